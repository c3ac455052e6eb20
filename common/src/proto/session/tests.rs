//! Two sessions driven against each other in memory, on virtual time.

use std::time::{Duration, Instant};

use super::*;
use crate::proto::frame::{write_header, FrameType, HEADER_LEN};
use crate::proto::hello::{HelloParse, Limits};

/// An event with its data copied out, so tests can keep it.
#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Data(StreamId, Vec<u8>),
    Other(Event<'static>),
}

fn own(ev: Event<'_>) -> Ev {
    match ev.into_owned() {
        Ok(ev) => Ev::Other(ev),
        Err((stream, bytes)) => Ev::Data(stream, bytes.to_vec()),
    }
}

/// One side plus what it has seen.
struct Side {
    s: Session,
    events: Vec<Ev>,
    /// Received stream bytes per stream, when the side passes data on at once.
    auto_consume: bool,
}

impl Side {
    fn new(role: Role, seed: u64) -> Side {
        Side {
            s: Session::new(Config::new(role, format!("{role} test")), seed),
            events: vec![],
            auto_consume: true,
        }
    }

    fn poll(&mut self, now: Instant) {
        while let Some(ev) = self.s.poll_event(now) {
            let ev = own(ev);
            if let Ev::Data(stream, bytes) = &ev {
                if self.auto_consume {
                    let (stream, n) = (*stream, bytes.len());
                    self.events.push(ev);
                    self.s.consumed(stream, n);
                    continue;
                }
            }
            self.events.push(ev);
        }
    }

    fn take(&mut self) -> Vec<Ev> {
        std::mem::take(&mut self.events)
    }

    fn data(&self, stream: StreamId) -> Vec<u8> {
        let mut out = vec![];
        for e in &self.events {
            if let Ev::Data(s, b) = e {
                if *s == stream {
                    out.extend_from_slice(b);
                }
            }
        }
        out
    }

    fn has(&self, pred: impl Fn(&Event<'static>) -> bool) -> bool {
        self.events.iter().any(|e| matches!(e, Ev::Other(ev) if pred(ev)))
    }
}

struct Pair {
    g: Side,
    h: Side,
    now: Instant,
    /// Largest chunk moved per read, to exercise partial frames.
    chunk: usize,
    /// When false, bytes the guest writes are lost (a frozen or absent guest).
    g_to_h: bool,
}

impl Pair {
    fn new() -> Pair {
        Pair {
            g: Side::new(Role::Guest, 1),
            h: Side::new(Role::Host, 2),
            now: Instant::now(),
            chunk: usize::MAX,
            g_to_h: true,
        }
    }

    fn up(&mut self) {
        self.g.s.link_up(self.now);
        self.h.s.link_up(self.now);
        self.drive();
        assert!(self.g.s.is_established() && self.h.s.is_established());
    }

    /// Moves bytes both ways until nothing changes.
    fn drive(&mut self) {
        for _ in 0..100_000 {
            let a = transfer(&mut self.g.s, &mut self.h.s, self.chunk, self.g_to_h);
            let b = transfer(&mut self.h.s, &mut self.g.s, self.chunk, true);
            self.g.poll(self.now);
            self.h.poll(self.now);
            if a + b == 0 {
                return;
            }
        }
        panic!("pair did not settle");
    }

    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next = [self.g.s.poll_timeout(), self.h.s.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|&t| t <= end)
                .min();
            let Some(t) = next else { break };
            self.now = t.max(self.now);
            self.g.s.handle_timeout(self.now);
            self.h.s.handle_timeout(self.now);
            self.drive();
        }
        self.now = end;
        self.drive();
    }
}

/// Moves up to `chunk` bytes at a time from `a`'s transmit buffer into `b`.
fn transfer(a: &mut Session, b: &mut Session, chunk: usize, deliver: bool) -> usize {
    let mut moved = 0;
    loop {
        let out = a.poll_transmit();
        if out.is_empty() {
            return moved;
        }
        if !deliver {
            let n = out.len();
            a.advance_transmit(n);
            moved += n;
            continue;
        }
        let space = b.recv_space();
        let n = out.len().min(space.len()).min(chunk);
        if n == 0 {
            return moved;
        }
        space[..n].copy_from_slice(&out[..n]);
        b.recv_commit(n);
        a.advance_transmit(n);
        moved += n;
        if moved > 0 && chunk != usize::MAX {
            return moved;
        }
    }
}

fn established(side: &Side) -> bool {
    side.has(|e| matches!(e, Event::Established(_)))
}

fn ended(side: &Side) -> Option<EndReason> {
    side.events.iter().find_map(|e| match e {
        Ev::Other(Event::Ended(r)) => Some(r.clone()),
        _ => None,
    })
}

