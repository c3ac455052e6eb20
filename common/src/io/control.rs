//! The control socket and the metrics listener: how a daemon answers "what
//! are you doing?" without anybody reading its log.
//!
//! - The **control socket** (unix, mode 0660) takes one request line per
//!   connection: `status [json] [streams] [guest=NAME]`, and answers with a
//!   header line `vios-status 1 established=yes|no` and the status, as a
//!   table or as JSON ([`crate::status`]). `vios-*-bridge status` is its
//!   client ([`query`]).
//! - The **metrics listener** (TCP, loopback unless the operator says
//!   otherwise) answers `GET /metrics` with Prometheus text.
//!
//! Neither is an attack surface: a request is at most 512 bytes (4 KiB for
//! HTTP) and must arrive within 2 s, one request per connection, at most 16
//! connections at once (more are closed at once), and the answer is written
//! without blocking the loop. Only local users with access to the socket, or
//! to the metrics address, can ask; guests reach neither.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::net::{TcpListener, UnixListener};
use mio::{Interest, Registry, Token};

use super::slab::Slab;
use super::sock::{interrupted, would_block, Sock};
use crate::status::Status;

const MAX_CONTROL_REQUEST: usize = 512;
const MAX_HTTP_REQUEST: usize = 4096;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_CLIENTS: usize = 16;
/// Descriptors a control server may hold: two listeners and its clients.
pub const MAX_DESCRIPTORS: usize = 2 + MAX_CLIENTS;

/// Where a daemon's status comes from.
pub trait StatusSource {
    /// The status now; with every stream if `streams`, only guest `guest`
    /// if given.
    fn status(&mut self, now: Instant, streams: bool, guest: Option<&str>) -> Status;
}

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusQuery {
    pub json: bool,
    pub streams: bool,
    pub guest: Option<String>,
}

impl StatusQuery {
    /// The request line a client sends.
    pub fn to_line(&self) -> String {
        let mut l = "status".to_owned();
        if self.json {
            l.push_str(" json");
        }
        if self.streams {
            l.push_str(" streams");
        }
        if let Some(g) = &self.guest {
            l.push_str(" guest=");
            l.push_str(g);
        }
        l.push('\n');
        l
    }

    pub fn parse(line: &str) -> Result<StatusQuery, String> {
        let mut words = line.split_whitespace();
        if words.next() != Some("status") {
            return Err("expected: status [json] [streams] [guest=NAME]".into());
        }
        let mut q = StatusQuery {
            json: false,
            streams: false,
            guest: None,
        };
        for w in words {
            match w {
                "json" => q.json = true,
                "streams" => q.streams = true,
                _ if w.starts_with("guest=") => q.guest = Some(w[6..].to_owned()),
                _ => return Err(format!("unknown word {w:?}")),
            }
        }
        Ok(q)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Control,
    Http,
}

#[derive(Debug)]
struct Client {
    sock: Sock,
    kind: Kind,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    deadline: Instant,
    answered: bool,
}

#[derive(Debug)]
pub struct ControlServer {
    unix: Option<(UnixListener, PathBuf)>,
    metrics: Option<TcpListener>,
    clients: Slab<Client>,
    /// Tokens: `base` the control socket, `base + 1` the metrics listener,
    /// `base + 2 + k` client `k`.
    base: usize,
    /// Clients with something to do this turn.
    busy: Vec<usize>,
}

impl ControlServer {
    /// A server with no listener yet; its tokens start at `base`.
    pub fn new(base: usize) -> ControlServer {
        ControlServer {
            unix: None,
            metrics: None,
            clients: Slab::default(),
            base,
            busy: Vec::new(),
        }
    }

    pub fn owns(&self, t: Token) -> bool {
        t.0 >= self.base && t.0 < self.base + 2 + MAX_CLIENTS
    }

    /// Listens on the control socket `path` (mode 0660). A socket left by a
    /// dead daemon is replaced; one a running daemon listens on is an error.
    pub fn bind_control(&mut self, path: &Path, registry: &Registry) -> io::Result<()> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(io::Error::other(format!(
                    "{} exists and is not a socket",
                    path.display()
                )));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running daemon", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let mut l = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        registry.register(&mut l, Token(self.base), Interest::READABLE)?;
        info!("control socket {} (try: status)", path.display());
        self.unix = Some((l, path.to_path_buf()));
        Ok(())
    }

