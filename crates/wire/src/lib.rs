//! The PostgreSQL wire protocol as cutover's front end speaks it: framing of
//! raw message bytes, the handful of messages the proxy decodes or makes
//! itself, and the client handshake (SSLRequest/GSSENCRequest negotiation,
//! TLS, startup packet, and trust/MD5/SCRAM-SHA-256 authentication).
//!
//! It owns no sockets' lifetimes and no routing: the proxy crate hands it a
//! stream and gets back an authenticated client, then forwards bytes itself.

pub mod auth;
pub mod frame;
pub mod handshake;
pub mod messages;
pub mod stream;
pub mod tls;

pub use frame::{Frame, FrameError};
pub use handshake::{accept, Accepted, HandshakeError, StartupRequest};
pub use stream::ClientStream;

/// SQLSTATE codes cutover produces itself.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
}
