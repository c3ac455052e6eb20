//! Addresses, TCP-or-unix streams and listeners for mio, and the connector
//! that opens many streams with bounded concurrency.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::sys;

const EINPROGRESS: i32 = 115;

/// Longest a loop waits in `poll` before it looks at the stop flag again.
pub const TICK: Duration = Duration::from_millis(100);

/// Where to connect or listen: `HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

pub fn parse_target(s: &str) -> Result<Target, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err("expected unix:PATH, got an empty path".into());
        }
        return Ok(Target::Unix(p.into()));
    }
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("expected HOST:PORT or unix:PATH, got {s:?}: {e}"))?;
    addrs
        .next()
        .map(Target::Tcp)
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// A connected stream of either kind.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Options applied to a socket before it connects.
#[derive(Clone, Copy, Debug, Default)]
pub struct SockOpts {
    /// TCP_NODELAY.
    pub nodelay: bool,
    /// SO_SNDBUF and SO_RCVBUF (the kernel doubles it); None keeps autotuning.
    pub buf: Option<usize>,
}

impl Stream {
    /// Starts a non-blocking connect; completion shows as writability.
    pub fn connect(t: &Target, o: SockOpts) -> io::Result<Stream> {
        match t {
            Target::Tcp(a) => {
                let s = Socket::new(Domain::for_address(*a), Type::STREAM, None)?;
                s.set_nonblocking(true)?;
                s.set_nodelay(o.nodelay)?;
                if let Some(b) = o.buf {
                    s.set_send_buffer_size(b)?;
                    s.set_recv_buffer_size(b)?;
                }
                match s.connect(&(*a).into()) {
                    Ok(()) => {}
                    // EINPROGRESS (Linux: 115): completion shows as writability.
                    Err(e) if e.raw_os_error() == Some(EINPROGRESS) => {}
                    Err(e) => return Err(e),
                }
                Ok(Stream::Tcp(TcpStream::from_std(s.into())))
            }
            Target::Unix(p) => {
                let s = UnixStream::connect(p)?;
                if let Some(b) = o.buf {
                    let r = socket2::SockRef::from(&s);
                    r.set_send_buffer_size(b)?;
                    r.set_recv_buffer_size(b)?;
                }
                Ok(Stream::Unix(s))
            }
        }
    }

    /// TCP_NODELAY (no-op for unix sockets).
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(true),
            Stream::Unix(_) => Ok(()),
        }
    }

    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }

    /// After a connect: `Ok(true)` connected, `Ok(false)` still connecting.
    pub fn connect_state(&self) -> io::Result<bool> {
        let (err, peer) = match self {
            Stream::Tcp(s) => (s.take_error(), s.peer_addr().map(|_| ())),
            Stream::Unix(s) => (s.take_error(), s.peer_addr().map(|_| ())),
        };
        if let Some(e) = err? {
            return Err(e);
        }
        match peer {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }
}

extern "C" {
    fn ioctl(fd: std::ffi::c_int, request: std::ffi::c_ulong, ...) -> std::ffi::c_int;
}

/// SIOCOUTQ (= TIOCOUTQ): bytes in the send queue not yet acknowledged (TCP)
/// or not yet read by the peer (unix).
const SIOCOUTQ: std::ffi::c_ulong = 0x5411;

impl Stream {
    /// Bytes written but not yet delivered (see SIOCOUTQ).
    pub fn unsent(&self) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        };
        let mut n: std::ffi::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int through the pointer.
        if unsafe { ioctl(fd, SIOCOUTQ, &mut n as *mut std::ffi::c_int) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.max(0) as usize)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(r, t, i),
            Stream::Unix(s) => s.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
        }
    }
}

/// A listening socket of either kind.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Kernel accept backlog asked for (capped by net.core.somaxconn).
const BACKLOG: i32 = 65535;

