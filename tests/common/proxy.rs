//! A TCP relay in front of a real server that a test can cut off and restore: down, it
//! closes its listening socket (new connections are refused, as by a stopped server) and
//! shuts every relayed connection both ways (a write in flight breaks off half way). It
//! can also drop what the server sends while still passing on what the client sends (a
//! server that takes writes and whose answers are lost).

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

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Relays a free loopback port to `127.0.0.1:upstream`, up from the start.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            up: AtomicBool::new(true),
            muted: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        });
        let thread = {
            let shared = shared.clone();
            listener.set_nonblocking(true).unwrap();
            std::thread::spawn(move || accept_loop(Some(listener), port, upstream, shared))
        };
        Proxy {
            port,
            shared,
            thread: Some(thread),
        }
    }

    /// Refuses new connections and breaks every open one.
    pub fn cut(&self) {
        self.shared.up.store(false, Ordering::SeqCst);
        // The accept loop drops its listener within a few milliseconds.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "the relay on {} still accepts", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
        for c in self.shared.connections.lock().unwrap().drain(..) {
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
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.shared.connections.lock().unwrap().drain(..) {
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
            listener = TcpListener::bind(("127.0.0.1", port)).ok();
            if let Some(l) = &listener {
                l.set_nonblocking(true).unwrap();
            }
        }
        let Some(l) = &listener else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        match l.accept() {
            Ok((client, _)) => {
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let mut open = shared.connections.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                relay(client.try_clone().unwrap(), server.try_clone().unwrap(), None);
                relay(server, client, Some(shared.clone()));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("the relay on {port}: {e}"),
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
