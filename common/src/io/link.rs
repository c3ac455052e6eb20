//! The channel: the one byte pipe a session runs over.
//!
//! Three kinds, one behaviour towards the [`Session`]:
//! - **unix socket, connecting** (host side to QEMU's chardev socket; guest
//!   side in development): connect, retry with backoff while the socket is
//!   missing or refuses, and on end-of-file or error close, end the session
//!   and connect again;
//! - **virtio-serial device** (guest side): opened once and never closed
//!   (closing discards input and stops QEMU reading the host socket). A read
//!   of 0 bytes means "no host connected right now", not end of stream; the
//!   session restarts its handshake and the HELLO waits until the host is back.
//!   Edge-triggered polling fires on every host connect, disconnect, arrival
//!   and drain, so this never spins; a 1 s timer covers a missed edge.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use super::limits::Descriptors;
use super::sock::{drained, interrupted, would_block};
use crate::proto::Session;

const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often an absent host is looked for without an edge.
const DEVICE_POLL: Duration = Duration::from_secs(1);
/// A failure repeated this long is reported loudly again.
pub const REPORT_AGAIN: Duration = Duration::from_secs(60);
/// Bytes read from the channel per turn before other work gets a go.
const READ_BUDGET_BYTES: usize = 1 << 20;

/// Where the channel is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelSpec {
    /// Connect to a unix socket (QEMU's chardev, or a stand-in).
    Unix(PathBuf),
    /// Open a virtio-serial character device.
    Device(PathBuf),
    /// Find the virtio-serial port with this name.
    Named(String),
}

impl ChannelSpec {
    /// The channel's short name: the socket's or device's file name, or the
    /// port name.
    pub fn name(&self) -> String {
        match self {
            ChannelSpec::Unix(p) | ChannelSpec::Device(p) => p
                .file_name()
                .map_or_else(|| p.display().to_string(), |f| f.to_string_lossy().into_owned()),
            ChannelSpec::Named(n) => n.clone(),
        }
    }
}

impl std::fmt::Display for ChannelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            ChannelSpec::Device(p) => write!(f, "{}", p.display()),
            ChannelSpec::Named(n) => write!(f, "port {n}"),
        }
    }
}

/// What a channel socket on disk is: its file's device and inode, and its
/// owner. The host reconnects to a discovered path only while it is still
/// this very socket, so a path swapped for another socket or a symlink by
/// someone who can write the directory is not followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SocketId {
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
}

impl SocketId {
    /// The socket at `path` itself (a symlink there is an error, not
    /// followed).
    pub fn of(path: &Path) -> io::Result<SocketId> {
        SocketId::from_metadata(&fs::symlink_metadata(path)?, path)
    }

    /// The socket `file` is (opened with `O_PATH | O_NOFOLLOW`: a symlink
    /// there is the symlink itself, an error); `path` is for messages.
    pub fn of_open(file: &File, path: &Path) -> io::Result<SocketId> {
        SocketId::from_metadata(&file.metadata()?, path)
    }

    fn from_metadata(m: &fs::Metadata, path: &Path) -> io::Result<SocketId> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if !m.file_type().is_socket() {
            let what = if m.file_type().is_symlink() {
                "a symlink"
            } else {
                "not a socket"
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is {what}", path.display()),
            ));
        }
        Ok(SocketId {
            dev: m.dev(),
            ino: m.ino(),
            uid: m.uid(),
        })
    }
}

