//! A TCP proxy on loopback that a test can cut: every open connection is dropped at once, as a
//! network fault or a broker restart would, while new connections keep working.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    cut: watch::Sender<u64>,
    generation: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(0u64);
        let generation = Arc::new(AtomicU64::new(0));
        let cuts = cut.clone();
        let down = Arc::new(AtomicBool::new(false));
        let is_down = down.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if is_down.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut_rx = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                    // Dropping both sockets ends the connection for both sides.
                });
            }
        });
        Proxy {
            addr,
            cut,
            generation,
            down,
            task,
        }
    }

    /// While down, connections are refused (accepted and dropped at once) and open ones are cut.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    /// Drops every connection open through the proxy.
    pub fn cut(&self) {
        let next = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.cut.send(next);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
