//! A stand-in for QEMU's virtio-serial chardev, for tests without a VM.
//!
//! It listens on two unix sockets: the **host** socket, which the host bridge
//! connects to as it would to QEMU's `chardev socket,server=on`, and the
//! **guest** socket, which stands for the guest's `/dev/vportNpM` (the guest
//! bridge runs with `--channel unix:PATH`). It relays bytes the way QEMU does:
//!
//! - one served client per side; a second connect succeeds but waits, unread,
//!   until the first goes (the kernel backlog does this for us);
//! - bytes only, no message boundaries;
//! - the host never sees the guest go: host→guest bytes written while no guest
//!   is connected are kept (up to ~230 KB) and delivered to the *next* guest;
//! - when the host goes, bytes in flight both ways are dropped and the guest
//!   sees "no host" (here: its connection is closed and it reconnects).
//!
//! Commands on standard input, one per line, for tests to inject faults:
//! `cut` (drop both sides and everything in flight), `cut-guest`, `cut-host`,
//! `split N` (write at most N bytes per write), `delay MS` (pause MS between
//! writes), `pause` / `resume` (stop relaying, as a frozen guest), `stats`.

use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};

/// Bytes kept for an absent guest, like QEMU's buffering (about 230 KB).
const ABSENT_GUEST_BUFFER: usize = 230 * 1024;
/// Bytes relayed host -> guest before the host side is no longer read. With
/// the two unix sockets' own buffers, a host writer gets as far ahead of a
/// guest that stopped reading as with QEMU: 728,448 bytes measured on the
/// test VM (docs/BENCH.md), 699,456 with 256 KiB here.
const H2G_BUFFER: usize = 285 * 1024;
/// Bytes relayed guest -> host before the guest side is no longer read: QEMU
/// and the guest's port queue take 4,423,680 bytes of a guest writer whose
/// host stopped reading (128 entries of 32 KiB, plus the socket); so much
/// waits here too, so that the bench cannot flatter the bridge.
const G2H_BUFFER: usize = 3893 * 1024;

#[derive(Parser, Debug)]
#[command(
    about = "Relay bytes between a host-side and a guest-side unix socket the way QEMU's virtio-serial does"
)]
struct Args {
    /// Socket the host bridge connects to.
    #[arg(long)]
    host: PathBuf,
    /// Socket the guest bridge connects to (--channel unix:PATH).
    #[arg(long)]
    guest: PathBuf,
}

const HOST_L: Token = Token(0);
const GUEST_L: Token = Token(1);
const HOST_C: Token = Token(2);
const GUEST_C: Token = Token(3);
const CMD: Token = Token(4);

#[derive(Default)]
struct Side {
    conn: Option<UnixStream>,
    readable: bool,
    writable: bool,
}

struct Relay {
    poll: Poll,
    host_l: UnixListener,
    guest_l: UnixListener,
    host: Side,
    guest: Side,
    h2g: Pipe,
    g2h: Pipe,
    split: usize,
    delay: Duration,
    next_write: Instant,
    paused: bool,
    moved_h2g: u64,
    moved_g2h: u64,
}

fn bind(path: &PathBuf) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let poll = Poll::new()?;
    let mut host_l = bind(&args.host)?;
    let mut guest_l = bind(&args.guest)?;
    poll.registry()
        .register(&mut host_l, HOST_L, Interest::READABLE)?;
    poll.registry()
        .register(&mut guest_l, GUEST_L, Interest::READABLE)?;
    let waker = Waker::new(poll.registry(), CMD)?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
            let _ = waker.wake();
        }
    });
    let mut r = Relay {
        poll,
        host_l,
        guest_l,
        host: Side::default(),
        guest: Side::default(),
        h2g: Pipe::default(),
        g2h: Pipe::default(),
        split: usize::MAX,
        delay: Duration::ZERO,
        next_write: Instant::now(),
        paused: false,
        moved_h2g: 0,
        moved_g2h: 0,
    };
    eprintln!(
        "standin: host {} guest {}",
        args.host.display(),
        args.guest.display()
    );
    let mut events = Events::with_capacity(64);
    loop {
        let timeout =
            (r.delay > Duration::ZERO).then(|| r.next_write.saturating_duration_since(Instant::now()));
        r.poll
            .poll(&mut events, timeout.or(Some(Duration::from_millis(200))))?;
        for ev in events.iter() {
            match ev.token() {
                HOST_C => {
                    r.host.readable |= ev.is_readable() || ev.is_read_closed();
                    r.host.writable |= ev.is_writable();
                }
                GUEST_C => {
                    r.guest.readable |= ev.is_readable() || ev.is_read_closed();
                    r.guest.writable |= ev.is_writable();
                }
                _ => {}
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            r.command(cmd.trim());
        }
        r.accept()?;
        r.pump();
    }
}

