//! systemd's protocols, as small as they are: readiness and watchdog
//! notifications (`sd_notify`: one datagram per message to the socket named
//! by `$NOTIFY_SOCKET`) and log priorities when standard error is the
//! journal (`$JOURNAL_STREAM`). Without systemd every call here does nothing.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// Where `sd_notify` messages go, and how often the watchdog wants one.
#[derive(Debug, Default)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service.
    pub fn from_env() -> Notifier {
        let var = |k: &str| std::env::var(k).ok();
        Notifier::new(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
        .unwrap_or_else(|e| {
            log::warn!("NOTIFY_SOCKET: {e}; not notifying systemd");
            Notifier::default()
        })
    }

    /// `socket` as in `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
    /// namespace); the watchdog applies when `watchdog_usec` is set and
    /// `watchdog_pid`, if set, is `pid`.
    pub fn new(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> io::Result<Notifier> {
        let socket = match socket.filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some((UnixDatagram::unbound()?, notify_addr(s)?)),
        };
        let for_us = watchdog_pid.is_none_or(|p| p.trim().parse() == Ok(pid));
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(Duration::from_micros);
        Ok(Notifier { socket, watchdog })
    }

    /// Whether anyone listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the watchdog timeout, as
    /// `sd_watchdog_enabled(3)` advises. None without a watchdog.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.socket.as_ref().and(self.watchdog.map(|w| w / 2))
    }

    /// Sends one message (`READY=1`, `STATUS=…`, `WATCHDOG=1`,
    /// `STOPPING=1`; several separated by newlines). A failure is logged at
    /// debug level: systemd may simply be gone.
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                log::debug!("sd_notify {state:?}: {e}");
            }
        }
    }

    /// Sends `state`, then waits up to `timeout` until systemd has read it
    /// (`sd_notify_barrier(3)`: a `BARRIER=1` message carrying the write end
    /// of a pipe, which systemd closes once it has handled everything sent
    /// before). For a process about to exit: systemd may otherwise see the
    /// exit first and drop the message (a `Type=notify` unit whose process
    /// exits before `READY=1` counts as failed).
    pub fn notify_and_wait(&self, state: &str, timeout: Duration) {
        self.notify(state);
        let Some((_, addr)) = &self.socket else { return };
        let barrier = || -> io::Result<bool> {
            let (read, write) = crate::sys::pipe()?;
            let conn = UnixDatagram::unbound()?;
            conn.set_write_timeout(Some(timeout))?;
            conn.connect_addr(addr)?;
            crate::sys::send_with_fd(&conn, b"BARRIER=1", &write)?;
            drop(write);
            crate::sys::wait_hangup(&read, timeout)
        };
        match barrier() {
            Ok(true) => {}
            Ok(false) => log::debug!("sd_notify barrier: systemd did not answer within {timeout:?}"),
            Err(e) => log::debug!("sd_notify barrier: {e}"),
        }
    }
}

/// How often `STATUS=` is refreshed when there is no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// What an event loop tells systemd: `READY=1` once, then `WATCHDOG=1` (only
/// while the daemon is whole) and a fresh `STATUS=` every half watchdog
/// period, `STOPPING=1` at the end. Time comes from the loop.
#[derive(Debug)]
pub struct Heartbeat {
    notifier: Notifier,
    every: Option<Duration>,
    next: Option<Instant>,
    ready: bool,
}

impl Heartbeat {
    pub fn new(notifier: Notifier, now: Instant) -> Heartbeat {
        let every = notifier
            .enabled()
            .then(|| notifier.watchdog_every().unwrap_or(STATUS_EVERY));
        Heartbeat {
            notifier,
            every,
            next: every.map(|_| now),
            ready: false,
        }
    }

    /// When [`Heartbeat::beat`] is next due; None without systemd.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next
    }

    /// Whether a beat is due: the caller then gathers its status and calls
    /// [`Heartbeat::beat`].
    pub fn due(&self, now: Instant) -> bool {
        self.next.is_some_and(|t| now >= t)
    }

    /// The first beat says `READY=1`; later ones pet the watchdog if
    /// `whole` (every part of the daemon answered). Both refresh `STATUS=`.
    pub fn beat(&mut self, now: Instant, whole: bool, status: &str) {
        let Some(every) = self.every else { return };
        let status = status.replace('\n', " ");
        if !self.ready {
            self.ready = true;
            self.notifier.notify(&format!("READY=1\nSTATUS={status}"));
        } else if whole && self.notifier.watchdog_every().is_some() {
            self.notifier.notify(&format!("WATCHDOG=1\nSTATUS={status}"));
        } else {
            self.notifier.notify(&format!("STATUS={status}"));
        }
        self.next = Some(now + every);
    }

    /// `STOPPING=1`: systemd then waits for the exit without restarting.
    pub fn stopping(&mut self, status: &str) {
        if self.every.is_some() {
            self.notifier.notify(&format!("STOPPING=1\nSTATUS={status}"));
            self.next = None;
        }
    }
}

