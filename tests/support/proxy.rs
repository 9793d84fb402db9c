//! A loopback TCP proxy in front of a real server, for faults no peer can show on demand: an
//! outage without losing the server's data (`set_down`: connections accepted and dropped;
//! `set_refusing`: the port closed, so connecting is refused) and a slow network (`set_delay`).
//! Tests that use it say so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Handle to a running proxy.
#[derive(Clone)]
pub struct Proxy {
    /// `127.0.0.1:<port>` to connect to instead of the server.
    pub addr: String,
    down: Arc<AtomicBool>,
    refusing: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    generation: watch::Sender<u64>,
}

impl Proxy {
    /// Start forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (generation, _) = watch::channel(0u64);
        let p = Proxy {
            addr,
            down: Arc::default(),
            refusing: Arc::default(),
            delay_ms: Arc::default(),
            received: Arc::default(),
            generation,
        };
        let (me, target) = (p.clone(), target.to_string());
        tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                if me.refusing.load(Ordering::SeqCst) {
                    listener = None; // the port is closed: a connect is refused
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let Some(l) = &listener else {
                    match TcpListener::bind(&me.addr).await {
                        Ok(l) => listener = Some(l),
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                    continue;
                };
                let Ok(accepted) = tokio::time::timeout(Duration::from_millis(50), l.accept()).await else { continue };
                let Ok((client, _)) = accepted else { return };
                // Subscribe before looking at the flags: a cut that comes after this is seen by
                // the forwarding task, and one that came before it is seen here.
                let mut gen_rx = me.generation.subscribe();
                if me.down.load(Ordering::SeqCst) || me.refusing.load(Ordering::SeqCst) {
                    drop(client); // refused while down
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target).await else { continue };
                let delay = Arc::clone(&me.delay_ms);
                let received = Arc::clone(&me.received);
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            received.fetch_add(n as u64, Ordering::SeqCst);
                            let d = delay.load(Ordering::SeqCst);
                            if d > 0 {
                                tokio::time::sleep(Duration::from_millis(d)).await;
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = sr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = gen_rx.changed() => {} // cut by set_down
                    }
                });
            }
        });
        p
    }

    /// Cut every connection and refuse new ones (`true`), or accept again (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Cut every connection and close the port, so a client's connect is refused outright (it
    /// never gets as far as writing a command), or listen again (`false`).
    pub fn set_refusing(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
        if refusing {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Bytes the clients have sent so far (counted on arrival, before any delay): whether a
    /// client still talks to this server.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// Delay every client→server chunk by this much (a slow server as seen from the client).
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
}