/// Opens a stream from the guest, accepted by the host.
fn open_accepted(p: &mut Pair) -> StreamId {
    let id = p.g.s.open("amqp").unwrap();
    p.drive();
    assert!(p.h.take().contains(&Ev::Other(Event::Opened {
        stream: id,
        service: "amqp".into(),
        client: None,
    })));
    p.h.s.accept(id);
    p.drive();
    assert!(p.g.take().contains(&Ev::Other(Event::Accepted { stream: id })));
    id
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn handshake_agrees_on_tag_and_limits() {
    let mut p = Pair::new();
    p.up();
    let gi = p.g.s.info().unwrap().clone();
    let hi = p.h.s.info().unwrap().clone();
    assert_eq!(gi.tag, hi.tag);
    assert_eq!(gi.version, 1);
    assert_eq!(gi.peer_identity, "host test");
    assert_eq!(hi.peer_identity, "guest test");
    assert!(established(&p.g) && established(&p.h));
}

#[test]
fn handshake_one_side_first() {
    // The host comes up long before the guest; its HELLOs pile up unread.
    let mut p = Pair::new();
    p.h.s.link_up(p.now);
    for _ in 0..5 {
        p.now += Duration::from_secs(10);
        p.h.s.handle_timeout(p.now);
    }
    p.g.s.link_up(p.now);
    p.drive();
    assert!(p.g.s.is_established() && p.h.s.is_established());
}

#[test]
fn stale_bytes_before_the_handshake_are_discarded() {
    let mut p = Pair::new();
    // An earlier session's frames and a stale HELLO from an earlier host sit in
    // the guest's input before anything of this host's.
    let mut old = Session::new(Config::new(Role::Host, "old"), 99);
    old.link_up(p.now);
    let mut junk = old.poll_transmit().to_vec();
    let mut f = [0u8; HEADER_LEN + 4 + 2];
    write_header(&mut f, FrameType::Data, 0x1234, 4, StreamId(1));
    junk.extend_from_slice(&f);
    junk.extend_from_slice(&crate::proto::hello::MAGIC[..5]); // a torn magic
    let space = p.g.s.recv_space();
    space[..junk.len()].copy_from_slice(&junk);
    p.g.s.link_up(p.now);
    p.g.s.recv_commit(junk.len());
    p.h.s.link_up(p.now);
    p.drive();
    assert!(p.g.s.is_established() && p.h.s.is_established());
    assert!(!p.g.events.iter().any(|e| matches!(e, Ev::Data(..))));
    let id = open_accepted(&mut p);
    assert_eq!(p.g.s.send(id, b"ping"), 4);
    p.drive();
    assert_eq!(p.h.data(id), b"ping");
}

#[test]
fn stream_round_trip_with_half_close() {
    let mut p = Pair::new();
    p.up();
    let id = open_accepted(&mut p);
    let up = pattern(700_000, 1);
    let down = pattern(900_000, 2);
    let (mut us, mut ds) = (0, 0);
    while us < up.len() || ds < down.len() {
        us += p.g.s.send(id, &up[us..]);
        ds += p.h.s.send(id, &down[ds..]);
        p.drive();
    }
    p.g.s.finish(id);
    p.drive();
    assert!(p.h.has(|e| *e == Event::Finished { stream: id }));
    // The host still sends after the guest's FIN.
    assert_eq!(p.h.s.send(id, b"tail"), 4);
    p.h.s.finish(id);
    p.drive();
    assert_eq!(p.h.data(id), up);
    let mut want = down.clone();
    want.extend_from_slice(b"tail");
    assert_eq!(p.g.data(id), want);
    assert_eq!(p.g.s.stream_count(), 0);
    assert_eq!(p.h.s.stream_count(), 0);
}

#[test]
fn data_may_follow_open_before_accept() {
    let mut p = Pair::new();
    p.up();
    let id = p.g.s.open("amqp").unwrap();
    assert_eq!(p.g.s.send(id, b"AMQP"), 4);
    p.g.s.finish(id);
    p.drive();
    assert_eq!(p.h.data(id), b"AMQP");
    assert!(p.h.has(|e| *e == Event::Finished { stream: id }));
    // The host sends nothing before it accepts.
    assert!(p.h.s.send_space(id).is_none());
    p.h.s.accept(id);
    assert_eq!(p.h.s.send(id, b"ok"), 2);
    p.h.s.finish(id);
    p.drive();
    assert_eq!(p.g.data(id), b"ok");
    assert_eq!(p.h.s.stream_count(), 0);
}

#[test]
fn refusal_and_reset_both_ways() {
    let mut p = Pair::new();
    p.up();
    let a = p.g.s.open("nosuch").unwrap();
    p.drive();
    p.h.s.refuse(a, Code::UnknownService, "no service \"nosuch\"");
    p.drive();
    assert!(p.g.has(|e| matches!(e, Event::Refused { stream, code: Code::UnknownService, by_peer: true, .. } if *stream == a)));
    assert_eq!(p.g.s.stream_count(), 0);

    let b = open_accepted(&mut p);
    p.g.s.reset(b, Code::Aborted, "client reset");
    p.drive();
    assert!(p.h.has(
        |e| matches!(e, Event::Reset { stream, code: Code::Aborted, by_peer: true, .. } if *stream == b)
    ));
    let c = open_accepted(&mut p);
    p.h.s.reset(c, Code::Aborted, "broker reset");
    p.drive();
    assert!(p
        .g
        .has(|e| matches!(e, Event::Reset { stream, by_peer: true, .. } if *stream == c)));
    assert_eq!((p.g.s.stream_count(), p.h.s.stream_count()), (0, 0));
}

#[test]
fn frames_in_flight_after_a_reset_are_ignored() {
    let mut p = Pair::new();
    p.up();
    let id = open_accepted(&mut p);
    // Both send; the host resets before it sees the guest's data.
    p.g.s.send(id, b"late data");
    p.g.s.finish(id);
    p.h.s.reset(id, Code::Aborted, "gone");
    p.drive();
    assert!(p.g.s.is_established() && p.h.s.is_established());
    assert_eq!(p.h.s.stats().stale_frames, 2);
}

#[test]
fn credit_is_returned_only_when_consumed() {
    let mut p = Pair::new();
    p.h.auto_consume = false;
    p.up();
    let id = open_accepted(&mut p);
    let window = DEFAULT_INITIAL_WINDOW as usize;
    let big = pattern(window * 3, 3);
    let sent = p.g.s.send(id, &big);
    p.drive();
    assert_eq!(sent, window, "a sender stops at the window");
    assert_eq!(p.g.s.send_credit(id), 0);
    assert_eq!(p.h.data(id).len(), window);
    // The host passes on half, half is still waiting for the consumer: that
    // half of credit comes back (no more) and the guest is told.
    p.h.s.consumed_with_backlog(id, window / 2, window / 2);
    p.drive();
    assert!(p.g.has(|e| *e == Event::Credit { stream: id }));
    assert_eq!(p.g.s.send_credit(id) as usize, window / 2);
}

#[test]
fn a_fast_stream_window_grows_to_the_ceiling_and_returns_to_the_pool() {
    let mut p = Pair::new();
    p.up();
    let id = open_accepted(&mut p);
    let base = DEFAULT_INITIAL_WINDOW as usize;
    // The host passes everything on at once (no backlog): after a few
    // windows the guest may have the ceiling in flight.
    let data = pattern(32 << 20, 1);
    let mut sent = 0;
    let mut most = 0;
    while sent < data.len() {
        let credit = p.g.s.send_credit(id) as usize;
        // The guest never has more credit than the window the host granted
        // (the fuzz harness found a wrong bound here: the initial window).
        let window = p.h.s.recv_window(id) as usize;
        assert!(
            credit <= window && window <= DEFAULT_WINDOW_MAX as usize,
            "{credit} {window}"
        );
        most = most.max(credit);
        sent += p.g.s.send(id, &data[sent..]);
        p.drive();
    }
    assert!(most > base, "window never grew past {base}");
    assert!(p.h.s.recv_window(id) as usize > base);
    assert!(most <= DEFAULT_WINDOW_MAX as usize, "{most}");
    assert_eq!(p.h.data(id), data);
    let State::Established(e) = &p.h.s.state else {
        panic!()
    };
    assert!(e.window_pool < u64::from(DEFAULT_WINDOW_POOL));
    p.g.s.reset(id, Code::Aborted, "done");
    p.drive();
    let State::Established(e) = &p.h.s.state else {
        panic!()
    };
    assert_eq!(
        e.window_pool,
        u64::from(DEFAULT_WINDOW_POOL),
        "the extra went back to the pool"
    );
}

#[test]
fn credit_overrun_resets_only_that_stream() {
    let mut p = Pair::new();
    p.h.auto_consume = false;
    p.up();
    let a = open_accepted(&mut p);
    let b = open_accepted(&mut p);
    // Forge a DATA frame beyond the window on stream a.
    let tag = p.g.s.info().unwrap().tag;
    let payload = vec![0u8; 60_000];
    for _ in 0..5 {
        let f = Frame::Data {
            stream: a,
            payload: &payload,
        };
        push_frame(&mut p.g.s.tx, tag, &f);
    }
    p.drive();
    assert!(p.h.has(|e| matches!(e, Event::Reset { stream, code: Code::FlowControlError, by_peer: false, .. } if *stream == a)));
    assert!(p.g.has(|e| matches!(e, Event::Reset { stream, code: Code::FlowControlError, by_peer: true, .. } if *stream == a)));
    assert!(p.h.s.is_established());
    assert_eq!(p.g.s.send(b, b"still fine"), 10);
    p.drive();
    assert_eq!(p.h.data(b), b"still fine");
}

#[test]
fn credit_overflow_resets_the_stream() {
    let mut p = Pair::new();
    p.up();
    let a = open_accepted(&mut p);
    let tag = p.g.s.info().unwrap().tag;
    push_frame(
        &mut p.g.s.tx,
        tag,
        &Frame::Credit {
            stream: a,
            increment: u32::MAX,
        },
    );
    p.drive();
    assert!(p.h.has(|e| matches!(
        e,
        Event::Reset {
            code: Code::FlowControlError,
            ..
        }
    )));
}

#[test]
fn garbage_frame_ends_the_session_and_it_recovers() {
    let mut p = Pair::new();
    p.up();
    let a = open_accepted(&mut p);
    let tag = p.g.s.info().unwrap().tag;
    let mut bad = [0u8; 18];
    write_header(&mut bad, FrameType::Fin, tag, 0, a);
    bad[0] = 0x42;
    p.g.s.tx.append_raw(18).copy_from_slice(&bad);
    p.drive();
    let reason = ended(&p.h).expect("host ended the session");
    assert!(
        matches!(
            reason,
            EndReason::Violation {
                code: Code::ProtocolError,
                ..
            }
        ),
        "{reason:?}"
    );
    assert!(matches!(
        ended(&p.g),
        Some(EndReason::PeerGoAway {
            code: Code::ProtocolError,
            ..
        })
    ));
    // A fresh session follows without any timeout.
    assert!(p.g.s.is_established() && p.h.s.is_established());
    assert_eq!(p.g.s.stream_count(), 0);
}

#[test]
fn guest_restart_mid_frame_recovers_without_delivering_junk() {
    let mut p = Pair::new();
    p.up();
    let id = open_accepted(&mut p);
    // The old guest wrote half of a DATA frame, then died.
    p.g.s.send(id, &pattern(5000, 9));
    let partial = p.g.s.poll_transmit()[..2000].to_vec();
    let space = p.h.s.recv_space();
    space[..partial.len()].copy_from_slice(&partial);
    p.h.s.recv_commit(partial.len());
    p.h.poll(p.now);
    p.h.take();
    // A new guest bridge starts on the same port.
    p.g = Side::new(Role::Guest, 77);
    p.g.s.link_up(p.now);
    p.drive();
    for _ in 0..30 {
        if p.h.s.is_established() && p.g.s.is_established() {
            break;
        }
        p.advance(Duration::from_secs(1));
    }
    assert!(p.g.s.is_established() && p.h.s.is_established());
    assert!(ended(&p.h).is_some());
    assert!(
        !p.h.events.iter().any(|e| matches!(e, Ev::Data(..))),
        "junk taken for data"
    );
}

#[test]
fn peer_restart_between_frames_is_seen_at_once() {
    let mut p = Pair::new();
    p.up();
    open_accepted(&mut p);
    p.g = Side::new(Role::Guest, 1234);
    p.g.s.link_up(p.now);
    p.drive();
    assert_eq!(ended(&p.h), Some(EndReason::PeerRestarted));
    assert!(p.g.s.is_established() && p.h.s.is_established());
    assert_eq!(p.h.s.stream_count(), 0);
}

#[test]
fn keepalive_holds_an_idle_session_and_detects_a_dead_peer() {
    let mut p = Pair::new();
    p.up();
    p.advance(Duration::from_secs(120));
    assert!(ended(&p.g).is_none() && ended(&p.h).is_none());
    // The guest freezes: nothing it writes arrives.
    p.g_to_h = false;
    p.advance(Duration::from_secs(16));
    assert_eq!(ended(&p.h), Some(EndReason::IdleTimeout(Duration::from_secs(15))));
}

#[test]
fn split_at_every_byte_boundary() {
    // The same conversation, delivered in chunks of every size from 1 byte.
    for chunk in [1, 2, 3, 5, 7, 16, 17, 18, 19, 100, 4096] {
        let mut p = Pair::new();
        p.chunk = chunk;
        p.up();
        let id = open_accepted(&mut p);
        let data = pattern(20_000, chunk as u8);
        let mut sent = 0;
        while sent < data.len() {
            sent += p.g.s.send(id, &data[sent..]);
            p.drive();
        }
        p.g.s.finish(id);
        p.drive();
        assert_eq!(p.h.data(id), data, "chunk {chunk}");
        assert!(p.h.has(|e| *e == Event::Finished { stream: id }), "chunk {chunk}");
    }
}

#[test]
fn goaway_drains_then_ends() {
    let mut p = Pair::new();
    p.up();
    let id = open_accepted(&mut p);
    p.h.s
        .go_away(Code::NoError, Duration::from_secs(5), "maintenance", p.now);
    p.drive();
    assert!(p.g.has(|e| matches!(e, Event::GoingAway { .. })));
    assert_eq!(p.g.s.open("amqp"), Err(OpenError::GoingAway));
    // The open stream still works.
    assert_eq!(p.g.s.send(id, b"x"), 1);
    p.drive();
    assert_eq!(p.h.data(id), b"x");
    p.advance(Duration::from_secs(6));
    assert_eq!(ended(&p.h), Some(EndReason::Drained));
    assert_eq!(ended(&p.g), Some(EndReason::Drained));
    // Both handshake again by themselves.
    assert!(p.g.s.is_established() && p.h.s.is_established());
}

#[test]
fn shutdown_closes_after_the_last_stream() {
    let mut p = Pair::new();
    p.up();
    let id = open_accepted(&mut p);
    p.h.s.shutdown(Duration::from_secs(30), p.now);
    p.drive();
    assert!(!p.h.s.is_closed());
    p.g.s.finish(id);
    p.h.s.finish(id);
    p.drive();
    assert!(p.h.s.is_closed());
    assert_eq!(ended(&p.h), Some(EndReason::Drained));
}

#[test]
fn version_mismatch_is_refused_with_a_reason() {
    let mut p = Pair::new();
    p.h.s.link_up(p.now);
    // A guest from the future speaking versions 2..=3.
    let hello = Hello {
        min_version: 2,
        max_version: 3,
        role: Some(Role::Guest),
        refuse: false,
        nonce: [5; 16],
        echo: NO_NONCE,
        capabilities: 0,
        limits: Config::new(Role::Guest, "").limits,
        code: Code::NoError,
        text: "future".into(),
    };
    let mut b = vec![];
    hello.encode(&mut b);
    p.h.s.recv_space()[..b.len()].copy_from_slice(&b);
    p.h.s.recv_commit(b.len());
    p.h.poll(p.now);
    assert!(p.h.has(|e| matches!(e, Event::Rejected { by_peer: false, code: Code::VersionMismatch, text } if text.as_str().contains("peer speaks 2..=3"))));
    // What the host sent back is a REFUSE HELLO.
    let out = p.h.s.poll_transmit().to_vec();
    let pos = hello::find_magic(&out[1..]).unwrap() + 1;
    let HelloParse::Valid(reply, _) = Hello::parse(&out[pos..]) else {
        panic!("no reply HELLO")
    };
    assert!(reply.refuse && reply.code == Code::VersionMismatch);
}

#[test]
fn two_guests_refuse_each_other() {
    let mut p = Pair::new();
    p.h = Side::new(Role::Guest, 3);
    p.g.s.link_up(p.now);
    p.h.s.link_up(p.now);
    p.drive();
    assert!(p.g.has(|e| matches!(
        e,
        Event::Rejected {
            code: Code::RoleMismatch,
            ..
        }
    )));
    assert!(!p.g.s.is_established());
}

#[test]
fn ping_flood_leaves_one_pong() {
    let mut p = Pair::new();
    p.up();
    let tag = p.h.s.info().unwrap().tag;
    let mut flood = vec![];
    for i in 0..10_000u64 {
        let f = Frame::Ping {
            opaque: i.to_be_bytes(),
        };
        let mut b = vec![0; f.encoded_len()];
        f.encode(tag, &mut b);
        flood.extend_from_slice(&b);
    }
    let mut fed = 0;
    while fed < flood.len() {
        let space = p.h.s.recv_space();
        let n = space.len().min(flood.len() - fed);
        space[..n].copy_from_slice(&flood[fed..fed + n]);
        p.h.s.recv_commit(n);
        fed += n;
        p.h.poll(p.now);
    }
    // One PONG, for the last PING; then one ACK of the whole flood.
    let out = p.h.s.poll_transmit();
    assert_eq!(out.len(), 26 + 26);
    assert_eq!(&out[HEADER_LEN..HEADER_LEN + 8], &9999u64.to_be_bytes());
    assert_eq!(
        &out[26 + HEADER_LEN..26 + HEADER_LEN + 8],
        &(flood.len() as u64).to_be_bytes()
    );
}

#[test]
fn replies_backed_up_stop_input() {
    // The guest opens streams beyond the limit and never reads the refusals.
    let mut p = Pair::new();
    let mut cfg = Config::new(Role::Host, "h");
    cfg.limits.max_streams = 1;
    cfg.policy = Policy::unlimited();
    p.h = Side {
        s: Session::new(cfg, 2),
        events: vec![],
        auto_consume: true,
    };
    p.up();
    let tag = p.h.s.info().unwrap().tag;
    let mut input = vec![];
    // More refusals than the transmit buffer may hold.
    for id in 1..=200_000u64 {
        let f = Frame::Open {
            stream: StreamId(id),
            service: "amqp",
        };
        let mut b = vec![0; f.encoded_len()];
        f.encode(tag, &mut b);
        input.extend_from_slice(&b);
    }
    let mut fed = 0;
    while fed < input.len() {
        let space = p.h.s.recv_space();
        if space.is_empty() {
            break;
        }
        let n = space.len().min(input.len() - fed);
        space[..n].copy_from_slice(&input[fed..fed + n]);
        p.h.s.recv_commit(n);
        fed += n;
        p.h.poll(p.now);
    }
    assert!(fed < input.len(), "input must stop while replies are backed up");
    let limit = DEFAULT_TX_HIGH_WATER + DEFAULT_MAX_FRAME_PAYLOAD as usize + CONTROL_ALLOWANCE;
    assert!(p.h.s.tx.len() < limit + 300);
}

#[test]
fn repeated_failures_back_off() {
    let mut p = Pair::new();
    p.up();
    let tag = p.g.s.info().unwrap().tag;
    let mut fails = 0;
    for _ in 0..3 {
        if !p.g.s.is_established() {
            break;
        }
        let mut bad = [0u8; 18];
        write_header(&mut bad, FrameType::Fin, tag.wrapping_add(1), 0, StreamId(1));
        p.g.s.tx.append_raw(18).copy_from_slice(&bad);
        p.drive();
        fails += 1;
    }
    // The first failure re-handshakes at once; the second holds off.
    assert_eq!(fails, 2);
    assert!(!p.h.s.is_established());
    p.advance(Duration::from_secs(2));
    assert!(p.g.s.is_established() && p.h.s.is_established());
}

#[test]
fn link_loss_ends_the_session_and_link_up_restarts() {
    let mut p = Pair::new();
    p.up();
    open_accepted(&mut p);
    p.h.s.link_down(p.now);
    p.h.poll(p.now);
    assert_eq!(ended(&p.h), Some(EndReason::LinkLost));
    p.g.s.link_down(p.now);
    p.g.poll(p.now);
    p.g.take();
    p.h.take();
    p.up();
    assert_eq!(p.g.s.stream_count(), 0);
}

#[test]
fn random_traffic_many_streams_every_byte_arrives() {
    let mut rng = crate::proto::rng::SplitMix64::new(42);
    let mut p = Pair::new();
    p.chunk = 3000;
    p.up();
    let mut streams = vec![];
    for i in 0..20 {
        let id = open_accepted(&mut p);
        let up = pattern((rng.next_u64() % 300_000) as usize, i);
        let down = pattern((rng.next_u64() % 300_000) as usize, i + 100);
        streams.push((id, up, 0usize, down, 0usize));
    }
    loop {
        let mut busy = false;
        for (id, up, us, down, ds) in streams.iter_mut() {
            let n = (rng.next_u64() % 70_000) as usize;
            let end = (*us + n).min(up.len());
            *us += p.g.s.send(*id, &up[*us..end]);
            let end = (*ds + n).min(down.len());
            *ds += p.h.s.send(*id, &down[*ds..end]);
            busy |= *us < up.len() || *ds < down.len();
        }
        p.drive();
        if !busy {
            break;
        }
    }
    for (id, up, _, down, _) in &streams {
        assert_eq!(&p.h.data(*id), up);
        assert_eq!(&p.g.data(*id), down);
    }
}

/// A pair whose host has the given policy.
fn pair_with_host_policy(policy: Policy) -> Pair {
    let mut p = Pair::new();
    let mut cfg = Config::new(Role::Host, "host test");
    cfg.policy = policy;
    p.h = Side {
        s: Session::new(cfg, 2),
        events: vec![],
        auto_consume: true,
    };
    p.up();
    p
}

/// Frames with the session tag, as a misbehaving guest would write them.
fn raw(p: &Pair, frames: &[Frame<'_>]) -> Vec<u8> {
    let tag = p.g.s.info().unwrap().tag;
    let mut out = vec![];
    for f in frames {
        let mut b = vec![0; f.encoded_len()];
        f.encode(tag, &mut b);
        out.extend_from_slice(&b);
    }
    out
}

/// Feeds bytes to the host as fast as it takes them; returns how many it took.
fn feed_host(p: &mut Pair, bytes: &[u8]) -> usize {
    let mut fed = 0;
    while fed < bytes.len() {
        let space = p.h.s.recv_space();
        if space.is_empty() {
            break;
        }
        let n = space.len().min(bytes.len() - fed);
        space[..n].copy_from_slice(&bytes[fed..fed + n]);
        p.h.s.recv_commit(n);
        fed += n;
        p.h.poll(p.now);
    }
    p.h.poll(p.now);
    fed
}

#[test]
fn control_frame_flood_ends_the_session_with_enhance_your_calm() {
    let policy = Policy {
        control_rate: 1000,
        ..Policy::default()
    };
    let mut p = pair_with_host_policy(policy);
    let pings: Vec<Frame<'_>> = (0..5000u64)
        .map(|i| Frame::Ping {
            opaque: i.to_be_bytes(),
        })
        .collect();
    let bytes = raw(&p, &pings);
    feed_host(&mut p, &bytes);
    let reason = ended(&p.h).expect("host ended the session");
    assert!(
        matches!(
            &reason,
            EndReason::Violation {
                code: Code::EnhanceYourCalm,
                ..
            }
        ),
        "{reason:?}"
    );
    // The GOAWAY reaches the guest with the code.
    p.drive();
    assert!(matches!(
        ended(&p.g),
        Some(EndReason::PeerGoAway {
            code: Code::EnhanceYourCalm,
            ..
        })
    ));
}

#[test]
fn opens_beyond_the_rate_are_refused_then_the_session_ends() {
    let policy = Policy {
        open_rate: 10,
        open_burst: 10,
        violations_per_10s: 50,
        ..Policy::default()
    };
    let mut p = pair_with_host_policy(policy);
    let opens: Vec<Frame<'_>> = (1..=40u64)
        .map(|i| Frame::Open {
            stream: StreamId(i),
            service: "amqp",
        })
        .collect();
    let bytes = raw(&p, &opens);
    feed_host(&mut p, &bytes);
    let opened =
        p.h.events
            .iter()
            .filter(|e| matches!(e, Ev::Other(Event::Opened { .. })))
            .count();
    let refused =
        p.h.events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Ev::Other(Event::Refused {
                        code: Code::ResourceLimit,
                        ..
                    })
                )
            })
            .count();
    assert_eq!((opened, refused), (10, 30));
    assert!(
        ended(&p.h).is_none(),
        "30 refusals are within the violation budget"
    );
    assert_eq!(p.h.s.stats().opens_refused_for_rate, 30);
    // Keep going: past the violation budget the session ends.
    let more: Vec<Frame<'_>> = (41..=100u64)
        .map(|i| Frame::Open {
            stream: StreamId(i),
            service: "amqp",
        })
        .collect();
    let bytes = raw(&p, &more);
    feed_host(&mut p, &bytes);
    assert!(matches!(
        ended(&p.h),
        Some(EndReason::Violation {
            code: Code::EnhanceYourCalm,
            ..
        })
    ));
}