/// The device node of the virtio-serial port named `name`: the udev symlink
/// `/dev/virtio-ports/NAME` if present, else the `vportNpM` whose sysfs `name`
/// attribute matches.
pub fn resolve_port_name(name: &str, sys: &Path, dev: &Path) -> io::Result<PathBuf> {
    let link = dev.join("virtio-ports").join(name);
    if link.exists() {
        return Ok(link);
    }
    for entry in fs::read_dir(sys)? {
        let entry = entry?;
        let Ok(found) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if found.trim_end() == name {
            return Ok(dev.join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio-serial port named {name:?} under {}", sys.display()),
    ))
}

#[derive(Debug)]
enum Io {
    Unix(UnixStream),
    /// The open device and its path (for logs).
    Device(File, PathBuf),
}

/// A change the owner should log.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkNews {
    /// Connected to the unix socket.
    Connected,
    /// The device is open (at this path); a host may or may not be there.
    Opened(PathBuf),
    /// Bytes moved on the device: a host is connected.
    HostPresent,
    Lost(String),
    /// A connect or open attempt failed; retrying after the given delay.
    /// `repeated` when it failed the same way last time and was reported
    /// less than [`REPORT_AGAIN`] ago, so the owner can log it quietly.
    Failed {
        error: String,
        retry_in: Duration,
        repeated: bool,
    },
    HostAbsent,
}

#[derive(Debug)]
pub struct Link {
    spec: ChannelSpec,
    token: Token,
    io: Option<Io>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Device only: whether a host is believed connected.
    host_present: bool,
    /// The last connect failure reported loudly, and when.
    last_failure: Option<(String, Instant)>,
    readable: bool,
    writable: bool,
    /// The last event said end-of-file or an error is queued.
    closing: bool,
    /// Where the channel's descriptor is counted.
    fds: Arc<Descriptors>,
    /// (unix socket) Registered for WRITABLE too: a write blocked.
    write_interest: bool,
    /// (unix socket) Connect only while the path is this socket.
    expected: Option<SocketId>,
}

impl Link {
    /// A link that will connect at the first [`Link::handle_timeout`].
    pub fn new(spec: ChannelSpec, token: Token, now: Instant) -> Link {
        Link {
            spec,
            token,
            io: None,
            retry_at: Some(now),
            backoff: RETRY_FIRST,
            host_present: false,
            last_failure: None,
            readable: false,
            writable: false,
            closing: false,
            fds: Arc::new(Descriptors::unlimited()),
            write_interest: false,
            expected: None,
        }
    }

    /// (unix socket) Connects only while the path is the socket `id` (as
    /// discovered), owned by the user of the process listening on it.
    pub fn expecting(mut self, id: SocketId) -> Link {
        self.expected = Some(id);
        self
    }

    /// Counts the channel's descriptor in `fds`: without room there, a
    /// connect fails like any other and is retried after the backoff.
    pub fn with_descriptors(mut self, fds: Arc<Descriptors>) -> Link {
        self.fds = fds;
        self
    }

    pub fn spec(&self) -> &ChannelSpec {
        &self.spec
    }

    pub fn token(&self) -> Token {
        self.token
    }

    pub fn is_connected(&self) -> bool {
        self.io.is_some()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.retry_at
    }

    /// The link in words, for status reports: `connected`, `open` (a
    /// device; `waiting for the host` when none is there), or `down` with
    /// the last error and when it is tried again.
    pub fn state(&self, now: Instant) -> String {
        match &self.io {
            Some(Io::Unix(_)) => "connected".into(),
            Some(Io::Device(..)) if self.host_present => "open, host present".into(),
            Some(Io::Device(..)) => "open, waiting for the host".into(),
            None => {
                let retry = self
                    .retry_at
                    .map(|t| format!("; retry in {} ms", t.saturating_duration_since(now).as_millis()))
                    .unwrap_or_default();
                let why = self
                    .last_failure
                    .as_ref()
                    .map_or_else(|| "not connected".to_owned(), |(e, _)| e.clone());
                format!("down: {why}{retry}")
            }
        }
    }

    /// Whether buffered readiness means there is reading left to do.
    pub fn may_read(&self) -> bool {
        self.io.is_some() && self.readable
    }

    pub fn ready(&mut self, readable: bool, writable: bool, closing: bool) {
        self.readable |= readable;
        self.writable |= writable;
        self.closing |= closing;
    }

