//! The byte stream to a backend: plain TCP, TLS when the URL's sslmode
//! asked for it and the server agreed, or an in-memory stream to a backend
//! inside cutover (the SQLite engine).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{tcp, TcpStream};
use tokio_rustls::client::TlsStream;

pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Embedded(DuplexStream),
}

/// The reading half of a split [`BackendStream`].
pub enum BackendRead<'a> {
    Plain(tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
    Embedded(tokio::io::ReadHalf<&'a mut DuplexStream>),
}

/// The writing half of a split [`BackendStream`].
pub enum BackendWrite<'a> {
    Plain(tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
    Embedded(tokio::io::WriteHalf<&'a mut DuplexStream>),
}

impl BackendStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, BackendStream::Tls(_))
    }

    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            BackendStream::Plain(tcp) => Some(tcp),
            BackendStream::Tls(tls) => Some(tls.get_ref().0),
            BackendStream::Embedded(_) => None,
        }
    }

    /// True when the server has sent something (or closed the socket)
    /// while the session sat idle; checked without waiting or consuming.
    /// An in-memory stream cannot be peeked; its engine session ends only
    /// when the stream does, which the next use finds.
    pub fn has_pending_input(&self) -> bool {
        let Some(tcp) = self.tcp() else {
            return false;
        };
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        !matches!(tcp.poll_peek(&mut cx, &mut buf), Poll::Pending)
    }

    /// Halves that read and write concurrently. Plain TCP splits for free;
    /// TLS shares one session between the halves.
    pub fn split(&mut self) -> (BackendRead<'_>, BackendWrite<'_>) {
        match self {
            BackendStream::Plain(tcp) => {
                let (r, w) = tcp.split();
                (BackendRead::Plain(r), BackendWrite::Plain(w))
            }
            BackendStream::Tls(tls) => {
                let (r, w) = tokio::io::split(tls.as_mut());
                (BackendRead::Tls(r), BackendWrite::Tls(w))
            }
            BackendStream::Embedded(duplex) => {
                let (r, w) = tokio::io::split(duplex);
                (BackendRead::Embedded(r), BackendWrite::Embedded(w))
            }
        }
    }
}

/// Forwards each poll to whichever variant the value holds.
macro_rules! delegate_read {
    ($ty:ty, $($variant:ident),+) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($ty:ty, $($variant:ident),+) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

delegate_read!(BackendStream, Plain, Tls, Embedded);
delegate_write!(BackendStream, Plain, Tls, Embedded);
delegate_read!(BackendRead<'_>, Plain, Tls, Embedded);
delegate_write!(BackendWrite<'_>, Plain, Tls, Embedded);

/// A backend that runs inside cutover and speaks the protocol over an
/// in-memory stream: the SQLite engine.
pub trait Embedded: Send + Sync {
    /// A new session's stream.
    fn open(&self) -> DuplexStream;
    /// A CancelRequest for one of its sessions.
    fn cancel(&self, key: cutover_wire::messages::backend_key_data::CancelKey);
}

/// A shared handle on an [`Embedded`] backend.
#[derive(Clone)]
pub struct EmbeddedBackend(pub std::sync::Arc<dyn Embedded>);

impl std::fmt::Debug for EmbeddedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedBackend")
    }
}
