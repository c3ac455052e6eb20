//! The socket side of a [`Channel`]: writing what the channel delivered,
//! reading what the channel should carry, the buffer budget, interest,
//! timeouts, and the one closing line per stream.

use std::time::Instant;

use mio::{Registry, Token};

use super::Channel;
use crate::io::conn::{Phase, Written};
use crate::io::sock::{drained, interrupted, would_block};
use crate::proto::{Code, Role, StreamId};

/// Socket reads per turn before the loop looks at other work.
const READS_PER_TURN: usize = 512;

impl Channel {
    /// Writes a connection's pending bytes (and half-close) and settles the result.
    pub(super) fn flush_conn(&mut self, key: usize, registry: &Registry, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let stream = conn.stream;
        let w = conn.flush();
        self.after_write(key, stream, w, registry, now);
    }

    pub(super) fn after_write(
        &mut self,
        key: usize,
        stream: StreamId,
        w: Written,
        registry: &Registry,
        now: Instant,
    ) {
        if w.n > 0 {
            let backlog = self.conns.get(key).map_or(0, |c| c.data_pending());
            self.session.consumed_with_backlog(stream, w.n, backlog);
        }
        if let Some(e) = w.error {
            let peer = self.conns.get(key).map_or("", |c| c.peer.as_str());
            let why = socket_failure("write", &e, peer);
            self.session.reset(stream, Code::Aborted, &why);
            self.drop_conn(key, registry, &why, false, now);
            return;
        }
        if !self.settle(key, registry, now) {
            return;
        }
        let conn = self.conns.get_mut(key).expect("live key");
        if conn.is_done() {
            self.drop_conn(key, registry, "finished", true, now);
        } else {
            self.sync_interest(key, registry, now);
        }
    }

    /// Registers for what the connection now waits for. A socket that cannot
    /// be watched is a failed socket: its stream is reset.
    pub(super) fn sync_interest(&mut self, key: usize, registry: &Registry, now: Instant) {
        let token = Token(self.token_base + 1 + key);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Err(e) = conn.sync_interest(registry, token) {
            let stream = conn.stream;
            let why = format!("cannot watch the socket: {e}");
            self.session.reset(stream, Code::InternalError, &why);
            self.drop_conn(key, registry, &why, false, now);
        }
    }

    /// Brings the connection's share of the buffer budget in line with what
    /// it holds. A stream that would pass the guest's budget is reset; returns
    /// whether the connection is still there.
    pub(super) fn settle(&mut self, key: usize, registry: &Registry, now: Instant) -> bool {
        let budget = &self.cfg.budget;
        let conn = self.conns.get_mut(key).expect("live key");
        let held = conn.held();
        if held < conn.reserved {
            budget.release_buffer(conn.reserved - held);
        } else if held > conn.reserved && !budget.try_buffer(held - conn.reserved) {
            let stream = conn.stream;
            let text = format!("guest buffer limit of {} bytes reached", budget.max_buffered());
            self.session.reset(stream, Code::ResourceLimit, &text);
            self.drop_conn(
                key,
                registry,
                &format!("reset: RESOURCE_LIMIT: {text}"),
                false,
                now,
            );
            return false;
        }
        conn.reserved = held;
        true
    }