#[test]
fn frame_rate_throttles_input_instead_of_burning_cpu() {
    let policy = Policy {
        frame_rate: 1000,
        ..Policy::default()
    };
    let mut p = pair_with_host_policy(policy);
    let id = open_accepted(&mut p);
    let tiny: Vec<Frame<'_>> = (0..5000)
        .map(|_| Frame::Data {
            stream: id,
            payload: b"x",
        })
        .collect();
    let bytes = raw(&p, &tiny);
    let t0 = p.now;
    let mut fed = feed_host(&mut p, &bytes);
    let got = p.h.data(id).len();
    assert!((900..=1100).contains(&got), "{got} frames before the throttle");
    assert!(p.h.s.recv_space().is_empty(), "no reading while throttled");
    let wake = p.h.s.poll_timeout().unwrap();
    assert!(wake > t0 && wake <= t0 + Duration::from_millis(5), "{wake:?}");
    // Time passes: input flows again at the configured rate.
    for _ in 0..50 {
        p.now += Duration::from_millis(100);
        p.h.s.handle_timeout(p.now);
        p.h.poll(p.now);
        fed += feed_host(&mut p, &bytes[fed..]);
    }
    assert_eq!(p.h.data(id).len(), 5000);
    assert!(p.h.s.stats().throttled > 0);
    assert!(ended(&p.h).is_none(), "throttling is not a violation");
}