    /// Serves Prometheus text on `addr`.
    pub fn bind_metrics(&mut self, addr: SocketAddr, registry: &Registry) -> io::Result<()> {
        let mut l = TcpListener::bind(addr)?;
        registry.register(&mut l, Token(self.base + 1), Interest::READABLE)?;
        info!("metrics on http://{}/metrics", l.local_addr()?);
        self.metrics = Some(l);
        Ok(())
    }

    /// Removes the control socket's path (at exit).
    pub fn cleanup(&self) {
        if let Some((_, p)) = &self.unix {
            let _ = std::fs::remove_file(p);
        }
    }

    pub fn ready(&mut self, ev: &mio::event::Event, registry: &Registry, now: Instant) {
        let t = ev.token().0;
        if t == self.base || t == self.base + 1 {
            self.accept(t == self.base + 1, registry, now);
        } else if self.clients.get(t - self.base - 2).is_some() {
            self.busy.push(t - self.base - 2);
        }
    }

    fn accept(&mut self, http: bool, registry: &Registry, now: Instant) {
        loop {
            let accepted = if http {
                self.metrics
                    .as_ref()
                    .map(|l| l.accept().map(|(s, _)| (Sock::Tcp(s), Kind::Http)))
            } else {
                self.unix
                    .as_ref()
                    .map(|(l, _)| l.accept().map(|(s, _)| (Sock::Unix(s), Kind::Control)))
            };
            let (mut sock, kind) = match accepted {
                None => return,
                Some(Ok(c)) => c,
                Some(Err(e)) if would_block(&e) => return,
                Some(Err(e)) if interrupted(&e) => continue,
                Some(Err(e)) => {
                    warn!("control: accept failed: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                continue; // dropped: closed at once
            }
            let key = self.clients.next_key();
            let token = Token(self.base + 2 + key);
            if sock
                .register(registry, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            self.clients.insert(Client {
                sock,
                kind,
                input: Vec::new(),
                output: Vec::new(),
                written: 0,
                deadline: now + REQUEST_TIMEOUT,
                answered: false,
            });
            self.busy.push(key);
        }
    }

    /// Reads requests, answers them from `src`, writes, and closes what is
    /// done or too slow.
    pub fn turn(&mut self, registry: &Registry, now: Instant, src: &mut dyn StatusSource) {
        let mut keys = std::mem::take(&mut self.busy);
        keys.extend(
            self.clients
                .keys()
                .filter(|&k| self.clients.get(k).is_some_and(|c| now >= c.deadline)),
        );
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let Some(c) = self.clients.get_mut(key) else {
                continue;
            };
            let done = serve(c, now, src);
            if done || now >= c.deadline {
                let c = self.clients.remove(key).expect("live");
                c.sock.close(registry);
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients
            .keys()
            .filter_map(|k| self.clients.get(k))
            .map(|c| c.deadline)
            .min()
    }
}

/// Moves one client along; true once it is done with.
fn serve(c: &mut Client, now: Instant, src: &mut dyn StatusSource) -> bool {
    if !c.answered {
        let max = match c.kind {
            Kind::Control => MAX_CONTROL_REQUEST,
            Kind::Http => MAX_HTTP_REQUEST,
        };
        let mut buf = [0u8; 1024];
        loop {
            match c.sock.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    c.input.extend_from_slice(&buf[..n]);
                    if c.input.len() > max {
                        return true;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if interrupted(&e) => {}
                Err(_) => return true,
            }
        }
        let complete = match c.kind {
            Kind::Control => c.input.contains(&b'\n'),
            Kind::Http => c.input.windows(4).any(|w| w == b"\r\n\r\n"),
        };
        if !complete {
            return false;
        }
        c.output = match c.kind {
            Kind::Control => answer_control(&c.input, now, src),
            Kind::Http => answer_http(&c.input, now, src),
        };
        c.answered = true;
    }
    while c.written < c.output.len() {
        match c.sock.write(&c.output[c.written..]) {
            Ok(0) => return true,
            Ok(n) => c.written += n,
            Err(e) if would_block(&e) => return false,
            Err(e) if interrupted(&e) => {}
            Err(_) => return true,
        }
    }
    true
}

fn answer_control(input: &[u8], now: Instant, src: &mut dyn StatusSource) -> Vec<u8> {
    let line = String::from_utf8_lossy(input);
    let line = line.lines().next().unwrap_or_default();
    match StatusQuery::parse(line) {
        Ok(q) => {
            let s = src.status(now, q.streams, q.guest.as_deref());
            let body = if q.json {
                s.to_json() + "\n"
            } else {
                s.to_table(q.streams)
            };
            // Asked about a guest it does not serve: not established.
            let unknown = q.guest.is_some() && s.guests.is_empty();
            let est = if s.all_established() && !unknown {
                "yes"
            } else {
                "no"
            };
            format!("vios-status 1 established={est}\n{body}").into_bytes()
        }
        Err(e) => format!("vios-status 1 error={e}\n").into_bytes(),
    }
}

fn answer_http(input: &[u8], now: Instant, src: &mut dyn StatusSource) -> Vec<u8> {
    let head = String::from_utf8_lossy(input);
    let first = head.lines().next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next(), parts.next());
    if method != Some("GET") || path.map(|p| p.split('?').next()) != Some(Some("/metrics")) {
        let body = "only GET /metrics is served here\n";
        return format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
    }
    let body = src.status(now, false, None).to_prometheus();
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What [`query`] found.
pub struct Answer {
    pub established: bool,
    pub body: String,
}

/// The client side: asks the daemon at `path`. The error says which socket
/// was tried.
pub fn query(path: &Path, q: &StatusQuery) -> Result<Answer, String> {
    let fail = |e: io::Error| format!("cannot reach the daemon at {}: {e}", path.display());
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(fail)?;
    s.write_all(q.to_line().as_bytes()).map_err(fail)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(fail)?;
    let (head, body) = out.split_once('\n').unwrap_or((out.as_str(), ""));
    if let Some(e) = head.strip_prefix("vios-status 1 error=") {
        return Err(format!("the daemon at {} says: {e}", path.display()));
    }
    let established = match head {
        "vios-status 1 established=yes" => true,
        "vios-status 1 established=no" => false,
        _ => {
            return Err(format!(
                "{} answered {head:?}: not a vios daemon?",
                path.display()
            ))
        }
    };
    Ok(Answer {
        established,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ChannelStatus, GuestStatus};

    struct Fixed;

    impl StatusSource for Fixed {
        fn status(&mut self, _: Instant, _: bool, guest: Option<&str>) -> Status {
            let g = GuestStatus {
                name: guest.unwrap_or("vm1").into(),
                channels: vec![ChannelStatus {
                    channel: "c".into(),
                    session: "handshaking".into(),
                    ..ChannelStatus::default()
                }],
                ..GuestStatus::default()
            };
            Status {
                daemon: "test".into(),
                guests: vec![g],
                ..Status::default()
            }
        }
    }

    fn run_server(
        path: PathBuf,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut poll = mio::Poll::new().unwrap();
            let mut events = mio::Events::with_capacity(16);
            let mut srv = ControlServer::new(10);
            srv.bind_control(&path, poll.registry()).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                poll.poll(&mut events, Some(Duration::from_millis(20))).unwrap();
                let now = Instant::now();
                for ev in events.iter() {
                    srv.ready(ev, poll.registry(), now);
                }
                srv.turn(poll.registry(), now, &mut Fixed);
            }
            srv.cleanup();
        })
    }

    #[test]
    fn answers_status_and_refuses_junk_without_blocking() {
        let path = std::env::temp_dir().join(format!("vios-control-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = run_server(path.clone(), stop.clone());
        let end = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            assert!(Instant::now() < end);
            std::thread::sleep(Duration::from_millis(10));
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // A client that connects and says nothing does not hold up others.
        let _idle = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let q = StatusQuery {
            json: true,
            streams: false,
            guest: Some("vm9".into()),
        };
        let a = query(&path, &q).unwrap();
        assert!(!a.established);
        assert!(a.body.contains("\"name\":\"vm9\""), "{}", a.body);
        let a = query(
            &path,
            &StatusQuery {
                json: false,
                streams: true,
                guest: None,
            },
        )
        .unwrap();
        assert!(a.body.contains("GUEST") && a.body.contains("vm1"), "{}", a.body);
        // Junk gets an error line; an over-long request is cut off.
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(b"shutdown now\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("vios-status 1 error="), "{out}");
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let _ = s.write_all(&[b'x'; 4096]);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
        let e = query(&path, &q).err().unwrap();
        assert!(e.contains(&path.display().to_string()), "{e}");
    }
}
