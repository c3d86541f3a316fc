//! Server side of client authentication: SCRAM-SHA-256 (RFC 5802/7677, as
//! PostgreSQL implements it) and, over TLS, SCRAM-SHA-256-PLUS with
//! `tls-server-end-point` channel binding (RFC 5929); MD5 and trust.
//!
//! Verifiers are derived once from the configured user list; a login costs
//! two HMACs and a hash, not a PBKDF2 run. Unknown users go through the same
//! exchange against a throwaway verifier and fail exactly like a wrong
//! password, so the user list cannot be probed.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use cutover_config::{AuthConfig, AuthMethod};
use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// SCRAM with channel binding (`tls-server-end-point`), offered over TLS.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// What a SCRAM exchange knows of channel binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// Not offered (no TLS): a client saying `y` is fine.
    NotOffered,
    /// Offered, but the client chose SCRAM-SHA-256: a client saying `y`
    /// (it supports binding but thinks the server does not) is refused, as
    /// that means someone stripped the -PLUS mechanism.
    Declined,
    /// SCRAM-SHA-256-PLUS: the client must bind to this
    /// `tls-server-end-point` hash.
    Required(Vec<u8>),
}

/// A stored SCRAM-SHA-256 secret, as in `pg_authid.rolpassword`.
#[derive(Clone)]
pub struct ScramVerifier {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl ScramVerifier {
    pub fn from_password(password: &str) -> ScramVerifier {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Self::parse(&text).expect("postgres-protocol produces well-formed verifiers")
    }

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(text: &str) -> Option<ScramVerifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramVerifier {
            salt: B64.decode(salt).ok()?,
            iterations: iterations.parse().ok()?,
            stored_key: B64.decode(stored).ok()?,
            server_key: B64.decode(server).ok()?,
        })
    }

    fn mock() -> ScramVerifier {
        let mut rng = rand::rng();
        ScramVerifier {
            salt: (0..16).map(|_| rng.random()).collect(),
            iterations: 4096,
            stored_key: (0..32).map(|_| rng.random()).collect(),
            server_key: (0..32).map(|_| rng.random()).collect(),
        }
    }
}

/// Why a login was refused. The message is what PostgreSQL would say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("password authentication failed for user \"{0}\"")]
    WrongPassword(String),
    #[error("malformed SCRAM message ({0})")]
    Malformed(&'static str),
    #[error("SASL authentication mechanism {0:?} is not supported; use SCRAM-SHA-256")]
    UnknownMechanism(String),
}

struct UserSecret {
    password: Option<String>,
    scram: Option<ScramVerifier>,
}

/// Checks client credentials against the configured user list.
pub struct Authenticator {
    method: AuthMethod,
    users: HashMap<String, UserSecret>,
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Authenticator {
        let users = config
            .users
            .iter()
            .map(|u| {
                let scram = match (config.method, &u.password) {
                    (AuthMethod::ScramSha256, Some(pw)) => Some(ScramVerifier::from_password(pw)),
                    _ => None,
                };
                (
                    u.name.clone(),
                    UserSecret {
                        password: u.password.clone(),
                        scram,
                    },
                )
            })
            .collect();
        Authenticator {
            method: config.method,
            users,
        }
    }

    pub fn method(&self) -> AuthMethod {
        self.method
    }

    /// Starts a SCRAM exchange for `user` (known or not).
    pub fn scram(&self, user: &str, binding: Binding) -> ScramExchange {
        let verifier = self
            .users
            .get(user)
            .and_then(|u| u.scram.clone())
            .unwrap_or_else(ScramVerifier::mock);
        ScramExchange {
            user: user.to_string(),
            verifier,
            state: ScramState::Initial,
            binding,
        }
    }

    /// Checks an MD5 response (`md5` + hex) for the salt the client was sent.
    pub fn check_md5(&self, user: &str, salt: [u8; 4], response: &[u8]) -> Result<(), AuthFailure> {
        let expected = self
            .users
            .get(user)
            .and_then(|u| u.password.as_deref())
            .map(|pw| {
                postgres_protocol::authentication::md5_hash(user.as_bytes(), pw.as_bytes(), salt)
            });
        match expected {
            Some(e) if constant_time_eq(e.as_bytes(), response) => Ok(()),
            _ => Err(AuthFailure::WrongPassword(user.to_string())),
        }
    }
}

