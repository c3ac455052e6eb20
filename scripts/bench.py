#!/usr/bin/python3
"""vios-bridge benchmark orchestrator (entry point: scripts/bench; see docs/BENCH.md).

Runs direct TCP loopback, socat (default and -b 131072) and the vios bridge
pair (guest bridge -> QEMU stand-in -> host bridge) against the same
vios-load servers, repetitions interleaved round-robin, and prints a markdown
table of medians with per-repetition ratios and the issue's targets.
Standard library only; every process it starts is stopped on exit.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINS = ["vios-load", "vios-host-bridge", "vios-guest-bridge", "vios-qemu-standin", "vios-guests"]
CLK = os.sysconf("SC_CLK_TCK")
PATHS = ["direct", "socat", "socat128", "vios"]
LABEL = {"direct": "direct", "socat": "socat", "socat128": "socat -b 128k", "vios": "vios"}
GiB = 1 << 30
MiB = 1 << 20
T0 = time.monotonic()


def log(msg):
    print(f"[bench +{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


# --------------------------------------------------------------------------
# /proc helpers


def proc_stat(pid):
    """(utime+stime, cutime+cstime) in clock ticks, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rfind(")") + 2:].split()
    return int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


def proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid):
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return out
    for k in kids:
        out.append(k)
        out.extend(children(k))
    return out


def tcp_states():
    """Counts of TCP sockets by state (hex code) over tcp and tcp6."""
    counts = {}
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn) as f:
                next(f)
                for line in f:
                    st = line.split(None, 4)[3]
                    counts[st] = counts.get(st, 0) + 1
        except OSError:
            pass
    return counts


def tcpext(names=("ListenOverflows", "ListenDrops")):
    try:
        with open("/proc/net/netstat") as f:
            lines = [ln.split() for ln in f if ln.startswith("TcpExt:")]
        hdr, val = lines[0], lines[1]
        return {n: int(val[hdr.index(n)]) for n in names}
    except (OSError, IndexError, ValueError):
        return {}


