//! The `cutover` command: `serve` runs the daemon, `status` asks a running
//! one how it is, `demo` runs the daemon in front of a throwaway PostgreSQL.

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use cutover::cli_http;
use cutover::Server;
use cutover_config::Config;
use cutover_control::Status;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cutover",
    version,
    about = "PostgreSQL proxy for zero-downtime database migrations"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and its admin API.
    Serve {
        /// TOML configuration; every key can be overridden by CUTOVER_<SECTION>__<KEY>.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show a running cutover's phase, backends, pools, clients and mirroring.
    Status {
        #[command(flatten)]
        target: AdminTarget,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// The schema on new. `schema --config F` prints the PostgreSQL DDL
    /// for old (for a SQLite file: each column with its declaration, the
    /// storage found and the decisions the data could not settle).
    /// `schema copy` creates on new the tables old has and new lacks, as
    /// `mirror start` does (PostgreSQL old).
    Schema {
        #[command(subcommand)]
        action: Option<SchemaAction>,
        /// Configuration naming [old] (and, for PostgreSQL, [new]).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Convert the SQLite file [old] names into the empty PostgreSQL
    /// database [new] names, offline: schema, rows in resumable chunks,
    /// indexes and foreign keys, identity restarts, ANALYZE, then verify.
    /// Exit 1 naming table, key and value on anything not converted exactly.
    Convert {
        #[arg(long, short)]
        config: PathBuf,
        /// Rows per chunk (one PostgreSQL transaction each).
        #[arg(long, default_value_t = 10_000)]
        chunk_rows: u32,
        /// Tables copied at the same time, each on its own connection.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
    /// Control mirroring to the new database.
    Mirror {
        #[command(subcommand)]
        action: MirrorAction,
    },
    /// Prove old and new hold the same rows. Runs in the daemon (its
    /// verdict counts for promote; each chunk is compared at one point of
    /// the stream, exact under load), or alone with --standalone. Exit 1
    /// on differences.
    Verify {
        #[command(flatten)]
        check: CheckArgs,
        /// Which running cutover runs it (default: admin.listen from --config).
        #[arg(long)]
        admin: Option<String>,
        /// Bearer token (default: admin.token from --config, or CUTOVER_ADMIN__TOKEN).
        #[arg(long)]
        token: Option<String>,
        /// Verify here, without the daemon: needs --config with [old] and
        /// [new]; a differing chunk is re-checked after a delay instead.
        #[arg(long)]
        standalone: bool,
    },
    /// Re-copy from old the rows verify finds different, then verify again.
    Repair {
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Set the read dial: the percentage of eligible reads new serves.
    Reads {
        /// 0 to 100.
        percent: u8,
        #[command(flatten)]
        target: AdminTarget,
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Walk the read dial through stages, each held and watched: a stage
    /// whose reads on new fail above --max-error-rate (errors old would not
    /// raise) or run slower than --max-p99-ratio times old's sets the dial
    /// to 0 and stops, saying why. Runs in the daemon; `status` shows it.
    Ramp {
        /// Stages in percent, increasing: 10,25,50,75,100.
        #[arg(value_delimiter = ',', required_unless_present = "abort")]
        stages: Vec<u8>,
        /// How long each stage is held: 90s, 5m, 1h.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        hold: std::time::Duration,
        /// Failed reads on new allowed, in percent of those sent there: 1%.
        #[arg(long, default_value = "1%", value_parser = parse_percent)]
        max_error_rate: f64,
        /// p99 of reads on new over p99 of reads on old that ends the ramp.
        #[arg(long)]
        max_p99_ratio: Option<f64>,
        /// Shadow reads (routing.shadow_percent) that may disagree, in
        /// percent of those compared: 0.1%.
        #[arg(long, value_parser = parse_percent)]
        max_shadow_mismatch: Option<f64>,
        /// Start although the last ramp rolled back.
        #[arg(long)]
        acknowledge: bool,
        /// Stop the running ramp where it is.
        #[arg(long, conflicts_with_all = ["stages", "acknowledge"])]
        abort: bool,
        #[command(flatten)]
        target: AdminTarget,
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Make new the primary (write pause bounded by cutover.max_pause).
    Promote {
        /// Promote even if the stream lags or the last verify was not clean.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: AdminTarget,
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Before promotion: reads back to old. After: old becomes primary again.
    Rollback {
        #[command(flatten)]
        target: AdminTarget,
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// After promotion: stop the reverse stream and drop cutover's slots.
    Finalize {
        #[command(flatten)]
        target: AdminTarget,
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Start a throwaway PostgreSQL and serve it through cutover; Ctrl-C cleans up.
    Demo {
        /// Where clients connect.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
        /// Where the admin API listens.
        #[arg(long, default_value = "127.0.0.1:9187")]
        admin_listen: String,
    },
}

#[derive(Subcommand)]
enum SchemaAction {
    /// Create on new what old has and new lacks, in one transaction.
    Copy {
        /// Configuration naming the [old] and [new] databases.
        #[arg(long, short)]
        config: PathBuf,
        /// Print the statements instead of running them.
        #[arg(long)]
        print: bool,
    },
}

#[derive(Subcommand)]
enum MirrorAction {
    /// Check preconditions, create the slot, copy, then stream changes.
    /// Waits for the setup and exits non-zero with its error. Run it again
    /// after fixing the cause of a failed stream.
    Start {
        /// Let the copy empty tables on new that hold rows cutover did not
        /// copy there (every row in them is deleted first).
        #[arg(long)]
        clear_new: bool,
        /// Follow the copy with a progress bar until the stream runs.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// What verify and repair look at.
#[derive(Args)]
struct CheckArgs {
    /// Configuration naming the [old] and [new] databases (and the admin API).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Only this table (`name` or `schema.name`); repeatable.
    #[arg(long = "table")]
    tables: Vec<String>,
    /// Rows per checksum chunk.
    #[arg(long, default_value_t = 10_000)]
    chunk_rows: i64,
    /// Times a differing chunk is re-checked (0.5 s apart) before it is
    /// reported, so changes still in flight on the stream are not reported.
    #[arg(long, default_value_t = 5)]
    rechecks: u32,
    /// Continue an earlier verify from its recorded progress.
    #[arg(long)]
    resume: bool,
    /// Stop after this many chunks (continue later with --resume).
    #[arg(long)]
    max_chunks: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

impl CheckArgs {
    async fn connect(
        &self,
    ) -> anyhow::Result<(
        tokio_postgres::Client,
        tokio_postgres::Client,
        cutover_stream::VerifyOptions,
    )> {
        let path = self
            .config
            .as_deref()
            .context("--config FILE is needed to reach [old] and [new] directly")?;
        let config = Config::load(path)?;
        if let Some(file) = config.old.url.sqlite_path() {
            anyhow::bail!(
                "old is the SQLite file {}: verify and repair run in the daemon, at positions of its change stream (`cutover verify --admin URL`, POST /v1/repair)",
                file.display()
            );
        }
        let new = config
            .new
            .as_ref()
            .context("the configuration has no [new] section; add [new] url = ...")?;
        let old = cutover_stream::control_client(&config.old.url, "cutover-verify").await?;
        let new = cutover_stream::control_client(&new.url, "cutover-verify").await?;
        let options = cutover_stream::VerifyOptions {
            chunk_rows: self.chunk_rows.max(1),
            tables: self.tables.clone(),
            rechecks: self.rechecks,
            resume: self.resume,
            max_chunks: self.max_chunks,
            ..Default::default()
        };
        Ok((old, new, options))
    }

    fn print(&self, report: &cutover_stream::VerifyReport) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(report)?);
        } else {
            print!("{}", report.render());
        }
        if !report.complete {
            anyhow::bail!("verify is incomplete; continue with --resume")
        }
        if report.clean {
            Ok(())
        } else {
            anyhow::bail!("old and new differ")
        }
    }
}

async fn verify(check: CheckArgs) -> anyhow::Result<()> {
    let (old, new, options) = check.connect().await?;
    let report = cutover_stream::verify(&old, &new, &options).await?;
    check.print(&report)
}

/// Starts a verify in the daemon and follows it to its verdict, printing
/// progress on stderr.
fn verify_in_daemon(check: &CheckArgs, target: &AdminTarget) -> anyhow::Result<()> {
    if check.resume || check.max_chunks.is_some() {
        anyhow::bail!("--resume and --max-chunks apply to --standalone runs only");
    }
    let body = serde_json::json!({
        "tables": check.tables,
        "chunk_rows": check.chunk_rows.max(1),
    });
    call(target, "POST", "/v1/verify", &body.to_string()).map_err(|e| {
        e.context("verify runs in the daemon; without one, use `cutover verify --standalone --config FILE`")
    })?;
    let (base, _) = target.resolve()?;
    let mut shown = None;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let response = cli_http::request(&base, "GET", "/v1/status", None, None)?;
        let status: serde_json::Value =
            serde_json::from_str(&response.body).context("reading /v1/status")?;
        let v = &status["verify"];
        let line = format!(
            "verify: {} rows checked in {} chunks, {} different",
            v["rows_checked"].as_u64().unwrap_or(0),
            v["chunks"].as_u64().unwrap_or(0),
            v["rows_different"].as_u64().unwrap_or(0)
        );
        if shown.as_ref() != Some(&line) {
            eprintln!("{line}");
            shown = Some(line);
        }
        match v["state"].as_str() {
            Some("running") => continue,
            Some("failed") => anyhow::bail!(
                "verify failed: {}",
                v["error"].as_str().unwrap_or("no reason given")
            ),
            _ if v["report"]["source"] == "sqlite" => return print_sqlite_verify(&v["report"]),
            _ => {
                let report: cutover_stream::VerifyReport =
                    serde_json::from_value(v["report"].clone())
                        .context("reading the verify report from /v1/status")?;
                return check.print(&report);
            }
        }
    }
}

/// A SQLite old's verify report: each table's row counts and differences.
fn print_sqlite_verify(report: &serde_json::Value) -> anyhow::Result<()> {
    let tables = report["tables"].as_array().cloned().unwrap_or_default();
    for t in &tables {
        let differences = t["differences"].as_array().cloned().unwrap_or_default();
        println!(
            "{}: {} rows in SQLite, {} in PostgreSQL{}",
            t["table"].as_str().unwrap_or("?"),
            t["sqlite_rows"],
            t["postgres_rows"],
            if differences.is_empty() {
                ", equal"
            } else {
                ":"
            }
        );
        for d in differences {
            println!("  {}", d.as_str().unwrap_or_default());
        }
        if let Some(n) = t["repaired_rows"].as_u64().filter(|n| *n > 0) {
            println!("  repaired {n} rows from the file");
        }
    }
    if report["clean"] == true {
        println!("clean: every table equal at one position of the change stream");
        Ok(())
    } else {
        anyhow::bail!("differences found")
    }
}

async fn schema_copy(path: PathBuf, print: bool) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let new = config
        .new
        .as_ref()
        .context("the configuration has no [new] section; add [new] url = ...")?;
    let old = cutover_stream::control_client(&config.old.url, "cutover-schema").await?;
    let new = cutover_stream::control_client(&new.url, "cutover-schema").await?;
    let ddl = if print {
        cutover_stream::schema::missing_ddl(&old, &new).await?
    } else {
        cutover_stream::schema::create_missing(&old, &new).await?
    };
    for statement in &ddl {
        println!("{statement};");
    }
    if ddl.is_empty() {
        eprintln!("cutover: new already has every table old has");
    } else if !print {
        eprintln!("cutover: created {} objects on new", ddl.len());
    }
    Ok(())
}

/// The schema map of the SQLite file `config`'s [old] names, with its
/// `[[schema.columns]]` settings.
fn sqlite_map(config: &Config) -> anyhow::Result<(PathBuf, cutover_sqlite::SchemaMap)> {
    let path = config
        .old
        .url
        .sqlite_path()
        .context("old.url is not a SQLite file")?
        .to_path_buf();
    if !path.is_file() {
        anyhow::bail!("old.url: the SQLite file {} does not exist", path.display());
    }
    let map = cutover_sqlite::SchemaMap::read_file(&path, &config.schema_columns, 2)
        .with_context(|| format!("reading the SQLite file {}", path.display()))?;
    Ok((path, map))
}

async fn schema_print(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    if config.old.url.sqlite_path().is_none() {
        return schema_copy(path, true).await;
    }
    let (_, map) = sqlite_map(&config)?;
    print!("{}", map.ddl());
    for t in &map.tables {
        for (key, column, value) in &t.bad_values {
            eprintln!(
                "cutover: {}: key {key}, column {column}: {value:?} does not fit {}",
                t.name,
                t.columns
                    .iter()
                    .find(|c| &c.name == column)
                    .map(|c| c.pg_type.as_str())
                    .unwrap_or("its type")
            );
        }
    }
    Ok(())
}

async fn convert(path: PathBuf, chunk_rows: u32, jobs: usize) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let new = config
        .new
        .as_ref()
        .context("the configuration has no [new] section; add [new] url = \"postgres://...\"")?;
    let started = std::time::Instant::now();
    let (file, map) = sqlite_map(&config)?;
    eprintln!(
        "cutover: read the schema map of {} tables at {:.1}s",
        map.tables.len(),
        started.elapsed().as_secs_f64()
    );
    let mut pgs = Vec::new();
    for _ in 0..jobs.max(1) {
        pgs.push(cutover_stream::control_client(&new.url, "cutover-convert").await?);
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:12} [{bar:30}] {pos}/{len} rows {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let at = || started.elapsed().as_secs_f64();
    let events = |e: cutover_sqlite::convert::Event| match e {
        cutover_sqlite::convert::Event::Started { total, done } => {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message("copying");
            if done > 0 {
                bar.suspend(|| eprintln!("cutover: resuming with {done} of {total} rows copied"));
            }
        }
        cutover_sqlite::convert::Event::Rows { rows, .. } => bar.inc(rows),
        cutover_sqlite::convert::Event::TableDone { table, rows } => {
            bar.suspend(|| eprintln!("cutover: copied {table} ({rows} rows) at {:.1}s", at()));
        }
        cutover_sqlite::convert::Event::Step(step) => {
            bar.finish_and_clear();
            eprintln!("cutover: {step} at {:.1}s", at());
        }
    };
    let checks = cutover_sqlite::convert::convert(
        &file,
        &map,
        &pgs,
        &cutover_sqlite::convert::Options {
            chunk_rows,
            throttle: cutover_sqlite::convert::Throttle::new(0),
        },
        &events,
    )
    .await;
    bar.finish_and_clear();
    let cutover_sqlite::convert::Converted { checks, warnings } = checks?;
    let mut clean = true;
    for c in &checks {
        if c.clean() {
            println!(
                "{}: {} rows, content hash {:016x} on both sides",
                c.table, c.sqlite_rows, c.sqlite_hash
            );
        } else {
            clean = false;
            println!(
                "{}: DIFFERS: {} rows in SQLite, {} in PostgreSQL",
                c.table, c.sqlite_rows, c.postgres_rows
            );
            for d in &c.differences {
                println!("  {d}");
            }
        }
    }
    for (name, why) in &map.skipped {
        println!("{name}: not converted: {why}");
    }
    for w in &warnings {
        eprintln!("cutover: warning: {w}");
    }
    let rows: u64 = checks.iter().map(|c| c.sqlite_rows).sum();
    eprintln!(
        "cutover: converted {} tables, {rows} rows in {:.1}s",
        checks.len(),
        started.elapsed().as_secs_f64()
    );
    if !clean {
        anyhow::bail!("verify found differences between the SQLite file and PostgreSQL");
    }
    Ok(())
}

async fn repair(check: CheckArgs) -> anyhow::Result<()> {
    let (old, new, options) = check.connect().await?;
    let report = cutover_stream::verify(&old, &new, &options).await?;
    if report.clean {
        return check.print(&report);
    }
    let (repaired, again) = cutover_stream::repair(&old, &new, &report, &options).await?;
    if !check.json {
        println!("repaired {repaired} rows; verifying again");
    }
    check.print(&again)
}

/// Which running cutover to talk to.
#[derive(Args)]
struct AdminTarget {
    /// Admin API base URL (default: admin.listen from --config, else http://127.0.0.1:9187).
    #[arg(long)]
    admin: Option<String>,
    /// Read the admin address and token from this configuration.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Bearer token for mutating calls (default: admin.token from --config, or CUTOVER_ADMIN__TOKEN).
    #[arg(long)]
    token: Option<String>,
}

impl AdminTarget {
    fn resolve(&self) -> anyhow::Result<(String, Option<String>)> {
        let config = self.config.as_deref().map(Config::load).transpose()?;
        let base = match (&self.admin, &config) {
            (Some(url), _) => url.clone(),
            (None, Some(c)) => format!("http://{}", c.admin.listen),
            (None, None) => format!("http://{}", cutover_config::DEFAULT_ADMIN_LISTEN),
        };
        let token = self
            .token
            .clone()
            .or_else(|| config.and_then(|c| c.admin.token))
            .or_else(|| {
                std::env::var("CUTOVER_ADMIN__TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty())
            });
        Ok((base, token))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = init_logging(cli.log_format);
    match cli.command {
        Command::Serve { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("cutover: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = set_log_level(&log, &config.log_level) {
                eprintln!("cutover: {e}");
                return ExitCode::from(2);
            }
            report(
                runtime(config.proxy.worker_threads)
                    .and_then(|rt| rt.block_on(serve(path, config, log))),
            )
        }
        Command::Status { target, json } => report(status(&target, json)),
        Command::Schema {
            action: Some(SchemaAction::Copy { config, print }),
            ..
        } => report(runtime(1).and_then(|rt| rt.block_on(schema_copy(config, print)))),
        Command::Schema {
            action: None,
            config: Some(config),
        } => report(runtime(1).and_then(|rt| rt.block_on(schema_print(config)))),
        Command::Schema {
            action: None,
            config: None,
        } => report(Err(anyhow::anyhow!(
            "cutover schema needs --config FILE (print the DDL) or a subcommand (copy)"
        ))),
        Command::Convert {
            config,
            chunk_rows,
            jobs,
        } => report(runtime(2).and_then(|rt| rt.block_on(convert(config, chunk_rows, jobs)))),
        Command::Mirror {
            action:
                MirrorAction::Start {
                    clear_new,
                    wait,
                    target,
                },
        } => report(mirror_start(&target, clear_new, wait)),
        Command::Reads {
            percent,
            target,
            json,
        } => report(control(
            &target,
            "PUT",
            "/v1/reads",
            &format!(r#"{{"percent": {percent}}}"#),
            json,
        )),
        Command::Ramp {
            stages,
            hold,
            max_error_rate,
            max_p99_ratio,
            max_shadow_mismatch,
            acknowledge,
            abort,
            target,
            json,
        } => report(ramp(
            &target,
            abort,
            &serde_json::json!({
                "stages": stages,
                "hold_seconds": hold.as_secs_f64(),
                "max_error_rate_percent": max_error_rate,
                "max_p99_ratio": max_p99_ratio,
                "max_shadow_mismatch_percent": max_shadow_mismatch,
                "acknowledge": acknowledge,
            }),
            json,
        )),
        Command::Promote {
            force,
            target,
            json,
        } => report(control(
            &target,
            "POST",
            "/v1/promote",
            &format!(r#"{{"force": {force}}}"#),
            json,
        )),
        Command::Rollback { target, json } => {
            report(control(&target, "POST", "/v1/rollback", "{}", json))
        }
        Command::Finalize { target, json } => {
            report(control(&target, "POST", "/v1/finalize", "{}", json))
        }
        Command::Verify {
            check,
            admin,
            token,
            standalone,
        } => {
            if standalone {
                report(runtime(1).and_then(|rt| rt.block_on(verify(check))))
            } else {
                let target = AdminTarget {
                    admin,
                    config: check.config.clone(),
                    token,
                };
                report(verify_in_daemon(&check, &target))
            }
        }
        Command::Repair { check } => report(runtime(1).and_then(|rt| rt.block_on(repair(check)))),
        Command::Demo {
            listen,
            admin_listen,
        } => match ensure_postgres() {
            Err(code) => code,
            Ok(()) => report(
                runtime(cutover_config::default_worker_threads())
                    .and_then(|rt| rt.block_on(demo(listen, admin_listen))),
            ),
        },
    }
}

/// PostgreSQL's server binaries for `demo`: found; or, missing, installed
/// with apt-get when running as root where apt-get exists (as `.ci/run`
/// does); or else the one command that installs them is printed and the
/// exit status is 2.
fn ensure_postgres() -> Result<(), ExitCode> {
    let missing = match cutover_pgcluster::find_bindir() {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let apt = std::path::Path::new("/usr/bin/apt-get").is_file();
    let chosen = std::env::var_os("CUTOVER_PG_BINDIR").is_some();
    if apt && !chosen && cutover_pgcluster::running_as_root() {
        eprintln!("cutover demo: PostgreSQL's server binaries are missing; installing them: apt-get install -y postgresql");
        let apt_get = |args: &[&str]| {
            std::process::Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        if apt_get(&["update", "-qq"])
            && apt_get(&["install", "-y", "-qq", "postgresql"])
            && cutover_pgcluster::find_bindir().is_ok()
        {
            return Ok(());
        }
        eprintln!("cutover demo: apt-get could not install postgresql; install it, then run the demo again");
        return Err(ExitCode::from(2));
    }
    if chosen {
        eprintln!("cutover demo: {missing}");
        return Err(ExitCode::from(2));
    }
    let command = if apt {
        "sudo apt-get install -y postgresql"
    } else if std::path::Path::new("/opt/homebrew/bin/brew").is_file()
        || std::path::Path::new("/usr/local/bin/brew").is_file()
    {
        "brew install postgresql"
    } else {
        "your system's PostgreSQL server package (it holds initdb and pg_ctl)"
    };
    eprintln!(
        "cutover demo: PostgreSQL's server binaries (initdb, pg_ctl) are not installed; install them with:\n  {command}\nthen run the demo again"
    );
    Err(ExitCode::from(2))
}

/// The work-stealing runtime with `threads` workers. Measured on 2 cores
/// (benches/README.md): one worker costs less CPU per query than two, and
/// has lower single-client latency than the current-thread runtime.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cutover: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter, changeable at run time (SIGHUP applies `log.level`).
type LogFilter =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn init_logging(format: LogFormat) -> LogFilter {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry.with(layer).init(),
        LogFormat::Json => registry.with(layer.json()).init(),
    }
    handle
}

/// Applies `log.level` unless RUST_LOG decides.
fn set_log_level(filter: &LogFilter, level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(());
    }
    let parsed = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("config key `log.level`: {level:?} is not a log filter: {e}"))?;
    filter.reload(parsed).map_err(|e| e.to_string())
}

async fn serve(path: PathBuf, config: Config, log: LogFilter) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let server = Server::start(config).await?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let stop = wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            stopped = &mut stop => {
                stopped?;
                break;
            }
            _ = hangup.recv() => reload(&server, &path, &log),
        }
    }
    tracing::info!("signal received; shutting down");
    server.shutdown().await;
    Ok(())
}

/// SIGHUP: reads the configuration again and applies what can change
/// without a restart, as PgBouncer's RELOAD does; a file that does not load
/// changes nothing.
fn reload(server: &Server, path: &std::path::Path, log: &LogFilter) {
    let config = Config::load(path).map_err(|e| e.to_string()).and_then(|c| {
        set_log_level(log, &c.log_level)?;
        Ok(c)
    });
    match config {
        Err(e) => {
            server.reload_failed();
            tracing::error!(error = %e, "configuration reload refused; nothing changed");
        }
        Ok(config) => {
            let restart = server.reload(&config);
            if restart.is_empty() {
                tracing::info!(
                    "configuration reloaded: users, pool sizes, routing strategy and log level"
                );
            } else {
                tracing::warn!(
                    needs_restart = ?restart,
                    "configuration reloaded: users, pool sizes, routing strategy and log level; the sections named differ but need a restart and run as before"
                );
            }
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn mirror_start(target: &AdminTarget, clear_new: bool, wait: bool) -> anyhow::Result<()> {
    let doc = call(
        target,
        "POST",
        "/v1/mirror/start",
        &format!(r#"{{"clear_new": {clear_new}}}"#),
    )?;
    if !wait {
        println!(
            "mirroring started at {}; the copy runs now, follow it with `cutover status`",
            doc["start_lsn"].as_str().unwrap_or("?")
        );
        return Ok(());
    }
    // The copy's progress from /v1/status until the stream runs.
    let (base, _) = target.resolve()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "copy [{bar:30}] {pos}/{len} rows {per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    loop {
        let response = cli_http::request(&base, "GET", "/v1/status", None, None)?;
        let status: serde_json::Value =
            serde_json::from_str(&response.body).context("reading /v1/status")?;
        let mirror = &status["mirror"];
        let tables = mirror["copy"].as_array().cloned().unwrap_or_default();
        let sum = |key: &str| -> u64 { tables.iter().map(|t| t[key].as_u64().unwrap_or(0)).sum() };
        let (rows, estimated) = (sum("rows"), sum("estimated_rows"));
        bar.set_length(estimated.max(rows));
        bar.set_position(rows);
        let left = tables.iter().filter(|t| t["done"] != true).count();
        bar.set_message(format!("{left} tables left"));
        match mirror["state"].as_str() {
            Some("streaming") => {
                bar.finish_and_clear();
                println!(
                    "copied {rows} rows of {} tables; the change stream runs",
                    tables.len()
                );
                return Ok(());
            }
            Some("failed") => {
                bar.abandon();
                anyhow::bail!(
                    "mirroring failed: {}",
                    mirror["error"].as_str().unwrap_or("no reason given")
                );
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(250)),
        }
    }
}

/// Calls a mutating endpoint; a refusal is an error carrying its reason.
fn call(
    target: &AdminTarget,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<serde_json::Value> {
    let (base, token) = target.resolve()?;
    let response = cli_http::request(&base, method, path, Some(body), token.as_deref())?;
    let doc = serde_json::from_str::<serde_json::Value>(&response.body).ok();
    if response.status != 200 {
        let reason = doc
            .as_ref()
            .and_then(|v| v["reason"].as_str().map(str::to_string))
            .unwrap_or(response.body);
        anyhow::bail!("refused ({}): {reason}", response.status);
    }
    Ok(doc.unwrap_or_default())
}

fn ramp(
    target: &AdminTarget,
    abort: bool,
    request: &serde_json::Value,
    json: bool,
) -> anyhow::Result<()> {
    let doc = if abort {
        call(target, "POST", "/v1/ramp/abort", "")?
    } else {
        call(target, "POST", "/v1/ramp", &request.to_string())?
    };
    if json {
        println!("{doc}");
    } else {
        println!("{}", ramp_line(&doc));
    }
    Ok(())
}

/// `90s`, `5m`, `1h`, or seconds.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 5m or 1h"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{text:?}: use s, m or h")),
    };
    Ok(std::time::Duration::from_secs_f64(seconds))
}

/// `1%` or `1` (percent).
fn parse_percent(text: &str) -> Result<f64, String> {
    text.trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage like 1%"))
}

/// The ramp as one line: where it is and what it saw, or how it ended.
fn ramp_line(r: &serde_json::Value) -> String {
    let stage = r["stage"].as_u64().unwrap_or(0) + 1;
    let stages = r["stages"].as_array().map(Vec::len).unwrap_or(0);
    let percent = r["percent"].as_u64().unwrap_or(0);
    let figures = match r["figures"].as_object() {
        Some(f) => format!(
            "; new: {} reads, {} errors",
            f["reads"].as_u64().unwrap_or(0),
            f["errors"].as_u64().unwrap_or(0)
        ),
        None => String::new(),
    };
    match r["state"].as_str() {
        Some("running") => {
            let left = r["remaining_seconds"].as_u64().unwrap_or(0);
            format!(
                "ramp: stage {stage} of {stages} ({percent}%), {}m{:02}s left{figures}",
                left / 60,
                left % 60
            )
        }
        Some("completed") => format!("ramp: completed, reads {percent}% on new{figures}"),
        Some(state) => format!(
            "ramp: {}: {}",
            state.replace('_', " "),
            r["reason"].as_str().unwrap_or("")
        ),
        None => "ramp: -".to_string(),
    }
}

/// A control-state change: prints the resulting state.
fn control(
    target: &AdminTarget,
    method: &str,
    path: &str,
    body: &str,
    json: bool,
) -> anyhow::Result<()> {
    let doc = call(target, method, path, body)?;
    if json {
        println!("{doc}");
        return Ok(());
    }
    let mut line = format!(
        "phase {}, primary {}, reads on new {}%",
        doc["phase"].as_str().unwrap_or("?"),
        doc["primary"].as_str().unwrap_or("?"),
        doc["read_percent"]
    );
    if let Some(ms) = doc["pause_ms"].as_f64() {
        line.push_str(&format!(", write pause {ms:.1} ms"));
    }
    println!("{line}");
    Ok(())
}

fn status(target: &AdminTarget, json: bool) -> anyhow::Result<()> {
    let (base, _) = target.resolve()?;
    let response = cli_http::request(&base, "GET", "/v1/status", None, None)?;
    if response.status != 200 {
        anyhow::bail!("admin API answered {}: {}", response.status, response.body);
    }
    if json {
        println!("{}", response.body);
        return Ok(());
    }
    let status: Status = serde_json::from_str(&response.body).context("reading /v1/status")?;
    print!("{}", render_status(&status));
    Ok(())
}

fn render_status(s: &Status) -> String {
    let mut out = format!(
        "cutover {}  up {}s\nphase:   {}\nprimary: {}\nreads:   {}% on new{}\nclients: {}\n",
        s.version,
        s.uptime_seconds,
        s.phase,
        s.primary,
        s.read_percent,
        if s.secondary_lagging {
            " (secondary lagging: reads on the primary)"
        } else {
            ""
        },
        s.clients
    );
    if s.write_paused {
        out.push_str("writes:  PAUSED (a promote or rollback is swapping the primary)\n");
    }
    if let Some(r) = &s.ramp {
        out.push_str(&ramp_line(r));
        out.push('\n');
    }
    out.push('\n');
    out.push_str("BACKEND  ROLE       ADDRESS                DATABASE   HEALTH   POOL (in use/idle/waiting of size)\n");
    for b in &s.backends {
        let health = match b.healthy {
            None => "unknown",
            Some(true) => "up",
            Some(false) => "DOWN",
        };
        let pool = b
            .pool
            .map(|p| format!("{}/{}/{} of {}", p.in_use, p.idle, p.waiting, p.size))
            .unwrap_or_else(|| "-".to_string());
        out.push_str(&format!(
            "{:<8} {:<10} {:<22} {:<10} {:<8} {}\n",
            b.name, b.role, b.address, b.database, health, pool
        ));
        if let Some(e) = &b.last_error {
            out.push_str(&format!("         last error: {e}\n"));
        }
    }
    if let Some(m) = &s.mirror {
        let text = |k: &str| m[k].as_str().unwrap_or("-").to_string();
        out.push_str(&format!(
            "\nstream:  from {}  {}  applied {}  primary {}  lag {} bytes / {:.1}s  ({} transactions, {} rows applied)\n",
            text("from"),
            text("state"),
            text("applied_lsn"),
            text("primary_lsn"),
            m["lag_bytes"].as_u64().unwrap_or(0),
            m["lag_seconds"].as_f64().unwrap_or(0.0),
            m["applied_transactions"].as_u64().unwrap_or(0),
            m["applied_rows"].as_u64().unwrap_or(0),
        ));
        if let Some(e) = m["error"].as_str() {
            out.push_str(&format!("         error: {e}\n"));
        }
        match m["state"].as_str() {
            Some("failed") => out.push_str(
                "         stopped: reads stay on the primary; fix the error, then `cutover mirror start`\n",
            ),
            Some("copying") => out.push_str(
                "         not ready: the dial and promote wait until every table is copied\n",
            ),
            _ => {}
        }
        for t in m["copy"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "         copy {:<40} {}\n",
                t["table"].as_str().unwrap_or("?"),
                progress_bar(
                    t["rows"].as_u64().unwrap_or(0),
                    t["estimated_rows"].as_u64().unwrap_or(0),
                    t["done"].as_bool().unwrap_or(false)
                )
            ));
        }
    }
    if let Some(v) = &s.verify {
        out.push_str(&format!(
            "verify:  {}  {} rows checked, {} different\n",
            v["state"].as_str().unwrap_or("-"),
            v["rows_checked"].as_u64().unwrap_or(0),
            v["rows_different"].as_u64().unwrap_or(0)
        ));
    }
    if let Some(p) = &s.last_pause {
        out.push_str(&format!(
            "pause:   last write pause {:.1} ms (to {}, {})\n",
            p["milliseconds"].as_f64().unwrap_or(0.0),
            p["to"].as_str().unwrap_or("?"),
            if p["completed"].as_bool().unwrap_or(false) {
                "completed"
            } else {
                "aborted"
            }
        ));
    }
    out
}

/// `[#####.....]  52%  5200 rows` from rows copied and the planner's estimate.
fn progress_bar(rows: u64, estimate: u64, done: bool) -> String {
    let fraction = if done {
        1.0
    } else if estimate == 0 {
        0.0
    } else {
        (rows as f64 / estimate as f64).min(0.99)
    };
    let filled = (fraction * 20.0).round() as usize;
    format!(
        "[{}{}] {:>3.0}%  {rows} rows",
        "#".repeat(filled),
        ".".repeat(20 - filled),
        fraction * 100.0
    )
}

async fn demo(listen: String, admin_listen: String) -> anyhow::Result<()> {
    eprintln!("cutover demo: starting two throwaway PostgreSQL clusters (old and new)...");
    let start = || {
        tokio::task::spawn_blocking(|| {
            cutover_pgcluster::Cluster::start(cutover_pgcluster::ClusterOptions::default())
        })
    };
    let (old, new) = (start().await??, start().await??);
    // The same small schema on both (cutover copies rows, not DDL), rows on old.
    for cluster in [&old, &new] {
        cluster.psql("postgres", "CREATE ROLE app LOGIN PASSWORD 'app'")?;
        cluster.psql("postgres", "CREATE DATABASE app OWNER app")?;
        cluster.psql(
            "app",
            "CREATE TABLE accounts (id serial PRIMARY KEY, owner text NOT NULL, balance int NOT NULL); \
             GRANT ALL ON accounts, accounts_id_seq TO app",
        )?;
    }
    old.psql(
        "app",
        "INSERT INTO accounts (owner, balance) SELECT 'owner ' || g, g * 10 FROM generate_series(1, 1000) g",
    )?;
    let url = |c: &cutover_pgcluster::Cluster| {
        c.url(
            cutover_pgcluster::SUPERUSER,
            cutover_pgcluster::SUPERUSER_PASSWORD,
            "app",
        )
    };
    let config = Config::from_toml(&format!(
        r#"
        [proxy]
        listen = "{listen}"
        shutdown_timeout_ms = 2000
        [auth]
        method = "scram-sha-256"
        users = [{{ name = "app", password = "app" }}]
        [admin]
        listen = "{admin_listen}"
        [old]
        url = "{}"
        pool_size = 20
        [new]
        url = "{}"
        pool_size = 20
        "#,
        url(&old),
        url(&new)
    ))?;
    let server = Server::start(config).await?;
    let admin = format!("--admin http://{admin_listen}");
    println!();
    println!(
        "  PostgreSQL {}: old on 127.0.0.1:{}, new on 127.0.0.1:{} (data in temporary directories)",
        old.bindir().display(),
        old.port(),
        new.port()
    );
    println!("  cutover listens on {listen}; connect with:");
    println!();
    println!(
        "    psql \"postgres://app:app@{listen}/app\"      (table `accounts`, 1000 rows on old)"
    );
    println!();
    println!("  then walk the migration (in another terminal):");
    let exe = std::env::current_exe()
        .ok()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "cutover".to_string());
    for step in [
        "status",
        "mirror start",
        "verify",
        "reads 50",
        "promote",
        "rollback",
    ] {
        println!("    {exe} {step} {admin}");
    }
    println!("  metrics: curl http://{admin_listen}/metrics");
    println!();
    println!("  Ctrl-C stops cutover and deletes both databases.");
    wait_for_signal().await?;
    eprintln!("cutover demo: stopping");
    server.shutdown().await;
    drop((old, new));
    Ok(())
}
