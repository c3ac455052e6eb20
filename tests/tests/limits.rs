//! What the host holds for a stream whose service is slow or stops reading
//! (issue 8): bytes already written onward are freed as they go, and the
//! kernel buffers of service sockets are capped.

use std::io::{Read, Write};

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vios_tests::{Rig, RigSpec};

/// A service that reads at most `rate` bytes a second on every connection.
fn slow_service(rate: u64, stop: Arc<AtomicBool>, read: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let (stop, read) = (stop.clone(), read.clone());
            std::thread::spawn(move || {
                let chunk = (rate / 500) as usize;
                let mut buf = vec![0u8; chunk];
                let start = Instant::now();
                let mut got = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            got += n as u64;
                            read.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    let due = Duration::from_secs_f64(got as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            });
        }
    });
    addr
}

/// A client writing as fast as the bridge lets it, until told to stop.
fn flood(rig: &Rig, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let mut c = rig.connect();
    std::thread::spawn(move || {
        let block = vec![0x5au8; 64 * 1024];
        let mut sent = 0u64;
        c.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match c.write(&block) {
                Ok(n) => sent += n as u64,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("the stream failed: {e}"),
            }
        }
        sent
    })
}

#[test]
fn written_out_bytes_are_freed_under_a_slow_consumer() {
    let stop = Arc::new(AtomicBool::new(false));
    let read = Arc::new(AtomicU64::new(0));
    // 20 MB/s: slower than the bridge, so bytes wait in the host all along.
    let addr = slow_service(20_000_000, stop.clone(), read.clone());
    let rig = Rig::start(RigSpec::new("slow", addr));
    let writer = flood(&rig, stop.clone());
    let host = rig.host().pid();
    let rss = || vios_tests::proc_status_kib(host, "VmRSS:");
    std::thread::sleep(Duration::from_secs(10));
    let early = rss();
    let mut samples = vec![];
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(5));
        samples.push(rss());
    }
    stop.store(true, Ordering::Relaxed);
    let sent = writer.join().unwrap();
    let late = *samples.last().unwrap();
    let peak = *samples.iter().max().unwrap();
    let moved = read.load(Ordering::Relaxed);
    vios_tests::record_figure(&format!(
        "slow consumer, 60 s: {} MB written onward at {:.1} MB/s; host RSS {early} KiB after 10 s, \
         {late} KiB after 60 s, peak {peak} KiB",
        moved / 1_000_000,
        moved as f64 / 60e6
    ));
    // The premise: bytes flowed the whole time, and the consumer lagged.
    assert!(moved > 500_000_000, "only {moved} bytes reached the service");
    assert!(sent > moved, "the client was never ahead of the consumer");
    // Flat: what passed is not kept (60 s at 20 MB/s would be 1.2 GB).
    assert!(
        peak <= early + 2048,
        "host RSS grew from {early} to {peak} KiB: {samples:?}"
    );
}

/// Bytes in the send queue of the local TCP socket `local` -> `remote`
/// (from /proc/net/tcp).
fn send_queue(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!("{:08X}:{:04X}", u32::from_ne_bytes(v4.ip().octets()), v4.port()),
        SocketAddr::V6(_) => unreachable!(),
    };
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f[1] == hex(local) && f[2] == hex(remote))
            .then(|| u64::from_str_radix(f[4].split(':').next()?, 16).ok())?
    })
}

#[test]
fn a_service_that_never_reads_parks_only_bounded_kernel_buffers() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let rig = Rig::start(RigSpec::new("stuck", addr));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = flood(&rig, stop.clone());
    // The service accepts, and never reads.
    let (svc, host_side) = l.accept().unwrap();
    let mut last = (0, 0);
    // Wait until the pipeline is full: the host's send queue stops growing.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let q = send_queue(host_side, addr).expect("the host's socket to the service");
        let rss = vios_tests::proc_status_kib(rig.host().pid(), "VmRSS:");
        if q == last.0 && q > 0 {
            last = (q, rss);
            break;
        }
        last = (q, rss);
        assert!(Instant::now() < end, "the send queue never settled");
    }
    stop.store(true, Ordering::Relaxed);
    let sent = writer.join().unwrap();
    let (queued, rss) = last;
    vios_tests::record_figure(&format!(
        "service that never reads: client wrote {} KiB before it was held back; \
         host's kernel send queue {} KiB (SO_SNDBUF 256 KiB); host RSS {rss} KiB",
        sent / 1024,
        queued / 1024
    ));
    // The premise: the client tried to send far more than is held.
    assert!(sent > 1 << 20, "the client sent only {sent} bytes");
    // Linux reserves twice SO_SNDBUF and counts headers in it: the payload
    // queued stays under 2 x 256 KiB.
    assert!(queued <= 512 * 1024, "{queued} bytes parked in the host's kernel");
    drop(svc);
}