#[test]
fn addresses_and_paths_are_refused_as_unknown_services() {
    let mut p = Pair::new();
    p.up();
    for (i, name) in ["127.0.0.1:22", "[::1]:22", "/etc/passwd", "", "a b"]
        .iter()
        .enumerate()
    {
        let bytes = raw(
            &p,
            &[Frame::Open {
                stream: StreamId(i as u64 + 1),
                service: name,
            }],
        );
        feed_host(&mut p, &bytes);
    }
    let refused =
        p.h.events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Ev::Other(Event::Refused {
                        code: Code::UnknownService,
                        by_peer: false,
                        ..
                    })
                )
            })
            .count();
    assert_eq!(refused, 5);
    assert!(!p
        .h
        .events
        .iter()
        .any(|e| matches!(e, Ev::Other(Event::Opened { .. }))));
    assert!(
        p.h.s.is_established(),
        "a bad name costs the stream, not the session"
    );
}

/// The nonce of a side that is handshaking.
fn handshake_nonce(s: &Session) -> Nonce {
    match &s.state {
        State::Handshaking(h) => h.nonce,
        _ => panic!("not handshaking"),
    }
}

fn refuse_hello(echo: Nonce) -> Vec<u8> {
    let h = Hello {
        min_version: 1,
        max_version: 1,
        role: Some(Role::Host),
        refuse: true,
        nonce: [9; 16],
        echo,
        capabilities: 0,
        limits: Config::new(Role::Host, "").limits,
        code: Code::EnhanceYourCalm,
        text: "go away".into(),
    };
    let mut b = vec![];
    h.encode(&mut b);
    b
}

