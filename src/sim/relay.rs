//! A TCP relay in front of a server that can be cut off and restored: a network outage
//! between the appliance and Polygon (or a sink), for the tests, the demo and `bench repair`.
//! Down, it closes its listening socket (new connections are refused, as by a stopped
//! server) and shuts every relayed connection both ways (a write in flight breaks off
//! half way). It can also drop what the server sends while still passing on what the
//! client sends (a server that takes writes and whose answers are lost).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct Shared {
    up: AtomicBool,
    /// Drop the server's bytes.
    muted: AtomicBool,
    stop: AtomicBool,
    connections: Mutex<Vec<TcpStream>>,
}

pub struct Relay {
    pub port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays a free loopback port to `127.0.0.1:upstream`, up from the start.
    pub fn start(upstream: u16) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            up: AtomicBool::new(true),
            muted: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || accept_loop(Some(listener), port, upstream, shared))
        };
        Ok(Relay {
            port,
            shared,
            thread: Some(thread),
        })
    }

    /// Refuses new connections and breaks every open one.
    pub fn cut(&self) {
        self.shared.up.store(false, Ordering::SeqCst);
        // The accept loop drops its listener within a few milliseconds.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for c in self.connections().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// From now on drops what the server sends on every connection (its answers are
    /// lost) while the client's bytes still reach it.
    pub fn mute_replies(&self) {
        self.shared.muted.store(true, Ordering::SeqCst);
    }

    /// Takes connections again, on the same port, and passes the server's answers on.
    pub fn restore(&self) {
        self.shared.muted.store(false, Ordering::SeqCst);
        self.shared.up.store(true, Ordering::SeqCst);
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, Vec<TcpStream>> {
        self.shared.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sleeps until the wall clock reads `at_ms`: an outage is staged at set times (across
/// a minute's close).
pub async fn until_ms(at_ms: i64) {
    let now = crate::event::now_ms();
    tokio::time::sleep(Duration::from_millis(u64::try_from(at_ms - now).unwrap_or(0))).await;
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.connections().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(mut listener: Option<TcpListener>, port: u16, upstream: u16, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let up = shared.up.load(Ordering::SeqCst);
        if !up {
            listener = None;
        } else if listener.is_none() {
            // std sets SO_REUSEADDR, so the port can be bound again at once.
            listener = TcpListener::bind(("127.0.0.1", port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .ok();
        }
        let Some(l) = &listener else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        match l.accept() {
            Ok((client, _)) => {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let clones = (|| {
                    client.set_nonblocking(false)?;
                    client.set_nodelay(true)?;
                    server.set_nodelay(true)?;
                    std::io::Result::Ok([
                        client.try_clone()?,
                        server.try_clone()?,
                        client.try_clone()?,
                        server.try_clone()?,
                    ])
                })();
                let Ok([c1, s1, c2, s2]) = clones else { continue };
                shared
                    .connections
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend([c1, s1]);
                relay(client, s2, None);
                relay(server, c2, Some(shared.clone()));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => {
                tracing::warn!(port, error = %e, "the relay cannot accept; it stops");
                return;
            }
        }
    }
}

/// Copies `from` to `to` on a thread of its own until either side ends; with `mute`,
/// drops the bytes while the relay is muted.
fn relay(mut from: TcpStream, mut to: TcpStream, mute: Option<Arc<Shared>>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if mute.as_ref().is_some_and(|m| m.muted.load(Ordering::SeqCst)) {
                continue;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}