fn notify_addr(s: &str) -> io::Result<SocketAddr> {
    match s.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None if s.starts_with('/') => SocketAddr::from_pathname(s),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} is neither a path nor an abstract name"),
        )),
    }
}

/// Whether standard error is the journal: `$JOURNAL_STREAM` names its
/// device and inode (`DEV:INO`), so that a daemon started from a unit but
/// logging elsewhere (redirected by hand) is not mistaken for it.
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some(want) = parse_journal_stream(&v) else {
        return false;
    };
    let Ok(fd) = std::os::fd::AsFd::as_fd(&io::stderr()).try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => (m.dev(), m.ino()) == want,
        Err(_) => false,
    }
}

fn parse_journal_stream(v: &str) -> Option<(u64, u64)> {
    let (dev, ino) = v.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The listening sockets a `.socket` unit passed (socket activation,
/// `sd_listen_fds(3)`): `$LISTEN_PID` names this process and `$LISTEN_FDS`
/// counts descriptors from 3. Each is taken over (close-on-exec from now on)
/// and checked to be a listening stream socket. Empty without activation,
/// or when the variables were meant for another process (a parent's). Call
/// once: the descriptors become the caller's.
pub fn listen_fds() -> io::Result<Vec<socket2::Socket>> {
    let n = match listen_fd_count(
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::process::id(),
    ) {
        Ok(n) => n,
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
    };
    (0..n)
        .map(|i| {
            let fd = LISTEN_FDS_START + i as i32;
            let s = socket2::Socket::from(crate::sys::take_inherited_fd(fd)?);
            if s.r#type()? != socket2::Type::STREAM || !s.is_listener()? {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("systemd passed descriptor {fd}, which is not a listening stream socket"),
                ));
            }
            Ok(s)
        })
        .collect()
}

/// How many descriptors `$LISTEN_PID`/`$LISTEN_FDS` pass to process `me`.
fn listen_fd_count(pid: Option<&str>, fds: Option<&str>, me: u32) -> Result<usize, String> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(0);
    };
    if pid.trim().parse::<u32>().ok() != Some(me) {
        return Ok(0);
    }
    match fds.trim().parse::<u16>() {
        Ok(n) => Ok(usize::from(n)),
        Err(_) => Err(format!("LISTEN_FDS={fds:?} is not a count of descriptors")),
    }
}