def cpu_busy(seconds=1.0):
    """Fraction of all CPU time not idle over a short interval (/proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def listening(port):
    want = f":{port:04X}"
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn) as f:
                next(f)
                for line in f:
                    p = line.split(None, 4)
                    if p[3] == "0A" and p[1].endswith(want):
                        return True
        except OSError:
            pass
    return False


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------
# processes


class Registry:
    """Every process the benchmark starts, each in its own process group."""

    def __init__(self):
        self.procs = []

    def start(self, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=None):
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                             start_new_session=True, env=env)
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, grace=8.0, group=False):
        if p.poll() is None:
            try:
                if group:
                    os.killpg(p.pid, sig)
                else:
                    os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"pid {p.pid} ({os.path.basename(p.args[0])}) ignored signal {sig}; SIGKILL")
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        # forked children left in the group (socat), if any
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in reversed(list(self.procs)):
            self.stop(p, grace=5.0, group=True)


REG = Registry()


class Ctx:
    """Run-wide settings and output files."""

    def __init__(self, args, outdir, work, bindir):
        self.a = args
        self.out = outdir
        self.work = work
        self.bin = bindir
        self.raw = open(os.path.join(outdir, "raw.jsonl"), "a")
        self.clientlog = open(os.path.join(outdir, "logs", "clients.log"), "a")
        self.notes = []
        self.rep = 0

    def load(self):
        return os.path.join(self.bin, "vios-load")

    def record(self, obj):
        obj.setdefault("t_utc", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"))
        self.raw.write(json.dumps(obj) + "\n")
        self.raw.flush()

    def note(self, msg):
        if msg not in self.notes:
            self.notes.append(msg)
        log("note: " + msg)

    def client(self, argv, timeout, tag):
        """Runs one vios-load client to completion; returns its JSON (or a failure dict)."""
        return self.finish_client(self.start_client(argv, tag), argv[0], timeout)

    def start_client(self, argv, tag):
        """Starts `vios-load ARGV` in the background, logged to the client log."""
        self.clientlog.write(f"--- {tag}: {' '.join([self.load()] + argv)}\n")
        self.clientlog.flush()
        return REG.start([self.load()] + argv, stdout=subprocess.PIPE, stderr=self.clientlog)

    def finish_client(self, p, cmd, timeout, stop=False):
        """Waits for a client's JSON report (after SIGTERM when `stop`); a
        failure dict when there is none within `timeout` seconds."""
        if stop and p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            REG.stop(p, sig=signal.SIGKILL, group=True)
            return {"cmd": cmd, "ok": False, "errors": [f"bench: no report within {timeout}s"]}
        REG.stop(p)
        return parse_report(out, cmd)


def parse_report(out, cmd):
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip().startswith("{")]
    if not lines:
        return {"cmd": cmd, "ok": False, "errors": ["bench: no JSON line on stdout"]}
    try:
        return json.loads(lines[-1])
    except ValueError as e:
        return {"cmd": cmd, "ok": False, "errors": [f"bench: bad JSON: {e}"]}


class Sampler(threading.Thread):
    """Samples fn() (a dict of KiB) every interval; keeps the maximum per key."""

    def __init__(self, fn, interval):
        super().__init__(daemon=True)
        self.fn = fn
        self.interval = interval
        self.max = {}
        self.n = 0
        self.ev = threading.Event()

    def take(self):
        for k, v in self.fn(self.n).items():
            if v is not None:
                self.max[k] = max(self.max.get(k, 0), v)
        self.n += 1

    def run(self):
        self.take()
        while not self.ev.wait(self.interval):
            self.take()

    def stop(self):
        self.ev.set()
        self.join()
        self.take()
        return self.max


# --------------------------------------------------------------------------
# the servers and the three kinds of path


class Servers:
    def __init__(self, ctx):
        self.ctx = ctx
        self.addr = {}
        self.procs = {}
        for mode in ("sink", "echo", "source"):
            rf = os.path.join(ctx.work, f"{mode}.addr")
            out = open(os.path.join(ctx.out, "logs", f"serve-{mode}.json"), "w")
            err = open(os.path.join(ctx.out, "logs", f"serve-{mode}.log"), "w")
            self.procs[mode] = (REG.start([ctx.load(), "serve", "--listen", "127.0.0.1:0", "--mode", mode,
                                           "--timeout", "0", "--ready-file", rf], stdout=out, stderr=err), out)
            wait_for(lambda: os.path.exists(rf) and open(rf).read().strip(), 10, f"{mode} server")
            self.addr[mode] = open(rf).read().strip()
        log(f"servers: {self.addr}")

    def alive(self):
        return all(p.poll() is None for p, _ in self.procs.values())

    def stop(self):
        for mode, (p, out) in self.procs.items():
            REG.stop(p, sig=signal.SIGINT)
            out.close()
            try:
                with open(os.path.join(self.ctx.out, "logs", f"serve-{mode}.json")) as f:
                    rep = parse_report(f.read().encode(), "serve")
                self.ctx.record({"rep": None, "path": "server", "test": f"serve-{mode}", "result": rep})
            except OSError:
                pass


class Direct:
    name = "direct"

    def __init__(self, ctx, servers):
        self.addr = dict(servers.addr)

    def alive(self):
        return True

    def cpu(self):
        return {}

    def rss(self, services=None, pss=False):
        return {}

    def idle(self):
        pass

    def stop(self):
        pass


class Socat:
    """Two socats per service: TCP-LISTEN -> unix socket ("guest" side) and
    UNIX-LISTEN -> TCP to the server ("host" side), each forking per connection."""

    def __init__(self, ctx, servers, name, bufsize=None):
        self.ctx = ctx
        self.name = name
        self.servers = servers
        self.bufsize = bufsize
        self.start()

    def start(self):
        ctx = self.ctx
        self.addr = {}
        self.chains = {}
        opt = ["-b", str(self.bufsize)] if self.bufsize else []
        d = os.path.join(ctx.work, self.name)
        os.makedirs(d, exist_ok=True)
        for svc, saddr in self.servers.addr.items():
            sock = os.path.join(d, f"{svc}.sock")
            if os.path.exists(sock):
                os.unlink(sock)
            port = free_port()
            logf = open(os.path.join(ctx.out, "logs", f"{self.name}-{svc}.log"), "a")
            host = REG.start(["socat"] + opt + [f"UNIX-LISTEN:{sock},fork,backlog=1024", f"TCP:{saddr}"],
                             stderr=logf)
            wait_for(lambda: os.path.exists(sock), 10, f"socat unix listener {sock}")
            guest = REG.start(["socat"] + opt + [f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                                                 f"UNIX-CONNECT:{sock}"], stderr=logf)
            wait_for(lambda: listening(port), 10, f"socat tcp listener {port}")
            self.chains[svc] = {"host": host, "guest": guest}
            self.addr[svc] = f"127.0.0.1:{port}"
            logf.close()

    def parents(self):
        return [p for ch in self.chains.values() for p in ch.values()]

    def alive(self):
        return all(p.poll() is None for p in self.parents())

    def kids(self):
        return [k for p in self.parents() for k in children(p.pid)]

    def idle(self, timeout=15.0):
        """Waits until no forked child is left (their CPU is then in the parents' cutime/cstime)."""
        end = time.monotonic() + timeout
        while self.kids():
            if time.monotonic() > end:
                self.ctx.note(f"{self.name}: {len(self.kids())} forked socats still alive {timeout:.0f}s after a run")
                return
            time.sleep(0.02)

    def cpu(self):
        total = 0
        for p in self.parents():
            st = proc_stat(p.pid)
            if st:
                total += st[0] + st[1]
            for k in children(p.pid):
                st = proc_stat(k)
                if st:
                    total += st[0] + st[1]
        return {"relay": total}

    def rss(self, services=None, pss=False):
        """Sum of VmRSS (and, if asked, of Pss) over the chains' processes, by side."""
        out = {"host": 0, "guest": 0, "procs": 0}
        if pss:
            out.update({"pss_host": 0, "pss_guest": 0})
        for svc in services or list(self.chains):
            for role, p in self.chains[svc].items():
                for pid in [p.pid] + children(p.pid):
                    v = proc_status(pid, "VmRSS")
                    if v:
                        out[role] += v
                        out["procs"] += 1
                    if pss:
                        out["pss_" + role] += pss_kib(pid) or 0
        out["total"] = out["host"] + out["guest"]
        if pss:
            out["pss_total"] = out["pss_host"] + out["pss_guest"]
        return out

    def restart(self):
        self.stop()
        self.start()

    def stop(self):
        for p in self.parents():
            REG.stop(p, group=True)


class Vios:
    """vios-guest-bridge -> vios-qemu-standin -> vios-host-bridge."""

    def __init__(self, ctx, servers, tag):
        self.ctx = ctx
        self.servers = servers
        self.tag = tag
        self.name = "vios"
        self.start()

    def start(self):
        ctx, bin_ = self.ctx, self.ctx.bin
        d = os.path.join(ctx.work, self.tag)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        hsock, gsock = os.path.join(d, "host.sock"), os.path.join(d, "guest.sock")
        L = os.path.join(ctx.out, "logs")
        env = dict(os.environ, RUST_LOG="info")
        self.standin = REG.start([os.path.join(bin_, "vios-qemu-standin"), "--host", hsock, "--guest", gsock],
                                 stderr=open(os.path.join(L, f"{self.tag}-standin.log"), "a"), env=env)
        wait_for(lambda: os.path.exists(hsock) and os.path.exists(gsock), 10, "stand-in sockets")
        hargv = [os.path.join(bin_, "vios-host-bridge"), "--guest", f"bench={hsock}",
                 "--open-rate", "0", "--max-streams", "12000"]
        # Extra host-bridge options for experiments (not used by default).
        hargv += os.environ.get("VIOS_BENCH_HOST_ARGS", "").split()
        for svc, saddr in self.servers.addr.items():
            hargv += ["--service", f"{svc}={saddr}"]
        self.host = REG.start(hargv, stderr=open(os.path.join(L, f"{self.tag}-host.log"), "a"), env=env)
        self.addr = {svc: f"127.0.0.1:{free_port()}" for svc in self.servers.addr}
        gargv = [os.path.join(bin_, "vios-guest-bridge"), "--channel", f"unix:{gsock}"]
        for svc, a in self.addr.items():
            gargv += ["--listen", f"{a}={svc}"]
        self.glog = os.path.join(L, f"{self.tag}-guest.log")
        start_size = os.path.getsize(self.glog) if os.path.exists(self.glog) else 0
        self.guest = REG.start(gargv, stderr=open(self.glog, "a"), env=env)

        def up():
            if self.guest.poll() is not None or self.host.poll() is not None:
                raise RuntimeError(f"a bridge exited at start; see {L}/{self.tag}-*.log")
            with open(self.glog) as f:
                f.seek(start_size)
                if "session established" not in f.read():
                    return False
            return all(listening(int(a.rsplit(":", 1)[1])) for a in self.addr.values())
        wait_for(up, 20, "vios session and guest listeners")

    def procs(self):
        return {"host": self.host, "guest": self.guest, "standin": self.standin}

    def alive(self):
        return all(p.poll() is None for p in self.procs().values())

    def idle(self):
        time.sleep(0.2)

    def cpu(self):
        out = {}
        for role, p in self.procs().items():
            st = proc_stat(p.pid)
            out[role] = st[0] if st else 0
        return out

    def rss(self, services=None, pss=False):
        out = {role: proc_status(p.pid, "VmRSS") for role, p in self.procs().items()}
        out["total"] = (out["host"] or 0) + (out["guest"] or 0)
        out["pss_host"], out["pss_guest"] = pss_kib(self.host.pid), pss_kib(self.guest.pid)
        out["pss_total"] = (out["pss_host"] or 0) + (out["pss_guest"] or 0)
        return out

    def hwm(self):
        return {role: proc_status(p.pid, "VmHWM") for role, p in self.procs().items()}

    def restart(self):
        self.stop()
        self.start()

    def stop(self):
        for p in (self.guest, self.host, self.standin):
            REG.stop(p)


# --------------------------------------------------------------------------
# measurements


class Results:
    def __init__(self):
        self.v = {}  # key -> path -> {rep: value}

    def put(self, key, path, rep, val):
        self.v.setdefault(key, {}).setdefault(path, {})[rep] = val

    def get(self, key, path):
        return self.v.get(key, {}).get(path, {})


RATE = {}  # (path, test) -> MB/s measured last time


def bulk_bytes(a, path, key, direction, streams):
    """Bytes per stream: the fixed total the first time (or always with --bulk-seconds 0),
    afterwards what lasts about --bulk-seconds at the rate this path and test had last time."""
    total = a.bulk_total
    if a.bulk_seconds > 0 and (path, key) in RATE:
        total = RATE[(path, key)] * 1e6 * a.bulk_seconds
        total = min(max(total, 256 * MiB), 16 * GiB)
    per = max(MiB, int(total / streams) // (64 << 10) * (64 << 10))
    if direction == "down":
        per = max(per, a.down_floor)
    return per


def t_bulk(ctx, res, path, rep, direction, streams):
    a = ctx.a
    svc = "sink" if direction == "up" else "source"
    key = f"bulk_{direction}_{streams}"
    per = bulk_bytes(a, path.name, key, direction, streams)
    path.idle()
    cpu0 = path.cpu()
    # socat: hundreds of processes, so sample slowly, and read Pss (costly) only once
    smp = Sampler(lambda i: path.rss([svc], pss=(i in (1, 2))), 0.5 if path.name.startswith("socat") else 0.05)
    smp.start()
    argv = ["bulk", "--connect", path.addr[svc], "--streams", str(streams), "--bytes", str(per),
            "--direction", direction, "--timeout", "300s"]
    if a.no_verify:
        argv.append("--no-verify")
    r = ctx.client(argv, 400, f"{rep} {path.name} {key}")
    rss = smp.stop()
    path.idle()
    cpu1 = path.cpu()
    cpu_s = {k: (cpu1.get(k, 0) - cpu0.get(k, 0)) / CLK for k in cpu1}
    ok = bool(r.get("ok"))
    moved = r.get("bytes") or 0
    relay = {"cpu_s": cpu_s, "rss_max_kib": rss, "rss_samples": smp.n}
    ctx.record({"rep": rep, "path": path.name, "test": key, "result": r, "relay": relay})
    if not ok:
        ctx.note(f"rep {rep} {LABEL[path.name]} {key}: failed ({r.get('streams_failed')} streams failed; "
                 f"{(r.get('errors') or ['?'])[0]})")
        res.put(key, path.name, rep, None)
        return
    if (r.get("connect_s") or 0) > 0.9:
        ctx.note(f"rep {rep} {LABEL[path.name]} {key}: opening the streams took {r['connect_s']:.2f}s "
                 "(a SYN retransmission?)")
    res.put(key, path.name, rep, r["mb_per_s"])
    RATE[(path.name, key)] = r["mb_per_s"]
    gb = moved / 1e9
    if path.name == "vios":
        res.put(f"cpu_{direction}_{streams}", path.name, rep, (cpu_s["host"] + cpu_s["guest"]) / gb)
        res.put(f"cpu_standin_{direction}_{streams}", path.name, rep, cpu_s["standin"] / gb)
    elif path.name != "direct":
        res.put(f"cpu_{direction}_{streams}", path.name, rep, cpu_s["relay"] / gb)
    if streams == 256 and path.name != "direct":
        for role in ("host", "guest", "total", "pss_total"):
            v = rss.get(role)
            if v is None:
                continue
            prev = res.get(f"mem_bulk256_{role}", path.name).get(rep)
            res.put(f"mem_bulk256_{role}", path.name, rep, v if prev is None else max(prev, v))


def t_rtt(ctx, res, path, rep, streams, count):
    key = f"rtt_{streams}"
    r = ctx.client(["rtt", "--connect", path.addr["echo"], "--streams", str(streams), "--count", str(count),
                    "--size", "64", "--timeout", "300s"], 400, f"{rep} {path.name} {key}")
    ctx.record({"rep": rep, "path": path.name, "test": key, "result": r})
    if not r.get("ok"):
        ctx.note(f"rep {rep} {LABEL[path.name]} {key}: failed ({(r.get('errors') or ['?'])[0]})")
        for q in ("p50", "p99", "p99_9"):
            res.put(f"{key}_{q}", path.name, rep, None)
        return
    for q in ("p50", "p99", "p99_9"):
        res.put(f"{key}_{q}", path.name, rep, r["us"][q])


def t_loaded(ctx, res, path, rep, count):
    """rtt on one connection while one bulk `up` stream saturates another of the same path."""
    path.idle()
    bg = ctx.start_client(["bulk", "--connect", path.addr["sink"], "--streams", "1", "--bytes", str(1 << 40),
                           "--direction", "up", "--timeout", "600s"], f"{rep} {path.name} loaded background")
    time.sleep(0.5)
    r = ctx.client(["rtt", "--connect", path.addr["echo"], "--streams", "1", "--count", str(count),
                    "--size", "64", "--timeout", "300s"], 400, f"{rep} {path.name} rtt_loaded")
    still = bg.poll() is None
    b = ctx.finish_client(bg, "bulk", 30, stop=True)
    ctx.record({"rep": rep, "path": path.name, "test": "rtt_loaded", "result": r, "background": b,
                "background_ran_throughout": still})
    if not still:
        ctx.note(f"rep {rep} {LABEL[path.name]} rtt_loaded: the background bulk ended before the rtt run")
    good = r.get("ok") and still
    res.put("loaded_p50", path.name, rep, r["us"]["p50"] if good else None)
    res.put("loaded_p99", path.name, rep, r["us"]["p99"] if good else None)
    res.put("loaded_bg", path.name, rep, b.get("mb_per_s_sent") if good else None)
    if not r.get("ok"):
        ctx.note(f"rep {rep} {LABEL[path.name]} rtt_loaded: failed ({(r.get('errors') or ['?'])[0]})")


def t_setup(ctx, res, path, rep, count):
    path.idle()
    r = ctx.client(["setup", "--connect", path.addr["echo"], "--count", str(count), "--timeout", "300s"], 400,
                   f"{rep} {path.name} setup")
    ctx.record({"rep": rep, "path": path.name, "test": "setup", "result": r})
    if not r.get("ok"):
        ctx.note(f"rep {rep} {LABEL[path.name]} setup: {r.get('failed')} of {count} failed "
                 f"({(r.get('errors') or ['?'])[0]})")
    good = r.get("ok")
    res.put("setup_p50", path.name, rep, r["us"]["p50"] if good else None)
    res.put("setup_p99", path.name, rep, r["us"]["p99"] if good else None)


def hold(ctx, path, rep, n):
    """Opens n idle echo streams through path, samples the relays' RSS while held."""
    rf = os.path.join(ctx.work, f"hold-{path.name}-{n}.ready")
    if os.path.exists(rf):
        os.unlink(rf)
    p = ctx.start_client(["hold", "--connect", path.addr["echo"], "--streams", str(n), "--seconds", "300s",
                          "--ready-file", rf, "--timeout", "120s"], f"{rep} {path.name} hold {n}")
    end = time.monotonic() + 150
    state = ""
    while time.monotonic() < end and p.poll() is None:
        if os.path.exists(rf):
            state = open(rf).read().strip()
            if state:
                break
        time.sleep(0.02)
    rss = {}
    if state == "ready":
        time.sleep(0.2)
        smp = Sampler(lambda i: path.rss(["echo"], pss=(i == 0)), 0.1)
        smp.start()
        time.sleep(0.6)
        rss = smp.stop()
    r = ctx.finish_client(p, "hold", 150, stop=True)
    ctx.record({"rep": rep, "path": path.name, "test": f"hold_{n}", "result": r, "ready": state,
                "relay": {"rss_kib": rss}})
    if state != "ready" or not r.get("ok"):
        ctx.note(f"rep {rep} {LABEL[path.name]} hold {n}: ready={state or 'never'}, "
                 f"opened {r.get('opened')}, verified {r.get('verified')}, "
                 f"closed clean {r.get('closed_clean')} ({(r.get('errors') or ['-'])[0]})")
    if n <= 256 and (r.get("open_s") or 0) > 0.9:
        ctx.note(f"rep {rep} {LABEL[path.name]} hold {n}: opening took {r['open_s']:.2f}s (a SYN retransmission?)")
    path.idle()
    return rss if state == "ready" else None


def t_memory(ctx, res, path, rep, servers):
    if path.name == "direct":
        return
    if path.name == "vios":
        # A fresh bridge pair, so that RSS at 1 stream is a clean baseline
        # (not what the allocator kept from the bulk runs).
        fresh = Vios(ctx, servers, f"vios-mem-r{rep}")
        try:
            sizes = [1, 256, ctx.a.hold_streams]
            got = {n: hold(ctx, fresh, rep, n) for n in sizes}
            ctx.record({"rep": rep, "path": "vios", "test": "hold_hwm", "relay": {"hwm_kib": fresh.hwm()}})
        finally:
            fresh.stop()
    else:
        sizes = [1, 256]
        got = {n: hold(ctx, path, rep, n) for n in sizes}
    for n, rss in got.items():
        tag = "10k" if n == ctx.a.hold_streams else str(n)
        for role in ("host", "guest", "total"):
            res.put(f"mem_hold{tag}_{role}", path.name, rep, rss.get(role) if rss else None)
        if rss and "pss_total" in rss:
            res.put(f"mem_hold{tag}_pss_total", path.name, rep, rss["pss_total"])
    if path.name == "vios":
        big, one = got.get(ctx.a.hold_streams), got.get(1)
        for role in ("host", "guest"):
            v = None
            if big and one:
                v = (big[role] - one[role]) / ctx.a.hold_streams
            res.put(f"perstream_{role}", "vios", rep, v)


# --------------------------------------------------------------------------
# the table


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, kind):
    if v is None:
        return "—"
    if kind == "mbs":
        return f"{v:,.0f}"
    if kind == "us":
        return f"{v:,.1f}"
    if kind == "kib":
        return f"{v:,.0f}"
    if kind == "kib1":
        return f"{v:,.2f}"
    if kind == "cpu":
        return f"{v:.3f}"
    if kind == "x":
        return f"{v:.2f}×"
    return str(v)


def rows(a):
    R = []

    def add(key, label, kind, target=None):
        R.append({"key": key, "label": label, "kind": kind, "target": target})
    for d in ("up", "down"):
        for n in (1, 16, 256):
            tg = ("ratio_direct_ge", 0.30, "vios ≥ 0.30 × direct") if n in (1, 256) else None
            add(f"bulk_{d}_{n}", f"bulk {d}, {n} stream{'s' if n > 1 else ''} (MB/s)", "mbs", tg)
    for d in ("up", "down"):
        add(f"scale_{d}", f"bulk {d}: 256-stream / 1-stream aggregate", "x", ("vios_ge", 0.9, "≥ 0.90"))
    for n in (1, 16):
        c = "1 connection" if n == 1 else "16 connections"
        add(f"rtt_{n}_p50", f"rtt 64 B, {c}, p50 (µs)", "us", ("ratio_direct_le", 3.5, "≤ 3.5 × direct"))
        add(f"rtt_{n}_p99", f"rtt 64 B, {c}, p99 (µs)", "us", ("ratio_direct_le", 6.0, "≤ 6 × direct"))
        add(f"rtt_{n}_p99_9", f"rtt 64 B, {c}, p99.9 (µs)", "us")
    add("loaded_p50", "rtt behind a saturating bulk stream, p50 (µs)", "us")
    add("loaded_p99", "rtt behind a saturating bulk stream, p99 (µs)", "us", ("vios_le", 1000, "≤ 1000 µs"))
    add("loaded_bg", "  that bulk stream meanwhile (MB/s)", "mbs")
    add("setup_p50", "stream set-up (connect → first echoed byte), p50 (µs)", "us", ("vios_le", 300, "≤ 300 µs"))
    add("setup_p99", "stream set-up, p99 (µs)", "us")
    role_lbl = {"host": "host bridge", "guest": "guest bridge", "total": "both bridges"}
    for tag, what in (("1", "1 idle stream"), ("256", "256 idle streams"),
                      ("10k", f"{a.hold_streams:,} idle streams")):
        for role in ("host", "guest", "total"):
            add(f"mem_hold{tag}_{role}", f"RSS, {role_lbl[role]}, {what} (KiB)", "kib")
    for role in ("host", "guest", "total"):
        tg = ("vios_le", 32768, "≤ 32 MiB") if role != "total" else None
        add(f"mem_bulk256_{role}", f"peak RSS, {role_lbl[role]}, 256 bulk streams (KiB)", "kib", tg)
    for tag, what in (("1", "1 idle stream"), ("256", "256 idle streams"),
                      ("10k", f"{a.hold_streams:,} idle streams"), ("bulk256", "256 bulk streams")):
        key = f"mem_bulk256_pss_total" if tag == "bulk256" else f"mem_hold{tag}_pss_total"
        add(key, f"PSS, both bridges, {what} (KiB)²", "kib")
    for role in ("host", "guest"):
        add(f"perstream_{role}", f"RSS per idle stream at {a.hold_streams:,}, {role_lbl[role]} (KiB)", "kib1",
            ("vios_le", 16, "≤ 16 KiB"))
    for d in ("up", "down"):
        for n in (1, 16, 256):
            add(f"cpu_{d}_{n}", f"relay CPU s per GB, bulk {d}, {n} stream{'s' if n > 1 else ''}", "cpu")
    return R


def derive(res, reps):
    for d in ("up", "down"):
        for p in PATHS:
            one, big = res.get(f"bulk_{d}_1", p), res.get(f"bulk_{d}_256", p)
            for r in range(1, reps + 1):
                if one.get(r) and big.get(r) is not None:
                    res.put(f"scale_{d}", p, r, big[r] / one[r])


def per_rep_ratios(res, key, num, den):
    a, b = res.get(key, num), res.get(key, den)
    return [a[r] / b[r] for r in a if a[r] is not None and b.get(r) not in (None, 0)]


def ratio(res, key, num, den):
    xs = per_rep_ratios(res, key, num, den)
    return med(xs), len(xs)


def table(ctx, res, reps):
    a = ctx.a
    out = []
    hdr = ["metric", "direct", "socat", "socat -b 128k", "vios", "vios/direct", "vios/socat", "target", "met?"]
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "|".join([" --- "] + [" ---: "] * 6 + [" --- ", " --- "]) + "|")
    missed, met = [], []
    for row in rows(a):
        key, kind = row["key"], row["kind"]
        cells = [row["label"]]
        for p in PATHS:
            vals = res.get(key, p)
            m = med(vals.values())
            c = fmt(m, kind)
            nvalid = sum(1 for v in vals.values() if v is not None)
            if vals and nvalid < len(vals):
                c += f" ({nvalid}/{len(vals)})"
            if not vals:
                c = "n/a" if p not in ctx.paths else "—"
                if key.startswith("mem_hold10k") and p.startswith("socat"):
                    c = "skipped¹"
            cells.append(c)
        rd, _ = ratio(res, key, "vios", "direct")
        rs, _ = ratio(res, key, "vios", "socat")
        if key.startswith("scale_"):
            rd = rs = None
        cells += [fmt(rd, "x"), fmt(rs, "x")]
        tgt, status = "", ""
        if row["target"]:
            kindt, lim, text = row["target"]
            tgt = text
            vv = [v for v in res.get(key, "vios").values() if v is not None]
            vm = med(vv)
            if kindt.startswith("ratio_direct"):
                test, per = rd, per_rep_ratios(res, key, "vios", "direct")
            else:
                test, per = vm, vv
            if kindt.endswith("_ge"):
                ok = None if test is None else test >= lim
                bad = sum(1 for x in per if x < lim)
            else:
                ok = None if test is None else test <= lim
                bad = sum(1 for x in per if x > lim)
            status = "no data" if ok is None else ("met" if ok else "**MISSED**")
            if ok is not None and 0 < bad < len(per):
                status += f" (median; {len(per) - bad}/{len(per)} reps within)"
            if key.startswith("mem_bulk256") and vv and max(vv) > lim:
                status += f", max {max(vv):,.0f}"
            if ok is None:
                missed.append(row["label"] + " (no data)")
            elif ok:
                met.append(row["label"])
            else:
                missed.append(row["label"])
        cells += [tgt, status]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out), met, missed


