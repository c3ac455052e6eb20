//! The few system calls std does not wrap, each behind a safe function.
//!
//! This is the only module of the crate with `unsafe` code: every block is a
//! single libc call on plain integers or on a value owned by the caller, with
//! its result checked.
#![allow(unsafe_code)]

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// The open-files limit before and after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit the process started with.
    pub soft_before: u64,
    /// The soft limit now: what the process may really open.
    pub soft: u64,
    /// The hard limit (the most the soft limit may be raised to without
    /// privilege).
    pub hard: u64,
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (many systems start
/// daemons at a soft 1024 with a much higher hard limit). If raising fails the
/// soft limit stays as it was; the result says what holds.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let lim = get_nofile()?;
    let before = lim.rlim_cur;
    // An unlimited hard limit still stops at the kernel's fs.nr_open.
    let target = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .map_or(lim.rlim_max, |n| n.min(lim.rlim_max));
    if lim.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit read-only for the call.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    }
    let now = get_nofile()?;
    Ok(NofileLimit {
        soft_before: before as u64,
        soft: now.rlim_cur as u64,
        hard: now.rlim_max as u64,
    })
}

/// The soft open-files limit.
pub fn nofile_limit() -> io::Result<u64> {
    Ok(get_nofile()?.rlim_cur as u64)
}

/// Descriptors the process has open now (from `/proc/self/fd`, less the one
/// the listing itself uses).
pub fn open_descriptors() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count().saturating_sub(1))
}

/// Whether `e` means the process or the system ran out of descriptors or
/// memory: a resource limit, not a failure of what was being opened.
pub fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    )
}

/// The user id of the process at the other end of a connected unix socket
/// (`SO_PEERCRED`: the kernel's word, not the peer's).
pub fn unix_peer_uid(sock: &impl AsRawFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid and writable for the call, `len`
    // holds the size of `cred`, and the descriptor is borrowed for the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// The user id that owns the TCP socket whose local end is `local` and whose
/// remote end is `remote`: on a loopback connection accepted at `remote`,
/// the uid of the client. Asks the kernel's sock_diag netlink interface; where
/// that is missing (a kernel without `inet_diag`), reads `/proc/net/tcp*`.
pub fn tcp_socket_uid(local: SocketAddr, remote: SocketAddr) -> io::Result<u32> {
    match sock_diag_uid(local, remote) {
        Ok(uid) => Ok(uid),
        Err(_) => proc_net_tcp_uid(local, remote),
    }
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;

fn sock_diag_uid(local: SocketAddr, remote: SocketAddr) -> io::Result<u32> {
    let nl = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )?;
    nl.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    // struct nlmsghdr, then struct inet_diag_req_v2 (linux/inet_diag.h):
    // family, protocol, ext, pad, states, then inet_diag_sockid: source and
    // destination port (big-endian), addresses (4 x be32 each), interface,
    // cookie (INET_DIAG_NOCOOKIE).
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    req.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&local.port().to_be_bytes());
    req.extend_from_slice(&remote.port().to_be_bytes());
    for a in [local.ip(), remote.ip()] {
        let mut b = [0u8; 16];
        match a {
            IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => b.copy_from_slice(&v6.octets()),
        }
        req.extend_from_slice(&b);
    }
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]);
    debug_assert_eq!(req.len(), 72);
    nl.send(&req)?;
    let mut buf = [0u8; 512];
    let n = (&nl).read(&mut buf)?;
    let u16_at = |o: usize| u16::from_ne_bytes([buf[o], buf[o + 1]]);
    let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
    if n < 20 {
        return Err(io::Error::other("short sock_diag answer"));
    }
    if u16_at(4) == NLMSG_ERROR {
        let code = u32_at(16) as i32;
        return Err(io::Error::from_raw_os_error(-code));
    }
    // struct inet_diag_msg: 4 bytes, the 48-byte sockid, expires, rqueue,
    // wqueue, then uid.
    if u16_at(4) != SOCK_DIAG_BY_FAMILY || n < 16 + 4 + 48 + 16 {
        return Err(io::Error::other("unexpected sock_diag answer"));
    }
    Ok(u32_at(16 + 4 + 48 + 12))
}

/// The same from `/proc/net/tcp` and `/proc/net/tcp6`: addresses in hex as
/// the kernel stores them, the uid in the eighth column.
fn proc_net_tcp_uid(local: SocketAddr, remote: SocketAddr) -> io::Result<u32> {
    let hex = |a: SocketAddr| -> String {
        let ip = match a.ip() {
            IpAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(v6) => v6
                .octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_ne_bytes(w.try_into().unwrap())))
                .collect(),
        };
        format!("{ip}:{:04X}", a.port())
    };
    let (l, r) = (hex(local), hex(remote));
    let file = if local.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(file)?;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 7 && f[1] == l && f[2] == r {
            return f[7].parse().map_err(|_| io::Error::other("bad uid column"));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no socket {local} -> {remote}"),
    ))
}

/// Returns the allocator's free memory to the kernel (glibc's
/// `malloc_trim`): buffers given back by quiet channels otherwise stay in
/// the process's RSS. A no-op where the C library is not glibc.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes a plain integer and only walks the
    // allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Takes over descriptor `fd`, inherited from the parent (socket
