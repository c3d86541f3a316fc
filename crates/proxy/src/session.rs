//! One client connection from accept to close: handshake, backend checkout,
//! the login reply, the relay, and handing the backend session back (reset
//! and pooled, or closed) according to the state the relay left it in.

use crate::cancel::CancelTarget;
use crate::relay::{self, BackendError, ClientCursor, ClientEnd, ClientError, Cursor};
use crate::Shared;
use bytes::BytesMut;
use cutover_backend::{send_cancel, Checkout, OnReturn, PoolKey};
use cutover_wire::handshake::HandshakeSettings;
use cutover_wire::messages::ready_for_query::TransactionStatus;
use cutover_wire::messages::{
    authentication, backend_key_data, parameter_status, ready_for_query, ErrorResponse,
};
use cutover_wire::{sqlstate, Accepted, ClientStream, StartupRequest};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::Instrument;

pub(crate) async fn run(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    close: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let settings = HandshakeSettings {
        tls: shared.tls.as_ref(),
        authenticator: &shared.authenticator,
        database: &shared.config.old.url.database,
    };
    let accepted =
        match tokio::time::timeout(crate::AUTH_TIMEOUT, cutover_wire::accept(tcp, &settings)).await
        {
            Ok(accepted) => accepted,
            Err(_) => {
                shared
                    .metrics
                    .protocol_errors
                    .with_label_values(&["startup_timeout"])
                    .inc();
                tracing::debug!(session = id, %peer, "client did not complete startup in time");
                return;
            }
        };
    match accepted {
        Ok(Accepted::Cancel(key)) => forward_cancel(&shared, key).await,
        Ok(Accepted::Startup(request)) => {
            let span = tracing::info_span!("session", id, user = %request.user, %peer);
            serve(shared, request, close).instrument(span).await
        }
        Err(e) => {
            let counter = if e.is_auth_failure() {
                Some(&shared.metrics.auth_failures)
            } else if e.is_protocol_violation() {
                Some(&shared.metrics.protocol_errors)
            } else {
                None
            };
            if let Some(counter) = counter {
                counter.with_label_values(&[e.reason()]).inc();
            }
            tracing::info!(session = id, %peer, error = %e, "client handshake failed");
        }
    }
}

async fn forward_cancel(shared: &Shared, key: backend_key_data::CancelKey) {
    let Some(target) = shared.cancels.lookup(key) else {
        shared
            .metrics
            .cancel_requests
            .with_label_values(&["unknown_key"])
            .inc();
        return;
    };
    let result = send_cancel(&target.address, target.key, Duration::from_secs(5)).await;
    let outcome = if result.is_ok() {
        "forwarded"
    } else {
        "failed"
    };
    shared
        .metrics
        .cancel_requests
        .with_label_values(&[outcome])
        .inc();
}

/// Decrements the client gauge however the session ends.
struct ClientCount<'a>(&'a Shared);

impl Drop for ClientCount<'_> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.client_connections.dec();
    }
}

async fn serve(shared: Arc<Shared>, request: StartupRequest, mut close: watch::Receiver<bool>) {
    let StartupRequest {
        mut stream,
        user,
        params,
        ..
    } = request;
    let count = shared.clients.fetch_add(1, Ordering::Relaxed) + 1;
    shared.metrics.client_connections.inc();
    shared.metrics.client_connections_total.inc();
    let _count = ClientCount(&shared);
    if count > i64::from(shared.config.proxy.max_client_connections) {
        let e = ErrorResponse::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
        )
        .with_hint("raise proxy.max_client_connections");
        let _ = stream.write_all(&e.to_bytes()).await;
        return;
    }

    let password = shared
        .config
        .auth
        .user(&user)
        .and_then(|u| u.password.clone());
    let key = PoolKey { user, params };
    let checkout = tokio::select! {
        c = shared.primary.checkout(key, password.as_deref()) => c,
        _ = close.changed() => {
            let _ = stream.write_all(&shutdown_error().to_bytes()).await;
            return;
        }
    };
    let mut checkout = match checkout {
        Ok(c) => c,
        Err(e) => {
            shared
                .metrics
                .backend_connect_failures
                .with_label_values(&["old", e.reason()])
                .inc();
            tracing::warn!(error = %e, "no backend session for client");
            let _ = stream.write_all(&e.client_error()).await;
            return;
        }
    };

    let client_key = shared.cancels.register(CancelTarget {
        address: shared.primary.settings().address.clone(),
        key: checkout.conn_ref().key,
    });
    let mut hello = BytesMut::with_capacity(512);
    authentication::ok(&mut hello);
    for (name, value) in &checkout.conn_ref().params {
        parameter_status::encode(&mut hello, name, value);
    }
    if checkout.fresh {
        hello.extend_from_slice(&checkout.conn_ref().login_notices);
    }
    backend_key_data::encode(&mut hello, client_key);
    ready_for_query::encode(&mut hello, TransactionStatus::Idle);
    if stream.write_all(&hello).await.is_err() {
        shared.cancels.forget(client_key);
        checkout.on_return(OnReturn::Reset);
        return;
    }
    tracing::debug!(reused = !checkout.fresh, "client logged in");

    let outcome = match stream {
        ClientStream::Plain(mut tcp) => {
            let (r, w) = tcp.split();
            relay_session(&shared, r, w, &mut checkout, &mut close).await
        }
        ClientStream::Tls(tls) => {
            let (r, w) = tokio::io::split(*tls);
            relay_session(&shared, r, w, &mut checkout, &mut close).await
        }
    };
    shared.cancels.forget(client_key);
    checkout.on_return(outcome);
}

