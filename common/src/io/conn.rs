//! One stream's local end: its socket, the bytes received from the channel
//! that the socket has not taken yet, the half-close state of each
//! direction, and what readiness it waits for.
//!
//! Directions, named from the socket's point of view:
//! - **in**: socket → channel. Read only while the stream has credit and the
//!   channel has room; end-of-file becomes FIN.
//! - **out**: channel → socket. Written straight from the session's receive
//!   buffer; what the socket does not take waits in `pending`, a ring that
//!   frees what it wrote as it goes (never more than the window granted,
//!   because credit is returned only for bytes written). A FIN from the peer
//!   becomes `shutdown(SHUT_WR)` once `pending` is empty.
//!
//! Interest follows what the socket waits for: READABLE while its input may
//! still bring something, WRITABLE only while a write could not finish (or a
//! connect is in progress). Writes are tried optimistically; a write that
//! would block asks for WRITABLE, and a flush that empties `pending` drops it.

use std::collections::VecDeque;
use std::io;
use std::time::Instant;

use mio::{Interest, Registry, Token};

use super::sock::{interrupted, would_block, Sock};
use crate::proto::StreamId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// (host) Non-blocking connect to the service in progress.
    Connecting,
    Open,
}

#[derive(Debug)]
pub struct Conn {
    pub stream: StreamId,
    pub service: String,
    /// Where the socket leads, for logs (client address or service address).
    pub peer: String,
    pub sock: Sock,
    pub phase: Phase,
    pub opened: Instant,
    pending: VecDeque<u8>,
    /// The peer sent FIN: shut the socket's write side once `pending` drains.
    pub peer_fin: bool,
    pub write_shut: bool,
    /// The socket reached end-of-file and FIN was sent.
    pub read_eof: bool,
    /// Edge-triggered readiness, remembered until `WouldBlock` (or a short read).
    pub readable: bool,
    /// The last event said end-of-file or an error is queued: read until it.
    pub closing: bool,
    /// The last write did not block (optimistic until one does).
    pub writable: bool,
    /// What the socket is registered for; `None` before registration.
    registered: Option<Interest>,
    /// In the channel's ready queue.
    pub queued: bool,
    /// Bytes read from the socket (sent over the channel).
    pub bytes_in: u64,
    /// Bytes written to the socket (received over the channel).
    pub bytes_out: u64,
    /// Bytes of the guest's buffer budget this connection holds (always
    /// what `pending` has allocated, once the channel has settled it).
    pub reserved: usize,
    /// Has small DATA waiting in `pending` for the end-of-dispatch flush.
    pub dirty: bool,
    /// Last time a byte moved either way.
    pub last_active: Instant,
    /// When one direction finished (FIN sent or received) without the other.
    pub half_closed_since: Option<Instant>,
    /// The quiet rule's window: when it began and the bytes moved by then.
    pub window_start: Instant,
    pub window_bytes: u64,
    /// Since when the stream is quiet (counted in the guest's budget).
    pub quiet_since: Option<Instant>,
    /// (guest) The local user the stream belongs to, reported back when it
    /// closes.
    pub owner: Option<u32>,
    /// The guest client's address as the guest saw it (on the host, as the
    /// guest reported it: peer text).
    pub client: Option<String>,
    /// (host) The service address being connected to, and which attempt
    /// this is (the next address after a failure).
    pub addr: Option<std::net::SocketAddr>,
    pub attempt: usize,
    /// (host) Addresses this stream's connects failed at.
    pub tried: Vec<std::net::SocketAddr>,
    /// Bytes at the front of `pending` that are not stream data (a PROXY
    /// header): written first, never counted as data or credit.
    preamble_left: usize,
}

/// The result of writing to the socket.
#[derive(Debug)]
pub struct Written {
    /// Bytes the socket took: pass them to `Session::consumed`.
    pub n: usize,
    pub error: Option<io::Error>,
}

impl Conn {
    /// A stream's socket. Fails if the socket cannot be made to abort on
    /// close: such a stream must not start (see [`Sock::abort_on_close`]).
    pub fn new(
        stream: StreamId,
        service: String,
        peer: String,
        sock: Sock,
        phase: Phase,
        now: Instant,
    ) -> io::Result<Conn> {
        sock.abort_on_close()?;
        Ok(Conn {
            stream,
            service,
            peer,
            sock,
            phase,
            opened: now,
            pending: VecDeque::new(),
            peer_fin: false,
            write_shut: false,
            read_eof: false,
            readable: false,
            closing: false,
            writable: true,
            registered: None,
            queued: false,
            bytes_in: 0,
            bytes_out: 0,
            reserved: 0,
            dirty: false,
            last_active: now,
            half_closed_since: None,
            window_start: now,
            window_bytes: 0,
            quiet_since: None,
            owner: None,
            client: None,
            addr: None,
            attempt: 0,
            tried: Vec::new(),
            preamble_left: 0,
        })
    }

