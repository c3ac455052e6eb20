//! The channel without processes: a host-side [`Channel`] on a real mio
//! poll, its link a unix socket whose far end is a guest [`Session`] driven
//! here, and its streams' sockets socketpairs or loopback TCP whose far ends
//! (the "service") the tests read and write.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::{Events, Poll};

use super::*;
use crate::io::link::ChannelSpec;
use crate::proto::frame::Frame;
use crate::proto::session::{Config, Policy};
use crate::proto::{EndReason, PeerText, Role};

/// What the guest side saw.
#[derive(Debug, Default)]
struct GuestView {
    established: usize,
    data: HashMap<StreamId, Vec<u8>>,
    finished: Vec<StreamId>,
    accepted: Vec<StreamId>,
    refused: Vec<(StreamId, Code, PeerText)>,
    reset: Vec<(StreamId, Code, PeerText)>,
    ended: Vec<EndReason>,
}

/// How the test opener connects streams.
enum Service {
    /// A socketpair per stream; the far ends are kept.
    Pairs(Vec<UnixStream>),
    /// A TCP connect to this listener.
    Tcp(TcpListener),
    /// A descriptor that is no socket: it cannot abort.
    Broken,
    /// TCP to these addresses in turn (attempt i to the i-th), each socket
    /// getting this preamble first; the opener's reports are kept.
    Addrs(Vec<SocketAddr>, Vec<u8>, Vec<(SocketAddr, bool)>),
}

struct TestOpener<'a>(&'a mut Service);

fn opening(sock: Sock, addr: Option<SocketAddr>) -> Opening {
    Opening {
        sock,
        addr,
        preamble: Vec::new(),
    }
}

impl Opener for TestOpener<'_> {
    fn open(
        &mut self,
        _: StreamId,
        service: &str,
        tried: &[SocketAddr],
        _: Instant,
    ) -> Result<Opening, (Code, String)> {
        let attempt = tried.len();
        match &mut self.0 {
            _ if service != "svc" => Err((Code::UnknownService, format!("no {service}"))),
            Service::Pairs(_) | Service::Tcp(_) | Service::Broken if attempt > 0 => {
                Err((Code::Unreachable, "no other address".into()))
            }
            Service::Pairs(ends) => {
                let (a, b) = UnixStream::pair().unwrap();
                a.set_nonblocking(true).unwrap();
                ends.push(b);
                Ok(opening(Sock::Unix(mio::net::UnixStream::from_std(a)), None))
            }
            Service::Tcp(l) => {
                let addr = l.local_addr().unwrap();
                let s = mio::net::TcpStream::connect(addr).unwrap();
                Ok(opening(Sock::Tcp(s), Some(addr)))
            }
            Service::Broken => {
                let file = std::fs::File::open("/dev/null").unwrap();
                let fake = std::net::TcpStream::from(OwnedFd::from(file));
                Ok(opening(Sock::Tcp(mio::net::TcpStream::from_std(fake)), None))
            }
            Service::Addrs(addrs, preamble, _) => {
                let Some(&addr) = addrs.get(attempt) else {
                    return Err((Code::Unreachable, "every address failed".into()));
                };
                let s = mio::net::TcpStream::connect(addr).unwrap();
                Ok(Opening {
                    sock: Sock::Tcp(s),
                    addr: Some(addr),
                    preamble: preamble.clone(),
                })
            }
        }
    }

    fn connected(&mut self, _: &str, addr: SocketAddr, ok: bool, _: Instant) {
        if let Service::Addrs(_, _, reports) = &mut self.0 {
            reports.push((addr, ok));
        }
    }
}

struct Rig {
    poll: Poll,
    events: Events,
    ch: Channel,
    service: Service,
    listener: UnixListener,
    path: PathBuf,
    /// The guest: its end of the link and its session.
    peer: Option<UnixStream>,
    guest: Session,
    seen: GuestView,
}

fn temp_path(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("vios-channel-{tag}-{}-{n}.sock", std::process::id()))
}