/// How long replies to a client's last valid messages may take to arrive
/// before it is disconnected for a protocol violation.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

fn shutdown_error() -> ErrorResponse {
    ErrorResponse::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        "terminating connection due to administrator command",
    )
    .with_detail("cutover is shutting down")
}

/// Relays until the client leaves or something breaks; returns what to do
/// with the backend session.
async fn relay_session<R, W>(
    shared: &Shared,
    mut client_r: R,
    mut client_w: W,
    checkout: &mut Checkout,
    close: &mut watch::Receiver<bool>,
) -> OnReturn
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = shared.metrics.backend("old");
    let state = relay::Shared::new();
    let mut client_cursor = ClientCursor::default();
    let mut backend_cursor = Cursor::default();
    let conn = checkout.conn();
    let (mut backend_r, mut backend_w) = conn.stream.split();
    let mut view = relay::BackendView {
        params: &mut conn.params,
        saw_fatal: false,
        drain: false,
    };

    enum End {
        Client(Result<ClientEnd, ClientError>),
        Backend(BackendError),
        Shutdown,
    }
    let end = tokio::select! {
        r = relay::client_to_backend(
            &mut client_r, &mut backend_w, &mut client_cursor, &state,
            shared.config.proxy.max_message_bytes, &metrics,
        ) => End::Client(r),
        e = relay::backend_to_client(
            &mut backend_r, &mut client_w, &mut backend_cursor, &state,
            &mut view, &metrics,
        ) => End::Backend(e),
        _ = close.wait_for(|closing| *closing) => End::Shutdown,
    };

    match end {
        End::Client(Ok(how)) => {
            tracing::debug!(?how, "client left");
            let clean = state.outstanding.load(Ordering::Relaxed) == 0
                && !client_cursor.unsynced
                && client_cursor.cursor.remaining == 0
                && backend_cursor.is_clean();
            match (clean, state.status()) {
                (true, Some(TransactionStatus::Idle)) => OnReturn::Reset,
                (true, Some(_)) => OnReturn::RollbackAndReset,
                _ => OnReturn::Close,
            }
        }
        End::Client(Err(e)) => {
            if let Some(reason) = e.protocol_reason() {
                shared
                    .metrics
                    .protocol_errors
                    .with_label_values(&[reason])
                    .inc();
                tracing::info!(error = %e, "closing client for protocol violation");
                // Answer what the client sent before the bad message, as
                // PostgreSQL would have, then refuse.
                view.drain = true;
                let _ = tokio::time::timeout(
                    DRAIN_TIMEOUT,
                    relay::backend_to_client(
                        &mut backend_r,
                        &mut client_w,
                        &mut backend_cursor,
                        &state,
                        &mut view,
                        &metrics,
                    ),
                )
                .await;
                let response = ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string());
                let _ = client_w.write_all(&response.to_bytes()).await;
            } else if let ClientError::BackendIo(io) = &e {
                tracing::warn!(error = %io, "lost the backend session");
                let response = backend_lost(shared, io);
                let _ = client_w.write_all(&response.to_bytes()).await;
            } else {
                tracing::debug!(error = %e, "client connection failed");
            }
            OnReturn::Close
        }
        End::Backend(e) => {
            match &e {
                BackendError::ClientIo(io) => {
                    tracing::debug!(error = %io, "client connection failed")
                }
                _ if view.saw_fatal => tracing::info!(error = %e, "backend ended the session"),
                _ => {
                    tracing::warn!(error = %e, "lost the backend session");
                    let response = backend_lost(shared, &e);
                    let _ = client_w.write_all(&response.to_bytes()).await;
                }
            }
            OnReturn::Close
        }
        End::Shutdown => {
            let _ = client_w.write_all(&shutdown_error().to_bytes()).await;
            OnReturn::Close
        }
    }
}

fn backend_lost(shared: &Shared, e: &dyn std::fmt::Display) -> ErrorResponse {
    ErrorResponse::fatal(
        sqlstate::CONNECTION_FAILURE,
        format!(
            "server closed the connection unexpectedly: lost the session on old backend {} ({e})",
            shared.primary.settings().address
        ),
    )
    .with_hint("the database may have restarted or terminated the session; reconnect to continue")
}
