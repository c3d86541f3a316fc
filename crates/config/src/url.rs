//! Backend URLs: `postgres://user:password@host:port/database` for a
//! PostgreSQL server, `sqlite:///abs/path.db` or `sqlite:rel/path.db` for a
//! SQLite file.

use std::path::PathBuf;

/// Where a backend is.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// A PostgreSQL server.
    Tcp { host: String, port: u16 },
    /// A SQLite file (only `[old]` may be one).
    Sqlite { path: PathBuf },
}

/// libpq's `sslmode`: whether a connection uses TLS and what it checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Without TLS; with TLS (unverified) only when the server refuses the
    /// plain connection.
    Allow,
    /// TLS when the server offers it, unverified; plain otherwise. libpq's
    /// and PgBouncer's default.
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is checked only when `sslrootcert`
    /// is given (then as verify-ca, as libpq does).
    Require,
    /// TLS, the certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// As verify-ca, and the certificate must name the URL's host.
    VerifyFull,
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the certificates that may sign the server's come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's CA bundle.
    System,
}

/// A URL's TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
}

/// A parsed backend URL. The user and password are the control-plane login;
/// client sessions log in as the client's own user.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub target: Target,
    /// `sslmode` and `sslrootcert`, for every connection to this backend.
    pub tls: TlsSettings,
    /// The database clients name: from the URL, or for a SQLite file
    /// `[old] database` or the file's stem (`app` for `app.db`).
    pub database: String,
    pub user: String,
    pub password: Option<String>,
}

impl std::fmt::Debug for BackendUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl BackendUrl {
    /// `host:port` (or the SQLite file's path), for messages and status.
    pub fn address(&self) -> String {
        match &self.target {
            Target::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Target::Tcp { host, port } => format!("{host}:{port}"),
            Target::Sqlite { path } => path.display().to_string(),
        }
    }

    /// The SQLite file this URL names, if it names one.
    pub fn sqlite_path(&self) -> Option<&std::path::Path> {
        match &self.target {
            Target::Sqlite { path } => Some(path),
            Target::Tcp { .. } => None,
        }
    }

    /// The URL with the password hidden, safe to log.
    pub fn redacted(&self) -> String {
        if let Target::Sqlite { path } = &self.target {
            return format!("sqlite://{}", path.display());
        }
        let pw = if self.password.is_some() { ":***" } else { "" };
        format!(
            "postgres://{}{}@{}/{}",
            self.user,
            pw,
            self.address(),
            self.database
        )
    }

    /// `sqlite:///srv/app.db` is an absolute path, `sqlite:data/app.db` a
    /// path relative to the working directory.
    fn parse_sqlite(rest: &str) -> Result<BackendUrl, String> {
        let path = match rest.strip_prefix("//") {
            Some(after) if after.starts_with('/') => after,
            Some(_) => {
                return Err(
                    "write sqlite:///absolute/path.db or sqlite:relative/path.db".to_string(),
                )
            }
            None => rest,
        };
        let path = PathBuf::from(decode(path.split('?').next().unwrap_or(path))?);
        let database = path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| "the URL must name a SQLite file".to_string())?
            .to_string();
        Ok(BackendUrl {
            target: Target::Sqlite { path },
            tls: TlsSettings::default(),
            database,
            user: String::new(),
            password: None,
        })
    }

    pub fn parse(text: &str) -> Result<BackendUrl, String> {
        if let Some(rest) = text.strip_prefix("sqlite:") {
            return Self::parse_sqlite(rest);
        }
        let rest = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))
            .ok_or_else(|| format!("{text:?} must start with postgres:// or sqlite:"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let tls = tls_settings(query)?;
        let (authority, database) = match rest.split_once('/') {
            Some((a, d)) => (a, d),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (String::new(), None),
            Some(u) => match u.split_once(':') {
                Some((name, pw)) => (decode(name)?, Some(decode(pw)?)),
                None => (decode(u)?, None),
            },
        };
        if user.is_empty() {
            return Err("the URL must name a user (postgres://USER@host/db)".to_string());
        }
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| "unterminated [ in host".to_string())?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err("the URL must name a host".to_string());
        }
        let port = match port {
            None | Some("") => 5432,
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("port {p:?} is not a number from 1 to 65535"))?,
        };
        let database = decode(database)?;
        let database = if database.is_empty() {
            user.clone()
        } else {
            database
        };
        Ok(BackendUrl {
            target: Target::Tcp { host, port },
            tls,
            database,
            user,
            password,
        })
    }
}

