//! A TCP proxy in front of a service that a test can take "down" (refusing new connections and
//! cutting open ones) or make hold what clients send, to freeze a request mid-way.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// A proxy on 127.0.0.1 in front of one service; stops with its guard.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    up: AtomicBool,
    links: Mutex<Vec<JoinHandle<()>>>,
    /// While true, bytes from clients are kept (in `held`) instead of forwarded.
    holding: watch::Sender<bool>,
    held: Mutex<Vec<u8>>,
}

impl Proxy {
    /// In front of the tests' Postgres (`DATABASE_URL`).
    pub async fn postgres(up: bool) -> Self {
        Self::to(crate::host_port(&crate::database_url(), 5432), up).await
    }

    /// In front of the tests' Redis (`REDIS_URL`).
    pub async fn redis(up: bool) -> Self {
        Self::to(crate::host_port(&crate::redis_url(), 6379), up).await
    }

    /// In front of `target` (`host:port`), up or down from the start.
    pub async fn to(target: String, up: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            up: AtomicBool::new(up),
            links: Mutex::default(),
            holding: watch::Sender::new(false),
            held: Mutex::default(),
        });
        let accepting = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !accepting.up.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let link = tokio::spawn(link(client, target.clone(), accepting.clone()));
                let mut links = accepting.links.lock().unwrap();
                links.retain(|l| !l.is_finished());
                links.push(link);
            }
        });
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// `service_url` (credentials, database and all) through this proxy.
    pub fn url(&self, service_url: &str) -> String {
        crate::via(service_url, self.addr)
    }

    /// Takes the service "down" (refusing new and cutting open connections) or brings it back.
    pub fn set_up(&self, up: bool) {
        self.shared.up.store(up, Ordering::SeqCst);
        if !up {
            for link in self.shared.links.lock().unwrap().drain(..) {
                link.abort();
            }
        }
    }

    /// From now on, what clients send waits in the proxy (see [`Proxy::held`]) until
    /// [`Proxy::release`]: a request already on its way stalls, its connection still open.
    pub fn hold(&self) {
        self.shared.held.lock().unwrap().clear();
        self.shared.holding.send_replace(true);
    }

    /// Forwards what was held, and all that follows.
    pub fn release(&self) {
        self.shared.holding.send_replace(false);
    }

    /// What clients sent since [`Proxy::hold`].
    pub fn held(&self) -> Vec<u8> {
        self.shared.held.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set_up(false);
    }
}

/// Carries one client's connection to `target` both ways until either side closes.
async fn link(client: TcpStream, target: String, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(&target).await else {
        return;
    };
    for stream in [&client, &server] {
        stream.set_nodelay(true).ok();
    }
    let (from_client, to_client) = client.into_split();
    let (from_server, to_server) = server.into_split();
    tokio::join!(
        forward(from_client, to_server, Some(&*shared)),
        forward(from_server, to_client, None),
    );
}

/// Copies `from` to `to`; with `gate`, keeps what arrives while the proxy holds, and forwards it
/// once released.
async fn forward(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    gate: Option<&Shared>,
) {
    let mut buf = vec![0; 64 * 1024];
    let mut holding = gate.map(|shared| shared.holding.subscribe());
    let mut open = true;
    while open {
        let mut out = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf[..n].to_vec(),
        };
        if let (Some(shared), Some(holding)) = (gate, holding.as_mut())
            && *holding.borrow_and_update()
        {
            shared.held.lock().unwrap().extend_from_slice(&out);
            // Keep reading (what follows is held too) until released.
            loop {
                tokio::select! {
                    _ = holding.wait_for(|holding| !holding) => break,
                    read = from.read(&mut buf), if open => match read {
                        Ok(0) | Err(_) => open = false,
                        Ok(n) => {
                            shared.held.lock().unwrap().extend_from_slice(&buf[..n]);
                            out.extend_from_slice(&buf[..n]);
                        }
                    },
                }
            }
        }
        if to.write_all(&out).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
