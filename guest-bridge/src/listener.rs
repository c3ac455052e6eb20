//! Local listeners: TCP on loopback and unix sockets.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use socket2::{Domain, SockAddr, Socket, Type};

use mio::net::{TcpListener, UnixListener};
use mio::{Interest, Registry, Token};
use vios_common::io::sock::Sock;
use vios_common::sys;

use crate::config::{ListenAddr, ListenSpec};

/// Who may connect to a unix-socket listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

impl SocketAccess {
    fn apply(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if self.owner.is_some() || self.group.is_some() {
            std::os::unix::fs::chown(path, self.owner, self.group).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give {} to {:?}:{:?}: {e}",
                        path.display(),
                        self.owner,
                        self.group
                    ),
                )
            })?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode))
    }
}

/// A client just accepted.
#[derive(Debug)]
pub struct Accepted {
    pub sock: Sock,
    pub peer: String,
    pub uid: Option<u32>,
}

#[derive(Debug)]
pub struct Listener {
    pub spec: ListenSpec,
    sock: Sock0,
    /// Passed by systemd (socket activation): its unit owns the socket's
    /// path, mode and owner, and the socket outlives this process.
    passed: bool,
}

#[derive(Debug)]
enum Sock0 {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds. A unix socket path left behind by a dead bridge is replaced; a
    /// path that is not a socket, or a socket someone still listens on, is an
    /// error. A unix socket then gets `access`'s mode, owner and group.
    pub fn bind(spec: &ListenSpec, access: &SocketAccess) -> io::Result<Listener> {
        let sock = match &spec.addr {
            ListenAddr::Tcp(a) => Sock0::Tcp(bind_tcp(*a)?),
            ListenAddr::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", path.display()),
                        ));
                    }
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is in use by a running process", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let l = bind_unix(path)?;
                access.apply(path)?;
                Sock0::Unix(l)
            }
        };
        Ok(Listener {
            spec: spec.clone(),
            sock,
            passed: false,
        })
    }

    /// Takes from `passed` (the sockets systemd passed, see
    /// [`vios_common::systemd::listen_fds`]) the one bound to `spec`'s
    /// address, if there is one: clients that connected while no bridge ran
    /// wait in its backlog and are served now.
    pub fn adopt(spec: &ListenSpec, passed: &mut Vec<Socket>) -> io::Result<Option<Listener>> {
        let mut found = None;
        for (i, s) in passed.iter().enumerate() {
            if bound_to(s, &spec.addr)? {
                found = Some(i);
                break;
            }
        }
        let Some(i) = found else { return Ok(None) };
        let s = passed.swap_remove(i);
        s.set_nonblocking(true)?;
        let sock = match spec.addr {
            ListenAddr::Tcp(_) => Sock0::Tcp(TcpListener::from_std(s.into())),
            ListenAddr::Unix(_) => Sock0::Unix(UnixListener::from_std(s.into())),
        };
        Ok(Some(Listener {
            spec: spec.clone(),
            sock,
            passed: true,
        }))
    }

    /// Whether systemd passed this listener.
    pub fn is_passed(&self) -> bool {
        self.passed
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        match &mut self.sock {
            Sock0::Tcp(l) => registry.register(l, token, Interest::READABLE),
            Sock0::Unix(l) => registry.register(l, token, Interest::READABLE),
        }
    }

    /// One accepted client: its socket, a printable peer address, and the
    /// user it belongs to as the kernel says (`SO_PEERCRED` for unix
    /// sockets, the owner of the client's socket for loopback TCP), or
    /// `None` if the kernel cannot tell. The socket aborts on close from the
    /// start (see `Sock::abort_on_close`); a client whose socket cannot is
    /// closed at once, before a byte flows, and skipped.
    pub fn accept(&self) -> io::Result<Accepted> {
        loop {
            let c = self.accept_raw()?;
            match c.sock.abort_on_close() {
                Ok(()) => return Ok(c),
                Err(e) => log::warn!("client {} closed at once: its socket cannot abort: {e}", c.peer),
            }
        }
    }

    fn accept_raw(&self) -> io::Result<Accepted> {
        match &self.sock {
            Sock0::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let _ = s.set_nodelay(true);
                let uid = s
                    .local_addr()
                    .and_then(|local| sys::tcp_socket_uid(peer, local))
                    .map_err(|e| log::debug!("client {peer}: user unknown: {e}"))
                    .ok();
                Ok(Accepted {
                    sock: Sock::Tcp(s),
                    peer: peer.to_string(),
                    uid,
                })
            }
            Sock0::Unix(l) => {
                let (s, _) = l.accept()?;
                let uid = sys::unix_peer_uid(&s).ok();
                let peer = match uid {
                    Some(u) => format!("{} (uid {u})", self.spec.addr),
                    None => self.spec.addr.to_string(),
                };
                Ok(Accepted {
                    sock: Sock::Unix(s),
                    peer,
                    uid,
                })
            }
        }
    }

    /// Removes a unix socket's path on shutdown (not a passed one's: it
    /// stays systemd's, still listening).
    pub fn cleanup(&self) {
        if let (ListenAddr::Unix(path), false) = (&self.spec.addr, self.passed) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where a passed socket listens, as a `--listen` address would say it.
pub fn passed_addr(s: &Socket) -> String {
    match s.local_addr() {
        Ok(a) => match (a.as_socket(), a.as_pathname()) {
            (Some(ip), _) => ip.to_string(),
            (None, Some(path)) => format!("unix:{}", path.display()),
            (None, None) => "an unnamed or abstract socket".to_string(),
        },
        Err(e) => format!("an unknown address ({e})"),
    }
}

/// Whether `s` listens on `addr`: the same IP address and port, or the same
/// unix socket path.
fn bound_to(s: &Socket, addr: &ListenAddr) -> io::Result<bool> {
    let local = s.local_addr()?;
    Ok(match addr {
        ListenAddr::Tcp(a) => local.as_socket() == Some(*a),
        ListenAddr::Unix(path) => local.as_pathname() == Some(path.as_path()),
    })
}

/// Pending connections the kernel queues before accept: mio's 128 drops SYNs
/// when hundreds of clients connect at once.
const BACKLOG: i32 = 1024;

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = listen_on(Domain::for_address(addr), &addr.into(), true)?;
    Ok(TcpListener::from_std(s.into()))
}

fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    let s = listen_on(Domain::UNIX, &SockAddr::unix(path)?, false)?;
    Ok(UnixListener::from_std(s.into()))
}

/// A non-blocking stream socket listening on `addr` with [`BACKLOG`].
fn listen_on(domain: Domain, addr: &SockAddr, reuse_address: bool) -> io::Result<Socket> {
    let s = Socket::new(domain, Type::STREAM, None)?;
    if reuse_address {
        s.set_reuse_address(true)?;
    }
    s.bind(addr)?;
    s.listen(BACKLOG)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(addr: ListenAddr) -> ListenSpec {
        ListenSpec {
            addr,
            service: "amqp".into(),
        }
    }

    #[test]
    fn a_passed_socket_is_taken_by_the_listener_at_its_address_only() {
        let tcp = listen_on(
            Domain::IPV4,
            &"127.0.0.1:0".parse::<SocketAddr>().unwrap().into(),
            true,
        )
        .unwrap();
        let at = tcp.local_addr().unwrap().as_socket().unwrap();
        let dir = std::env::temp_dir().join(format!("vios-adopt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("amqp.sock");
        let _ = std::fs::remove_file(&path);
        let unix = listen_on(Domain::UNIX, &SockAddr::unix(&path).unwrap(), false).unwrap();
        let mut passed = vec![tcp, unix];

        let mut other = at;
        other.set_port(at.port().wrapping_add(1).max(1));
        let none = [
            ListenAddr::Tcp(other),
            ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 2], at.port()))),
            ListenAddr::Unix(dir.join("other.sock")),
        ];
        for addr in none {
            assert!(Listener::adopt(&spec(addr), &mut passed).unwrap().is_none());
        }
        assert_eq!(passed.len(), 2);

        let l = Listener::adopt(&spec(ListenAddr::Unix(path.clone())), &mut passed)
            .unwrap()
            .expect("the unix socket");
        assert!(l.is_passed());
        l.cleanup();
        assert!(path.exists(), "a passed socket's path is systemd's to remove");
        let l = Listener::adopt(&spec(ListenAddr::Tcp(at)), &mut passed)
            .unwrap()
            .expect("the TCP socket");
        assert!(l.is_passed() && passed.is_empty());
        // It listens: a client connects and is accepted.
        let _c = std::net::TcpStream::connect(at).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match l.accept() {
                Ok(a) => break assert!(a.peer.starts_with("127.0.0.1:")),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