/// Feeds all of `bytes` (as long as the session reads) and collects events.
fn feed(s: &mut Session, bytes: &[u8], now: Instant) -> Vec<Ev> {
    let mut evs = vec![];
    let mut fed = 0;
    while fed < bytes.len() {
        let space = s.recv_space();
        if space.is_empty() {
            break;
        }
        let n = space.len().min(bytes.len() - fed);
        space[..n].copy_from_slice(&bytes[fed..fed + n]);
        s.recv_commit(n);
        fed += n;
        while let Some(ev) = s.poll_event(now) {
            evs.push(own(ev));
        }
    }
    evs
}

#[test]
fn a_refusal_that_does_not_echo_our_nonce_is_stale() {
    let mut p = Pair::new();
    p.g.s.link_up(p.now);
    // Replayed bytes: a refusal of some earlier handshake.
    let evs = feed(&mut p.g.s, &refuse_hello([5; 16]), p.now);
    assert!(evs.is_empty(), "{evs:?}");
    assert_eq!(p.g.s.stats().stale_refusals, 1);
    // The handshake goes on as if nothing had come: no backoff.
    p.h.s.link_up(p.now);
    p.drive();
    assert!(p.g.s.is_established() && p.h.s.is_established());
    // A refusal of this very handshake is obeyed.
    let mut g = Session::new(Config::new(Role::Guest, "g"), 7);
    g.link_up(p.now);
    let mine = handshake_nonce(&g);
    let evs = feed(&mut g, &refuse_hello(mine), p.now);
    assert!(
        matches!(
            &evs[..],
            [Ev::Other(Event::Rejected {
                by_peer: true,
                code: Code::EnhanceYourCalm,
                ..
            })]
        ),
        "{evs:?}"
    );
}

