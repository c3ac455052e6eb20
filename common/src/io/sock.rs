//! One stream's local socket: TCP or unix, and how to end it.

use std::io::{self, Read, Write};
use std::net::Shutdown;
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

    /// Makes every close an abort until [`Sock::close`] says otherwise, so that
    /// even the death of the process (the kernel closing the descriptor) shows
    /// the far end a reset, never a clean end of a truncated stream.
    pub fn abort_on_close(&self) {
        if let Sock::Tcp(s) = self {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }

    /// Closes so that the far end sees an abort, never a clean end of stream.
    ///
    /// TCP: `SO_LINGER` 0 makes close send RST. Unix sockets have no RST; the
    /// kernel reports `ECONNRESET` to the peer only if it had sent bytes we
    /// had not read, which is why a caller must not drain a socket it aborts.
    pub fn abort(mut self, registry: &Registry) {
        let _ = self.deregister(registry);
        if let Sock::Tcp(s) = &self {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }

    /// Closes after a clean end of both directions (undoing
    /// [`Sock::abort_on_close`]).
    pub fn close(mut self, registry: &Registry) {
        let _ = self.deregister(registry);
        if let Sock::Tcp(s) = &self {
            let _ = socket2::SockRef::from(s).set_linger(None);
        }
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        match self {
            Sock::Tcp(s) => registry.register(s, token, interest),
            Sock::Unix(s) => registry.register(s, token, interest),
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
