//! Throwaway PostgreSQL clusters on loopback ports, made with the system's
//! own `initdb` and `pg_ctl`: for `cutover demo` and the end-to-end tests.
//!
//! PostgreSQL refuses to run as root, so when this process is root the
//! server runs as an unprivileged account (`CUTOVER_PG_OS_USER`, default
//! `postgres`, which Debian's packages create) through `runuser`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Superuser created in every cluster; its password is [`SUPERUSER_PASSWORD`].
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "postgres-pw";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("PostgreSQL server binaries (initdb, pg_ctl) not found in `pg_config --bindir`, /usr/lib/postgresql/*/bin or PATH; install them, e.g. `sudo apt-get install -y postgresql` on Debian/Ubuntu or `brew install postgresql` on macOS")]
    NoBinaries,
    #[error("CUTOVER_PG_BINDIR={0} holds no initdb and pg_ctl")]
    NotInBindir(String),
    #[error("running as root, and PostgreSQL refuses to: create an unprivileged account (`useradd -r postgres`) or name one in CUTOVER_PG_OS_USER")]
    NoUnprivilegedUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How clients over TCP must authenticate (pg_hba `host` lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAuth {
    Trust,
    Md5,
    ScramSha256,
    Password,
}

impl HostAuth {
    fn hba(self) -> &'static str {
        match self {
            HostAuth::Trust => "trust",
            HostAuth::Md5 => "md5",
            HostAuth::ScramSha256 => "scram-sha-256",
            HostAuth::Password => "password",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub host_auth: HostAuth,
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<String>,
    /// Serve TLS with this certificate and accept TCP clients only over
    /// TLS (pg_hba `hostssl`).
    pub tls: Option<ServerCert>,
}

/// A server certificate and its key, PEM files.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            host_auth: HostAuth::ScramSha256,
            settings: Vec::new(),
            tls: None,
        }
    }
}

/// A running cluster; stopped and deleted on drop.
pub struct Cluster {
    bindir: PathBuf,
    root: PathBuf,
    data: PathBuf,
    port: u16,
    os_user: Option<String>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The directory holding `initdb`, `pg_ctl`, `psql` and `pgbench`.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    // An explicit directory is the only one looked at.
    if let Some(dir) = std::env::var_os("CUTOVER_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_tools(&dir) {
            Ok(dir)
        } else {
            Err(ClusterError::NotInBindir(dir.display().to_string()))
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_tools(&dir) {
            return Ok(dir);
        }
    }
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let dir = e.path().join("bin");
            has_tools(&dir).then_some((version, dir))
        })
        .collect();
    versioned.sort();
    if let Some((_, dir)) = versioned.pop() {
        return Ok(dir);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_tools(dir))
        .ok_or(ClusterError::NoBinaries)
}

