//! `vios-amqp-client`: a small AMQP 0-9-1 load/verification client meant to
//! run inside the guest VM (busybox initramfs, loopback only) and talk to
//! RabbitMQ through the bridge at 127.0.0.1:5672.
//!
//! It uses the published `amiquip` crate (synchronous, no async runtime, no
//! TLS) for the AMQP protocol. Each of `--connections` threads opens its own
//! connection, declares an exclusive auto-delete queue with a unique name,
//! publishes its share of `--messages` with publisher confirms and
//! `mandatory` set, and consumes them back on a second channel, checking
//! order and every body byte against a deterministic pseudo-random body
//! regenerated from (seed, connection, index).
//!
//! Exactly one JSON line goes to stdout:
//! `{"client":"vios-amqp-client","connections":C,"messages":M,"verified":K,
//!   "bytes":B,"seconds":T,"msgs_per_sec":R,"mb_per_sec":X,"errors":[...]}`
//!
//! Exit status: 0 all messages verified, 1 failure, 2 bad command line,
//! 3 `--timeout` watchdog fired.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::process;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amiquip::{
    AmqpProperties, Auth, Channel, Confirm, ConfirmSmoother, Connection, ConnectionOptions, ConnectionTuning,
    ConsumerMessage, ConsumerOptions, Publish, QueueDeclareOptions,
};
use clap::Parser;
use vios_tests::tool::json::Json;

const CLIENT: &str = "vios-amqp-client";
/// How often blocking waits wake up to notice that another thread failed.
const POLL: Duration = Duration::from_millis(200);
/// Consumer acknowledges with `multiple` every this many deliveries.
const ACK_EVERY: u64 = 64;
/// Errors reported per connection / in total (keeps the JSON line bounded).
const MAX_ERRORS_PER_CONN: usize = 5;
const MAX_ERRORS_TOTAL: usize = 64;

#[derive(Parser, Debug, Clone)]
#[command(
    name = CLIENT,
    about = "AMQP 0-9-1 test client: publish with confirms, consume back, verify every byte"
)]
struct Args {
    /// Broker address HOST:PORT (a numeric address needs no resolver).
    #[arg(long, default_value = "127.0.0.1:5672")]
    addr: String,
    /// AMQP user (SASL PLAIN).
    #[arg(long, default_value = "guest")]
    user: String,
    /// AMQP password.
    #[arg(long, default_value = "guest")]
    password: String,
    /// Concurrent connections (one thread each, plus a consumer thread).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    connections: u32,
    /// Total messages, split evenly over the connections.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Maximum body size in bytes; sizes vary from 0 to this.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(0..=(64 << 20)))]
    size: u64,
    /// Queue names are PREFIX-<pid>-<run>-<connection>.
    #[arg(long, default_value = "vios-vm")]
    queue_prefix: String,
    /// Overall time limit in seconds; when it passes, report and exit 3.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Seed for the message bodies (default: derived from time and pid).
    #[arg(long)]
    seed: Option<u64>,
    /// Maximum unconfirmed publishes per connection.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65535))]
    window: u64,
}

/// Progress and errors shared by all threads, the watchdog and the final report.
struct Shared {
    start: Instant,
    connections: u32,
    messages: u64,
    verified: AtomicU64,
    bytes: AtomicU64,
    /// AMQP connections whose handshake completed.
    opened: AtomicU64,
    published: AtomicU64,
    confirmed: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// Held (forever) by whoever prints the one JSON line and exits.
    report: Mutex<()>,
}

impl Shared {
    fn error(&self, msg: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < MAX_ERRORS_TOTAL {
            errors.push(msg);
        } else if errors.len() == MAX_ERRORS_TOTAL {
            errors.push("(further errors suppressed)".to_string());
        }
    }