impl Rig {
    fn new(tag: &str, service: Service) -> Rig {
        let path = temp_path(tag);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let now = Instant::now();
        let link = Link::new(ChannelSpec::Unix(path.clone()), Token(0), now);
        let mut cfg = Config::new(Role::Host, "host under test");
        cfg.limits.initial_window = 64 << 10;
        cfg.limits.max_frame_payload = 16 << 10;
        // Windows do not grow: what the host may hold is exactly one window.
        cfg.window_max = cfg.limits.initial_window;
        let ch = Channel::new(Session::new(cfg, 1), link, ChannelConfig::unlimited("t: ".into()));
        let mut gcfg = Config::new(Role::Guest, "test guest");
        gcfg.policy = Policy::unlimited();
        Rig {
            poll: Poll::new().unwrap(),
            events: Events::with_capacity(64),
            ch,
            service,
            listener,
            path,
            peer: None,
            guest: Session::new(gcfg, 2),
            seen: GuestView::default(),
        }
    }

    /// One round: the channel's events and work, then the guest's.
    fn step(&mut self) {
        self.poll
            .poll(&mut self.events, Some(Duration::from_millis(2)))
            .unwrap();
        let now = Instant::now();
        for ev in self.events.iter() {
            self.ch.ready(ev, self.poll.registry(), now);
        }
        let mut opener = TestOpener(&mut self.service);
        self.ch.process(now, self.poll.registry(), &mut opener);
        if self.peer.is_none() {
            if let Ok((s, _)) = self.listener.accept() {
                s.set_nonblocking(true).unwrap();
                self.peer = Some(s);
                self.guest.link_up(now);
            }
        }
        self.pump_guest(now);
    }

    /// Moves bytes between the guest session and its end of the link.
    fn pump_guest(&mut self, now: Instant) {
        if self.guest.poll_timeout().is_some_and(|t| now >= t) {
            self.guest.handle_timeout(now);
        }
        let Some(peer) = self.peer.as_mut() else { return };
        loop {
            let space = self.guest.recv_space();
            if space.is_empty() {
                break;
            }
            match peer.read(space) {
                Ok(0) => break,
                Ok(n) => self.guest.recv_commit(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("guest read: {e}"),
            }
        }
        while let Some(ev) = self.guest.poll_event(now) {
            match ev {
                Event::Established(_) => self.seen.established += 1,
                Event::Data { stream, bytes } => {
                    let n = bytes.len();
                    self.seen.data.entry(stream).or_default().extend_from_slice(bytes);
                    self.guest.consumed(stream, n);
                }
                Event::Finished { stream } => self.seen.finished.push(stream),
                Event::Accepted { stream } => self.seen.accepted.push(stream),
                Event::Refused {
                    stream, code, text, ..
                } => self.seen.refused.push((stream, code, text)),
                Event::Reset {
                    stream, code, text, ..
                } => self.seen.reset.push((stream, code, text)),
                Event::Ended(r) => self.seen.ended.push(r),
                _ => {}
            }
        }
        loop {
            let out = self.guest.poll_transmit();
            if out.is_empty() {
                break;
            }
            match peer.write(out) {
                Ok(n) => self.guest.advance_transmit(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("guest write: {e}"),
            }
        }
    }

    /// Steps until `done` holds; panics after 5 s.
    fn until(&mut self, what: &str, done: impl Fn(&Rig) -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !done(self) {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}: {:?}",
                self.seen
            );
            self.step();
        }
    }

    fn established(&mut self) {
        self.until("the session", |r| r.seen.established > 0 && r.ch.is_established());
    }

    /// The guest opens a stream to `svc`, accepted by the host.
    fn open(&mut self) -> StreamId {
        let s = self.guest.open("svc").unwrap();
        self.until("the accept", |r| r.seen.accepted.contains(&s));
        s
    }

    fn service_end(&mut self, i: usize) -> &mut UnixStream {
        match &mut self.service {
            Service::Pairs(ends) => &mut ends[i],
            _ => panic!("not a socketpair service"),
        }
    }

