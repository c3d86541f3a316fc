//! cutover's configuration: the TOML file, environment overrides, and the
//! validation that turns both into typed settings.
//!
//! Every key can be overridden by an environment variable named
//! `CUTOVER_<SECTION>__<KEY>` (`CUTOVER_OLD__URL`, `CUTOVER_ADMIN__TOKEN`).
//! Unknown keys are errors, and every error names the key and the reason, so
//! an operator never runs with a setting that was silently ignored.

mod url;

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use url::{BackendUrl, RootCert, SslMode, Target, TlsSettings};

/// A configuration problem, naming the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(String),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// The raw shape of the file. `deny_unknown_fields` makes a typo an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    admin: RawAdmin,
    old: RawBackend,
    new: Option<RawBackend>,
    #[serde(default)]
    mirror: RawMirror,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    cutover: RawCutover,
    #[serde(default)]
    schema: RawSchema,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    #[serde(default)]
    columns: Vec<RawColumn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    table: String,
    column: String,
    #[serde(rename = "type")]
    pg_type: String,
    storage: Option<String>,
}

/// What an operator says of a SQLite column that its declaration and data
/// cannot settle: the PostgreSQL type on new and, optionally, how the file
/// stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSetting {
    pub table: String,
    pub column: String,
    pub pg_type: String,
    pub storage: Option<String>,
}

/// Storage codecs a `[[schema.columns]]` entry may name.
pub const STORAGES: &[&str] = &[
    "native",
    "unix_s",
    "unix_ms",
    "iso_text",
    "bool_int",
    "bool_text",
    "date_text",
    "json_text",
];

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    strategy: Option<String>,
    shadow_percent: Option<u8>,
    shadow_concurrency: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCutover {
    max_pause_ms: Option<u64>,
    state_file: Option<PathBuf>,
}

/// How the read dial picks a backend for an eligible read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingStrategy {
    /// Each statement (or read-only transaction) draws on its own.
    Random,
    /// A stable hash of the client session: one session sees one backend.
    Session,
}

/// The read dial's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    pub strategy: RoutingStrategy,
    /// Percentage of the reads old serves that also run on new, compared.
    pub shadow_percent: u8,
    /// Shadow reads running at once at most; more are skipped.
    pub shadow_concurrency: u32,
}

/// Promote, rollback and the control state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutoverConfig {
    /// A promote or rollback whose write pause would exceed this is aborted
    /// and traffic resumes unchanged.
    pub max_pause: Duration,
    /// Where the control state (phase, primary, dial) is kept across
    /// restarts; not persisted when unset.
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    copy_chunk_rows: Option<u32>,
    copy_parallel_tables: Option<u32>,
    copy_max_rows_per_second: Option<u64>,
    sync: Option<bool>,
    sync_timeout_ms: Option<u64>,
}

/// How the initial copy runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// Rows per keyset chunk (each chunk is one transaction on each side).
    pub copy_chunk_rows: u32,
    /// Tables copied at the same time.
    pub copy_parallel_tables: u32,
    /// Throttle across all tables; 0 means as fast as the databases go.
    pub copy_max_rows_per_second: u64,
    /// Acknowledge a client's commit only once the secondary applied it.
    pub sync: bool,
    /// How long a commit waits for the secondary before it is acknowledged
    /// anyway and the secondary is marked lagging.
    pub sync_timeout: Duration,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            copy_chunk_rows: 10_000,
            copy_parallel_tables: 2,
            copy_max_rows_per_second: 0,
            sync: true,
            sync_timeout: Duration::from_millis(2_000),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<String>,
    max_client_connections: Option<u32>,
    max_message_bytes: Option<u64>,
    pool_timeout_ms: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    worker_threads: Option<u32>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    other_databases: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    method: Option<String>,
    #[serde(default)]
    users: Vec<RawUser>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password: Option<String>,
    password_env: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    url: String,
    pool_size: Option<u32>,
    /// For a SQLite file: the database name clients connect to.
    database: Option<String>,
}

