//! Small TCP servers with known behaviour, standing in for a service behind
//! the host bridge. Each records how every connection ended.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::End;

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Writes back everything as it arrives; half-closes after end of file.
    Echo,
    /// Reads until end of file, then writes it all back and closes.
    EchoAfterEof,
    /// Reads this many bytes, then aborts with a TCP reset.
    ResetAfter(usize),
    /// Reads and discards.
    Sink,
    /// Writes a pattern until the client goes away.
    Source,
}

/// How one connection ended, as the server saw it.
#[derive(Debug)]
pub struct Outcome {
    pub bytes_in: u64,
    pub end: End,
}

pub struct Server {
    pub addr: SocketAddr,
    pub outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(mode: Mode) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let outcomes = outcomes.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let outcomes = outcomes.clone();
                    std::thread::spawn(move || {
                        let o = serve(conn, mode);
                        outcomes.lock().unwrap().push(o);
                    });
                }
            });
        }
        Server { addr, outcomes, stop }
    }

    /// Waits until `n` connections have ended; returns their outcomes.
    pub fn wait_outcomes(&self, n: usize, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        loop {
            {
                let o = self.outcomes.lock().unwrap();
                if o.len() >= n || Instant::now() >= end {
                    return o
                        .iter()
                        .map(|o| format!("{:?} after {} B", o.end, o.bytes_in))
                        .collect();
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(mut conn: TcpStream, mode: Mode) -> Outcome {
    let _ = conn.set_nodelay(true);
    if let Mode::Source = mode {
        let chunk = crate::pattern(256 * 1024, 11);
        loop {
            if let Err(e) = conn.write_all(&chunk) {
                return Outcome {
                    bytes_in: 0,
                    end: End::Reset(e.to_string()),
                };
            }
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut got: Vec<u8> = Vec::new();
    let mut bytes_in = 0u64;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Outcome {
                    bytes_in,
                    end: End::Reset(e.to_string()),
                }
            }
        };
        bytes_in += n as u64;
        match mode {
            Mode::Echo => {
                if let Err(e) = conn.write_all(&buf[..n]) {
                    return Outcome {
                        bytes_in,
                        end: End::Reset(e.to_string()),
                    };
                }
            }
            Mode::EchoAfterEof => got.extend_from_slice(&buf[..n]),
            Mode::ResetAfter(limit) => {
                if bytes_in as usize >= limit {
                    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
                    return Outcome {
                        bytes_in,
                        end: End::Eof,
                    };
                }
            }
            Mode::Sink | Mode::Source => {}
        }
    }
    if let Mode::EchoAfterEof = mode {
        if let Err(e) = conn.write_all(&got) {
            return Outcome {
                bytes_in,
                end: End::Reset(e.to_string()),
            };
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
    Outcome {
        bytes_in,
        end: End::Eof,
    }
}
