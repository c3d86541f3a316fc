//! The byte stream to a backend: plain TCP, or TLS when the URL's sslmode
//! asked for it and the server agreed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{tcp, TcpStream};
use tokio_rustls::client::TlsStream;

pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The reading half of a split [`BackendStream`].
pub enum BackendRead<'a> {
    Plain(tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
}

/// The writing half of a split [`BackendStream`].
pub enum BackendWrite<'a> {
    Plain(tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
}

impl BackendStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, BackendStream::Tls(_))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(tcp) => tcp,
            BackendStream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// True when the server has sent something (or closed the socket)
    /// while the session sat idle; checked without waiting or consuming.
    pub fn has_pending_input(&self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        !matches!(self.tcp().poll_peek(&mut cx, &mut buf), Poll::Pending)
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

delegate_read!(BackendStream, Plain, Tls);
delegate_write!(BackendStream, Plain, Tls);
delegate_read!(BackendRead<'_>, Plain, Tls);
delegate_write!(BackendWrite<'_>, Plain, Tls);