#[test]
fn sessions_beyond_the_session_rate_back_off_like_failures() {
    let policy = Policy {
        sessions_per_minute: 6,
        ..Policy::default()
    };
    let mut p = pair_with_host_policy(policy);
    let start = p.now;
    let mut per_minute = [0u64; 3];
    // The guest ends every session at once and handshakes again.
    while p.now < start + Duration::from_secs(180) {
        if p.g.s.is_established() && p.h.s.is_established() {
            let minute = (p.now - start).as_secs() as usize / 60;
            per_minute[minute] += 1;
            p.g.s.go_away(Code::NoError, Duration::ZERO, "bye", p.now);
            p.drive();
        }
        p.advance(Duration::from_millis(100));
    }
    let churned = p.h.s.stats().churned;
    // A burst of twice the rate, then ever longer holds: after the first
    // minute a handful a minute.
    assert!(per_minute[0] <= 24, "{per_minute:?}");
    assert!(per_minute[1] <= 6 && per_minute[2] <= 6, "{per_minute:?}");
    assert!(
        per_minute[2] >= 1,
        "the peer is held off, not shut out: {per_minute:?}"
    );
    assert!(churned > 0);
}

/// Candidates a sprayer would craft: magic, the largest length, then fixed
/// fields that pass every check but the CRC, every 70 bytes.
fn magic_spray(len: usize) -> Vec<u8> {
    let mut one = [0u8; 70];
    one[..8].copy_from_slice(&crate::proto::hello::MAGIC);
    one[8..10].copy_from_slice(&1024u16.to_be_bytes());
    one[10] = 1;
    one[11] = 1;
    one[12] = 1;
    one[14..30].fill(0x55);
    one.iter().copied().cycle().take(len).collect()
}

