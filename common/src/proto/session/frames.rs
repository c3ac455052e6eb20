//! Frames of an established session (PROTOCOL.md §4–§7), by family:
//! session frames (PING, PONG, GOAWAY), OPEN and its policy, and the frames
//! of a live stream (DATA, ACCEPT, REFUSE, CREDIT, FIN, RESET).

use std::time::{Duration, Instant};

use super::{push_frame, EndReason, Event, Session, State, Step, Stream};
use crate::proto::code::Code;
use crate::proto::frame::{self, Frame, StreamId};
use crate::proto::hello::{self, Role};

impl Session {
    /// A complete, checked frame: note that the peer is alive, then hand it
    /// to its family. `from` is where a DATA payload starts in the input.
    pub(super) fn on_frame(&mut self, frame: Frame<'_>, from: usize, now: Instant) -> Step {
        let State::Established(e) = &mut self.state else {
            unreachable!()
        };
        e.last_rx = now;
        match frame {
            Frame::Ping { .. } | Frame::Pong { .. } | Frame::GoAway { .. } | Frame::Ack { .. } => {
                self.on_session_frame(frame, now)
            }
            Frame::Open { stream, service } => self.on_open(stream, service, now),
            _ => self.on_stream_frame(frame, from, now),
        }
    }

    /// PING, PONG, GOAWAY (§7, §8.1) and ACK (§6.1).
    fn on_session_frame(&mut self, frame: Frame<'_>, now: Instant) -> Step {
        let State::Established(e) = &mut self.state else {
            unreachable!()
        };
        match frame {
            Frame::Ping { opaque } => {
                // At most one PONG waits: a newer PING replaces it (§7).
                e.pending_pong = Some(opaque);
                Step::Continue
            }
            Frame::Pong { opaque } => {
                if e.ping == Some(opaque) {
                    e.ping = None;
                }
                Step::Continue
            }
            Frame::GoAway { code, drain_ms, text } => {
                if drain_ms == 0 || e.streams.is_empty() {
                    let reason = EndReason::PeerGoAway {
                        code,
                        text: text.into(),
                    };
                    return Step::Event(self.end(reason, now));
                }
                let drain = Duration::from_millis(u64::from(drain_ms));
                let until = now + drain;
                e.drain_until = Some(e.drain_until.map_or(until, |d| d.min(until)));
                Step::Event(Event::GoingAway {
                    code,
                    drain,
                    text: text.into(),
                })
            }
            Frame::Ack { received } => {
                let written = self.tx.frames_written();
                match &mut e.acks {
                    Some(a) if received >= a.peer_acked && received <= written => {
                        a.peer_acked = received;
                        Step::Continue
                    }
                    Some(a) => {
                        let detail = format!(
                            "ACK of {received} bytes: {} acknowledged before, {written} sent",
                            a.peer_acked
                        );
                        self.desync(detail, now)
                    }
                    None => self.desync("ACK without CHANNEL_ACK".into(), now),
                }
            }
            _ => unreachable!("not a session frame"),
        }
    }

    /// OPEN (§5.1, §5.2, §8.2): numbering, names, and the host's limits.
    fn on_open(&mut self, stream: StreamId, payload: &str, now: Instant) -> Step {
        let role = self.cfg.role;
        let State::Established(e) = &mut self.state else {
            unreachable!()
        };
        if role != Role::Host {
            return self.desync("the host opened a stream".into(), now);
        }
        if stream.0 != e.highest.wrapping_add(1) {
            let detail = format!("OPEN of stream {stream} after stream {}", e.highest);
            return self.desync(detail, now);
        }
        e.highest = stream.0;
        let tag = e.info.tag;
        // With CLIENT_ADDRESS the service name may be followed by a NUL and
        // the client's address; otherwise a NUL makes no valid name.
        let (service, client) = match payload.split_once('\0') {
            Some((s, c)) if e.info.client_addresses && c.len() <= hello::MAX_CLIENT_ADDRESS => (s, Some(c)),
            _ => (payload, None),
        };
        let mut violation = false;
        let refusal = if frame::check_service_name(service.as_bytes()).is_err() {
            // A guest names services, never addresses or paths.
            violation = true;
            Some((
                Code::UnknownService,
                "not a service name (A-Z a-z 0-9 . _ -, 1 to 64)".to_owned(),
            ))
        } else if e.drain_until.is_some() {
            Some((Code::GoingAway, "session is going away".to_owned()))
        } else if !self.limits.opens.take(now) {
            violation = true;
            self.stats.opens_refused_for_rate += 1;
            let rate = self.cfg.policy.open_rate;
            Some((Code::ResourceLimit, format!("more than {rate} opens per second")))
        } else if e.streams.len() as u64 >= u64::from(self.cfg.limits.max_streams) {
            Some((
                Code::ResourceLimit,
                format!("stream limit of {} reached", self.cfg.limits.max_streams),
            ))
        } else {
            None
        };
        if let Some((code, text)) = refusal {
            if violation && !self.limits.violations.take(now) {
                return self.too_many_violations(now);
            }
            push_frame(
                &mut self.tx,
                tag,
                &Frame::Refuse {
                    stream,
                    code,
                    text: &text,
                },
            );
            return Step::Event(Event::Refused {
                stream,
                code,
                text: text.into(),
                by_peer: false,
            });
        }
        let window = self.cfg.limits.initial_window;
        e.streams
            .insert(stream, Stream::new(e.info.peer_limits.initial_window, window));
        Step::Event(Event::Opened {
            stream,
            service: service.to_owned(),
            client: client.map(Into::into),
        })
    }

