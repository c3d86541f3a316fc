//! One client connection from accept to close: handshake, backend checkout,
//! the login reply, the relay, and handing the backend session back (reset
//! and pooled, or closed) according to the state the relay left it in.

use crate::cancel::CancelTarget;
use crate::relay::{self, BackendError, ClientCursor, ClientEnd, ClientError, Cursor};
use crate::route::{Router, SessionRouting};
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
    let other_database = |name: &str| shared.config.proxy.passes_through(name);
    let authenticator = shared.authenticator();
    let settings = HandshakeSettings {
        tls: shared.tls.as_ref(),
        authenticator: &authenticator,
        database: &shared.config.old.url.database,
        other_database: &other_database,
        channel_binding: shared.channel_binding.as_deref(),
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
            serve(shared, id, request, close).instrument(span).await
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
    let result = match &target.embedded {
        Some(engine) => {
            engine.0.cancel(target.key);
            Ok(())
        }
        None => send_cancel(&target.address, target.key, Duration::from_secs(5)).await,
    };
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

async fn serve(
    shared: Arc<Shared>,
    id: u64,
    request: StartupRequest,
    mut close: watch::Receiver<bool>,
) {
    let StartupRequest {
        mut stream,
        user,
        database,
        params,
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

    let password = shared.password(&user);
    let key = PoolKey { user, params };
    let primary = shared.traffic.plane().state.primary;
    // Another database on the same server: forwarded as it is, never
    // mirrored or routed.
    let passthrough = database != shared.config.old.url.database;
    let pool = if passthrough {
        shared.pools.other(primary, &database)
    } else {
        shared.pools.get(primary).cloned()
    };
    let Some(pool) = pool else {
        let e = ErrorResponse::fatal(
            sqlstate::CONNECTION_FAILURE,
            "the primary is the new backend, but no [new] backend is configured",
        );
        let _ = stream.write_all(&e.to_bytes()).await;
        return;
    };
    let checkout = tokio::select! {
        c = pool.checkout(key.clone(), password.as_deref()) => c,
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
                .with_label_values(&[primary.name(), e.reason()])
                .inc();
            tracing::warn!(error = %e, "no backend session for client");
            let _ = stream.write_all(&e.client_error()).await;
            return;
        }
    };

    let client_key = shared.cancels.register(CancelTarget {
        address: pool.settings().address.clone(),
        key: checkout.conn_ref().key,
        embedded: pool.settings().embedded.clone(),
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

    let mut routing = SessionRouting::new(id, key, password, primary);
    routing.passthrough = passthrough;
    let mut session = Session {
        checkout,
        client_key,
        routing: &mut routing,
    };
    match stream {
        ClientStream::Plain(mut tcp) => {
            let (r, w) = tcp.split();
            relay_session(&shared, r, w, &mut session, &mut close).await
        }
        ClientStream::Tls(tls) => {
            let (r, w) = tokio::io::split(*tls);
            relay_session(&shared, r, w, &mut session, &mut close).await
        }
    };
    shared.cancels.forget(client_key);
    routing.drop_secondary(OnReturn::Reset);
}

/// A logged-in client's backend side.
struct Session<'a> {
    checkout: Checkout,
    client_key: backend_key_data::CancelKey,
    routing: &'a mut SessionRouting,
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

/// Relays until the client leaves or something breaks, moving the session
/// to the new primary whenever the router asks; decides at the end what
/// happens to the primary session.
async fn relay_session<R, W>(
    shared: &Shared,
    mut client_r: R,
    client_w: W,
    session: &mut Session<'_>,
    close: &mut watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let client_w = tokio::sync::Mutex::new(client_w);
    let mut client_cursor = ClientCursor::default();
    loop {
        let state = relay::Shared::new();
        let outcome = relay_once(
            shared,
            &mut client_r,
            &client_w,
            session,
            &mut client_cursor,
            &state,
            close,
        )
        .await;
        state.release(&shared.traffic);
        match outcome {
            Some(on_return) => {
                session.checkout.on_return(on_return);
                return;
            }
            None => {
                if let Err(e) = switch_primary(shared, session).await {
                    tracing::warn!(error = %e, "cannot move the session to the new primary");
                    let _ = client_w.lock().await.write_all(&e.client_error()).await;
                    return;
                }
            }
        }
    }
}

/// Checks out a session on the current primary for this client, replays
/// its session settings there, and returns the old one to its pool.
async fn switch_primary(
    shared: &Shared,
    session: &mut Session<'_>,
) -> Result<(), cutover_backend::ConnectError> {
    let primary = shared.traffic.plane().state.primary;
    let pool =
        shared
            .pools
            .get(primary)
            .ok_or_else(|| cutover_backend::ConnectError::Protocol {
                backend: primary.name().to_string(),
                address: String::new(),
                detail: "no such backend is configured".to_string(),
            })?;
    let routing = &mut *session.routing;
    let mut checkout = pool
        .checkout(routing.key.clone(), routing.password.as_deref())
        .await?;
    if !routing.sets.is_empty() {
        let sets: Vec<&str> = routing.sets.iter().map(String::as_str).collect();
        if let Err(message) = checkout.conn().run_quietly(&sets).await {
            tracing::info!(%message, "a session setting failed on the new primary");
        }
    }
    shared.cancels.update(
        session.client_key,
        CancelTarget {
            address: pool.settings().address.clone(),
            key: checkout.conn_ref().key,
            embedded: pool.settings().embedded.clone(),
        },
    );
    let mut old = std::mem::replace(&mut session.checkout, checkout);
    old.on_return(OnReturn::Reset);
    routing.primary_switched(primary);
    tracing::debug!(primary = primary.name(), "session moved to the new primary");
    Ok(())
}

/// One pass of the relay over the current primary session. None when the
/// session must move to another primary; otherwise what to do with the
/// backend session.
async fn relay_once<R, W>(
    shared: &Shared,
    client_r: &mut R,
    client_w: &tokio::sync::Mutex<W>,
    session: &mut Session<'_>,
    client_cursor: &mut ClientCursor,
    state: &relay::Shared,
    close: &mut watch::Receiver<bool>,
) -> Option<OnReturn>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let backend_name = session.routing.primary.name();
    let metrics = shared.metrics.backend(backend_name);
    let mut backend_cursor = Cursor::default();
    let conn = session.checkout.conn();
    let (mut backend_r, mut backend_w) = conn.stream.split();
    let mut view = relay::BackendView {
        params: &mut conn.params,
        saw_fatal: false,
        drain: false,
    };
    let mut router = Router {
        session: &mut *session.routing,
        traffic: &shared.traffic,
        pools: &shared.pools,
        strategy: shared.strategy(),
        client: client_w,
        max_message: shared.config.proxy.max_message_bytes,
    };

    enum End {
        Client(Result<ClientEnd, ClientError>),
        Backend(BackendError),
        Shutdown,
    }
    let end = tokio::select! {
        r = relay::client_to_backend(
            client_r, &mut backend_w, client_cursor, state,
            shared.config.proxy.max_message_bytes, &metrics, &mut router,
        ) => End::Client(r),
        e = relay::backend_to_client(
            &mut backend_r, client_w, &mut backend_cursor, state,
            &mut view, &metrics, &shared.traffic,
        ) => End::Backend(e),
        _ = close.wait_for(|closing| *closing) => End::Shutdown,
    };

    let on_return = match end {
        End::Client(Ok(ClientEnd::SwitchPrimary)) => return None,
        End::Client(Ok(how)) => {
            tracing::debug!(?how, "client left");
            let clean = state.outstanding.load(Ordering::Relaxed) == 0
                && !client_cursor.unsynced
                && client_cursor.cursor.remaining == 0
                && backend_cursor.is_clean()
                && state.swallow.load(Ordering::Relaxed) == 0;
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
                        client_w,
                        &mut backend_cursor,
                        state,
                        &mut view,
                        &metrics,
                        &shared.traffic,
                    ),
                )
                .await;
                let response = ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string());
                let _ = client_w.lock().await.write_all(&response.to_bytes()).await;
            } else if let ClientError::BackendIo(io) = &e {
                tracing::warn!(error = %io, "lost the backend session");
                let response = backend_lost(backend_name, io);
                let _ = client_w.lock().await.write_all(&response.to_bytes()).await;
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
                    let response = backend_lost(backend_name, &e);
                    let _ = client_w.lock().await.write_all(&response.to_bytes()).await;
                }
            }
            OnReturn::Close
        }
        End::Shutdown => {
            let _ = client_w
                .lock()
                .await
                .write_all(&shutdown_error().to_bytes())
                .await;
            OnReturn::Close
        }
    };
    Some(on_return)
}

fn backend_lost(backend: &str, e: &dyn std::fmt::Display) -> ErrorResponse {
    ErrorResponse::fatal(
        sqlstate::CONNECTION_FAILURE,
        format!(
            "server closed the connection unexpectedly: lost the session on the {backend} backend ({e})"
        ),
    )
    .with_hint("the database may have restarted or terminated the session; reconnect to continue")
}