enum ScramState {
    Initial,
    SentFirst {
        client_first_bare: String,
        server_first: String,
        gs2_header: String,
        nonce: String,
    },
    Done,
}

/// One SCRAM-SHA-256 exchange with one client.
pub struct ScramExchange {
    user: String,
    verifier: ScramVerifier,
    state: ScramState,
    binding: Binding,
}

impl ScramExchange {
    /// Takes the client-first-message, returns the server-first-message.
    pub fn client_first(&mut self, message: &[u8]) -> Result<Vec<u8>, AuthFailure> {
        let text = std::str::from_utf8(message).map_err(|_| AuthFailure::Malformed("not UTF-8"))?;
        let (cbind, rest) = text
            .split_once(',')
            .ok_or(AuthFailure::Malformed("no GS2 header"))?;
        match (cbind, &self.binding) {
            ("n", Binding::Required(_)) | ("y", Binding::Required(_)) => {
                return Err(AuthFailure::Malformed(
                    "SCRAM-SHA-256-PLUS was chosen without channel binding",
                ))
            }
            ("y", Binding::Declined) => {
                return Err(AuthFailure::Malformed(
                    "channel binding negotiation error: the client supports it and it is offered",
                ))
            }
            ("n" | "y", _) => {}
            ("p=tls-server-end-point", Binding::Required(_)) => {}
            (p, Binding::Required(_)) if p.starts_with("p=") => {
                return Err(AuthFailure::Malformed(
                    "unsupported channel binding type; use tls-server-end-point",
                ))
            }
            (p, _) if p.starts_with("p=") => {
                return Err(AuthFailure::Malformed(
                    "channel binding was requested but is not offered",
                ))
            }
            _ => return Err(AuthFailure::Malformed("bad channel-binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(AuthFailure::Malformed("no GS2 header"))?;
        if !authzid.is_empty() && !authzid.starts_with("a=") {
            return Err(AuthFailure::Malformed("bad authzid"));
        }
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(AuthFailure::Malformed("no client nonce"))?;
        if bare.split(',').any(|attr| attr.starts_with("m=")) {
            return Err(AuthFailure::Malformed(
                "mandatory extensions are not supported",
            ));
        }
        let nonce = format!("{client_nonce}{}", scram_nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = ScramState::SentFirst {
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            gs2_header: format!("{cbind},{authzid},"),
            nonce,
        };
        Ok(server_first.into_bytes())
    }

    /// Takes the client-final-message, returns the server-final-message if the proof holds.
    pub fn client_final(&mut self, message: &[u8]) -> Result<Vec<u8>, AuthFailure> {
        let ScramState::SentFirst {
            client_first_bare,
            server_first,
            gs2_header,
            nonce,
        } = std::mem::replace(&mut self.state, ScramState::Done)
        else {
            return Err(AuthFailure::Malformed("unexpected message"));
        };
        let text = std::str::from_utf8(message).map_err(|_| AuthFailure::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(AuthFailure::Malformed("no proof"))?;
        let mut channel = None;
        let mut client_nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                client_nonce = Some(r);
            }
        }
        let channel = channel.ok_or(AuthFailure::Malformed("no channel binding attribute"))?;
        let mut expected = gs2_header.into_bytes();
        if let (true, Binding::Required(data)) = (expected.starts_with(b"p="), &self.binding) {
            expected.extend_from_slice(data);
        }
        if B64.decode(channel).ok().as_deref() != Some(expected.as_slice()) {
            return Err(AuthFailure::Malformed("channel binding does not match"));
        }
        if client_nonce != Some(nonce.as_str()) {
            return Err(AuthFailure::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| AuthFailure::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(AuthFailure::Malformed("proof has the wrong length"));
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature.iter())
            .map(|(p, s)| p ^ s)
            .collect();
        let stored_key = Sha256::digest(&client_key);
        if !constant_time_eq(stored_key.as_slice(), &self.verifier.stored_key) {
            return Err(AuthFailure::WrongPassword(self.user.clone()));
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

/// HMAC-SHA-256, as SCRAM uses it (server side here, client side in the backend crate).
pub fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// 24 printable characters other than `,`, as a SCRAM nonce must be.
pub fn scram_nonce() -> String {
    let mut rng = rand::rng();
    (0..24)
        .map(|_| match rng.random_range(0x21u8..0x7e) {
            b',' => '~',
            c => c as char,
        })
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_config::User;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn authenticator() -> Authenticator {
        Authenticator::new(&AuthConfig {
            method: AuthMethod::ScramSha256,
            users: vec![User {
                name: "app".into(),
                password: Some("s3cret".into()),
            }],
        })
    }

    /// One exchange: the client with `client_binding`, the server with
    /// `server_binding`.
    fn exchange(
        auth: &Authenticator,
        user: &str,
        password: &str,
        client_binding: ChannelBinding,
        server_binding: Binding,
    ) -> Result<(), AuthFailure> {
        let mut client = ScramSha256::new(password.as_bytes(), client_binding);
        let mut server = auth.scram(user, server_binding);
        let first = server.client_first(client.message())?;
        client.update(&first).unwrap();
        let last = server.client_final(client.message())?;
        client
            .finish(&last)
            .map_err(|_| AuthFailure::Malformed("client rejected server"))
    }

    fn run(auth: &Authenticator, user: &str, password: &str) -> Result<(), AuthFailure> {
        exchange(
            auth,
            user,
            password,
            ChannelBinding::unsupported(),
            Binding::NotOffered,
        )
    }

    /// A PLUS exchange: the client binds to `client_hash`, the server
    /// expects `server_hash`.
    fn run_plus(client_hash: &[u8], server_hash: &[u8]) -> Result<(), AuthFailure> {
        exchange(
            &authenticator(),
            "app",
            "s3cret",
            ChannelBinding::tls_server_end_point(client_hash.to_vec()),
            Binding::Required(server_hash.to_vec()),
        )
    }

    #[test]
    fn scram_plus_binds_to_the_certificate_and_refuses_another_or_a_downgrade() {
        assert_eq!(run_plus(&[7; 32], &[7; 32]), Ok(()));
        assert_eq!(
            run_plus(&[7; 32], &[8; 32]),
            Err(AuthFailure::Malformed("channel binding does not match"))
        );
        // "y": the client could bind but saw no -PLUS offered.
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unrequested());
        let mut server = authenticator().scram("app", Binding::Declined);
        assert!(server.client_first(client.message()).is_err());
        let mut server = authenticator().scram("app", Binding::NotOffered);
        let first = server.client_first(client.message()).unwrap();
        client.update(&first).unwrap();
        assert!(server.client_final(client.message()).is_ok());
    }

    #[test]
    fn scram_accepts_right_password_and_client_verifies_server() {
        assert_eq!(run(&authenticator(), "app", "s3cret"), Ok(()));
    }

    #[test]
    fn scram_refuses_wrong_password_and_unknown_user_alike() {
        let auth = authenticator();
        assert_eq!(
            run(&auth, "app", "nope"),
            Err(AuthFailure::WrongPassword("app".into()))
        );
        assert_eq!(
            run(&auth, "eve", "s3cret"),
            Err(AuthFailure::WrongPassword("eve".into()))
        );
    }

    #[test]
    fn scram_rejects_garbage() {
        let auth = authenticator();
        assert!(auth
            .scram("app", Binding::NotOffered)
            .client_first(b"garbage")
            .is_err());
        let mut ex = auth.scram("app", Binding::NotOffered);
        ex.client_first(b"n,,n=,r=abc").unwrap();
        assert!(ex.client_final(b"c=biws,r=wrong,p=AAAA").is_err());
    }

    #[test]
    fn md5_checks_hash() {
        let auth = Authenticator::new(&AuthConfig {
            method: AuthMethod::Md5,
            users: vec![User {
                name: "app".into(),
                password: Some("pw".into()),
            }],
        });
        let salt = [1, 2, 3, 4];
        let good = postgres_protocol::authentication::md5_hash(b"app", b"pw", salt);
        assert!(auth.check_md5("app", salt, good.as_bytes()).is_ok());
        assert!(auth
            .check_md5("app", [9, 9, 9, 9], good.as_bytes())
            .is_err());
        assert!(auth.check_md5("bob", salt, good.as_bytes()).is_err());
    }
}