/// Whether this process runs as root.
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn os_user_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, name]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// A free loopback TCP port (bound and released; the caller retries on a race).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn check(what: &str, output: std::io::Result<Output>) -> Result<Output, ClusterError> {
    let output = output?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(ClusterError::Command {
            what: what.to_string(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

impl Cluster {
    /// initdb + start on a free port.
    pub fn start(options: ClusterOptions) -> Result<Cluster, ClusterError> {
        let bindir = find_bindir()?;
        let os_user = if running_as_root() {
            let name =
                std::env::var("CUTOVER_PG_OS_USER").unwrap_or_else(|_| "postgres".to_string());
            if os_user_ids(&name).is_none() {
                return Err(ClusterError::NoUnprivilegedUser);
            }
            Some(name)
        } else {
            None
        };
        let root = std::env::temp_dir().join(format!(
            "cutover-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        if root.exists() {
            std::fs::remove_dir_all(&root)?;
        }
        std::fs::create_dir_all(&root)?;
        let mut cluster = Cluster {
            data: root.join("data"),
            bindir,
            root,
            port: 0,
            os_user,
        };
        cluster.init(&options)?;
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClusterError::NoBinaries))
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        match &self.os_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn init(&self, options: &ClusterOptions) -> Result<(), ClusterError> {
        let pwfile = self.root.join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        if let Some(user) = &self.os_user {
            let (uid, gid) = os_user_ids(user).ok_or(ClusterError::NoUnprivilegedUser)?;
            std::os::unix::fs::chown(&self.root, Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
        }
        check(
            "initdb",
            self.command("initdb")
                .arg("-D")
                .arg(&self.data)
                .args(["-U", SUPERUSER, "-N", "-E", "UTF8", "--locale=C"])
                .args(["--auth-local=trust", "--auth-host", options.host_auth.hba()])
                .arg(format!("--pwfile={}", pwfile.display()))
                .output(),
        )?;
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            "unix_socket_directories = ''".to_string(),
            "fsync = off".to_string(),
            "full_page_writes = off".to_string(),
            "max_connections = 300".to_string(),
            "shared_buffers = 32MB".to_string(),
            "wal_level = logical".to_string(),
            "max_replication_slots = 10".to_string(),
            "max_wal_senders = 10".to_string(),
        ];
        if options.host_auth == HostAuth::Md5 {
            conf.push("password_encryption = md5".to_string());
        }
        if let Some(tls) = &options.tls {
            self.install_cert(tls)?;
            conf.push("ssl = on".to_string());
        }
        conf.extend(options.settings.iter().cloned());
        let path = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path)?;
        text.push_str("\n# cutover-pgcluster\n");
        for line in conf {
            text.push_str(&line);
            text.push('\n');
        }
        std::fs::write(&path, text)?;
        Ok(())
    }

    /// Copies the certificate and key into the data directory, owned by
    /// the server's user and private as PostgreSQL requires, and makes
    /// every TCP login use TLS.
    fn install_cert(&self, tls: &ServerCert) -> Result<(), ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        for (from, name) in [(&tls.cert, "server.crt"), (&tls.key, "server.key")] {
            let to = self.data.join(name);
            std::fs::copy(from, &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))?;
            if let Some(user) = &self.os_user {
                let (uid, gid) = os_user_ids(user).ok_or(ClusterError::NoUnprivilegedUser)?;
                std::os::unix::fs::chown(&to, Some(uid), Some(gid))?;
            }
        }
        let hba = self.data.join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba)?
            .lines()
            .map(|line| match line.strip_prefix("host ") {
                Some(rest) => format!("hostssl {rest}"),
                None => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&hba, text + "\n")?;
        Ok(())
    }

    fn start_server(&self) -> Result<(), ClusterError> {
        check(
            "pg_ctl start",
            self.command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.root.join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {}", self.port))
                .arg("start")
                .output(),
        )
        .map(|_| ())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// `postgres://user:password@127.0.0.1:port/db`.
    pub fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Runs SQL as the superuser in `database` with psql and returns its
    /// unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, ClusterError> {
        let out = check(
            "psql",
            Command::new(self.bindir.join("psql"))
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                ])
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    SUPERUSER,
                    "-d",
                    database,
                    "-c",
                    sql,
                ])
                .env("PGPASSWORD", SUPERUSER_PASSWORD)
                .output(),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stops the server (`-m fast`), keeping the data directory.
    pub fn stop(&self) -> Result<(), ClusterError> {
        self.pg_ctl_stop("fast")
    }

    /// Stops the server at once, as a crash would (`-m immediate`).
    pub fn kill(&self) -> Result<(), ClusterError> {
        self.pg_ctl_stop("immediate")
    }

    /// Starts the server again on the same port.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.start_server()
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), ClusterError> {
        check(
            "pg_ctl stop",
            self.command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-m", mode, "stop"])
                .output(),
        )
        .map(|_| ())
    }

    /// The server log so far, for test failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl_stop("immediate");
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