def sysinfo():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        rev += " (uncommitted changes in the tree)" if dirty else ""
    except OSError:
        rev = "?"
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(), "git": rev}


# --------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark direct TCP loopback, socat (default and -b 131072) and the vios bridge pair "
                    "(guest bridge -> QEMU stand-in -> host bridge), repetitions interleaved; prints a markdown "
                    "table of medians and writes raw.jsonl + table.md under target/bench/<UTC timestamp>/.")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 rep, small sizes")
    ap.add_argument("--no-build", action="store_true", help="skip `cargo build --release --workspace`")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of: " + ",".join(PATHS))
    ap.add_argument("--bulk-bytes", type=int, default=None,
                    help="total bytes per bulk run, split over the streams (default 2 GiB; quick 256 MiB)")
    ap.add_argument("--bulk-seconds", type=float, default=None,
                    help="after the first repetition, size each bulk run to last about this long at the rate "
                         "that path had (default 1.5; 0 = always --bulk-bytes; quick: 0)")
    ap.add_argument("--down-floor", type=int, default=None,
                    help="minimum bytes per stream for `down` runs (default 16 MiB; quick 4 MiB): a source "
                         "queues data before the clock starts")
    ap.add_argument("--rtt-count", type=int, default=None, help="round trips on 1 connection (default 20000)")
    ap.add_argument("--loaded-count", type=int, default=None,
                    help="round trips behind a bulk stream (default 5000)")
    ap.add_argument("--setup-count", type=int, default=None, help="set-ups per run (default 2000)")
    ap.add_argument("--hold-streams", type=int, default=10000, help="the large idle-stream count (default 10000)")
    ap.add_argument("--no-verify", action="store_true", help="pass --no-verify to bulk down runs")
    ap.add_argument("--out", default=None, help="output directory (default target/bench/<UTC timestamp>)")
    ap.add_argument("--density", default=None, metavar="N[,N...]",
                    help="instead of the comparison: N guests against one host bridge (e.g. 100,1000,10000); "
                         "see scripts/bench_density.py")
    a = ap.parse_args()
    q = a.quick
    a.reps = a.reps or (1 if q else 5)
    a.bulk_total = a.bulk_bytes or (256 * MiB if q else 2 * GiB)
    a.down_floor = a.down_floor or (4 * MiB if q else 16 * MiB)
    a.rtt_count = a.rtt_count or (2000 if q else 20000)
    a.loaded_count = a.loaded_count or (1000 if q else 5000)
    if a.bulk_seconds is None:
        a.bulk_seconds = 0.0 if q else 1.5
    a.setup_count = a.setup_count or (300 if q else 2000)
    return a


