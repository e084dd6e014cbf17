//! Fault injection for tests and benchmarks: a TCP proxy between agents and the gateway that
//! can pass traffic, reset every connection, blackhole (accept and forward nothing — a
//! half-open link), add latency, cap bandwidth, slice the stream into tiny writes, or close a
//! connection in the middle of the next frame.
//!
//! It runs on its own thread and runtime, so it works under any test harness; the handle
//! switches modes at any time and counts what it did.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Keep connections open, forward nothing, accept new ones (and forward nothing on them).
    Blackhole,
    /// Delay every chunk by this much (each direction).
    Latency(Duration),
    /// At most this many bytes per second per direction.
    Bandwidth(u64),
    /// Forward in writes of at most this many bytes.
    Slice(usize),
    /// Forward half of the next chunk in each direction, then close the connection.
    CloseMidFrame,
    /// Refuse (reset) every new connection.
    Refuse,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub resets: AtomicU64,
    pub bytes: AtomicU64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped to reset every open connection.
    reset: watch::Sender<u64>,
    pub counters: Arc<Counters>,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards to `target`.
    pub fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        let (mode_tx, mode_rx) = watch::channel(Mode::Pass);
        let (reset_tx, reset_rx) = watch::channel(0u64);
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match TcpListener::bind("127.0.0.1:0").await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = addr_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = addr_tx.send(listener.local_addr());
                    tokio::select! {
                        _ = accept_loop(listener, target, mode_rx, reset_rx, c) => {}
                        _ = stop_rx => {}
                    }
                });
            })?;
        let addr = addr_rx
            .recv()
            .map_err(|_| std::io::Error::other("proxy thread ended"))??;
        Ok(FaultProxy {
            addr,
            mode: mode_tx,
            reset: reset_tx,
            counters,
            stop: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn set(&self, mode: Mode) {
        let _ = self.mode.send(mode);
    }

    /// Resets (RST) every connection open now.
    pub fn reset_all(&self) {
        self.reset.send_modify(|n| *n += 1);
    }

    pub fn ws_url(&self, scheme: &str) -> String {
        format!("{scheme}://{}/v1/ws", self.addr)
    }

    pub fn stop(&self) {
        if let Some(s) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Receiver<Mode>,
    reset: watch::Receiver<u64>,
    counters: Arc<Counters>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        if *mode.borrow() == Mode::Refuse {
            let _ = client.set_zero_linger();
            drop(client);
            counters.resets.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let (mode, reset, counters) = (mode.clone(), reset.clone(), counters.clone());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let mut reset_a = reset.clone();
            let mut reset_b = reset;
            reset_a.mark_unchanged();
            reset_b.mark_unchanged();
            let a = pump(cr, sw, mode.clone(), reset_a, counters.clone());
            let b = pump(sr, cw, mode, reset_b, counters.clone());
            // When either direction ends, both sockets are dropped (closed, RST on linger 0).
            tokio::select! {
                _ = a => {}
                _ = b => {}
            }
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    mut reset: watch::Receiver<u64>,
    counters: Arc<Counters>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = reset.changed() => {
                counters.resets.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let current = *mode.borrow_and_update();
        let data = &buf[..n];
        let written = match current {
            Mode::Pass | Mode::Refuse => to.write_all(data).await,
            Mode::Blackhole => Ok(()),
            Mode::Latency(d) => {
                tokio::time::sleep(d).await;
                to.write_all(data).await
            }
            Mode::Bandwidth(bps) => {
                let secs = n as f64 / bps.max(1) as f64;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                to.write_all(data).await
            }
            Mode::Slice(max) => {
                let mut r = Ok(());
                for chunk in data.chunks(max.max(1)) {
                    r = to.write_all(chunk).await;
                    if r.is_err() {
                        break;
                    }
                    let _ = to.flush().await;
                    tokio::task::yield_now().await;
                }
                r
            }
            Mode::CloseMidFrame => {
                let _ = to.write_all(&data[..n / 2]).await;
                let _ = to.flush().await;
                counters.resets.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if written.is_err() {
            return;
        }
        counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}