#[test]
fn a_magic_spray_costs_at_most_the_scan_rate() {
    let policy = Policy {
        scan_bytes_per_sec: 1 << 20,
        ..Policy::default()
    };
    let mut cfg = Config::new(Role::Host, "host test");
    cfg.policy = policy;
    let mut h = Session::new(cfg, 2);
    let t0 = Instant::now();
    h.link_up(t0);
    let spray = magic_spray(64 << 20);
    let mut fed = 0;
    let mut now = t0;
    while now < t0 + Duration::from_secs(5) {
        let space = h.recv_space();
        let n = space.len().min(spray.len() - fed);
        space[..n].copy_from_slice(&spray[fed..fed + n]);
        h.recv_commit(n);
        fed += n;
        while h.poll_event(now).is_some() {}
        now += Duration::from_millis(10);
        if h.poll_timeout().is_some_and(|t| now >= t) {
            h.handle_timeout(now);
        }
    }
    let work = h.stats().scan_work;
    // 5 s at 1 MiB/s, plus the burst of one second's worth.
    assert!(work <= 6 << 20, "{work} bytes of scan work in 5 s");
    assert!(work >= 3 << 20, "the scanner did work: {work}");
    assert!(h.stats().throttled > 0);
    // Without the candidates' cheap fields the CRC is never run at all.
    let mut h = Session::new(Config::new(Role::Host, "h"), 3);
    h.link_up(t0);
    let cheap: Vec<u8> = crate::proto::hello::MAGIC
        .iter()
        .chain(&1024u16.to_be_bytes())
        .copied()
        .cycle()
        .take(100_000)
        .collect();
    feed(&mut h, &cheap, t0);
    let work = h.stats().scan_work;
    assert!(
        (100_000 - 1034..=100_000).contains(&work),
        "{work}: each byte scanned once, no CRC"
    );
}

#[test]
fn frames_sent_are_sized_by_this_side_not_by_the_peer() {
    let mut p = Pair::new();
    let mut cfg = Config::new(Role::Guest, "greedy guest");
    cfg.limits.max_frame_payload = Limits::MAX_FRAME_PAYLOAD;
    cfg.limits.initial_window = Limits::MAX_WINDOW;
    p.g = Side {
        s: Session::new(cfg, 1),
        events: vec![],
        auto_consume: true,
    };
    p.h.s.cfg.limits.max_frame_payload = 16 << 10;
    p.up();
    let id = open_accepted(&mut p);
    let room = p.h.s.send_space(id).map(|s| s.len());
    assert_eq!(room, Some(16 << 10));
    p.h.s.send_commit(id, 0);
}

#[test]
fn open_carries_the_client_address_when_both_sides_can() {
    let mut p = Pair::new();
    p.up();
    assert!(p.g.s.info().unwrap().client_addresses);
    let id = p.g.s.open_for("amqp", Some("127.0.0.1:40000")).unwrap();
    p.drive();
    assert!(p.h.take().contains(&Ev::Other(Event::Opened {
        stream: id,
        service: "amqp".into(),
        client: Some("127.0.0.1:40000".into()),
    })));
    // A peer that did not set the capability: a NUL makes no valid name.
    let mut q = Pair::new();
    q.up();
    if let State::Established(e) = &mut q.h.s.state {
        e.info.client_addresses = false;
    }
    let bytes = raw(
        &q,
        &[Frame::Open {
            stream: StreamId(1),
            service: "amqp\x00127.0.0.1:1",
        }],
    );
    feed_host(&mut q, &bytes);
    assert!(q.h.has(|e| matches!(
        e,
        Event::Refused {
            code: Code::UnknownService,
            ..
        }
    )));
}

// ---- CHANNEL_ACK and the two lanes (§6.1) ----

/// A pair whose host grants 2 MiB of credit per stream at once, so that
/// only the in-flight limit holds the guest back.
fn wide_pair() -> Pair {
    let mut p = Pair::new();
    p.h.s.cfg.limits.initial_window = 2 << 20;
    p.up();
    p
}

/// Writes everything the guest may write now into a "channel" (a Vec) the
/// host has not read yet; returns how many bytes.
fn write_out(s: &mut Session, wire: &mut Vec<u8>) -> usize {
    let mut n = 0;
    loop {
        let out = s.poll_transmit();
        if out.is_empty() {
            return n;
        }
        wire.extend_from_slice(out);
        let k = out.len();
        s.advance_transmit(k);
        n += k;
    }
}

fn feed_side(side: &mut Side, bytes: &[u8], now: Instant) {
    let mut at = 0;
    while at < bytes.len() {
        let space = side.s.recv_space();
        let n = space.len().min(bytes.len() - at);
        assert!(n > 0, "receiver stopped reading");
        space[..n].copy_from_slice(&bytes[at..at + n]);
        side.s.recv_commit(n);
        at += n;
        side.poll(now);
    }
}

/// Ten rounds of offering `data` to `stream` and writing out what the
/// session lets go; returns the bytes the stream took.
fn send_rounds(s: &mut Session, stream: StreamId, data: &[u8], wire: &mut Vec<u8>) -> usize {
    let mut sent = 0;
    for _ in 0..10 {
        sent += s.send(stream, &data[sent..]);
        write_out(s, wire);
    }
    sent
}

#[test]
fn bulk_stops_at_the_in_flight_limit_until_acknowledged() {
    let mut p = wide_pair();
    assert!(p.g.s.info().unwrap().channel_acks);
    let id = open_accepted(&mut p);
    // A second stream, which could be waiting behind the bulk.
    let _other = open_accepted(&mut p);
    let limit = p.g.s.config().inflight_limit as u64;
    let data = pattern(2_000_000, 3);
    let mut sent = 0;
    let mut wire = vec![];
    // Nothing acknowledged: the guest writes at most the limit, whatever
    // the stream's credit and the transmit buffer would allow.
    sent += send_rounds(&mut p.g.s, id, &data[sent..], &mut wire);
    assert!(
        sent as u64 > limit,
        "the buffer holds more than the limit ({sent})"
    );
    assert!(wire.len() as u64 <= limit, "{} bytes in flight", wire.len());
    assert!(
        wire.len() as u64 >= limit - limit / 4,
        "{} bytes in flight",
        wire.len()
    );
    // (The OPEN before it is in flight too: less than a quantum, unacknowledged.)
    let in_flight = p.g.s.in_flight();
    assert!(
        in_flight >= wire.len() as u64 && in_flight <= limit,
        "{in_flight}"
    );
    assert!(!p.g.s.wants_write(), "held-back bulk is nothing to write now");
    // The host reads it all and acknowledges it: the guest may go on.
    feed_side(&mut p.h, &wire, p.now);
    let mut back = vec![];
    write_out(&mut p.h.s, &mut back);
    feed_side(&mut p.g, &back, p.now);
    assert_eq!(p.g.s.in_flight(), 0);
    assert!(p.g.s.wants_write());
    // And everything arrives, in order, once both sides keep going.
    while sent < data.len() {
        sent += p.g.s.send(id, &data[sent..]);
        p.drive();
    }
    p.drive();
    assert_eq!(p.h.data(id), data);
}

