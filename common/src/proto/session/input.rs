//! Input processing of the [`Session`]: scanning for a HELLO while
//! handshaking (PROTOCOL.md §3), decoding frames once established (§4), and
//! ending a session for the peer's fault. What each frame does is in
//! `frames.rs`.

use std::collections::HashMap;
use std::time::Instant;

use super::{
    push_frame, Acks, EndReason, Established, Event, Session, SessionInfo, State, Stats, Step,
    MAX_DISCARD_PER_HANDSHAKE,
};
use crate::proto::code::Code;
use crate::proto::crc32c::crc32c;
use crate::proto::frame::{self, Decoded, Frame, HEADER_LEN};
use crate::proto::hello::{self, Hello, HelloParse, Role};
use crate::proto::rate::Bucket;

impl Session {
    pub(super) fn discard_input(&mut self) -> Step {
        self.stats.bytes_discarded += self.rx.len() as u64;
        self.rx.clear();
        Step::Need
    }

    /// Handshaking: find the next valid HELLO and act on it.
    pub(super) fn scan_hello(&mut self, now: Instant) -> Step {
        let State::Handshaking(h) = &mut self.state else {
            unreachable!()
        };
        if h.discarded > MAX_DISCARD_PER_HANDSHAKE {
            // Megabytes and no HELLO: a flood, not a restart. Hold off (and
            // stop reading) rather than scan at line rate.
            self.failures = self.failures.max(1) + 1;
            self.retry_handshake(now);
            return Step::Event(Event::Rejected {
                by_peer: false,
                code: Code::ProtocolError,
                text: format!("{} MiB without a valid HELLO", MAX_DISCARD_PER_HANDSHAKE >> 20).into(),
            });
        }
        if self.limits.scan.overdrawn(now) {
            // Scanning costs at most the scan rate: wait until the work done
            // is paid back, with the channel unread meanwhile.
            let batch = self.limits.scan.per(super::SCAN_BATCH);
            self.throttled_until = Some(self.limits.scan.ready_at(now, batch));
            self.stats.throttled += 1;
            return Step::Need;
        }
        match hello::find_magic(self.rx.filled()) {
            Err(keep) => {
                charge_scan(&mut self.limits.scan, &mut self.stats, now, keep);
                self.stats.bytes_discarded += keep as u64;
                h.discarded += keep as u64;
                self.rx.consume(keep);
                if keep > 0 {
                    h.partial_since = None;
                }
                Step::Need
            }
            Ok(pos) => {
                if pos > 0 {
                    charge_scan(&mut self.limits.scan, &mut self.stats, now, pos);
                    self.stats.bytes_discarded += pos as u64;
                    h.discarded += pos as u64;
                    self.rx.consume(pos);
                    h.partial_since = None;
                }
                let (parsed, crc_bytes) = Hello::parse_costed(self.rx.filled());
                charge_scan(&mut self.limits.scan, &mut self.stats, now, crc_bytes);
                match parsed {
                    HelloParse::Incomplete => {
                        h.partial_since.get_or_insert(now);
                        Step::Need
                    }
                    HelloParse::Invalid(_) => {
                        h.partial_since = None;
                        h.discarded += 1;
                        charge_scan(&mut self.limits.scan, &mut self.stats, now, 1);
                        self.stats.hellos_discarded += 1;
                        self.rx.consume(1);
                        Step::Continue
                    }
                    HelloParse::Valid(peer, len) => {
                        h.partial_since = None;
                        self.rx.consume(len);
                        self.limits.frames.take(now);
                        if !self.limits.control.take(now) {
                            // A HELLO flood: say why, then stop answering for a while.
                            let text = format!(
                                "more than {} HELLOs and control frames per second",
                                self.cfg.policy.control_rate
                            );
                            let nonce = h.nonce;
                            if self.tx.is_empty() {
                                self.queue_hello(nonce, peer.nonce, Some((Code::EnhanceYourCalm, &text)));
                            }
                            self.failures = self.failures.max(1) + 1;
                            self.retry_handshake(now);
                            return Step::Event(Event::Rejected {
                                by_peer: false,
                                code: Code::EnhanceYourCalm,
                                text: text.into(),
                            });
                        }
                        self.on_hello(peer, now)
                    }
                }
            }
        }
    }

