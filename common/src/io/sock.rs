//! One stream's local socket, TCP or unix, and how to end it.
//!
//! A stream socket aborts on close from the moment it is made a stream's
//! ([`Sock::abort_on_close`]): `SO_LINGER` 0, so even the death of the process
//! (the kernel closing the descriptor) shows the far end a reset, never the
//! clean end of a truncated stream. Only a stream that ended cleanly in both
//! directions is closed cleanly ([`Sock::close`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

#[derive(Debug)]
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }

    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }

    /// Half-close: the far end reads end-of-file after what was written.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Write),
            Sock::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }

    fn sock_ref(&self) -> socket2::SockRef<'_> {
        match self {
            Sock::Tcp(s) => socket2::SockRef::from(s),
            Sock::Unix(s) => socket2::SockRef::from(s),
        }
    }

    /// Makes every close an abort until [`Sock::close`] says otherwise.
    ///
    /// TCP: `SO_LINGER` 0 makes close send RST. Unix sockets have no RST:
    /// the kernel reports `ECONNRESET` to the peer only if it had sent bytes
    /// not yet read, which is why a caller must not drain a socket it aborts.
    /// An error here means the socket cannot be aborted: the caller must not
    /// let a single byte through it (the stream is refused before it starts).
    pub fn abort_on_close(&self) -> io::Result<()> {
        match self {
            Sock::Tcp(_) => self.sock_ref().set_linger(Some(Duration::ZERO)),
            // Still a socket check: a descriptor that is no socket fails here.
            Sock::Unix(_) => self.sock_ref().r#type().map(|_| ()),
        }
    }

    /// Closes so that the far end sees an abort (the socket was set up by
    /// [`Sock::abort_on_close`]).
    pub fn abort(mut self, registry: &Registry) {
        let _ = self.deregister(registry);
    }

    /// Closes after a clean end of both directions. Should the zero linger
    /// not come off, the close is an abort: the far end sees a reset, which
    /// loses nothing that was not already delivered or reported.
    pub fn close(mut self, registry: &Registry) {
        let _ = self.deregister(registry);
        if let Sock::Tcp(_) = &self {
            let _ = self.sock_ref().set_linger(None);
        }
    }

    pub fn register(&mut self, registry: &Registry, token: Token, interest: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => registry.register(s, token, interest),
            Sock::Unix(s) => registry.register(s, token, interest),
        }
    }

    pub fn reregister(&mut self, registry: &Registry, token: Token, interest: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => registry.reregister(s, token, interest),
            Sock::Unix(s) => registry.reregister(s, token, interest),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => registry.deregister(s),
            Sock::Unix(s) => registry.deregister(s),
        }
    }

    /// For a socket still connecting: `Ok(true)` once connected, `Ok(false)`
    /// while in progress, `Err` when the connect failed.
    pub fn connect_result(&self) -> io::Result<bool> {
        let Sock::Tcp(s) = self else { return Ok(true) };
        if let Some(err) = s.take_error()? {
            return Err(err);
        }
        match s.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The local address of a TCP socket (for logs: which broker connection
    /// is which stream).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Sock::Tcp(s) => s.local_addr().ok(),
            Sock::Unix(_) => None,
        }
    }
}

/// Whether a read of `n` bytes into `room` bytes drained a stream socket, so
/// that the read that would only say `WouldBlock` can be skipped (readiness
/// is edge-triggered: every later arrival is reported). Not when end-of-file
/// or an error is queued behind the data (`closing`): that must still be read.
pub fn drained(n: usize, room: usize, closing: bool) -> bool {
    n < room && !closing
}

pub fn would_block(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::WouldBlock
}

pub fn interrupted(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::Interrupted
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    #[test]
    fn a_descriptor_that_cannot_abort_is_reported() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(Sock::Unix(a).abort_on_close().is_ok());
        // Not a socket at all: neither zero linger nor anything else works.
        let file = std::fs::File::open("/dev/null").unwrap();
        let fake = std::os::unix::net::UnixStream::from(OwnedFd::from(file));
        let err = Sock::Unix(UnixStream::from_std(fake))
            .abort_on_close()
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
    }
}
