//! Local listeners: TCP on loopback and unix sockets.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use socket2::{Domain, SockAddr, Socket, Type};

use mio::net::{TcpListener, UnixListener};
use mio::{Interest, Registry, Token};
use vios_common::io::sock::Sock;

use crate::config::{ListenAddr, ListenSpec};

#[derive(Debug)]
pub struct Listener {
    pub spec: ListenSpec,
    sock: Sock0,
}

#[derive(Debug)]
enum Sock0 {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds. A unix socket path left behind by a dead bridge is replaced; a
    /// path that is not a socket, or a socket someone still listens on, is an error.
    pub fn bind(spec: &ListenSpec) -> io::Result<Listener> {
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
                Sock0::Unix(bind_unix(path)?)
            }
        };
        Ok(Listener {
            spec: spec.clone(),
            sock,
        })
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        match &mut self.sock {
            Sock0::Tcp(l) => registry.register(l, token, Interest::READABLE),
            Sock0::Unix(l) => registry.register(l, token, Interest::READABLE),
        }
    }

    /// One accepted client and a printable peer address. The socket aborts on
    /// close from the start (see `Sock::abort_on_close`); a client whose
    /// socket cannot is closed at once, before a byte flows, and skipped.
    pub fn accept(&self) -> io::Result<(Sock, String)> {
        loop {
            let (sock, peer) = self.accept_raw()?;
            match sock.abort_on_close() {
                Ok(()) => return Ok((sock, peer)),
                Err(e) => log::warn!("client {peer} closed at once: its socket cannot abort: {e}"),
            }
        }
    }

    fn accept_raw(&self) -> io::Result<(Sock, String)> {
        match &self.sock {
            Sock0::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Sock::Tcp(s), peer.to_string()))
            }
            Sock0::Unix(l) => {
                let (s, _) = l.accept()?;
                Ok((Sock::Unix(s), self.spec.addr.to_string()))
            }
        }
    }

    /// Removes a unix socket's path on shutdown.
    pub fn cleanup(&self) {
        if let ListenAddr::Unix(path) = &self.spec.addr {
            let _ = std::fs::remove_file(path);
        }
    }
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