    pub(super) fn enqueue(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.queued && conn.readable && !conn.read_eof && conn.phase == Phase::Open {
                conn.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Reads readable sockets into DATA frames, one read per stream per pass.
    pub(super) fn serve_ready(&mut self, now: Instant, registry: &Registry) {
        let mut reads = READS_PER_TURN;
        while reads > 0 && self.session.can_send_data() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            reads -= 1;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.queued = false;
            if !conn.readable || conn.read_eof {
                continue;
            }
            let stream = conn.stream;
            // No space: no credit yet (an Event::Credit requeues the stream).
            let Some(space) = self.session.send_space(stream) else {
                continue;
            };
            let room = space.len();
            let r = conn.sock.read(space);
            let n = *r.as_ref().unwrap_or(&0);
            self.session.send_commit(stream, n);
            self.counters.bytes_to_peer += n as u64;
            match r {
                Ok(0) => {
                    conn.read_eof = true;
                    conn.note_half_close(now);
                    self.session.finish(stream);
                    if conn.is_done() {
                        self.drop_conn(key, registry, "finished", true, now);
                    } else {
                        self.half_closed(now);
                    }
                }
                Ok(n) => {
                    conn.bytes_in += n as u64;
                    conn.last_active = now;
                    if drained(n, room, conn.closing) {
                        conn.readable = false;
                    } else {
                        self.enqueue(key);
                    }
                }
                Err(e) if would_block(&e) => conn.readable = false,
                Err(e) if interrupted(&e) => self.enqueue(key),
                Err(e) => {
                    let why = socket_failure("read", &e, &conn.peer);
                    self.session.reset(stream, Code::Aborted, &why);
                    self.drop_conn(key, registry, &why, false, now);
                }
            }
        }
    }

    /// Connects that took longer than the connect timeout fail like any
    /// other (see `retry_connects`).
    pub(super) fn expire_connects(&mut self, now: Instant) {
        while let Some(&(deadline, key, stream, attempt)) = self.connecting.front() {
            if now < deadline {
                break;
            }
            self.connecting.pop_front();
            let Some(conn) = self.conns.get(key) else { continue };
            if conn.stream == stream && conn.phase == Phase::Connecting && conn.attempt == attempt {
                let ms = self.cfg.connect_timeout.as_millis();
                let why = format!("connect to {}: timed out after {ms} ms", conn.peer);
                self.connects_failed.push((key, stream, why));
            }
        }
    }

    /// The stream timeouts and the quiet rule. Runs at the earliest moment
    /// one of them could apply to some stream (so an idle channel is not
    /// woken every second), and schedules the next such moment.
    pub(super) fn sweep(&mut self, now: Instant, registry: &Registry) {
        if self.next_sweep.is_none_or(|t| now < t) {
            return;
        }
        let t = self.cfg.timeouts;
        let budget = self.cfg.budget.clone();
        let mut expired = Vec::new();
        let mut quiet = Vec::new();
        let mut next: Option<Instant> = None;
        let mut soonest = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
        for key in self.conns.keys().collect::<Vec<_>>() {
            let c = self.conns.get_mut(key).expect("listed");
            if c.phase != Phase::Open {
                continue;
            }
            if let Some(limit) = t.half_closed {
                if let Some(since) = c.half_closed_since {
                    if now.duration_since(since) >= limit {
                        expired.push((key, format!("half-closed for {} s", limit.as_secs())));
                        continue;
                    }
                    soonest(since + limit);
                }
            }
            if let Some(limit) = t.idle {
                if now.duration_since(c.last_active) >= limit {
                    expired.push((key, format!("idle for {} s", limit.as_secs())));
                    continue;
                }
                soonest(c.last_active + limit);
            }
            if let Some(rule) = t.quiet {
                if now.duration_since(c.window_start) >= rule.window {
                    let total = c.bytes_in + c.bytes_out;
                    let is_quiet = total - c.window_bytes < rule.bytes;
                    if is_quiet != c.quiet_since.is_some() {
                        budget.set_quiet(is_quiet);
                        c.quiet_since = is_quiet.then_some(c.window_start);
                    }
                    c.window_start = now;
                    c.window_bytes = total;
                }
                soonest(c.window_start + rule.window);
                if let Some(since) = c.quiet_since {
                    quiet.push((since, key));
                }
            }
        }
        for (key, why) in expired {
            let stream = self.conns.get(key).expect("listed").stream;
            self.session.reset(stream, Code::Timeout, &why);
            self.drop_conn(key, registry, &format!("reset: TIMEOUT: {why}"), false, now);
        }
        if let Some(rule) = t.quiet {
            // Over the guest's limit: this channel's streams quiet longest go
            // first, until the guest is back within it.
            quiet.sort_unstable();
            for (_, key) in quiet {
                if budget.quiet() <= rule.max {
                    break;
                }
                let stream = self.conns.get(key).expect("listed").stream;
                let why = format!(
                    "quiet (under {} bytes in {} s) beyond the guest's {} quiet streams",
                    rule.bytes,
                    rule.window.as_secs(),
                    rule.max
                );
                self.session.reset(stream, Code::Timeout, &why);
                self.drop_conn(key, registry, &format!("reset: TIMEOUT: {why}"), false, now);
            }
        }
        self.next_sweep = next;
    }

    /// A stream became half-closed: the sweep must run when its timeout
    /// could expire.
    pub(super) fn half_closed(&mut self, now: Instant) {
        if let Some(limit) = self.cfg.timeouts.half_closed {
            self.sweep_by(now + limit);
        }
    }

    /// Makes sure the sweep runs by `at`.
    pub(super) fn sweep_by(&mut self, at: Instant) {
        self.next_sweep = Some(self.next_sweep.map_or(at, |t| t.min(at)));
    }

    /// Removes a connection, frees what it held, and logs its closing line.
    pub(super) fn drop_conn(
        &mut self,
        key: usize,
        registry: &Registry,
        why: &str,
        clean: bool,
        now: Instant,
    ) {
        let Some(conn) = self.conns.remove(key) else {
            return;
        };
        self.by_stream.remove(&conn.stream);
        if let Some(owner) = conn.owner {
            self.closed.push(owner);
        }
        if conn.quiet_since.is_some() {
            self.cfg.budget.set_quiet(false);
        }
        self.cfg.budget.release_buffer(conn.reserved);
        self.cfg.budget.release_stream();
        let secs = now.saturating_duration_since(conn.opened).as_secs_f64();
        let (bin, bout) = (conn.bytes_in, conn.bytes_out);
        let (stream, service, peer) = (conn.stream, conn.service.clone(), conn.peer.clone());
        conn.close(registry, clean);
        let flow = match self.session.config().role {
            Role::Guest => format!("{bin} B from client, {bout} B to client"),
            Role::Host => format!("{bout} B to {peer}, {bin} B from it"),
        };
        self.stream_log(
            now,
            &format!("stream {stream} ({service}) closed: {why}; {flow}; {secs:.3} s"),
        );
    }
}

/// Why a socket failed, in words for the log and the RESET text.
fn socket_failure(op: &str, e: &std::io::Error, peer: &str) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset => format!("{peer} reset the connection"),
        std::io::ErrorKind::BrokenPipe => format!("{peer} closed the connection while data was due"),
        _ => format!("{op} failed: {e}"),
    }
}