/// How clients prove who they are to cutover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ScramSha256,
    Md5,
    Trust,
}

impl AuthMethod {
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Trust => "trust",
        }
    }
}

/// One entry of the user list: cutover authenticates the client with this
/// password and logs in to the backends as the same user with it.
#[derive(Clone)]
pub struct User {
    pub name: String,
    pub password: Option<String>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub max_client_connections: u32,
    pub max_message_bytes: usize,
    pub pool_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub connect_timeout: Duration,
    /// Threads running client sessions; 1 means a single-threaded runtime.
    pub worker_threads: usize,
    pub tls: Option<TlsFiles>,
    /// Databases other than the migrated one (`[old] url`'s) that clients
    /// may reach on the primary's server, passed through unmirrored and
    /// unrouted, as PgBouncer's `*` entry does; `["*"]` (the default) is
    /// every database, `[]` none.
    pub other_databases: Vec<String>,
}

impl ProxyConfig {
    /// Whether a client may reach `database`, which is not the migrated one.
    pub fn passes_through(&self, database: &str) -> bool {
        self.other_databases
            .iter()
            .any(|d| d == "*" || d == database)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub method: AuthMethod,
    pub users: Vec<User>,
}

impl AuthConfig {
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub url: BackendUrl,
    /// Sessions cutover may open to this backend; None: as many as the
    /// server accepts (`max_connections` less its reserved slots).
    pub pool_size: Option<u32>,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub auth: AuthConfig,
    pub admin: AdminConfig,
    pub old: BackendConfig,
    pub new: Option<BackendConfig>,
    pub mirror: MirrorConfig,
    pub routing: RoutingConfig,
    pub cutover: CutoverConfig,
    /// `[[schema.columns]]`: type and storage settings for SQLite columns.
    pub schema_columns: Vec<ColumnSetting>,
    /// `[log] level`: tracing's filter syntax (`info`, `cutover=debug,warn`);
    /// RUST_LOG, when set, wins.
    pub log_level: String,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9187";

impl Config {
    /// Loads `path` (TOML), applies `CUTOVER_*` environment overrides, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, vars)
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Load(format!(
                "file {} does not exist",
                path.display()
            )));
        }
        let env: std::collections::HashMap<String, String> = env.into_iter().collect();
        // Only CUTOVER_<SECTION>__<KEY> names a setting; other CUTOVER_*
        // variables (a wrapper script's CUTOVER_BIN) are not ours.
        let overrides: std::collections::HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix("CUTOVER_")
                    .and_then(|rest| rest.split_once("__"))
                    .is_some_and(|(section, key)| !section.is_empty() && !key.is_empty())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let source = config::Environment::with_prefix("CUTOVER")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(overrides));
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(source)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load(format!("{}: {e}", path.display())))?;
        Self::validate(raw, &env)
    }

    /// Parses configuration text (TOML) without environment overrides.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        Self::validate(raw, &std::collections::HashMap::new())
    }

    fn validate(
        raw: RawConfig,
        env: &std::collections::HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let listen = parse_addr(
            "proxy.listen",
            raw.proxy.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
        )?;
        let tls = match (raw.proxy.tls_cert, raw.proxy.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                for (k, p) in [("proxy.tls_cert", &cert), ("proxy.tls_key", &key)] {
                    if !p.is_file() {
                        return Err(ConfigError::invalid(
                            k,
                            format!("file {} does not exist", p.display()),
                        ));
                    }
                }
                Some(TlsFiles { cert, key })
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "proxy.tls_key",
                    "tls_cert is set, so tls_key must be set too",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "proxy.tls_cert",
                    "tls_key is set, so tls_cert must be set too",
                ))
            }
        };
        let max_message_bytes = raw.proxy.max_message_bytes.unwrap_or(64 * 1024 * 1024);
        if !(1024..=1 << 30).contains(&max_message_bytes) {
            return Err(ConfigError::invalid(
                "proxy.max_message_bytes",
                "must be between 1024 and 1073741824",
            ));
        }
        let max_client_connections = raw.proxy.max_client_connections.unwrap_or(1000);
        if max_client_connections == 0 {
            return Err(ConfigError::invalid(
                "proxy.max_client_connections",
                "must be at least 1",
            ));
        }
        let proxy = ProxyConfig {
            listen,
            max_client_connections,
            other_databases: raw
                .proxy
                .other_databases
                .unwrap_or_else(|| vec!["*".to_string()]),
            max_message_bytes: max_message_bytes as usize,
            // PgBouncer's query_wait_timeout: a client waits this long for
            // a session before it gets 53300.
            pool_timeout: Duration::from_millis(raw.proxy.pool_timeout_ms.unwrap_or(120_000)),
            shutdown_timeout: Duration::from_millis(
                raw.proxy.shutdown_timeout_ms.unwrap_or(30_000),
            ),
            // PgBouncer's server_connect_timeout: a login to a busy server
            // (SCRAM costs CPU) can take seconds.
            connect_timeout: Duration::from_millis(raw.proxy.connect_timeout_ms.unwrap_or(15_000)),
            worker_threads: match raw.proxy.worker_threads.unwrap_or(0) {
                0 => default_worker_threads(),
                n => n as usize,
            },
            tls,
        };

        let method = match raw.auth.method.as_deref().unwrap_or("scram-sha-256") {
            "scram-sha-256" => AuthMethod::ScramSha256,
            "md5" => AuthMethod::Md5,
            "trust" => AuthMethod::Trust,
            other => {
                return Err(ConfigError::invalid(
                    "auth.method",
                    format!(
                        "unknown method {other:?}; use \"scram-sha-256\", \"md5\" or \"trust\""
                    ),
                ))
            }
        };
        let mut users = Vec::new();
        for (i, u) in raw.auth.users.into_iter().enumerate() {
            let key = format!("auth.users[{i}]");
            if u.name.is_empty() {
                return Err(ConfigError::invalid(&key, "name must not be empty"));
            }
            let password = match (u.password, u.password_env) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        &key,
                        "set either password or password_env, not both",
                    ))
                }
                (Some(p), None) => Some(p),
                (None, Some(var)) => {
                    match env.get(&var).cloned().or_else(|| std::env::var(&var).ok()) {
                        Some(p) => Some(p),
                        None => {
                            return Err(ConfigError::invalid(
                                &format!("{key}.password_env"),
                                format!("environment variable {var} is not set"),
                            ))
                        }
                    }
                }
                (None, None) => None,
            };
            if password.is_none() && method != AuthMethod::Trust {
                return Err(ConfigError::invalid(
                    &key,
                    format!(
                        "user {:?} has no password, which auth.method = \"{}\" needs",
                        u.name,
                        method.name()
                    ),
                ));
            }
            users.push(User {
                name: u.name,
                password,
            });
        }

        let admin = AdminConfig {
            listen: parse_addr(
                "admin.listen",
                raw.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
            )?,
            token: raw.admin.token.filter(|t| !t.is_empty()),
        };
        let old = backend("old", raw.old)?;
        let new = raw.new.map(|b| backend("new", b)).transpose()?;
        if new.as_ref().is_some_and(|n| n.url.sqlite_path().is_some()) {
            return Err(ConfigError::invalid(
                "new.url",
                "the new database must be PostgreSQL (postgres://...)",
            ));
        }
        let mut schema_columns = Vec::new();
        for (i, c) in raw.schema.columns.into_iter().enumerate() {
            let key = format!("schema.columns[{i}]");
            for (name, value) in [
                ("table", &c.table),
                ("column", &c.column),
                ("type", &c.pg_type),
            ] {
                if value.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        &format!("{key}.{name}"),
                        "must not be empty",
                    ));
                }
            }
            if let Some(s) = c.storage.as_deref().filter(|s| !STORAGES.contains(s)) {
                return Err(ConfigError::invalid(
                    &format!("{key}.storage"),
                    format!("unknown storage {s:?}; use one of {}", STORAGES.join(", ")),
                ));
            }
            schema_columns.push(ColumnSetting {
                table: c.table,
                column: c.column,
                pg_type: c.pg_type,
                storage: c.storage,
            });
        }
        let defaults = MirrorConfig::default();
        let mirror = MirrorConfig {
            copy_chunk_rows: raw
                .mirror
                .copy_chunk_rows
                .unwrap_or(defaults.copy_chunk_rows),
            copy_parallel_tables: raw
                .mirror
                .copy_parallel_tables
                .unwrap_or(defaults.copy_parallel_tables),
            copy_max_rows_per_second: raw
                .mirror
                .copy_max_rows_per_second
                .unwrap_or(defaults.copy_max_rows_per_second),
            sync: raw.mirror.sync.unwrap_or(defaults.sync),
            sync_timeout: raw
                .mirror
                .sync_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.sync_timeout),
        };
        if mirror.sync_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "mirror.sync_timeout_ms",
                "must be at least 1",
            ));
        }
        let strategy = match raw.routing.strategy.as_deref().unwrap_or("random") {
            "random" => RoutingStrategy::Random,
            "session" => RoutingStrategy::Session,
            other => {
                return Err(ConfigError::invalid(
                    "routing.strategy",
                    format!("unknown strategy {other:?}; use \"random\" or \"session\""),
                ))
            }
        };
        let shadow_percent = raw.routing.shadow_percent.unwrap_or(0);
        if shadow_percent > 100 {
            return Err(ConfigError::invalid(
                "routing.shadow_percent",
                "must be between 0 and 100",
            ));
        }
        let shadow_concurrency = raw.routing.shadow_concurrency.unwrap_or(4);
        if !(1..=1024).contains(&shadow_concurrency) {
            return Err(ConfigError::invalid(
                "routing.shadow_concurrency",
                "must be between 1 and 1024",
            ));
        }
        let max_pause = Duration::from_millis(raw.cutover.max_pause_ms.unwrap_or(2_000));
        if max_pause.is_zero() || max_pause > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "cutover.max_pause_ms",
                "must be between 1 and 60000",
            ));
        }
        if !(1..=1_000_000).contains(&mirror.copy_chunk_rows) {
            return Err(ConfigError::invalid(
                "mirror.copy_chunk_rows",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=64).contains(&mirror.copy_parallel_tables) {
            return Err(ConfigError::invalid(
                "mirror.copy_parallel_tables",
                "must be between 1 and 64",
            ));
        }
        Ok(Config {
            proxy,
            auth: AuthConfig { method, users },
            admin,
            old,
            new,
            mirror,
            routing: RoutingConfig {
                strategy,
                shadow_percent,
                shadow_concurrency,
            },
            cutover: CutoverConfig {
                max_pause,
                state_file: raw.cutover.state_file,
            },
            schema_columns,
            log_level: match raw.log.level {
                Some(level) if level.trim().is_empty() => {
                    return Err(ConfigError::invalid("log.level", "must not be empty"))
                }
                Some(level) => level,
                None => "info".to_string(),
            },
        })
    }
}

