//! Serving a fake so that a handler can reset its request's connection.
//!
//! A real provider (or a proxy in front of it) sometimes drops a connection with a TCP reset after
//! reading the request, without any answer. Clients must treat that differently from an HTTP error
//! (nothing says whether the call was billed), so a fake has to be able to do it for real: hyper
//! gives handlers no socket, so each connection carries a flag that, once set, fails every read
//! and write, and the socket is closed with SO_LINGER 0, which sends an RST.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A fake running in-process: its handle (`api`), its address, and its server task, aborted when
/// this is dropped.
pub struct Running<A> {
    pub api: A,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl<A> Running<A> {
    /// Serves `router` (the routes of `api`) on `127.0.0.1:0`.
    pub(crate) async fn start(api: A, router: Router, what: &'static str) -> std::io::Result<Self> {
        let (addr, task) = start(router, what).await?;
        Ok(Self { api, addr, task })
    }
}

impl<A> Drop for Running<A> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `127.0.0.1:0` and serves `router` there in a background task (for in-process fakes):
/// the address, and the task (aborting it stops the fake). `what` names the fake in its logs.
async fn start(
    router: Router,
    what: &'static str,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = serve(listener, router).await {
            tracing::error!(error = %e, "{what} stopped");
        }
    });
    Ok((addr, task))
}

/// Serves `router` on `listener` with a [`ResetHandle`] in every request's connect info.
pub(crate) async fn serve(listener: TcpListener, router: Router) -> std::io::Result<()> {
    let app = router.into_make_service_with_connect_info::<ResetHandle>();
    axum::serve(ResettableListener(listener), app).await
}

/// What a handler returns to reset its request's connection. `conn` is the handler's
/// `Option<Extension<ConnectInfo<ResetHandle>>>`: it is absent when the router is served some
/// other way than [`serve`], and then the response body fails before anything is written, so
/// hyper closes the connection (cleanly, not with an RST) and the client still gets no status.
pub(crate) fn reset(conn: Option<Extension<ConnectInfo<ResetHandle>>>) -> Response {
    match conn {
        Some(Extension(ConnectInfo(handle))) => {
            // Writing this response fails, so hyper drops the socket, which sends the RST.
            handle.0.store(true, Ordering::Release);
            StatusCode::OK.into_response()
        }
        None => {
            let broken = futures_util::stream::iter([Err::<Bytes, _>(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            ))]);
            Body::from_stream(broken).into_response()
        }
    }
}

/// Connect info given to handlers: setting it resets the request's connection.
#[derive(Clone)]
pub(crate) struct ResetHandle(Arc<AtomicBool>);

struct ResettableListener(TcpListener);

struct ResettableStream {
    io: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Listener for ResettableListener {
    type Io = ResettableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = Listener::accept(&mut self.0).await;
        let stream = ResettableStream {
            io,
            reset: Arc::default(),
        };
        (stream, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

impl Connected<IncomingStream<'_, ResettableListener>> for ResetHandle {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> Self {
        Self(stream.io().reset.clone())
    }
}

impl ResettableStream {
    /// Once reset is requested every I/O call fails; with SO_LINGER 0 the close sends an RST.
    fn check(&self) -> std::io::Result<()> {
        if self.reset.load(Ordering::Acquire) {
            let _ = self.io.set_zero_linger();
            return Err(std::io::ErrorKind::ConnectionReset.into());
        }
        Ok(())
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