/// The URL's parameters: `sslmode` and `sslrootcert`, as libpq reads them.
/// Anything else is refused rather than ignored.
fn tls_settings(query: &str) -> Result<TlsSettings, String> {
    let mut tls = TlsSettings::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(value)?;
        match key {
            "sslmode" => {
                tls.mode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "allow" => SslMode::Allow,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        ))
                    }
                }
            }
            "sslrootcert" if value.is_empty() => {
                return Err("sslrootcert needs a file path (or system)".to_string())
            }
            "sslrootcert" if value == "system" => tls.root_cert = Some(RootCert::System),
            "sslrootcert" => tls.root_cert = Some(RootCert::File(PathBuf::from(value))),
            "sslcert" | "sslkey" | "sslpassword" => {
                return Err(format!(
                    "{key}: cutover does not present client certificates to the databases; log in with a password"
                ))
            }
            other => return Err(format!("unknown URL parameter {other:?}")),
        }
    }
    if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && tls.root_cert.is_none() {
        return Err(format!(
            "sslmode={} needs sslrootcert=/path/to/ca.pem (or sslrootcert=system for the system's CA bundle)",
            tls.mode.name()
        ));
    }
    if matches!(
        tls.mode,
        SslMode::Disable | SslMode::Allow | SslMode::Prefer
    ) && tls.root_cert.is_some()
    {
        return Err(format!(
            "sslrootcert is only used with sslmode=require, verify-ca or verify-full; sslmode={} would not check the certificate",
            tls.mode.name()
        ));
    }
    Ok(tls)
}

fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_url() {
        let u = BackendUrl::parse("postgres://cut%40over:p%3Aw@127.0.0.1:5433/app").unwrap();
        assert_eq!(u.user, "cut@over");
        assert_eq!(u.password.as_deref(), Some("p:w"));
        assert_eq!(u.address(), "127.0.0.1:5433");
        assert_eq!(u.database, "app");
    }

    #[test]
    fn defaults_port_and_database() {
        let u = BackendUrl::parse("postgresql://bob@[::1]").unwrap();
        assert_eq!(u.address(), "[::1]:5432");
        assert_eq!(u.database, "bob");
    }

    #[test]
    fn parses_sqlite_files() {
        let u = BackendUrl::parse("sqlite:///srv/app/data/app.db").unwrap();
        assert_eq!(
            u.sqlite_path(),
            Some(std::path::Path::new("/srv/app/data/app.db"))
        );
        assert_eq!(u.database, "app");
        let u = BackendUrl::parse("sqlite:data/my%20app.sqlite3").unwrap();
        assert_eq!(
            u.sqlite_path(),
            Some(std::path::Path::new("data/my app.sqlite3"))
        );
        assert_eq!(u.database, "my app");
        assert!(BackendUrl::parse("sqlite://host/app.db").is_err());
        assert!(BackendUrl::parse("sqlite:").is_err());
    }

    #[test]
    fn reads_tls_settings() {
        let u = BackendUrl::parse("postgres://u@h/d").unwrap();
        assert_eq!(u.tls, TlsSettings::default());
        assert_eq!(u.tls.mode, SslMode::Prefer);
        let u =
            BackendUrl::parse("postgres://u@h/d?sslmode=verify-full&sslrootcert=/etc/ca%20x.pem")
                .unwrap();
        assert_eq!(u.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            u.tls.root_cert,
            Some(RootCert::File(PathBuf::from("/etc/ca x.pem")))
        );
        let u = BackendUrl::parse("postgres://u@h/d?sslmode=require&sslrootcert=system").unwrap();
        assert_eq!(u.tls.root_cert, Some(RootCert::System));
        let err = BackendUrl::parse("postgres://u@h/d?sslmode=verify-ca").unwrap_err();
        assert!(err.contains("needs sslrootcert"), "{err}");
        let err =
            BackendUrl::parse("postgres://u@h/d?sslmode=prefer&sslrootcert=/ca.pem").unwrap_err();
        assert!(err.contains("would not check"), "{err}");
        let err = BackendUrl::parse("postgres://u@h/d?sslmode=on").unwrap_err();
        assert!(err.starts_with("sslmode=on is not one of"), "{err}");
        let err = BackendUrl::parse("postgres://u@h/d?sslcert=/c.pem").unwrap_err();
        assert!(err.contains("client certificates"), "{err}");
        let err = BackendUrl::parse("postgres://u@h/d?sslmod=require").unwrap_err();
        assert_eq!(err, "unknown URL parameter \"sslmod\"");
    }

    #[test]
    fn rejects_garbage() {
        assert!(BackendUrl::parse("mysql://x@h/d").is_err());
        assert!(BackendUrl::parse("postgres://h:99999/d").is_err());
        assert!(BackendUrl::parse("postgres://u@h:99999/d").is_err());
    }
}