    /// The frames of a live stream (§5.3–§6). A frame for a stream already
    /// forgotten was in flight when it ended and is ignored (§5.1).
    fn on_stream_frame(&mut self, frame: Frame<'_>, from: usize, now: Instant) -> Step {
        let role = self.cfg.role;
        let State::Established(e) = &mut self.state else {
            unreachable!()
        };
        let stream = frame.stream();
        let Some(s) = e.streams.get_mut(&stream) else {
            if stream.0 <= e.highest {
                self.stats.stale_frames += 1;
                return Step::Continue;
            }
            return self.desync(
                format!("{:?} for stream {stream}, never opened", frame.frame_type()),
                now,
            );
        };
        let guest_unaccepted = role == Role::Guest && !s.accepted;
        match frame {
            Frame::Data { payload, .. } => {
                if s.remote_fin || guest_unaccepted {
                    return self.stream_violation(
                        stream,
                        Code::ProtocolError,
                        "DATA after FIN or before ACCEPT",
                        now,
                    );
                }
                if let Err(o) = s.recv.on_data(payload.len() as u32) {
                    let text = format!("DATA of {} bytes with {} credit", o.len, o.avail);
                    return self.stream_violation(stream, Code::FlowControlError, &text, now);
                }
                Step::Data {
                    stream,
                    from,
                    len: payload.len(),
                }
            }
            Frame::Accept { .. } => {
                if role != Role::Guest || s.accepted {
                    return self.stream_violation(stream, Code::ProtocolError, "unexpected ACCEPT", now);
                }
                s.accepted = true;
                Step::Event(Event::Accepted { stream })
            }
            Frame::Refuse { code, text, .. } => {
                if role != Role::Guest || s.accepted {
                    return self.stream_violation(stream, Code::ProtocolError, "unexpected REFUSE", now);
                }
                e.remove_stream(stream);
                Step::Event(Event::Refused {
                    stream,
                    code,
                    text: text.into(),
                    by_peer: true,
                })
            }
            Frame::Credit { increment, .. } => {
                if s.local_fin {
                    return Step::Continue;
                }
                match s.send.grant(increment) {
                    Ok(true) => Step::Event(Event::Credit { stream }),
                    Ok(false) => Step::Continue,
                    Err(_) => self.stream_violation(stream, Code::FlowControlError, "credit overflow", now),
                }
            }
            Frame::Fin { .. } => {
                if s.remote_fin || guest_unaccepted {
                    return self.stream_violation(
                        stream,
                        Code::ProtocolError,
                        "FIN twice or before ACCEPT",
                        now,
                    );
                }
                s.remote_fin = true;
                if s.local_fin {
                    e.remove_stream(stream);
                }
                Step::Event(Event::Finished { stream })
            }
            Frame::Reset { code, text, .. } => {
                e.remove_stream(stream);
                Step::Event(Event::Reset {
                    stream,
                    code,
                    text: text.into(),
                    by_peer: true,
                })
            }
            Frame::Open { .. }
            | Frame::Ping { .. }
            | Frame::Pong { .. }
            | Frame::GoAway { .. }
            | Frame::Ack { .. } => unreachable!("not a stream frame"),
        }
    }

    /// The peer broke a rule of one stream: reset just that stream.
    fn stream_violation(&mut self, stream: StreamId, code: Code, text: &str, now: Instant) -> Step {
        self.stats.stream_violations += 1;
        if !self.limits.violations.take(now) {
            return self.too_many_violations(now);
        }
        self.reset(stream, code, text);
        Step::Event(Event::Reset {
            stream,
            code,
            text: text.into(),
            by_peer: false,
        })
    }

    /// The peer keeps breaking stream rules or limits: end the session.
    fn too_many_violations(&mut self, now: Instant) -> Step {
        let n = self.cfg.policy.violations_per_10s;
        let detail = format!("more than {n} stream violations or refused opens in 10 s");
        Step::Event(self.fail(Code::EnhanceYourCalm, detail, now))
    }
}
