//! The client side of SCRAM-SHA-256 for backend logins, with a cache of
//! salted passwords.
//!
//! A role's salt and iteration count are fixed on the server, so the
//! expensive part of a login (PBKDF2, 4096 HMAC rounds by default) gives the
//! same answer every time. Caching it turns a burst of new backend sessions
//! from milliseconds of CPU each, spent on an async worker thread, into two
//! HMACs.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use cutover_wire::auth::{hmac, scram_nonce};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;

/// Servers asking for more rounds than this are refused: an impostor could
/// otherwise make every login burn CPU (PostgreSQL's default is 4096).
const MAX_ITERATIONS: u32 = 100_000;

/// (user, SHA-256 of the password, salt, iterations): what determines a salted password.
type SaltKey = (String, [u8; 32], Vec<u8>, u32);

/// Salted passwords from earlier logins.
#[derive(Default)]
pub struct ScramCache {
    salted: Mutex<HashMap<SaltKey, [u8; 32]>>,
}

impl std::fmt::Debug for ScramCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramCache")
    }
}

impl ScramCache {
    fn salted_password(
        &self,
        user: &str,
        password: &[u8],
        salt: &[u8],
        iterations: u32,
    ) -> [u8; 32] {
        let key = (
            user.to_string(),
            Sha256::digest(password).into(),
            salt.to_vec(),
            iterations,
        );
        if let Some(hit) = self
            .salted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return *hit;
        }
        let salted = pbkdf2(password, salt, iterations);
        self.salted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, salted);
        salted
    }
}

/// One login's SCRAM exchange.
pub struct ScramClient<'a> {
    cache: &'a ScramCache,
    user: &'a str,
    password: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    server_signature: Option<Vec<u8>>,
}

impl<'a> ScramClient<'a> {
    pub fn new(cache: &'a ScramCache, user: &'a str, password: &str) -> ScramClient<'a> {
        let nonce = scram_nonce();
        // SASLprep where the password is valid for it, as libpq does.
        let password = stringprep::saslprep(password)
            .map(|p| p.into_owned())
            .unwrap_or_else(|_| password.to_string())
            .into_bytes();
        ScramClient {
            cache,
            user,
            password,
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            server_signature: None,
        }
    }

    /// The client-first-message (no channel binding).
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Takes the server-first-message, returns the client-final-message.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(server_first).map_err(|_| "server-first is not UTF-8")?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in text.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = Some(B64.decode(v).map_err(|_| "salt is not base64")?);
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = Some(v.parse::<u32>().map_err(|_| "bad iteration count")?);
            }
        }
        let nonce = nonce.ok_or("server-first has no nonce")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err("server nonce does not extend ours".to_string());
        }
        let salt = salt.ok_or("server-first has no salt")?;
        let iterations = iterations.ok_or("server-first has no iteration count")?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(format!("iteration count {iterations} is out of range"));
        }
        let salted = self
            .cache
            .salted_password(self.user, &self.password, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.server_signature = Some(hmac(&server_key, auth_message.as_bytes()).to_vec());
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message: the server must prove it knows the verifier.
    pub fn verify_server(&self, server_final: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(server_final).map_err(|_| "server-final is not UTF-8")?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(format!("server reported SCRAM error {e}"));
        }
        let v = text
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .ok_or("server-final has no verifier")?;
        let got = B64
            .decode(v)
            .map_err(|_| "server signature is not base64")?;
        match &self.server_signature {
            Some(expected) if *expected == got => Ok(()),
            _ => Err(
                "server signature does not match: the server does not know this password"
                    .to_string(),
            ),
        }
    }
}

/// PBKDF2-HMAC-SHA-256 with one output block (RFC 5802's Hi()).
fn pbkdf2(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(password).expect("HMAC accepts keys of any length");
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = mac.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        out.iter_mut().zip(u).for_each(|(o, x)| *o ^= x);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's SCRAM-SHA-256 example: password "pencil".
    #[test]
    fn matches_rfc_7677_test_vector() {
        let cache = ScramCache::default();
        let mut client = ScramClient::new(&cache, "user", "pencil");
        client.nonce = "rOprNGfwEbeRWgbNEkqO".to_string();
        client.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".to_string();
        let last = client
            .client_final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(
            String::from_utf8(last).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert!(client
            .verify_server(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .is_ok());
        assert!(client.verify_server(b"v=AAAA").is_err());
        assert_eq!(cache.salted.lock().unwrap().len(), 1);
    }

    #[test]
    fn refuses_hostile_server_first() {
        let cache = ScramCache::default();
        let mut client = ScramClient::new(&cache, "u", "pw");
        assert!(client.client_final(b"r=other,s=AAAA,i=4096").is_err());
        let nonce = client.nonce.clone();
        let huge = format!("r={nonce}x,s=AAAA,i=999999999");
        assert!(client.client_final(huge.as_bytes()).is_err());
    }
}