    /// Print the JSON report (once per process) and exit with `code`.
    fn finish(&self, code: i32, extra: Option<String>) -> ! {
        let _guard = self.report.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = extra {
            self.error(e);
        }
        let secs = self.start.elapsed().as_secs_f64();
        let verified = self.verified.load(Ordering::SeqCst);
        let bytes = self.bytes.load(Ordering::SeqCst);
        let (rate, mbps) = if secs > 0.0 {
            (verified as f64 / secs, bytes as f64 / secs / 1e6)
        } else {
            (0.0, 0.0)
        };
        let errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let mut json = Json::new();
        json.str("client", CLIENT)
            .u64("connections", u64::from(self.connections))
            .u64("messages", self.messages)
            .u64("verified", verified)
            .u64("bytes", bytes)
            .f64("seconds", secs, 3)
            .f64("msgs_per_sec", rate, 1)
            .f64("mb_per_sec", mbps, 3)
            .strs("errors", &errors);
        let line = json.finish();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        process::exit(code);
    }
}

// ---------------------------------------------------------------------------
// Deterministic message bodies.

fn mix64(mut z: u64) -> u64 {
    // splitmix64 finaliser
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn msg_key(seed: u64, conn: u32, index: u64) -> u64 {
    mix64(seed ^ mix64((u64::from(conn) << 40) ^ index ^ 0x5eed_0fb0_d1e5))
}

/// Body length for message `index`: 0 for the first, `max` for the second,
/// pseudo-random in `0..=max` after that.
fn body_len(seed: u64, conn: u32, index: u64, max: u64) -> usize {
    let len = match index {
        0 => 0,
        1 => max,
        _ => mix64(msg_key(seed, conn, index) ^ 0x1e4) % (max + 1),
    };
    len as usize
}

/// Fill `buf` with the body of message `index` of connection `conn`.
fn fill_body(buf: &mut Vec<u8>, seed: u64, conn: u32, index: u64, max: u64) {
    let len = body_len(seed, conn, index, max);
    buf.clear();
    buf.reserve(len);
    let mut state = msg_key(seed, conn, index);
    while buf.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let word = mix64(state).to_le_bytes();
        let take = (len - buf.len()).min(8);
        buf.extend_from_slice(&word[..take]);
    }
}

fn message_id(conn: u32, index: u64) -> String {
    format!("{conn}:{index}")
}

// ---------------------------------------------------------------------------
// Address handling: a numeric address (the normal case in the guest) is
// parsed directly and never touches the resolver.

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("bad --addr {addr:?}: expected HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("bad --addr {addr:?}: bad port {port:?}"))?;
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host:?} resolved to no address"))
}

// ---------------------------------------------------------------------------
// One connection.

struct ConnCtx<'a> {
    args: &'a Args,
    shared: &'a Shared,
    addr: SocketAddr,
    conn: u32,
    count: u64,
    seed: u64,
    queue: String,
    /// Set when this connection has failed; the other thread stops waiting.
    abort: AtomicBool,
    nerrors: Mutex<usize>,
}

impl ConnCtx<'_> {
    fn error(&self, msg: impl AsRef<str>) {
        self.abort.store(true, Ordering::SeqCst);
        let mut n = self.nerrors.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        if *n <= MAX_ERRORS_PER_CONN {
            self.shared
                .error(format!("connection {}: {}", self.conn, msg.as_ref()));
        } else if *n == MAX_ERRORS_PER_CONN + 1 {
            self.shared
                .error(format!("connection {}: (further errors suppressed)", self.conn));
        }
    }

    fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }
}