def main():
    a = parse_args()
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    for p in paths:
        if p not in PATHS:
            sys.exit(f"unknown path {p!r}; choose from {','.join(PATHS)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < a.hold_streams + 1000:
        log(f"warning: open-files limit {nofile} is too low for {a.hold_streams} streams")
    if ("socat" in paths or "socat128" in paths) and not shutil.which("socat"):
        sys.exit("socat is not installed (apt-get install socat)")

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    if not a.no_build:
        log("cargo build --release --workspace")
        r = subprocess.run(["cargo", "build", "--release", "--workspace"], cwd=ROOT, stdout=sys.stderr)
        if r.returncode != 0:
            sys.exit("build failed")

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outdir = os.path.abspath(a.out or os.path.join(ROOT, "target", "bench", stamp))
    os.makedirs(os.path.join(outdir, "logs"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="vios-bench.")
    # a private copy of the binaries: others may rebuild target/release meanwhile
    bindir = os.path.join(work, "bin")
    os.makedirs(bindir)
    for b in BINS:
        src = os.path.join(ROOT, "target", "release", b)
        if not os.path.exists(src):
            sys.exit(f"{src} missing: build first")
        shutil.copy2(src, bindir)

    busy0 = cpu_busy()
    log(f"CPU busy before the run (others' load): {busy0 * 100:.0f}%")
    if a.density:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_density
        ns = [int(x) for x in a.density.split(",") if x.strip()]
        info = sysinfo()
        print(f"- machine: {info.get('cpu', '?')}, {os.cpu_count()} cores; open-files limit {nofile}")
        print(f"- CPU busy before the run (other work on the machine): {busy0 * 100:.0f}%\n")
        bench_density.run(bindir, work, outdir, ns, log)
        shutil.rmtree(work, ignore_errors=True)
        return
    ctx = Ctx(a, outdir, work, bindir)
    ctx.paths = paths
    info = sysinfo()
    started = datetime.datetime.now(datetime.timezone.utc)
    ctx.record({"rep": None, "path": None, "test": "config", "args": vars(a), "sys": info,
                "nofile": nofile})
    res = Results()
    objs = {}
    servers = None
    t_start = time.monotonic()
    interrupted = None
    tw_max = 0
    load = []
    try:
        servers = Servers(ctx)
        for p in paths:
            if p == "direct":
                objs[p] = Direct(ctx, servers)
            elif p == "socat":
                objs[p] = Socat(ctx, servers, "socat")
            elif p == "socat128":
                objs[p] = Socat(ctx, servers, "socat128", 131072)
            else:
                objs[p] = Vios(ctx, servers, "vios")
        tests = []
        for d in ("up", "down"):
            for n in (1, 16, 256):
                tests.append((f"bulk {d} {n}", lambda c, r, p, rep, d=d, n=n: t_bulk(c, r, p, rep, d, n)))
        tests.append(("rtt 1", lambda c, r, p, rep: t_rtt(c, r, p, rep, 1, a.rtt_count)))
        tests.append(("rtt 16", lambda c, r, p, rep: t_rtt(c, r, p, rep, 16, max(1, a.rtt_count // 16))))
        tests.append(("rtt loaded", lambda c, r, p, rep: t_loaded(c, r, p, rep, a.loaded_count)))
        tests.append(("setup", lambda c, r, p, rep: t_setup(c, r, p, rep, a.setup_count)))
        tests.append(("memory", lambda c, r, p, rep: t_memory(c, r, p, rep, servers)))
        for rep in range(1, a.reps + 1):
            ctx.rep = rep
            k = (rep - 1) % len(paths)
            order = paths[k:] + paths[:k]
            la = os.getloadavg()
            load.append(la[0])
            log(f"=== repetition {rep}/{a.reps} (path order {', '.join(order)}; load average {la[0]:.2f})")
            for tname, fn in tests:
                for p in order:
                    path = objs[p]
                    if not servers.alive():
                        raise RuntimeError("a vios-load server died; see logs/serve-*.log")
                    if not path.alive():
                        ctx.note(f"rep {rep}: a {LABEL[p]} process had exited before '{tname}'; restarted")
                        path.restart()
                    t1 = time.monotonic()
                    c0 = tcpext()
                    fn(ctx, res, path, rep)
                    c1 = tcpext()
                    d = {k: c1[k] - c0.get(k, 0) for k in c1 if c1[k] != c0.get(k, 0)}
                    if d:
                        ctx.record({"rep": rep, "path": p, "test": tname, "tcpext_delta": d})
                        ctx.note(f"rep {rep} {LABEL[p]} {tname}: kernel counters {d} (SYNs dropped at a "
                                 "full accept queue)")
                    tw = tcp_states().get("06", 0)
                    tw_max = max(tw_max, tw)
                    log(f"rep {rep} {tname:11s} {LABEL[p]:14s} {time.monotonic() - t1:6.1f}s  (TIME_WAIT {tw})")
    except (KeyboardInterrupt, Interrupted) as e:
        interrupted = str(e) or "Ctrl-C"
        log(f"interrupted ({interrupted}); stopping everything")
    except Exception as e:  # noqa: BLE001 - report, then clean up
        interrupted = f"error: {e}"
        log(interrupted)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        hwm = None
        if "vios" in objs:
            try:
                hwm = objs["vios"].hwm()
            except Exception:  # noqa: BLE001
                pass
        for o in objs.values():
            try:
                o.stop()
            except Exception as e:  # noqa: BLE001
                log(f"stop: {e}")
        if servers:
            servers.stop()
        REG.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    elapsed = time.monotonic() - t_start
    derive(res, a.reps)
    tbl, met, missed = table(ctx, res, a.reps)
    lines = []
    lines.append(f"# vios-bridge benchmark, {started.strftime('%Y-%m-%d %H:%M UTC')}")
    lines.append("")
    lines.append(f"- machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}; "
                 f"open-files limit {nofile}")
    lines.append(f"- tree: {info['git']}")
    lines.append(f"- {a.reps} interleaved repetition{'s' if a.reps > 1 else ''}{' (--quick)' if a.quick else ''}, "
                 f"medians; ratios are medians of per-repetition ratios; total run time {elapsed / 60:.1f} min")
    sizing = (f"then sized per path to last about {a.bulk_seconds:g} s at that path's previous rate (256 MiB–16 GiB)"
              if a.bulk_seconds > 0 and a.reps > 1 else "every time")
    lines.append(f"- bulk: {a.bulk_total / MiB:,.0f} MiB per run split over the streams in repetition 1, {sizing} "
                 f"(down: at least {a.down_floor / MiB:,.0f} MiB per stream); rtt: {a.rtt_count} round trips on 1 connection, "
                 f"16 × {max(1, a.rtt_count // 16)}, {a.loaded_count} behind the bulk stream; set-up: "
                 f"{a.setup_count} per run")
    lines.append(f"- CPU busy before the run started (other work on the machine): {busy0 * 100:.0f}%; 1-minute "
                 f"load average at the start of each repetition: {', '.join(f'{x:.2f}' for x in load)} (this "
                 f"includes the run's own processes: a 256-stream socat run has 512 forked socats)")
    lines.append("")
    lines.append(tbl)
    lines.append("")
    lines.append("¹ socat forks a process per connection at each end: 10,000 streams would be 20,000 processes "
                 "(pid_max here is " + open("/proc/sys/kernel/pid_max").read().strip() + "), so it is not run.")
    lines.append("² Pss (/proc/PID/smaps_rollup): each shared page divided among the processes sharing it. "
                 "socat's RSS sum counts its shared libraries once per forked process; the Pss sum does not. "
                 "socat: the larger of two samples, 0.5 s and 1 s into the bulk run; vios: the maximum of the samples.")
    lines.append("")
    lines.append("Notes:")
    lines.append("- ssh -L: not measured (no sshd on this machine; setting one up is not trivial).")
    lines.append("- socat memory is the sum of VmRSS over the echo chain (bulk: the sink or source chain): "
                 "its two listening socats and all their forked children, sampled; \"host bridge\" is the "
                 "UNIX-LISTEN→TCP side, \"guest bridge\" the TCP-LISTEN→UNIX side. vios: VmRSS of each bridge, "
                 "sampled; idle-stream figures come from a fresh bridge pair per repetition.")
    lines.append("- relay CPU: vios = host + guest bridge (the QEMU stand-in is not counted); socat = both "
                 "socats and their children (cutime/cstime). Per GB the client moved; `down` relays also carry "
                 "what the endless source queued beyond it.")
    sc = {}
    for d in ("up", "down"):
        for n in (1, 16, 256):
            m = med(res.get(f"cpu_standin_{d}_{n}", "vios").values())
            if m is not None:
                sc[f"{d} {n}"] = m
    if sc:
        lines.append("- QEMU stand-in CPU s per GB (not in the table): " +
                     ", ".join(f"{k}: {v:.3f}" for k, v in sc.items()))
    d1 = res.get("rtt_1_p50", "direct")
    if d1:
        lines.append("- direct rtt p50 per repetition: " + ", ".join(f"{v:.1f}" for v in d1.values() if v is not None) +
                     " µs. On a VM this is bimodal: about 15 µs when client and server happen to share a vCPU, "
                     "about 55–60 µs when every round trip wakes the other vCPU; the rtt ratios inherit it.")
    if hwm:
        lines.append(f"- VmHWM of the long-lived bridge pair at the end (all bulk/rtt/set-up runs): host "
                     f"{hwm.get('host')} KiB, guest {hwm.get('guest')} KiB, stand-in {hwm.get('standin')} KiB")
    def sysctl(n):
        try:
            return " ".join(open("/proc/sys/" + n.replace(".", "/")).read().split())
        except OSError:
            return "?"
    lines.append(f"- most TCP sockets in TIME_WAIT seen after a run: {tw_max} (net.ipv4.tcp_tw_reuse = "
                 f"{sysctl('net.ipv4.tcp_tw_reuse')}, ephemeral ports {sysctl('net.ipv4.ip_local_port_range')})")
    for n in ctx.notes:
        lines.append(f"- {n}")
    if interrupted:
        lines.append(f"- RUN INCOMPLETE: {interrupted}")
    lines.append("")
    lines.append(f"Targets met: {len(met)}; missed: {len(missed)}" +
                 (" — " + "; ".join(missed) if missed else ""))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(outdir, "table.md"), "w") as f:
        f.write(text)
    ctx.record({"rep": None, "path": None, "test": "summary", "elapsed_s": elapsed, "met": met,
                "missed": missed, "interrupted": interrupted})
    print(text)
    print(f"raw results and logs: {outdir}")
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