    /// Puts `bytes` (a PROXY header) in front of everything else the socket
    /// will get, replacing an earlier preamble not yet written.
    pub fn set_preamble(&mut self, bytes: &[u8]) {
        self.pending.drain(..self.preamble_left);
        for &b in bytes.iter().rev() {
            self.pending.push_front(b);
        }
        // The header goes out in one write: a service may parse it from
        // its first read (RabbitMQ does), so it must not be split where
        // the ring wraps.
        self.pending.make_contiguous();
        self.preamble_left = bytes.len();
    }

    /// Bytes of the preamble not yet written.
    pub fn preamble_left(&self) -> usize {
        self.preamble_left
    }

    /// What the socket should be registered for now.
    pub fn interest(&self) -> Interest {
        if self.phase == Phase::Connecting {
            return Interest::WRITABLE;
        }
        let write_due = !self.pending.is_empty() || (self.peer_fin && !self.write_shut);
        if write_due && !self.writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }

    /// Registers the socket, or re-registers it if what it waits for changed.
    pub fn sync_interest(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let want = self.interest();
        match self.registered {
            Some(have) if have == want => Ok(()),
            Some(_) => {
                self.sock.reregister(registry, token, want)?;
                self.registered = Some(want);
                Ok(())
            }
            None => {
                self.sock.register(registry, token, want)?;
                self.registered = Some(want);
                Ok(())
            }
        }
    }

    /// Registers a socket that replaced the one registered before (a retry
    /// to another address).
    pub fn register_anew(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        self.registered = None;
        self.writable = true;
        self.readable = false;
        self.closing = false;
        self.sync_interest(registry, token)
    }

    /// Appends bytes from the channel to `pending` without writing: small
    /// DATA frames are gathered and written once per dispatch.
    pub fn buffer(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
    }

