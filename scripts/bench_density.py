"""Density benchmark (scripts/bench --density N[,N...]; see docs/BENCH.md).

N guests against one host bridge: the guests are vios-guests processes (the
guest side of vios-common's own Session, in-process streams, 3,400 guests per
process so that each stays within the open-files limit), their channel
sockets in libvirt's layout under one --guest-dir. For each N it measures:

- time from the host bridge's start to every session established;
- echo wall time: every guest opens one stream, echoes 64 bytes (checked)
  and closes it, at most 300 per process at once;
- after 5 s of quiet: host RSS, RSS per guest, threads, descriptors;
- host CPU while everything idles for 30 s (default keepalives);
- a 64-byte echo p50/p99 on one guest (1000 round trips) while the rest idle.

Standard library only. Imported by bench.py.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time

PER_PROCESS = 3400


def _status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


class Peers:
    """One vios-guests process, driven by commands on stdin."""

    def __init__(self, bindir, gdir, first, n, log):
        self.p = subprocess.Popen(
            [os.path.join(bindir, "vios-guests"), "--dir", gdir, "--first", str(first), "--guests", str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, bufsize=1)

    def send(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()

    def answer(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("vios-guests exited")
        return json.loads(line)

    def stop(self):
        try:
            self.send("quit")
            self.p.wait(timeout=5)
        except Exception:
            self.p.kill()
            self.p.wait()


def run_one(bindir, work, n, log):
    d = tempfile.mkdtemp(prefix=f"density-{n}-", dir=work)
    gdir = os.path.join(d, "guests")
    os.makedirs(gdir)
    procs = []
    echo = subprocess.Popen(
        [os.path.join(bindir, "vios-load"), "serve", "--listen", "127.0.0.1:0", "--mode", "echo",
         "--timeout", "0", "--ready-file", os.path.join(d, "echo.addr")],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "echo.log"), "w"))
    host = None
    try:
        addr_file = os.path.join(d, "echo.addr")
        for _ in range(100):
            if os.path.exists(addr_file) and open(addr_file).read().endswith("\n"):
                break
            time.sleep(0.05)
        echo_addr = open(addr_file).read().strip()
        first = 1
        while first <= n:
            k = min(PER_PROCESS, n - first + 1)
            procs.append(Peers(bindir, gdir, first, k, os.path.join(d, f"guests-{first}.log")))
            first += k
        # Every peer listens before the host bridge looks.
        for p in procs:
            p.send("report")
            p.answer()
        t0_unix = time.time() * 1000
        host = subprocess.Popen(
            [os.path.join(bindir, "vios-host-bridge"), "--guest-dir", gdir, "--rescan", "60s",
             "--service", f"echo={echo_addr},loopback=ok", "--control", "none"],
            stderr=open(os.path.join(d, "host.log"), "w"))
        for p in procs:
            p.send("wait-established 120")
        answers = [p.answer() for p in procs]
        established = sum(a["established_now"] for a in answers)
        t_all = max(a["all_established_unix_ms"] or 0 for a in answers) - t0_unix
        t = time.monotonic()
        for p in procs:
            p.send("echo echo 300")
        answers = [p.answer() for p in procs]
        echo_s = time.monotonic() - t
        echoed = sum(a["echoed"] for a in answers)
        refused = sum(a["refused"] for a in answers) + sum(a["reset"] for a in answers)
        time.sleep(5)
        rss = _status(host.pid, "VmRSS:")
        threads = _status(host.pid, "Threads:")
        fds = len(os.listdir(f"/proc/{host.pid}/fd"))
        c0 = _cpu_ticks(host.pid)
        time.sleep(30)
        idle_cpu = (_cpu_ticks(host.pid) - c0) / os.sysconf("SC_CLK_TCK") / 30
        rss_idle = _status(host.pid, "VmRSS:")
        procs[0].send("rtt 0 1000")
        r = procs[0].answer()
        ended = sum(a["sessions_ended"] for a in answers)
        return {
            "guests": n, "established": established, "all_sessions_s": t_all / 1000,
            "echo_s": echo_s, "echoed": echoed, "refused": refused, "sessions_ended": ended,
            "rss_kib": rss, "rss_idle_kib": rss_idle, "rss_per_guest_kib": rss_idle / n,
            "threads": threads, "fds": fds, "idle_cpu_core": idle_cpu,
            "rtt_p50_us": r["rtt_p50_us"], "rtt_p99_us": r["rtt_p99_us"],
        }
    finally:
        if host is not None:
            host.terminate()
            try:
                host.wait(timeout=30)
            except subprocess.TimeoutExpired:
                host.kill()
                host.wait()
        for p in procs:
            p.stop()
        echo.terminate()
        echo.wait()
        shutil.rmtree(d, ignore_errors=True)


def table(results, cores):
    out = ["| guests | all sessions up | echo on every guest | host RSS (idle) | per guest | threads | "
           "descriptors | idle CPU (30 s) | 64 B echo p50 / p99, one guest |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        out.append(
            f"| {r['guests']:,} | {r['all_sessions_s']:.2f} s ({r['established']:,}) | "
            f"{r['echo_s']:.2f} s ({r['echoed']:,} verified) | {r['rss_idle_kib'] / 1024:.1f} MiB | "
            f"{r['rss_per_guest_kib']:.1f} KiB | {r['threads']} | {r['fds']:,} | "
            f"{r['idle_cpu_core'] * 100:.2f}% of a core | {r['rtt_p50_us']:.0f} / {r['rtt_p99_us']:.0f} µs |")
    big = max(results, key=lambda r: r["guests"])
    checks = [
        ("all sessions up in ≤ 5 s", big["all_sessions_s"] <= 5),
        ("every echo verified", all(r["echoed"] == r["guests"] for r in results)),
        ("host RSS ≤ 32 KiB per idle guest (≤ 320 MiB at 10,000)", big["rss_per_guest_kib"] <= 32),
        (f"threads ≤ cores + 4 ({cores + 4})", all(r["threads"] <= cores + 4 for r in results)),
        ("idle CPU ≤ 2% of one core", all(r["idle_cpu_core"] <= 0.02 for r in results)),
    ]
    out.append("")
    for what, ok in checks:
        out.append(f"- {what}: {'met' if ok else '**MISSED**'} (largest N: {big['guests']:,})")
    return "\n".join(out)


def run(bindir, work, outdir, ns, log):
    results = []
    for n in ns:
        log(f"density: {n} guests")
        r = run_one(bindir, work, n, log)
        log(f"density {n}: {json.dumps(r)}")
        with open(os.path.join(outdir, "density.jsonl"), "a") as f:
            f.write(json.dumps(r) + "\n")
        results.append(r)
    t = table(results, os.cpu_count() or 1)
    with open(os.path.join(outdir, "density.md"), "w") as f:
        f.write(t + "\n")
    print(t)
    return results