impl Listener {
    /// Binds `count` listeners on `t`: for TCP, separate sockets with
    /// SO_REUSEPORT (the kernel spreads connections among them); for unix, one
    /// socket shared. A stale unix socket file is replaced.
    /// `buf`: SO_SNDBUF/SO_RCVBUF, inherited by accepted sockets.
    pub fn bind(t: &Target, count: usize, buf: Option<usize>) -> io::Result<(Vec<Listener>, Target)> {
        let set_buf = |s: &Socket| -> io::Result<()> {
            if let Some(b) = buf {
                s.set_send_buffer_size(b)?;
                s.set_recv_buffer_size(b)?;
            }
            Ok(())
        };
        match t {
            Target::Tcp(addr) => {
                let mut addr = *addr;
                let mut out = Vec::with_capacity(count);
                for _ in 0..count {
                    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
                    s.set_reuse_address(true)?;
                    if count > 1 {
                        s.set_reuse_port(true)?;
                    }
                    s.set_nonblocking(true)?;
                    set_buf(&s)?;
                    s.bind(&addr.into())?;
                    s.listen(BACKLOG)?;
                    let std: std::net::TcpListener = s.into();
                    // Port 0: the others join the port the first one got.
                    addr = std.local_addr()?;
                    out.push(Listener::Tcp(TcpListener::from_std(std)));
                }
                Ok((out, Target::Tcp(addr)))
            }
            Target::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
                s.set_nonblocking(true)?;
                set_buf(&s)?;
                s.bind(&SockAddr::unix(path)?)?;
                s.listen(BACKLOG)?;
                let std: std::os::unix::net::UnixListener = s.into();
                let mut out = Vec::with_capacity(count);
                for _ in 1..count {
                    out.push(Listener::Unix(UnixListener::from_std(std.try_clone()?)));
                }
                out.push(Listener::Unix(UnixListener::from_std(std)));
                Ok((out, t.clone()))
            }
        }
    }

    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    pub fn source(&mut self) -> &mut dyn Source {
        match self {
            Listener::Tcp(l) => l,
            Listener::Unix(l) => l,
        }
    }
}

/// Polls until an event, `deadline`, or TICK, whichever comes first. EINTR
/// (a signal) counts as a wake-up with no events.
pub fn poll_once(
    poll: &mut Poll,
    events: &mut Events,
    deadline: Option<Instant>,
    max_wait: Duration,
) -> io::Result<()> {
    let mut wait = max_wait.min(TICK);
    if let Some(d) = deadline {
        wait = wait.min(d.saturating_duration_since(Instant::now()));
    }
    match poll.poll(events, Some(wait)) {
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            events.clear();
            Ok(())
        }
        r => r,
    }
}

/// A stream that finished connecting.
pub struct Connected {
    pub stream: Stream,
}

/// Opens `n` streams to `target`, at most `concurrency` connecting at once,
/// each registered for reading and writing with token `Token(i)`. Result `i`
/// is stream `i`'s. Stops at `deadline` or on the stop flag, failing the rest.
pub fn connect_many(
    poll: &mut Poll,
    events: &mut Events,
    target: &Target,
    n: usize,
    concurrency: usize,
    opts: SockOpts,
    deadline: Instant,
) -> Vec<Result<Connected, String>> {
    let mut out: Vec<Option<Result<Connected, String>>> = (0..n).map(|_| None).collect();
    let mut pending: Vec<Option<Stream>> = (0..n).map(|_| None).collect();
    let (mut next, mut inflight, mut done) = (0usize, 0usize, 0usize);
    let concurrency = concurrency.max(1);
    while done < n {
        while inflight < concurrency && next < n {
            let i = next;
            next += 1;
            match Stream::connect(target, opts).and_then(|mut s| {
                poll.registry()
                    .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)?;
                Ok(s)
            }) {
                Ok(s) => {
                    pending[i] = Some(s);
                    inflight += 1;
                }
                Err(e) => {
                    out[i] = Some(Err(format!("connect: {e}")));
                    done += 1;
                }
            }
        }
        if done == n {
            break;
        }
        let why = if sys::stop_requested() {
            Some("interrupted by a signal while connecting")
        } else if Instant::now() >= deadline {
            Some("timed out connecting")
        } else {
            None
        };
        if let Some(why) = why {
            for (o, p) in out.iter_mut().zip(pending.iter_mut()) {
                if o.is_none() {
                    *p = None;
                    *o = Some(Err(why.to_string()));
                }
            }
            break;
        }
        if let Err(e) = poll_once(poll, events, Some(deadline), TICK) {
            for o in out.iter_mut().filter(|o| o.is_none()) {
                *o = Some(Err(format!("poll: {e}")));
            }
            break;
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(s) = pending.get(i).and_then(|p| p.as_ref()) else {
                continue;
            };
            let r = match s.connect_state() {
                Ok(false) => continue,
                Ok(true) => {
                    let stream = pending[i].take().expect("pending");
                    Ok(Connected { stream })
                }
                Err(e) => {
                    pending[i] = None;
                    Err(format!("connect: {e}"))
                }
            };
            out[i] = Some(r);
            inflight -= 1;
            done += 1;
        }
    }
    out.into_iter()
        .map(|o| o.unwrap_or_else(|| Err("not connected".into())))
        .collect()
}