    /// Connects or re-polls when due.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        registry: &Registry,
        session: &mut Session,
    ) -> Option<LinkNews> {
        if self.retry_at.is_none_or(|t| now < t) {
            return None;
        }
        self.retry_at = None;
        if self.io.is_some() {
            // Device with no host: look again without waiting for an edge.
            self.readable = true;
            self.writable = true;
            self.retry_at = Some(now + DEVICE_POLL);
            return None;
        }
        match self.open(registry) {
            Ok(io) => {
                self.io = Some(io);
                self.readable = true;
                self.writable = true;
                self.write_interest = false;
                self.closing = false;
                self.backoff = RETRY_FIRST;
                self.last_failure = None;
                session.link_up(now);
                match &self.io {
                    Some(Io::Device(_, path)) => {
                        self.retry_at = Some(now + DEVICE_POLL);
                        Some(LinkNews::Opened(path.clone()))
                    }
                    _ => Some(LinkNews::Connected),
                }
            }
            Err(e) => {
                let retry_in = self.backoff;
                self.retry_at = Some(now + retry_in);
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
                let error = e.to_string();
                let repeated = self
                    .last_failure
                    .as_ref()
                    .is_some_and(|(last, at)| *last == error && now.duration_since(*at) < REPORT_AGAIN);
                if !repeated {
                    self.last_failure = Some((error.clone(), now));
                }
                Some(LinkNews::Failed {
                    error,
                    retry_in,
                    repeated,
                })
            }
        }
    }

    fn open(&self, registry: &Registry) -> io::Result<Io> {
        if !self.fds.take_infra(1) {
            return Err(io::Error::other(format!(
                "no descriptor free ({} of {} in use)",
                self.fds.used(),
                self.fds.limit()
            )));
        }
        let r = self.open_counted(registry);
        if r.is_err() {
            self.fds.release_infra(1);
        }
        r
    }

    fn open_counted(&self, registry: &Registry) -> io::Result<Io> {
        match &self.spec {
            ChannelSpec::Unix(path) => {
                // Never through a symlink; with an identity, only to it. The
                // checks and the connect concern one file: opened without
                // following a symlink (O_PATH), checked by fstat, connected
                // to through /proc/self/fd, so a path swapped meanwhile (for
                // a symlink to some other socket) is never followed.
                let file = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
                    .open(path)?;
                let id = SocketId::of_open(&file, path)?;
                if let Some(want) = self.expected {
                    if id != want {
                        return Err(io::Error::other(format!(
                            "{} is no longer the socket discovered (inode {} owner {}, was inode {} owner {}); \
                             waiting for the next scan",
                            path.display(),
                            id.ino,
                            id.uid,
                            want.ino,
                            want.uid
                        )));
                    }
                }
                let mut s = UnixStream::connect(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
                drop(file);
                // A unix connect completes at once or fails; make sure it did.
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
                // The process listening there runs as the socket's owner, or
                // as root (libvirt creates and listens on each channel socket
                // as root, then hands it to QEMU's user, which listens again).
                if let Ok(peer) = crate::sys::unix_peer_uid(&s) {
                    if peer != id.uid && peer != 0 {
                        return Err(io::Error::other(format!(
                            "{}: the listener runs as uid {peer}, the socket belongs to uid {}",
                            path.display(),
                            id.uid
                        )));
                    }
                }
                // Writes are tried at once; WRITABLE is asked for only while
                // one is blocked (see `write`).
                registry.register(&mut s, self.token, Interest::READABLE)?;
                Ok(Io::Unix(s))
            }
            ChannelSpec::Device(path) => self.open_device(path, registry),
            ChannelSpec::Named(name) => {
                let path = resolve_port_name(name, Path::new("/sys/class/virtio-ports"), Path::new("/dev"))?;
                self.open_device(&path, registry)
            }
        }
    }

    fn open_device(&self, path: &Path, registry: &Registry) -> io::Result<Io> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    io::Error::new(
                        e.kind(),
                        format!("{}: port busy (is another bridge running?)", path.display()),
                    )
                } else {
                    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                }
            })?;
        let fd = file.as_raw_fd();
        // The device is registered for both for good: with no host it reports
        // only HUP, and every host connect, drain and arrival is an edge.
        registry.register(
            &mut SourceFd(&fd),
            self.token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(Io::Device(file, path.to_path_buf()))
    }

    /// Reads what the channel has into the session, within a budget.
    pub fn read(&mut self, now: Instant, registry: &Registry, session: &mut Session) -> Option<LinkNews> {
        let mut total = 0;
        while self.readable && total < READ_BUDGET_BYTES {
            let space = session.recv_space();
            if space.is_empty() {
                return None; // the session is backed up; the flag stays set
            }
            let io = self.io.as_mut()?;
            let room = space.len();
            let (r, socket) = match io {
                Io::Unix(s) => (s.read(space), true),
                Io::Device(f, _) => (f.read(space), false),
            };
            match r {
                Ok(0) => return self.gone(now, registry, session, "end of file".into()),
                Ok(n) => {
                    session.recv_commit(n);
                    total += n;
                    // Not the device: it returns at most a page per read.
                    if socket && drained(n, room, self.closing) {
                        self.readable = false;
                    }
                    if let Some(news) = self.host_seen() {
                        return Some(news);
                    }
                }
                Err(e) if would_block(&e) => self.readable = false,
                Err(e) if interrupted(&e) => {}
                Err(e) => return self.gone(now, registry, session, e.to_string()),
            }
        }
        None
    }

    /// Writes what the session has to send. A unix socket that blocks is
    /// registered for WRITABLE until the session's output is written.
    pub fn write(&mut self, now: Instant, registry: &Registry, session: &mut Session) -> Option<LinkNews> {
        let news = self.write_out(now, registry, session);
        let want = !self.writable && session.wants_write();
        if let Some(Io::Unix(s)) = &mut self.io {
            if want != self.write_interest {
                let interest = if want {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                if let Err(e) = registry.reregister(s, self.token, interest) {
                    return self.gone(now, registry, session, format!("cannot watch the socket: {e}"));
                }
                self.write_interest = want;
            }
        }
        news
    }

    fn write_out(&mut self, now: Instant, registry: &Registry, session: &mut Session) -> Option<LinkNews> {
        while self.writable {
            let out = session.poll_transmit();
            if out.is_empty() {
                return None;
            }
            let io = self.io.as_mut()?;
            let r = match io {
                Io::Unix(s) => s.write(out),
                Io::Device(f, _) => f.write(out),
            };
            match r {
                Ok(n) => {
                    session.advance_transmit(n);
                    if let Some(news) = self.host_seen() {
                        return Some(news);
                    }
                }
                Err(e) if would_block(&e) => self.writable = false,
                Err(e) if interrupted(&e) => {}
                Err(e) => return self.gone(now, registry, session, e.to_string()),
            }
        }
        None
    }

    fn host_seen(&mut self) -> Option<LinkNews> {
        if matches!(self.io, Some(Io::Device(..))) && !self.host_present {
            self.host_present = true;
            return Some(LinkNews::HostPresent);
        }
        None
    }

    /// End of file or an error on the channel.
    fn gone(
        &mut self,
        now: Instant,
        registry: &Registry,
        session: &mut Session,
        why: String,
    ) -> Option<LinkNews> {
        self.readable = false;
        match self.io.take() {
            Some(Io::Device(f, path)) => {
                // No host right now. Keep the device open; start a fresh
                // handshake whose HELLO waits for the next host.
                self.io = Some(Io::Device(f, path));
                self.writable = false;
                let was_present = std::mem::replace(&mut self.host_present, false);
                if was_present {
                    session.link_down(now);
                    session.link_up(now);
                }
                self.retry_at = Some(now + DEVICE_POLL);
                was_present.then_some(LinkNews::HostAbsent)
            }
            Some(Io::Unix(mut s)) => {
                let _ = registry.deregister(&mut s);
                drop(s);
                self.fds.release_infra(1);
                self.writable = false;
                session.link_down(now);
                self.retry_at = Some(now + self.backoff);
                Some(LinkNews::Lost(why))
            }
            None => None,
        }
    }

    /// Closes the channel for good (shutdown).
    pub fn close(&mut self, registry: &Registry) {
        self.retry_at = None;
        match self.io.take() {
            Some(Io::Unix(mut s)) => {
                let _ = registry.deregister(&mut s);
            }
            Some(Io::Device(f, _)) => {
                let fd = f.as_raw_fd();
                let _ = registry.deregister(&mut SourceFd(&fd));
            }
            None => return,
        }
        self.fds.release_infra(1);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.io.is_some() {
            self.fds.release_infra(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_is_known_by_its_inode_and_a_symlink_is_not_followed() {
        let dir = std::env::temp_dir().join(format!("vios-sockid-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ch.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let id = SocketId::of(&path).unwrap();
        assert_eq!(SocketId::of(&path).unwrap(), id);
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = SocketId::of(&link).unwrap_err();
        assert!(e.to_string().contains("a symlink"), "{e}");
        // Replaced by another socket on the same path: another identity, and
        // a link that expects the first refuses to connect.
        fs::remove_file(&path).unwrap();
        let _l2 = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let id2 = SocketId::of(&path).unwrap();
        assert_ne!(id2, id);
        let poll = mio::Poll::new().unwrap();
        let now = Instant::now();
        let mut l = Link::new(ChannelSpec::Unix(path.clone()), Token(0), now).expecting(id);
        let mut s = Session::new(crate::proto::Config::new(crate::proto::Role::Host, "t"), 1);
        match l.handle_timeout(now, poll.registry(), &mut s) {
            Some(LinkNews::Failed { error, .. }) => {
                assert!(error.contains("no longer the socket"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        let mut l = Link::new(ChannelSpec::Unix(path.clone()), Token(0), now).expecting(id2);
        assert_eq!(
            l.handle_timeout(now, poll.registry(), &mut s),
            Some(LinkNews::Connected)
        );
        // The path swapped for a symlink to that very socket: not followed,
        // even without an expected identity.
        let moved = dir.join("moved.sock");
        fs::rename(&path, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &path).unwrap();
        let mut l = Link::new(ChannelSpec::Unix(path), Token(0), now);
        match l.handle_timeout(now, poll.registry(), &mut s) {
            Some(LinkNews::Failed { error, .. }) => assert!(error.contains("a symlink"), "{error}"),
            other => panic!("{other:?}"),
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resolves_names_through_sysfs() {
        let dir = std::env::temp_dir().join(format!("vios-link-test-{}", std::process::id()));
        let sys = dir.join("sys");
        let dev = dir.join("dev");
        fs::create_dir_all(sys.join("vport0p1")).unwrap();
        fs::create_dir_all(sys.join("vport0p2")).unwrap();
        fs::create_dir_all(&dev).unwrap();
        fs::write(sys.join("vport0p1/name"), "org.qemu.guest_agent.0\n").unwrap();
        fs::write(sys.join("vport0p2/name"), "org.qpid.vios.0\n").unwrap();
        assert_eq!(
            resolve_port_name("org.qpid.vios.0", &sys, &dev).unwrap(),
            dev.join("vport0p2")
        );
        let err = resolve_port_name("nope", &sys, &dev).unwrap_err();
        assert!(err.to_string().contains("no virtio-serial port named \"nope\""));
        fs::create_dir_all(dev.join("virtio-ports")).unwrap();
        fs::write(dev.join("virtio-ports/org.qpid.vios.0"), "").unwrap();
        assert_eq!(
            resolve_port_name("org.qpid.vios.0", &sys, &dev).unwrap(),
            dev.join("virtio-ports/org.qpid.vios.0")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