/// activation): it must be open, and is made close-on-exec.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD/F_SETFD on an integer; an fd that is not open fails
    // with EBADF and is never wrapped.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("inherited descriptor {fd}: {e}"),
        ));
    }
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and nothing else in
    // this process owns it: the caller takes each inherited one once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new inotify instance, non-blocking and close-on-exec; read it as a
/// file (each event is an `inotify_event` and its name).
pub fn inotify_init() -> io::Result<std::fs::File> {
    // SAFETY: no pointers; the result is checked.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us and is owned by nobody else.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// `path` as a C string for a system call.
fn c_path(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))
}

/// Watches `path` for `mask` (libc's `IN_*` bits); the same path again
/// returns the same watch.
pub fn inotify_add_watch(inotify: &std::fs::File, path: &std::path::Path, mask: u32) -> io::Result<i32> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let wd = unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), c.as_ptr(), mask) };
    if wd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(wd)
}

/// Whether this process may write `path` (for a unix socket: connect to
/// it), judged by its effective user and groups as the kernel will judge the
/// connect; a symlink is followed.
pub fn may_write(path: &std::path::Path) -> io::Result<bool> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK, libc::AT_EACCESS) } == 0 {
        return Ok(true);
    }
    // Only EACCES is a "no". Anything else (EPERM from a seccomp filter
    // that does not know faccessat2, say) is an error for the caller.
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just returned to us and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `data` on a connected socket with one descriptor attached
/// (SCM_RIGHTS).
pub fn send_with_fd(sock: &impl AsRawFd, data: &[u8], fd: &impl AsRawFd) -> io::Result<()> {
    let fd_len = std::mem::size_of::<RawFd>() as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
    // u64s: the control buffer must be aligned for a cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds CMSG_SPACE(one fd) bytes, so the first
    // header and its data fit; `msg`, `iov`, `data` and `control` outlive
    // the sendmsg call.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout` for the other end of a pipe to be closed: true if
/// it was.
pub fn wait_hangup(read: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let end = std::time::Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd: read.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // Rounded up: no busy loop over the last partial millisecond.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the length given.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n > 0 && p.revents & libc::POLLHUP != 0 {
            return Ok(true);
        }
        if left.is_zero() {
            return Ok(false);
        }
    }
}

/// The effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A user's id from its name (`/etc/passwd`) or a number.
pub fn user_id(name: &str) -> io::Result<u32> {
    id_from_db(name, "/etc/passwd", "user")
}

/// A group's id from its name (`/etc/group`) or a number.
pub fn group_id(name: &str) -> io::Result<u32> {
    id_from_db(name, "/etc/group", "group")
}

fn id_from_db(name: &str, db: &str, what: &str) -> io::Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(db)?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let id = f.nth(1)?;
            (n == name).then(|| id.parse().ok())?
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no {what} named {name:?} in {db}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn may_write_judges_as_the_kernel_does() {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("vios-may-write-{}", std::process::id()));
        std::fs::write(&p, b"").unwrap();
        assert!(may_write(&p).unwrap());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
        // Root may write anything; anybody else not a read-only file.
        assert_eq!(may_write(&p).unwrap(), effective_uid() == 0);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(may_write(&p).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        let l = raise_nofile_limit().unwrap();
        assert!(l.soft_before <= l.soft && l.soft <= l.hard, "{l:?}");
        assert_eq!(nofile_limit().unwrap(), l.soft);
    }

    #[test]
    fn a_unix_peer_is_known_by_its_uid() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY of the test: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        assert_eq!(unix_peer_uid(&a).unwrap(), me);
    }

    #[test]
    fn a_loopback_client_is_known_by_its_uid_both_ways() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        // SAFETY of the test: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        let local = l.local_addr().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        assert_eq!(sock_diag_uid(peer, local).unwrap(), me);
        assert_eq!(proc_net_tcp_uid(peer, local).unwrap(), me);
        assert_eq!(tcp_socket_uid(peer, local).unwrap(), me);
        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let c6 = std::net::TcpStream::connect(l6.local_addr().unwrap()).unwrap();
        let (_s6, peer6) = l6.accept().unwrap();
        assert_eq!(peer6, c6.local_addr().unwrap());
        assert_eq!(proc_net_tcp_uid(peer6, l6.local_addr().unwrap()).unwrap(), me);
        assert_eq!(sock_diag_uid(peer6, l6.local_addr().unwrap()).unwrap(), me);
        // No such socket: an error, not a guess.
        let gone: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(tcp_socket_uid(gone, local).is_err());
    }

    #[test]
    fn users_and_groups_by_name_or_number() {
        assert_eq!(user_id("root").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        assert_eq!(user_id("4242").unwrap(), 4242);
        let e = user_id("no-such-user-here").unwrap_err();
        assert!(e.to_string().contains("no user named"), "{e}");
    }

    #[test]
    fn counts_open_descriptors() {
        // Other tests open and close descriptors in parallel: one of a few
        // tries must see exactly the one this test opened.
        let exact = (0..50).any(|_| {
            let before = open_descriptors().unwrap();
            let f = std::fs::File::open("/proc/self/status").unwrap();
            let with = open_descriptors().unwrap();
            drop(f);
            with == before + 1
        });
        assert!(exact, "the count never rose by exactly one");
        assert!(is_resource_error(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!is_resource_error(&io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
    }
}