    fn on_hello(&mut self, peer: Hello, now: Instant) -> Step {
        let State::Handshaking(h) = &self.state else {
            unreachable!()
        };
        let nonce = h.nonce;
        if peer.refuse && peer.echo != nonce {
            // Not about this handshake: replayed or stale bytes (a restarted
            // side reads what the channel kept from before). Obeying it would
            // let old bytes push a fresh handshake into backoff.
            self.stats.stale_refusals += 1;
            return Step::Continue;
        }
        if peer.refuse {
            self.failures += 1;
            self.retry_handshake(now);
            return Step::Event(Event::Rejected {
                by_peer: true,
                code: peer.code,
                text: peer.text,
            });
        }
        if let Err((code, text)) = self.compatible(&peer) {
            self.queue_hello(nonce, peer.nonce, Some((code, &text)));
            self.failures += 1;
            self.retry_handshake(now);
            return Step::Event(Event::Rejected {
                by_peer: false,
                code,
                text: text.into(),
            });
        }
        let State::Handshaking(h) = &mut self.state else {
            unreachable!()
        };
        let echoed = h.echoed.replace(peer.nonce);
        if echoed != Some(peer.nonce) {
            self.queue_hello(nonce, peer.nonce, None);
        }
        if peer.echo != nonce {
            return Step::Continue;
        }
        let (guest_nonce, host_nonce) = match self.cfg.role {
            Role::Guest => (nonce, peer.nonce),
            Role::Host => (peer.nonce, nonce),
        };
        let mut both = [0u8; 32];
        both[..16].copy_from_slice(&guest_nonce);
        both[16..].copy_from_slice(&host_nonce);
        let info = SessionInfo {
            version: peer.max_version.min(hello::VERSION_MAX),
            tag: crc32c(&both) as u16,
            peer_identity: peer.text,
            peer_limits: peer.limits,
            client_addresses: peer.capabilities & self.cfg.capabilities & hello::CAP_CLIENT_ADDRESS != 0,
            channel_acks: peer.capabilities & self.cfg.capabilities & hello::CAP_CHANNEL_ACK != 0,
        };
        self.tx.restart_count();
        self.state = State::Established(Box::new(Established {
            info: info.clone(),
            peer_nonce: peer.nonce,
            streams: HashMap::new(),
            highest: 0,
            since: now,
            last_rx: now,
            ping: None,
            pending_pong: None,
            drain_until: None,
            window_pool: u64::from(self.cfg.window_pool),
            over_rate: !self.limits.sessions.take(now),
            acks: info.channel_acks.then(Acks::default),
        }));
        self.stats.sessions += 1;
        Step::Event(Event::Established(info))
    }

    /// Whether a session with this peer is possible; if not, the refusal.
    fn compatible(&self, peer: &Hello) -> Result<(), (Code, String)> {
        let version = peer.max_version.min(hello::VERSION_MAX);
        if version < peer.min_version.max(hello::VERSION_MIN) {
            return Err((
                Code::VersionMismatch,
                format!(
                    "no common version: we speak {}..={}, peer speaks {}..={}",
                    hello::VERSION_MIN,
                    hello::VERSION_MAX,
                    peer.min_version,
                    peer.max_version
                ),
            ));
        }
        if peer.role != Some(self.cfg.role.other()) {
            return Err((
                Code::RoleMismatch,
                format!("both ends claim to be the {}", self.cfg.role),
            ));
        }
        peer.limits.check().map_err(|why| (Code::BadLimits, why))
    }

    // ---- internals: frames ----

    /// Established: decode and handle the next frame.
    pub(super) fn next_frame(&mut self, now: Instant) -> Step {
        let State::Established(e) = &self.state else {
            unreachable!()
        };
        let (tag, peer_nonce) = (e.info.tag, e.peer_nonce);
        // Take the buffer out so the frame can borrow it while `self` changes.
        let rx = std::mem::take(&mut self.rx);
        let max_data = self.cfg.limits.max_frame_payload as usize;
        let (step, used) = match frame::decode(rx.filled(), tag, max_data) {
            Ok(Decoded::Incomplete) => (Step::Need, 0),
            Ok(Decoded::Frame(frame, len)) => {
                self.stats.frames_in += 1;
                self.limits.frames.take(now);
                if let State::Established(e) = &mut self.state {
                    if let Some(a) = &mut e.acks {
                        a.received += len as u64;
                    }
                }
                // ACKs ask for nothing in return: like DATA, only the frame
                // rate bounds them.
                let control = !matches!(frame, Frame::Data { .. } | Frame::Ack { .. });
                if control && !self.limits.control.take(now) {
                    let rate = self.cfg.policy.control_rate;
                    let detail = format!("more than {rate} control frames per second");
                    (Step::Event(self.fail(Code::EnhanceYourCalm, detail, now)), len)
                } else {
                    (self.on_frame(frame, rx.offset() + HEADER_LEN, now), len)
                }
            }
            Ok(Decoded::Hello) => match Hello::parse(rx.filled()) {
                HelloParse::Incomplete => (Step::Need, 0),
                // A retransmission of the HELLO that established this session.
                HelloParse::Valid(h, len) if h.nonce == peer_nonce => (Step::Continue, len),
                // The peer restarted. Leave its HELLO in place: the new
                // handshake reads it.
                HelloParse::Valid(..) => (Step::Event(self.end(EndReason::PeerRestarted, now)), 0),
                // Rescan from the byte after the offending header's start.
                HelloParse::Invalid(why) => (self.desync(format!("bad HELLO in session: {why}"), now), 1),
            },
            Err(err) => (self.desync(err.to_string(), now), 1),
        };
        self.rx = rx;
        self.rx.consume(used);
        step
    }

    /// The bytes where a frame should be are not one: end the session and
    /// look for a HELLO.
    pub(super) fn desync(&mut self, detail: String, now: Instant) -> Step {
        Step::Event(self.fail(Code::ProtocolError, detail, now))
    }

    /// Ends the session for the peer's fault: GOAWAY, then handshake again.
    pub(super) fn fail(&mut self, code: Code, detail: String, now: Instant) -> Event<'static> {
        if let State::Established(e) = &self.state {
            let text = frame::clip_text(&detail, frame::MAX_GOAWAY_TEXT);
            push_frame(
                &mut self.tx,
                e.info.tag,
                &Frame::GoAway {
                    code,
                    drain_ms: 0,
                    text,
                },
            );
        }
        self.end(EndReason::Violation { code, detail }, now)
    }
}

/// Counts handshake work against the scan rate.
fn charge_scan(bucket: &mut Bucket, stats: &mut Stats, now: Instant, bytes: usize) {
    bucket.charge(now, bytes);
    stats.scan_work += bytes as u64;
}