/// Half the cores, at least one. A proxy's work is mostly waking peers; on a
/// machine it shares with databases or applications, extra threads cost more
/// in cross-thread wakeups than they win (see benches/README.md).
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() / 2).max(1))
        .unwrap_or(1)
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("{value:?} is not an address like \"127.0.0.1:6432\""),
        )
    })
}

fn backend(section: &str, raw: RawBackend) -> Result<BackendConfig, ConfigError> {
    let mut url = BackendUrl::parse(&raw.url)
        .map_err(|reason| ConfigError::invalid(&format!("{section}.url"), reason))?;
    match (raw.database, url.sqlite_path().is_some()) {
        (None, _) => {}
        (Some(name), true) if !name.is_empty() => url.database = name,
        (Some(_), true) => {
            return Err(ConfigError::invalid(
                &format!("{section}.database"),
                "must not be empty",
            ))
        }
        (Some(_), false) => {
            return Err(ConfigError::invalid(
                &format!("{section}.database"),
                "is for a SQLite file; a postgres:// URL names its database itself",
            ))
        }
    }
    let pool_size = raw.pool_size;
    if pool_size == Some(0) {
        return Err(ConfigError::invalid(
            &format!("{section}.pool_size"),
            "must be at least 1",
        ));
    }
    Ok(BackendConfig { url, pool_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [old]
        url = "postgres://cutover:secret@127.0.0.1:5432/app"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.proxy.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.old.url.database, "app");
        assert_eq!(c.old.pool_size, None);
        assert_eq!(c.proxy.pool_timeout, Duration::from_secs(120));
        assert_eq!(c.auth.method, AuthMethod::ScramSha256);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_toml(&format!("{MINIMAL}\npool_sise = 3\n")).unwrap_err();
        assert!(err.to_string().contains("pool_sise"), "{err}");
    }

    #[test]
    fn bad_method_names_the_key() {
        let err = Config::from_toml(&format!("[auth]\nmethod = \"ldap\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("auth.method"), "{err}");
    }

    #[test]
    fn environment_overrides_file() {
        let dir = std::env::temp_dir().join(format!("cutover-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let c = Config::load_with_env(
            &path,
            [
                (
                    "CUTOVER_OLD__URL".to_string(),
                    "postgres://u@127.0.0.1:7000/other".to_string(),
                ),
                ("CUTOVER_OLD__POOL_SIZE".to_string(), "7".to_string()),
                ("CUTOVER_BIN".to_string(), "/usr/bin/cutover".to_string()),
                ("CUTOVER_".to_string(), "x".to_string()),
            ],
        )
        .unwrap();
        assert_eq!(c.old.url.address(), "127.0.0.1:7000");
        assert_eq!(c.old.url.database, "other");
        assert_eq!(c.old.pool_size, Some(7));
    }

    #[test]
    fn sqlite_old_with_column_settings() {
        let c = Config::from_toml(
            r#"
            [old]
            url = "sqlite:///srv/app/data/app.db"
            database = "shop"
            [new]
            url = "postgres://cutover@127.0.0.1/app"
            [[schema.columns]]
            table = "analytics"
            column = "timestamp"
            type = "timestamptz"
            storage = "unix_ms"
            "#,
        )
        .unwrap();
        assert_eq!(c.old.url.database, "shop");
        assert_eq!(c.schema_columns[0].storage.as_deref(), Some("unix_ms"));
        let err = Config::from_toml(
            "[old]\nurl = \"sqlite:a.db\"\n[[schema.columns]]\ntable = \"t\"\ncolumn = \"c\"\ntype = \"bigint\"\nstorage = \"epoch\"\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("schema.columns[0].storage"),
            "{err}"
        );
        let err = Config::from_toml("[old]\nurl = \"sqlite:a.db\"\n[new]\nurl = \"sqlite:b.db\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("new.url"), "{err}");
        let err = Config::from_toml(&format!("{MINIMAL}database = \"x\"\n")).unwrap_err();
        assert!(err.to_string().contains("old.database"), "{err}");
    }

    #[test]
    fn password_env_is_resolved() {
        let dir = std::env::temp_dir().join(format!("cutover-config-pe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            format!(
                "[auth]\nusers = [{{ name = \"app\", password_env = \"APP_PW_X\" }}]\n{MINIMAL}"
            ),
        )
        .unwrap();
        let c = Config::load_with_env(&path, [("APP_PW_X".to_string(), "pw".to_string())]).unwrap();
        assert_eq!(c.auth.user("app").unwrap().password.as_deref(), Some("pw"));
        let err = Config::load_with_env(&path, []).unwrap_err();
        assert!(err.to_string().contains("APP_PW_X"), "{err}");
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/cutover.toml");
        let c = Config::load_with_env(&path, [("APP_DB_PASSWORD".to_string(), "pw".to_string())])
            .unwrap();
        assert_eq!(c.auth.user("app").unwrap().password.as_deref(), Some("pw"));
        assert_eq!(c.old.url.address(), "127.0.0.1:5432");
        assert!(c.new.is_none());
    }
}