    fn guest_send(&mut self, s: StreamId, mut data: &[u8]) {
        while !data.is_empty() {
            let n = self.guest.send(s, data);
            data = &data[n..];
            self.step();
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Reads what is there now from a non-blocking socket.
fn read_now(s: &mut impl Read, out: &mut Vec<u8>) -> Option<io::Error> {
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => return Some(e),
        }
    }
}

#[test]
fn data_and_half_closes_each_way() {
    let mut r = Rig::new("half", Service::Pairs(vec![]));
    r.established();
    let s = r.open();
    r.guest_send(s, b"hello");
    r.guest.finish(s);
    // Guest -> service: the bytes, then end-of-file (the guest's FIN).
    let mut got = Vec::new();
    r.service_end(0).set_nonblocking(false).unwrap();
    r.service_end(0)
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        r.step();
        let mut buf = [0u8; 64];
        match r.service_end(0).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        assert!(Instant::now() < end, "no end-of-file");
    }
    assert_eq!(got, b"hello");
    // The other direction still flows; then the service ends it too.
    r.service_end(0).write_all(b"world").unwrap();
    r.service_end(0).shutdown(std::net::Shutdown::Write).unwrap();
    r.until("the reply and FIN", |r| r.seen.finished.contains(&s));
    assert_eq!(r.seen.data[&s], b"world");
    r.until("the stream to close", |r| r.ch.stream_count() == 0);
    assert!(r.seen.reset.is_empty());
}

#[test]
fn a_slow_service_gets_partial_writes_and_credit_as_it_reads() {
    let mut r = Rig::new("slow", Service::Pairs(vec![]));
    r.established();
    let s = r.open();
    let far = r.service_end(0);
    socket2::SockRef::from(&*far).set_recv_buffer_size(4096).unwrap();
    far.set_nonblocking(true).unwrap();
    let data = pattern(1 << 20);
    let mut sent = 0;
    // The service reads nothing: the guest runs out of credit, and the host
    // holds no more than the window it granted.
    for _ in 0..200 {
        sent += r.guest.send(s, &data[sent..]);
        r.step();
    }
    assert!(sent < data.len(), "credit never ran out");
    assert!(r.ch.buffered() <= 64 << 10, "{} bytes held", r.ch.buffered());
    // The service reads; everything arrives, in order.
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while got.len() < data.len() {
        sent += r.guest.send(s, &data[sent..]);
        r.step();
        assert!(read_now(r.service_end(0), &mut got).is_none());
        assert!(Instant::now() < end, "{} of {} bytes", got.len(), data.len());
    }
    assert_eq!(got, data);
}

#[test]
fn a_service_that_resets_reaches_the_guest_as_a_reset() {
    let mut r = Rig::new("svcreset", Service::Pairs(vec![]));
    r.established();
    let s = r.open();
    r.guest_send(s, b"unread by the service");
    r.step();
    // Closing with unread bytes makes the host's side see ECONNRESET.
    let Service::Pairs(ends) = &mut r.service else {
        unreachable!()
    };
    drop(ends.remove(0));
    r.guest_send(s, b"more");
    r.until("the reset", |r| !r.seen.reset.is_empty());
    let (stream, code, _) = &r.seen.reset[0];
    assert_eq!((*stream, *code), (s, Code::Aborted));
    assert!(r.seen.finished.is_empty(), "an abort never becomes FIN");
}

#[test]
fn hup_with_data_pending_delivers_everything_then_fin() {
    let mut r = Rig::new("hup", Service::Pairs(vec![]));
    r.established();
    let s = r.open();
    let data = pattern(300_000);
    let mut far = r.service_end(0).try_clone().unwrap();
    let d = data.clone();
    let writer = std::thread::spawn(move || {
        far.set_nonblocking(false).unwrap();
        far.write_all(&d).unwrap();
        // Close with everything written: end-of-file queued behind the data.
    });
    let Service::Pairs(ends) = &mut r.service else {
        unreachable!()
    };
    drop(ends.remove(0));
    r.until("the FIN", |r| r.seen.finished.contains(&s));
    writer.join().unwrap();
    assert_eq!(r.seen.data[&s].len(), data.len());
    assert_eq!(r.seen.data[&s], data);
}

#[test]
fn a_reset_from_the_guest_aborts_the_service_connection() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut r = Rig::new("abort", Service::Tcp(l.try_clone().unwrap()));
    r.established();
    let s = r.open();
    let (mut svc, _) = l.accept().unwrap();
    r.guest_send(s, b"partial message");
    r.guest.reset(s, Code::Aborted, "client went away");
    r.until("the stream to go", |r| r.ch.stream_count() == 0);
    svc.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let end = loop {
        let mut buf = [0u8; 64];
        match svc.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    let e = end.expect_err("the service saw a clean end of a truncated stream");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
}

