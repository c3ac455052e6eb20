//! One stream's local end: its socket, the bytes received from the channel
//! that the socket has not taken yet, and the half-close state of each
//! direction.
//!
//! Directions, named from the socket's point of view:
//! - **in**: socket → channel. Read only while the stream has credit and the
//!   channel has room; end-of-file becomes FIN.
//! - **out**: channel → socket. Written straight from the session's receive
//!   buffer; what the socket does not take waits in `pending` (never more than
//!   the window granted, because credit is returned only for bytes written).
//!   A FIN from the peer becomes `shutdown(SHUT_WR)` once `pending` is empty.

use std::io;
use std::time::Instant;

use mio::Registry;

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
    pending: Vec<u8>,
    pending_at: usize,
    /// The peer sent FIN: shut the socket's write side once `pending` drains.
    pub peer_fin: bool,
    pub write_shut: bool,
    /// The socket reached end-of-file and FIN was sent.
    pub read_eof: bool,
    /// Edge-triggered readiness, remembered until `WouldBlock` (or a short read).
    pub readable: bool,
    /// The last event said end-of-file or an error is queued: read until it.
    pub closing: bool,
    pub writable: bool,
    /// In the mux's ready queue.
    pub queued: bool,
    /// Bytes read from the socket (sent over the channel).
    pub bytes_in: u64,
    /// Bytes written to the socket (received over the channel).
    pub bytes_out: u64,
    /// Bytes of the guest's buffer budget this connection holds (always its
    /// pending length once the mux has settled it).
    pub reserved: usize,
    /// Has small DATA waiting in `pending` for the end-of-dispatch flush.
    pub dirty: bool,
    /// Last time a byte moved either way.
    pub last_active: Instant,
    /// When one direction finished (FIN sent or received) without the other.
    pub half_closed_since: Option<Instant>,
}

/// The result of writing to the socket.
#[derive(Debug)]
pub struct Written {
    /// Bytes the socket took: pass them to `Session::consumed`.
    pub n: usize,
    pub error: Option<io::Error>,
}

impl Conn {
    pub fn new(
        stream: StreamId,
        service: String,
        peer: String,
        sock: Sock,
        phase: Phase,
        now: Instant,
    ) -> Conn {
        sock.abort_on_close();
        Conn {
            stream,
            service,
            peer,
            sock,
            phase,
            opened: now,
            pending: Vec::new(),
            pending_at: 0,
            peer_fin: false,
            write_shut: false,
            read_eof: false,
            readable: false,
            closing: false,
            writable: false,
            queued: false,
            bytes_in: 0,
            bytes_out: 0,
            reserved: 0,
            dirty: false,
            last_active: now,
            half_closed_since: None,
        }
    }

    /// Appends bytes from the channel to `pending` without writing: small
    /// DATA frames are gathered and written once per dispatch.
    pub fn buffer(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Notes a half-close (either direction) for the half-closed timeout.
    pub fn note_half_close(&mut self, now: Instant) {
        if (self.read_eof || self.peer_fin) && !self.is_done() {
            self.half_closed_since.get_or_insert(now);
        }
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len() - self.pending_at
    }

    /// Both directions ended cleanly: the socket can be closed.
    pub fn is_done(&self) -> bool {
        self.read_eof && self.write_shut
    }

    /// Takes bytes from the channel: writes what the socket accepts now and
    /// keeps the rest, in order, for [`Conn::flush`].
    pub fn deliver(&mut self, bytes: &[u8]) -> Written {
        let mut w = Written { n: 0, error: None };
        if self.phase == Phase::Open && self.pending_len() == 0 {
            w = write_all(&mut self.sock, bytes, &mut self.writable);
        }
        self.bytes_out += w.n as u64;
        if w.error.is_none() && w.n < bytes.len() {
            self.pending.extend_from_slice(&bytes[w.n..]);
        }
        w
    }

    /// Writes pending bytes, then the half-close if one is due.
    pub fn flush(&mut self) -> Written {
        let mut w = Written { n: 0, error: None };
        if self.phase != Phase::Open {
            return w;
        }
        if self.pending_len() > 0 {
            w = write_all(
                &mut self.sock,
                &self.pending[self.pending_at..],
                &mut self.writable,
            );
            self.pending_at += w.n;
            self.bytes_out += w.n as u64;
            if self.pending_len() == 0 {
                // Give the memory back: an idle stream should cost little.
                self.pending = Vec::new();
                self.pending_at = 0;
            }
        }
        if w.error.is_none() && self.peer_fin && !self.write_shut && self.pending_len() == 0 {
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