/// The syslog priority prefix journald reads from the start of a line
/// (`sd-daemon(3)`): `<3>` error, `<4>` warning, `<6>` info, `<7>` debug.
pub fn priority_prefix(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "<3>",
        log::Level::Warn => "<4>",
        log::Level::Info => "<6>",
        log::Level::Debug | log::Level::Trace => "<7>",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket standing for systemd's notify socket, in a fresh directory
    /// named after `tag` (removed by the caller): (directory, path, socket).
    fn fake_systemd(tag: &str) -> (std::path::PathBuf, String, UnixDatagram) {
        let dir = std::env::temp_dir().join(format!("vios-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let systemd = UnixDatagram::bind(&path).unwrap();
        (dir, path.to_str().unwrap().to_owned(), systemd)
    }

    #[test]
    fn notify_and_wait_returns_once_systemd_has_read_the_barrier() {
        let (dir, path, systemd) = fake_systemd("barrier");
        let n = Notifier::new(Some(&path), None, None, 1).unwrap();
        // Nobody reads: the barrier times out (the pipe's write end sits in
        // the socket's queue).
        let t = Instant::now();
        n.notify_and_wait("STATUS=waiting", Duration::from_millis(200));
        assert!(t.elapsed() >= Duration::from_millis(200), "{:?}", t.elapsed());
        let mut buf = [0u8; 64];
        for want in [&b"STATUS=waiting"[..], b"BARRIER=1"] {
            let k = systemd.recv(&mut buf).unwrap();
            assert_eq!(&buf[..k], want);
        }
        // systemd reads (and so closes the descriptor it got): at once.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..2 {
                let mut buf = [0u8; 64];
                let k = systemd.recv(&mut buf).unwrap();
                got.push(String::from_utf8_lossy(&buf[..k]).into_owned());
            }
            got
        });
        let t = Instant::now();
        n.notify_and_wait("READY=1\nSTOPPING=1", Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(reader.join().unwrap(), ["READY=1\nSTOPPING=1", "BARRIER=1"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notifications_arrive_as_one_datagram_each() {
        let (dir, path, systemd) = fake_systemd("notify");
        let n = Notifier::new(Some(&path), Some("30000000"), None, 1).unwrap();
        assert!(n.enabled());
        assert_eq!(n.watchdog_every(), Some(Duration::from_secs(15)));
        n.notify("READY=1");
        n.notify("STATUS=2 guests, 3 streams");
        let mut buf = [0u8; 256];
        let k = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1");
        let k = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STATUS=2 guests, 3 streams");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn abstract_sockets_and_no_systemd() {
        let name = format!("vios-notify-test-{}", std::process::id());
        let addr = {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
        };
        let systemd = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::new(Some(&format!("@{name}")), None, None, 1).unwrap();
        assert_eq!(n.watchdog_every(), None);
        n.notify("WATCHDOG=1");
        let mut buf = [0u8; 64];
        let k = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"WATCHDOG=1");
        // No socket: nothing is sent and no watchdog is kept.
        let none = Notifier::new(None, Some("1000000"), None, 1).unwrap();
        assert!(!none.enabled());
        assert_eq!(none.watchdog_every(), None);
        none.notify("READY=1");
        assert!(Notifier::new(Some("relative/path"), None, None, 1).is_err());
    }

    #[test]
    fn the_watchdog_is_only_for_the_process_it_names() {
        let s = Some("/run/systemd/notify");
        let other = Notifier::new(s, Some("1000000"), Some("4242"), 7).unwrap();
        assert_eq!(other.watchdog_every(), None);
        let us = Notifier::new(s, Some("1000000"), Some("7"), 7).unwrap();
        assert_eq!(us.watchdog_every(), Some(Duration::from_millis(500)));
        let zero = Notifier::new(s, Some("0"), None, 7).unwrap();
        assert_eq!(zero.watchdog_every(), None);
    }

    #[test]
    fn the_heartbeat_says_ready_once_then_pets_the_watchdog_while_whole() {
        let (dir, path, systemd) = fake_systemd("beat");
        let t0 = Instant::now();
        let n = Notifier::new(Some(&path), Some("20000000"), None, 1).unwrap();
        let mut h = Heartbeat::new(n, t0);
        assert!(h.due(t0));
        let got = |h: &mut Heartbeat, at, whole| {
            h.beat(at, whole, "2 guests,\n1 stream");
            let mut buf = [0u8; 256];
            let k = systemd.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..k]).into_owned()
        };
        assert_eq!(got(&mut h, t0, true), "READY=1\nSTATUS=2 guests, 1 stream");
        assert_eq!(h.next_deadline(), Some(t0 + Duration::from_secs(10)));
        assert!(!h.due(t0 + Duration::from_secs(9)));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(got(&mut h, t1, true), "WATCHDOG=1\nSTATUS=2 guests, 1 stream");
        // A part that did not answer: no WATCHDOG=1, so systemd restarts us.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(got(&mut h, t2, false), "STATUS=2 guests, 1 stream");
        h.stopping("stopping");
        let mut buf = [0u8; 64];
        let k = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STOPPING=1\nSTATUS=stopping");
        assert_eq!(h.next_deadline(), None);
        // Without systemd nothing is ever due.
        let none = Heartbeat::new(Notifier::default(), t0);
        assert_eq!(none.next_deadline(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn journal_stream_and_priorities() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(priority_prefix(log::Level::Error), "<3>");
        assert_eq!(priority_prefix(log::Level::Warn), "<4>");
        assert_eq!(priority_prefix(log::Level::Info), "<6>");
        assert_eq!(priority_prefix(log::Level::Trace), "<7>");
    }

    #[test]
    fn listen_fds_are_ours_only_when_listen_pid_is() {
        let count = listen_fd_count;
        assert_eq!(count(None, None, 7), Ok(0));
        assert_eq!(count(Some("7"), None, 7), Ok(0));
        assert_eq!(count(None, Some("2"), 7), Ok(0));
        assert_eq!(count(Some("7"), Some("2"), 7), Ok(2));
        assert_eq!(count(Some("8"), Some("2"), 7), Ok(0), "a parent's descriptors");
        assert_eq!(count(Some("x"), Some("2"), 7), Ok(0));
        assert_eq!(count(Some("7"), Some("0"), 7), Ok(0));
        assert!(count(Some("7"), Some("-1"), 7)
            .unwrap_err()
            .contains("LISTEN_FDS"));
        assert!(count(Some("7"), Some("lots"), 7).is_err());
    }
}