fn run_connection(ctx: &ConnCtx<'_>) {
    let args = ctx.args;
    let connect_timeout = Duration::from_secs(args.timeout);
    let stream = match TcpStream::connect_timeout(&ctx.addr, connect_timeout) {
        Ok(s) => s,
        Err(e) => {
            ctx.error(format!("connect to {} failed: {e}", ctx.addr));
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let stream = match mio06::net::TcpStream::from_stream(stream) {
        Ok(s) => s,
        Err(e) => {
            ctx.error(format!("socket setup failed: {e}"));
            return;
        }
    };
    let options = ConnectionOptions::default()
        .auth(Auth::Plain {
            username: args.user.clone(),
            password: args.password.clone(),
        })
        .information(Some(format!("{CLIENT} connection {}", ctx.conn)));
    let mut connection = match Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
    {
        Ok(c) => c,
        Err(e) => {
            ctx.error(format!("AMQP handshake with {} failed: {e}", ctx.addr));
            return;
        }
    };

    ctx.shared.opened.fetch_add(1, Ordering::SeqCst);
    let result = run_channels(ctx, &mut connection);
    if let Err(e) = result {
        ctx.error(e);
    }
    if let Err(e) = connection.close() {
        // After a failure the close error is mostly noise; report it only
        // when everything else went well.
        if !ctx.aborted() {
            ctx.error(format!("closing connection: {e}"));
        }
    }
}

fn run_channels(ctx: &ConnCtx<'_>, connection: &mut Connection) -> Result<(), String> {
    let pub_ch = connection
        .open_channel(None)
        .map_err(|e| format!("open publish channel: {e}"))?;
    let cons_ch = connection
        .open_channel(None)
        .map_err(|e| format!("open consume channel: {e}"))?;

    // Exclusive (only this connection may use it, deleted when it closes)
    // and auto-delete (deleted when the consumer goes away).
    pub_ch
        .queue_declare(
            ctx.queue.clone(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
        )
        .map_err(|e| format!("declare queue {}: {e}", ctx.queue))?;

    thread::scope(|s| {
        let consumer = thread::Builder::new()
            .name(format!("consume-{}", ctx.conn))
            .spawn_scoped(s, move || consume(ctx, cons_ch))
            .map_err(|e| format!("spawn consumer thread: {e}"));
        if let Err(e) = consumer {
            ctx.error(e);
            return;
        }
        if let Err(e) = publish(ctx, &pub_ch) {
            ctx.error(e);
        }
    });
    pub_ch
        .close()
        .map_err(|e| format!("closing publish channel: {e}"))?;
    Ok(())
}

fn publish(ctx: &ConnCtx<'_>, ch: &Channel) -> Result<(), String> {
    let returns = ch
        .listen_for_returns()
        .map_err(|e| format!("listen for returns: {e}"))?;
    let confirms = ch
        .listen_for_publisher_confirms()
        .map_err(|e| format!("listen for confirms: {e}"))?;
    ch.enable_publisher_confirms()
        .map_err(|e| format!("enable publisher confirms: {e}"))?;

    let mut smoother = ConfirmSmoother::new();
    let mut settled = 0u64;
    let mut nacked = 0u64;
    let mut body = Vec::new();

    // Wait until at most `max_outstanding` publishes are unconfirmed.
    let mut wait_confirms = |published: u64, max_outstanding: u64| -> Result<(), String> {
        while published - settled > max_outstanding {
            if ctx.aborted() {
                return Err("publisher stopped after an earlier error".to_string());
            }
            let raw = match confirms.recv_timeout(POLL) {
                Ok(c) => c,
                Err(e) if e.is_timeout() => continue,
                Err(_) => {
                    return Err(format!(
                        "connection lost while waiting for publisher confirms \
                         ({settled}/{published} confirmed)"
                    ))
                }
            };
            for c in smoother.process(raw) {
                settled += 1;
                ctx.shared.confirmed.fetch_add(1, Ordering::Relaxed);
                if let Confirm::Nack(p) = c {
                    nacked += 1;
                    if nacked <= MAX_ERRORS_PER_CONN as u64 {
                        ctx.error(format!(
                            "broker nacked publish with delivery tag {}",
                            p.delivery_tag
                        ));
                    }
                }
            }
        }
        Ok(())
    };

    for index in 0..ctx.count {
        if ctx.aborted() {
            return Err("publisher stopped after an earlier error".to_string());
        }
        fill_body(&mut body, ctx.seed, ctx.conn, index, ctx.args.size);
        let properties = AmqpProperties::default().with_message_id(message_id(ctx.conn, index));
        ch.basic_publish(
            "",
            Publish {
                body: &body,
                routing_key: ctx.queue.clone(),
                mandatory: true,
                immediate: false,
                properties,
            },
        )
        .map_err(|e| format!("publish message {index}: {e}"))?;
        ctx.shared.published.fetch_add(1, Ordering::Relaxed);
        wait_confirms(index + 1, ctx.args.window)?;
    }
    wait_confirms(ctx.count, 0)?;

    // A mandatory message that could not be routed comes back as
    // basic.return before its (positive) confirm, so all returns are here.
    let mut returned = 0usize;
    while let Ok(r) = returns.try_recv() {
        returned += 1;
        if returned <= MAX_ERRORS_PER_CONN {
            ctx.error(format!(
                "message {:?} returned by broker: {} {}",
                r.properties.message_id().clone().unwrap_or_default(),
                r.reply_code,
                r.reply_text
            ));
        }
    }
    if nacked > 0 || returned > 0 {
        return Err(format!(
            "{nacked} publishes nacked, {returned} returned out of {}",
            ctx.count
        ));
    }
    Ok(())
}

fn consume(ctx: &ConnCtx<'_>, ch: Channel) {
    if let Err(e) = consume_inner(ctx, &ch) {
        ctx.error(e);
    }
    if let Err(e) = ch.close() {
        if !ctx.aborted() {
            ctx.error(format!("closing consume channel: {e}"));
        }
    }
}

fn consume_inner(ctx: &ConnCtx<'_>, ch: &Channel) -> Result<(), String> {
    if ctx.count == 0 {
        return Ok(());
    }
    let prefetch = (ctx.args.window.max(4 * ACK_EVERY)).min(u64::from(u16::MAX)) as u16;
    ch.qos(0, prefetch, false)
        .map_err(|e| format!("basic.qos: {e}"))?;
    let consumer = ch
        .basic_consume(
            ctx.queue.clone(),
            ConsumerOptions {
                no_ack: false,
                exclusive: true,
                ..ConsumerOptions::default()
            },
        )
        .map_err(|e| format!("basic.consume on {}: {e}", ctx.queue))?;

    let mut expected = Vec::new();
    let mut index = 0u64;
    while index < ctx.count {
        if ctx.aborted() {
            return Err(format!(
                "consumer stopped after {index}/{} messages: earlier error",
                ctx.count
            ));
        }
        let msg = match consumer.receiver().recv_timeout(POLL) {
            Ok(m) => m,
            Err(e) if e.is_timeout() => continue,
            Err(_) => {
                return Err(format!(
                    "connection lost after {index}/{} messages consumed",
                    ctx.count
                ))
            }
        };
        let delivery = match msg {
            ConsumerMessage::Delivery(d) => d,
            other => {
                return Err(format!(
                    "consumer ended after {index}/{} messages: {other:?}",
                    ctx.count
                ))
            }
        };
        let want_id = message_id(ctx.conn, index);
        let got_id = delivery.properties.message_id().clone().unwrap_or_default();
        fill_body(&mut expected, ctx.seed, ctx.conn, index, ctx.args.size);
        if got_id != want_id {
            ctx.error(format!(
                "out of order: expected message {want_id}, got {got_id:?} ({} bytes)",
                delivery.body.len()
            ));
        } else if delivery.body != expected {
            let at = delivery
                .body
                .iter()
                .zip(expected.iter())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| delivery.body.len().min(expected.len()));
            ctx.error(format!(
                "message {want_id}: body mismatch: {} bytes, expected {}, first difference at byte {at}",
                delivery.body.len(),
                expected.len()
            ));
        } else if delivery.redelivered {
            ctx.error(format!("message {want_id}: unexpectedly redelivered"));
        } else {
            ctx.shared.verified.fetch_add(1, Ordering::Relaxed);
            ctx.shared
                .bytes
                .fetch_add(delivery.body.len() as u64, Ordering::Relaxed);
        }
        index += 1;
        if index % ACK_EVERY == 0 || index == ctx.count {
            consumer
                .ack_multiple(delivery)
                .map_err(|e| format!("basic.ack after message {want_id}: {e}"))?;
        }
    }
    consumer.cancel().map_err(|e| format!("basic.cancel: {e}"))?;
    // amiquip 0.4.2 race: its I/O thread hands basic.cancel-ok to `cancel()`
    // and only then sends `ClientCancelled` to the consumer's receiver. If
    // the Consumer (and so the receiver) is dropped in between, the I/O
    // thread treats the failed send as fatal and tears the whole connection
    // down. So keep the receiver alive until that last message has arrived.
    loop {
        match consumer.receiver().recv_timeout(POLL) {
            Ok(ConsumerMessage::ClientCancelled) => break,
            Ok(ConsumerMessage::Delivery(d)) => {
                return Err(format!(
                    "unexpected extra message {:?} after all {} were consumed",
                    d.properties.message_id().clone().unwrap_or_default(),
                    ctx.count
                ))
            }
            Ok(other) => return Err(format!("consumer ended during cancel: {other:?}")),
            Err(e) if e.is_timeout() => {
                if ctx.aborted() {
                    return Err("consumer stopped during cancel: earlier error".into());
                }
            }
            Err(_) => return Err("connection lost during basic.cancel".to_string()),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------

fn main() {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off"))
        .target(env_logger::Target::Stderr)
        .init();

    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            let _ = e.print();
            let shared = Shared {
                start,
                connections: 0,
                messages: 0,
                verified: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                opened: AtomicU64::new(0),
                published: AtomicU64::new(0),
                confirmed: AtomicU64::new(0),
                errors: Mutex::new(Vec::new()),
                report: Mutex::new(()),
            };
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("bad command line").to_string();
            shared.finish(2, Some(format!("usage: {first}")));
        }
    };

    let shared = Arc::new(Shared {
        start,
        connections: args.connections,
        messages: args.messages,
        verified: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        opened: AtomicU64::new(0),
        published: AtomicU64::new(0),
        confirmed: AtomicU64::new(0),
        errors: Mutex::new(Vec::new()),
        report: Mutex::new(()),
    });

    // Watchdog: the only place a run times out.
    {
        let shared = Arc::clone(&shared);
        let timeout = Duration::from_secs(args.timeout);
        thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                thread::sleep(timeout);
                let msg = format!(
                    "timeout after {}s: {} of {} AMQP connections opened, \
                     published {}, confirmed {}, verified {} of {}",
                    timeout.as_secs(),
                    shared.opened.load(Ordering::SeqCst),
                    shared.connections,
                    shared.published.load(Ordering::SeqCst),
                    shared.confirmed.load(Ordering::SeqCst),
                    shared.verified.load(Ordering::SeqCst),
                    shared.messages
                );
                shared.finish(3, Some(msg));
            })
            .expect("spawn watchdog thread");
    }

    let addr = match resolve(&args.addr) {
        Ok(a) => a,
        Err(e) => shared.finish(1, Some(e)),
    };

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let pid = process::id();
    let seed = args.seed.unwrap_or_else(|| mix64(nanos ^ (u64::from(pid) << 32)));
    let run = format!("{:08x}", mix64(seed ^ nanos) as u32);

    let conns = u64::from(args.connections);
    let base = args.messages / conns;
    let extra = args.messages % conns;

    thread::scope(|s| {
        for conn in 0..args.connections {
            let count = base + u64::from(u64::from(conn) < extra);
            let ctx = ConnCtx {
                args: &args,
                shared: &shared,
                addr,
                conn,
                count,
                seed,
                queue: format!("{}-{pid}-{run}-{conn}", args.queue_prefix),
                abort: AtomicBool::new(false),
                nerrors: Mutex::new(0),
            };
            let spawned = thread::Builder::new()
                .name(format!("conn-{conn}"))
                .spawn_scoped(s, move || run_connection(&ctx));
            if let Err(e) = spawned {
                shared.error(format!("connection {conn}: spawn thread: {e}"));
            }
        }
    });

    let errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner()).len();
    let verified = shared.verified.load(Ordering::SeqCst);
    if errors == 0 && verified == args.messages {
        shared.finish(0, None);
    }
    let extra = (errors == 0).then(|| format!("only {verified} of {} messages verified", args.messages));
    shared.finish(1, extra);
}
