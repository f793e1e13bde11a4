//! A TCP relay in front of a destination: it forwards every connection to its target, can pace
//! each direction of each connection, freeze them (stop forwarding, sockets open, like a peer
//! that hangs without closing), cut them all at once (a lost link) and refuse new ones for a
//! while (a link that stays down).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The relay; connections go to [`Relay::addr`].
pub struct Relay {
    /// Where the source connects.
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    frozen: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
}

impl Relay {
    /// A relay forwarding at most `bytes_per_sec` per direction and connection (0: no limit).
    /// Set its target with [`Relay::target`] before anything connects.
    pub fn new(bytes_per_sec: u64) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let frozen = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let (c2, t2, f2, d2) = (conns.clone(), target.clone(), frozen.clone(), down.clone());
        std::thread::spawn(move || {
            for inbound in l.incoming() {
                let Ok(a) = inbound else { return };
                if d2.load(Ordering::Relaxed) {
                    // The link is down: the connection goes nowhere.
                    let _ = a.shutdown(Shutdown::Both);
                    continue;
                }
                let Some(t) = *t2.lock().unwrap() else { return };
                let Ok(b) = TcpStream::connect(t) else { return };
                let _ = (a.set_nodelay(true), b.set_nodelay(true));
                c2.lock()
                    .unwrap()
                    .extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
                for (from, to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                    let frozen = f2.clone();
                    std::thread::spawn(move || forward(from, to, bytes_per_sec, &frozen));
                }
            }
        });
        Relay {
            addr,
            target,
            conns,
            frozen,
            down,
        }
    }

    /// While down, new connections are closed at once (the link has not come back).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// A relay to `target`.
    pub fn to(target: SocketAddr, bytes_per_sec: u64) -> Relay {
        let r = Relay::new(bytes_per_sec);
        r.target(target);
        r
    }

    /// Where new connections go.
    pub fn target(&self, t: SocketAddr) {
        *self.target.lock().unwrap() = Some(t);
    }

    /// Stops (true) or resumes (false) forwarding, keeping every socket open.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Relaxed);
    }

    /// Shuts every connection down.
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Cuts every connection `after` from now, on a thread of its own (join it).
    pub fn cut_after(self: &Arc<Self>, after: Duration) -> std::thread::JoinHandle<()> {
        let relay = self.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            relay.cut();
        })
    }
}

fn forward(mut from: TcpStream, mut to: TcpStream, bytes_per_sec: u64, frozen: &AtomicBool) {
    let mut buf = vec![0u8; 1 << 16];
    let start = Instant::now();
    let mut total = 0u64;
    while let Ok(n) = from.read(&mut buf) {
        while frozen.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
        if bytes_per_sec > 0 {
            let due = Duration::from_secs_f64(total as f64 / bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}