#[test]
fn a_lone_stream_is_not_held_to_the_in_flight_limit() {
    let mut p = wide_pair();
    let id = open_accepted(&mut p);
    let limit = p.g.s.config().inflight_limit;
    let data = pattern(8_000_000, 4);
    let mut sent = 0;
    let mut wire = vec![];
    sent += send_rounds(&mut p.g.s, id, &data[sent..], &mut wire);
    assert!(
        wire.len() > 2 * limit,
        "{} bytes written, limit {limit}",
        wire.len()
    );
    // The host takes it all; a second stream opens: from now on the limit
    // holds.
    feed_side(&mut p.h, &wire, p.now);
    p.drive();
    let _other = open_accepted(&mut p);
    let mut more = vec![];
    sent += send_rounds(&mut p.g.s, id, &data[sent..], &mut more);
    assert!(sent < data.len(), "all of it was taken");
    assert!(more.len() <= limit, "{} bytes beyond the limit", more.len());
}

#[test]
fn a_small_frame_goes_ahead_of_another_streams_queued_bulk() {
    let mut p = wide_pair();
    let bulk = open_accepted(&mut p);
    let small = open_accepted(&mut p);
    let mut wire = vec![];
    let mut sent = 0;
    let data = pattern(1_000_000, 4);
    for _ in 0..4 {
        sent += p.g.s.send(bulk, &data[sent..]);
    }
    // The limit's worth of bulk goes out; the rest waits in the guest.
    write_out(&mut p.g.s, &mut wire);
    let before = wire.len();
    assert_eq!(p.g.s.send(small, b"heartbeat"), 9);
    write_out(&mut p.g.s, &mut wire);
    // The small frame is written at once, although bulk bytes queued before
    // it are still waiting for an ACK.
    assert_eq!(wire.len(), before + 9 + crate::proto::frame::FRAME_OVERHEAD);
    feed_side(&mut p.h, &wire, p.now);
    assert_eq!(p.h.data(small), b"heartbeat");
    assert!(sent > before);
}

#[test]
fn acks_beyond_what_was_sent_or_going_back_end_the_session() {
    for (first, second) in [(u64::MAX, None), (40, Some(20))] {
        let mut p = Pair::new();
        p.up();
        let id = open_accepted(&mut p);
        p.g.s.send(id, &pattern(100, 1));
        p.drive();
        let tag = p.h.s.info().unwrap().tag;
        let mut bytes = vec![];
        for received in [Some(first), second].into_iter().flatten() {
            let f = Frame::Ack { received };
            let mut b = vec![0; f.encoded_len()];
            f.encode(tag, &mut b);
            bytes.extend_from_slice(&b);
        }
        feed_side(&mut p.g, &bytes, p.now);
        let reason = ended(&p.g).expect("the guest ended the session");
        assert!(
            matches!(&reason, EndReason::Violation { code: Code::ProtocolError, detail } if detail.contains("ACK of")),
            "{reason:?}"
        );
    }
}

#[test]
fn without_channel_ack_on_one_side_nothing_is_held_back() {
    let mut p = Pair::new();
    // A host from before CHANNEL_ACK: it never acknowledges.
    p.h.s.cfg.capabilities = crate::proto::hello::CAP_CLIENT_ADDRESS;
    p.up();
    assert!(!p.g.s.info().unwrap().channel_acks);
    let id = open_accepted(&mut p);
    let data = pattern(1_000_000, 5);
    let sent = p.g.s.send(id, &data);
    let mut wire = vec![];
    write_out(&mut p.g.s, &mut wire);
    assert!(
        wire.len() >= sent,
        "all {sent} bytes written at once ({})",
        wire.len()
    );
    assert_eq!(p.g.s.in_flight(), 0);
}

#[test]
fn a_new_session_never_sees_the_old_ones_bulk() {
    let mut p = wide_pair();
    let id = open_accepted(&mut p);
    let _other = open_accepted(&mut p);
    let data = pattern(1_000_000, 6);
    let mut sent = 0;
    for _ in 0..4 {
        sent += p.g.s.send(id, &data[sent..]);
    }
    let mut wire = vec![];
    write_out(&mut p.g.s, &mut wire);
    assert!(!p.g.s.tx.is_empty(), "bulk waits for an ACK");
    // The guest breaks the session (its peer sends garbage): the queued
    // bulk of the old session is dropped, the new HELLO goes out alone.
    let tag = p.g.s.info().unwrap().tag;
    let mut bad = [0u8; 18];
    write_header(&mut bad, FrameType::Fin, tag, 0, id);
    bad[0] = 0x42;
    feed_side(&mut p.g, &bad, p.now);
    assert!(ended(&p.g).is_some());
    let mut after = vec![];
    write_out(&mut p.g.s, &mut after);
    // GOAWAY, then the HELLO, and nothing of the old stream.
    let hello_at = after
        .windows(8)
        .position(|w| w == crate::proto::hello::MAGIC)
        .expect("a HELLO");
    let (_, len) = match crate::proto::hello::Hello::parse(&after[hello_at..]) {
        HelloParse::Valid(h, len) => (h, len),
        other => panic!("{other:?}"),
    };
    assert_eq!(hello_at + len, after.len(), "bytes after the HELLO");
    // The pair recovers and the count starts again.
    feed_side(&mut p.h, &wire, p.now);
    feed_side(&mut p.h, &after, p.now);
    p.drive();
    assert!(p.g.s.is_established() && p.h.s.is_established());
    assert_eq!(p.g.s.in_flight(), 0);
    let id = open_accepted(&mut p);
    let again = pattern(300_000, 7);
    let mut s2 = 0;
    while s2 < again.len() {
        s2 += p.g.s.send(id, &again[s2..]);
        p.drive();
    }
    assert_eq!(p.h.data(id), again);
}