    /// Notes a half-close (either direction) for the half-closed timeout.
    pub fn note_half_close(&mut self, now: Instant) {
        if (self.read_eof || self.peer_fin) && !self.is_done() {
            self.half_closed_since.get_or_insert(now);
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Stream bytes waiting for the socket (the preamble not included).
    pub fn data_pending(&self) -> usize {
        self.pending.len() - self.preamble_left
    }

    /// Bytes of memory `pending` holds: what the budget counts.
    pub fn held(&self) -> usize {
        self.pending.capacity()
    }

    /// Both directions ended cleanly: the socket can be closed.
    pub fn is_done(&self) -> bool {
        self.read_eof && self.write_shut
    }

    /// Takes bytes from the channel: writes what the socket accepts now and
    /// keeps the rest, in order, for [`Conn::flush`].
    pub fn deliver(&mut self, bytes: &[u8]) -> Written {
        let mut w = Written { n: 0, error: None };
        if self.phase == Phase::Open && self.pending.is_empty() {
            w = write_all(&mut self.sock, bytes, &mut self.writable);
        }
        self.bytes_out += w.n as u64;
        if w.error.is_none() && w.n < bytes.len() {
            self.pending.extend(&bytes[w.n..]);
        }
        w
    }

    /// Writes pending bytes, then the half-close if one is due.
    pub fn flush(&mut self) -> Written {
        let mut w = Written { n: 0, error: None };
        if self.phase != Phase::Open {
            return w;
        }
        while !self.pending.is_empty() && self.writable && w.error.is_none() {
            let (front, _) = self.pending.as_slices();
            let part = write_all(&mut self.sock, front, &mut self.writable);
            self.pending.drain(..part.n);
            // The preamble is no stream data: it earns no credit.
            let pre = part.n.min(self.preamble_left);
            self.preamble_left -= pre;
            w.n += part.n - pre;
            w.error = part.error;
        }
        self.bytes_out += w.n as u64;
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            // Give the memory back: an idle stream should cost little.
            self.pending = VecDeque::new();
        }
        if w.error.is_none() && self.peer_fin && !self.write_shut && self.pending.is_empty() {
            self.write_shut = true;
            if let Err(e) = self.sock.shutdown_write() {
                if e.kind() != io::ErrorKind::NotConnected {
                    w.error = Some(e);
                }
            }
        }
        w
    }

    /// Ends the socket; the far end sees an abort unless `clean`.
    pub fn close(self, registry: &Registry, clean: bool) {
        if clean {
            self.sock.close(registry);
        } else {
            self.sock.abort(registry);
        }
    }
}

fn write_all(sock: &mut Sock, bytes: &[u8], writable: &mut bool) -> Written {
    let mut n = 0;
    while n < bytes.len() && *writable {
        match sock.write(&bytes[n..]) {
            Ok(0) => {
                let error = io::Error::new(io::ErrorKind::WriteZero, "socket took no bytes");
                return Written {
                    n,
                    error: Some(error),
                };
            }
            Ok(k) => n += k,
            Err(e) if would_block(&e) => *writable = false,
            Err(e) if interrupted(&e) => {}
            Err(e) => return Written { n, error: Some(e) },
        }
    }
    Written { n, error: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::OwnedFd;

    use mio::net::UnixStream;
    use mio::Poll;

    fn pair() -> (Conn, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let sock = Sock::Unix(UnixStream::from_std(a));
        let now = Instant::now();
        let c = Conn::new(StreamId(1), "s".into(), "peer".into(), sock, Phase::Open, now).unwrap();
        (c, b)
    }

    fn shrink_send_buffer(c: &Conn) {
        let Sock::Unix(s) = &c.sock else { unreachable!() };
        socket2::SockRef::from(s).set_send_buffer_size(4096).unwrap();
    }

    #[test]
    fn a_socket_that_cannot_abort_never_becomes_a_stream() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fake = std::net::TcpStream::from(OwnedFd::from(file));
        let sock = Sock::Tcp(mio::net::TcpStream::from_std(fake));
        let now = Instant::now();
        let r = Conn::new(StreamId(1), "s".into(), "p".into(), sock, Phase::Open, now);
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOTSOCK));
    }

    #[test]
    fn partial_writes_wait_in_order_and_free_what_was_written() {
        let (mut c, mut far) = pair();
        shrink_send_buffer(&c);
        let data: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
        let w = c.deliver(&data);
        assert!(w.error.is_none() && w.n < data.len(), "{w:?}");
        assert!(!c.writable, "the write blocked");
        assert_eq!(c.pending_len(), data.len() - w.n);
        assert!(c.interest().is_writable(), "a blocked write asks for WRITABLE");
        // The far end reads slowly; what was written is freed as it goes.
        let mut got = Vec::new();
        let mut buf = vec![0; 8192];
        let mut peak = c.held();
        far.set_nonblocking(true).unwrap();
        while got.len() < data.len() {
            match far.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            c.writable = true;
            let w = c.flush();
            assert!(w.error.is_none());
            assert!(c.held() <= peak, "pending grew while draining");
            peak = c.held();
        }
        assert_eq!(got, data);
        assert_eq!(c.held(), 0, "an idle stream holds no buffer");
        assert!(!c.interest().is_writable());
    }

    #[test]
    fn fin_waits_for_pending_bytes_then_shuts_the_write_side() {
        let (mut c, mut far) = pair();
        shrink_send_buffer(&c);
        let data = vec![7u8; 200_000];
        c.deliver(&data);
        c.peer_fin = true;
        c.flush();
        assert!(!c.write_shut, "bytes still pending");
        far.set_nonblocking(false).unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            far.read_to_end(&mut all).unwrap();
            all.len()
        });
        while !c.write_shut {
            c.writable = true;
            assert!(c.flush().error.is_none());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(reader.join().unwrap(), data.len(), "every byte, then end-of-file");
    }

    #[test]
    fn a_peer_that_resets_fails_the_write() {
        let (mut c, far) = pair();
        // Unread bytes at the far end make its close a reset.
        c.deliver(b"unread");
        drop(far);
        let w = c.deliver(b"more");
        let e = w.error.expect("write after the peer's close fails");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }

    #[test]
    fn interest_follows_the_phase_and_pending_output() {
        let poll = Poll::new().unwrap();
        let (mut c, _far) = pair();
        c.phase = Phase::Connecting;
        c.sync_interest(poll.registry(), Token(1)).unwrap();
        assert_eq!(c.registered, Some(Interest::WRITABLE));
        c.phase = Phase::Open;
        c.sync_interest(poll.registry(), Token(1)).unwrap();
        assert_eq!(c.registered, Some(Interest::READABLE));
        c.peer_fin = true;
        c.writable = false;
        c.sync_interest(poll.registry(), Token(1)).unwrap();
        assert_eq!(c.registered, Some(Interest::READABLE | Interest::WRITABLE));
        c.writable = true;
        c.flush();
        c.sync_interest(poll.registry(), Token(1)).unwrap();
        assert!(c.write_shut);
        assert_eq!(c.registered, Some(Interest::READABLE));
    }
}