#[test]
fn a_link_lost_mid_frame_resets_every_stream_and_reconnects() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut r = Rig::new("lost", Service::Tcp(l.try_clone().unwrap()));
    r.established();
    let s = r.open();
    let (mut svc, _) = l.accept().unwrap();
    // Half a DATA frame, then the guest's end of the link goes away.
    let tag = r.guest.info().unwrap().tag;
    let frame = Frame::Data {
        stream: s,
        payload: &[1u8; 1000],
    };
    let mut bytes = vec![0; frame.encoded_len()];
    frame.encode(tag, &mut bytes);
    r.peer.as_mut().unwrap().write_all(&bytes[..500]).unwrap();
    r.step();
    r.peer = None;
    r.guest.link_down(Instant::now());
    r.until("the stream to go", |r| r.ch.stream_count() == 0);
    svc.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 2048];
    let e = svc
        .read(&mut buf)
        .expect_err("no byte of the cut frame, and no clean end");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    // The link comes back by itself; a new session starts.
    r.until("a new session", |r| {
        r.seen.established >= 2 && r.ch.is_established()
    });
}

#[test]
fn a_socket_that_cannot_abort_is_refused_before_any_byte() {
    let mut r = Rig::new("broken", Service::Broken);
    r.established();
    let s = r.guest.open("svc").unwrap();
    r.until("the refusal", |r| !r.seen.refused.is_empty());
    let (stream, code, text) = &r.seen.refused[0];
    assert_eq!((*stream, *code), (s, Code::ResourceLimit));
    assert!(text.as_str().contains("cannot use the socket"), "{text}");
    assert_eq!(r.ch.stream_count(), 0);
}

#[test]
fn unknown_services_are_refused_with_the_openers_code() {
    let mut r = Rig::new("unknown", Service::Pairs(vec![]));
    r.established();
    let s = r.guest.open("nope").unwrap();
    r.until("the refusal", |r| !r.seen.refused.is_empty());
    assert_eq!(r.seen.refused[0].1, Code::UnknownService);
    assert_eq!(r.ch.counters.refused.get(&Code::UnknownService), Some(&1));
    let _ = s;
}

#[test]
fn a_refused_connect_goes_to_the_next_address_with_the_preamble_first() {
    // The first address refuses (nothing listens there); the second takes it.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let live = TcpListener::bind("127.0.0.1:0").unwrap();
    let live_addr = live.local_addr().unwrap();
    let preamble = b"PREAMBLE\r\n".to_vec();
    let mut r = Rig::new(
        "failover",
        Service::Addrs(vec![dead_addr, live_addr], preamble.clone(), vec![]),
    );
    r.established();
    let s = r.guest.open("svc").unwrap();
    // DATA right after the OPEN, before any connect completed.
    r.guest.send(s, b"guest bytes");
    r.until("the accept", |r| r.seen.accepted.contains(&s));
    let (mut svc, _) = live.accept().unwrap();
    svc.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while got.len() < preamble.len() + 11 {
        r.step();
        let mut buf = [0u8; 64];
        if let Ok(n) = svc.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        assert!(Instant::now() < end, "got {got:?}");
    }
    assert_eq!(&got[..preamble.len()], &preamble[..], "the preamble comes first");
    assert_eq!(&got[preamble.len()..], b"guest bytes");
    let Service::Addrs(_, _, reports) = &r.service else {
        unreachable!()
    };
    assert_eq!(reports, &vec![(dead_addr, false), (live_addr, true)]);
    // Only the 11 data bytes count against the window (the preamble earns
    // no credit; counting it would trip the receive window's own check).
    let credit = r.guest.send_credit(s);
    assert_eq!(credit, (64 << 10) - 11, "credit {credit}");
}

#[test]
fn when_every_address_fails_the_stream_is_refused_as_unreachable() {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = dead.local_addr().unwrap();
    drop(dead);
    let mut r = Rig::new("allfail", Service::Addrs(vec![a], vec![], vec![]));
    r.established();
    let s = r.guest.open("svc").unwrap();
    r.until("the refusal", |r| !r.seen.refused.is_empty());
    let (stream, code, text) = &r.seen.refused[0];
    assert_eq!((*stream, *code), (s, Code::Unreachable));
    assert!(text.as_str().contains(&a.to_string()), "{text}");
}