impl Relay {
    fn command(&mut self, cmd: &str) {
        let mut words = cmd.split_whitespace();
        match (words.next(), words.next().and_then(|w| w.parse::<u64>().ok())) {
            (Some("cut"), _) => {
                self.drop_host();
                self.drop_guest();
                self.h2g.clear();
            }
            (Some("cut-host"), _) => self.drop_host(),
            (Some("cut-guest"), _) => self.drop_guest(),
            (Some("split"), Some(n)) => self.split = (n as usize).max(1),
            (Some("delay"), Some(ms)) => self.delay = Duration::from_millis(ms),
            (Some("pause"), _) => self.paused = true,
            (Some("resume"), _) => self.paused = false,
            (Some("stats"), _) => {}
            _ => eprintln!("standin: unknown command {cmd:?}"),
        }
        eprintln!(
            "standin: {cmd}: host {} guest {} moved h2g {} g2h {}",
            self.host.conn.is_some(),
            self.guest.conn.is_some(),
            self.moved_h2g,
            self.moved_g2h
        );
    }

    /// The host went: QEMU drops what it holds both ways; the guest sees no host.
    fn drop_host(&mut self) {
        if let Some(mut c) = self.host.conn.take() {
            let _ = self.poll.registry().deregister(&mut c);
        }
        self.host = Side::default();
        self.g2h.clear();
        self.h2g.clear();
        self.drop_guest();
    }

    /// The guest closed the port: bytes already moved to it are lost; the host
    /// is not told.
    fn drop_guest(&mut self) {
        if let Some(mut c) = self.guest.conn.take() {
            let _ = self.poll.registry().deregister(&mut c);
        }
        self.guest = Side::default();
    }

    fn accept(&mut self) -> io::Result<()> {
        if self.host.conn.is_none() {
            if let Ok((mut c, _)) = self.host_l.accept() {
                self.poll
                    .registry()
                    .register(&mut c, HOST_C, Interest::READABLE | Interest::WRITABLE)?;
                self.host = Side {
                    conn: Some(c),
                    readable: true,
                    writable: true,
                };
            }
        }
        // Without a host, a guest sees "no host": it is not served.
        if self.guest.conn.is_none() && self.host.conn.is_some() {
            if let Ok((mut c, _)) = self.guest_l.accept() {
                self.poll
                    .registry()
                    .register(&mut c, GUEST_C, Interest::READABLE | Interest::WRITABLE)?;
                self.guest = Side {
                    conn: Some(c),
                    readable: true,
                    writable: true,
                };
            }
        }
        Ok(())
    }

    fn pump(&mut self) {
        for _ in 0..64 {
            let mut progress = false;
            let h2g_cap = if self.guest.conn.is_some() {
                H2G_BUFFER
            } else {
                ABSENT_GUEST_BUFFER
            };
            if !self.paused {
                match read_into(&mut self.host, &mut self.h2g, h2g_cap) {
                    Ok(n) => progress |= n > 0,
                    Err(()) => {
                        self.drop_host();
                        return;
                    }
                }
                match read_into(&mut self.guest, &mut self.g2h, G2H_BUFFER) {
                    Ok(n) => progress |= n > 0,
                    Err(()) => self.drop_guest(),
                }
            }
            if !self.paused && Instant::now() >= self.next_write {
                let limit = self.split;
                match write_from(&mut self.guest, &mut self.h2g, limit) {
                    Ok(n) => {
                        self.moved_h2g += n as u64;
                        progress |= n > 0;
                    }
                    Err(()) => self.drop_guest(),
                }
                match write_from(&mut self.host, &mut self.g2h, limit) {
                    Ok(n) => {
                        self.moved_g2h += n as u64;
                        progress |= n > 0;
                    }
                    Err(()) => {
                        self.drop_host();
                        return;
                    }
                }
                if progress && self.delay > Duration::ZERO {
                    self.next_write = Instant::now() + self.delay;
                }
            }
            if !progress {
                return;
            }
        }
    }
}

/// A flat byte buffer with a moving start: reads land straight in it and
/// writes go straight out of it (no copy in between, unlike a VecDeque).
#[derive(Default)]
struct Pipe {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Pipe {
    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Room for up to `want` more bytes.
    fn space(&mut self, want: usize) -> &mut [u8] {
        if self.start == self.end {
            self.clear();
        } else if self.buf.len() - self.end < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < self.end + want {
            self.buf.resize(self.end + want, 0);
        }
        &mut self.buf[self.end..self.end + want]
    }
}

/// Reads what fits; `Err` on end of file or error.
fn read_into(side: &mut Side, buf: &mut Pipe, cap: usize) -> Result<usize, ()> {
    let Some(c) = side.conn.as_mut() else { return Ok(0) };
    let mut total = 0;
    while side.readable && buf.len() < cap {
        let want = cap - buf.len();
        match c.read(buf.space(want)) {
            Ok(0) => return Err(()),
            Ok(n) => {
                buf.end += n;
                total += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => side.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    Ok(total)
}

/// Writes one piece of at most `limit` bytes.
fn write_from(side: &mut Side, buf: &mut Pipe, limit: usize) -> Result<usize, ()> {
    let Some(c) = side.conn.as_mut() else { return Ok(0) };
    if !side.writable || buf.is_empty() {
        return Ok(0);
    }
    let n = buf.len().min(limit);
    match c.write(&buf.buf[buf.start..buf.start + n]) {
        Ok(k) => {
            buf.start += k;
            Ok(k)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            side.writable = false;
            Ok(0)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(_) => Err(()),
    }
}
