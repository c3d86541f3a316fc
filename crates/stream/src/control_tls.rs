//! TLS for the control plane's tokio-postgres connections, with the same
//! settings and certificate checks as the data path's raw connections, and
//! channel binding (SCRAM-SHA-256-PLUS) to the server's certificate.

use cutover_backend::BackendTls;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// Hands tokio-postgres a connector for the backend's URL.
pub struct MakeRustls {
    connector: TlsConnector,
    name: ServerName<'static>,
    /// For explaining a refused certificate in the URL's terms.
    settings: BackendTls,
}

impl MakeRustls {
    pub fn new(
        (connector, name): (TlsConnector, ServerName<'static>),
        settings: BackendTls,
    ) -> Self {
        MakeRustls {
            connector,
            name,
            settings,
        }
    }
}

pub struct Connect {
    connector: TlsConnector,
    name: ServerName<'static>,
    settings: BackendTls,
}

pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    /// The name to check is the URL's host, already parsed; tokio-postgres
    /// passes the same host.
    fn make_tls_connect(&mut self, _domain: &str) -> Result<Connect, io::Error> {
        Ok(Connect {
            connector: self.connector.clone(),
            name: self.name.clone(),
            settings: self.settings.clone(),
        })
    }
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Stream<S>, io::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.connector
                .connect(self.name, stream)
                .await
                .map(Stream)
                .map_err(|e| io::Error::other(self.settings.explain(e)))
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        {
            Some(cert) => {
                ChannelBinding::tls_server_end_point(cutover_wire::tls::end_point_hash(cert))
            }
            None => ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
