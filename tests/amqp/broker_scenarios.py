#!/usr/bin/python3
"""End-to-end broker scenarios for vios-host-bridge's service features.

Each subcommand builds everything it needs in a temporary directory -- private
RabbitMQ nodes (scripts/lib/cluster.sh, scripts/lib/netns.sh), QEMU
stand-ins, both bridges, echo servers, real AMQP clients -- asserts what the
feature promises (and that the premise of each assertion holds), stops all it
started (brokers through the libraries, processes by pid, namespaces with
netns_delete; never by name) and prints exactly ONE JSON line on stdout:

    {"scenario": ..., "ok": true|false, "error": "...", ...measurements}

Notes go to stderr.  Exit status 0 only if every assertion held.

  proxy     PROXY v2 identities: a proxy_protocol node sees each guest's
            identity address and the stream id as the peer
            (rabbitmqctl list_connections / list_channels)
  trust     the service on a non-loopback address (inside a network
            namespace): guest/guest is refused through the bridge, a user
            made for the guest works; the loopback warning
  policy    --allow: NOT_PERMITTED at once, UNKNOWN_SERVICE distinct
  failover  a two-node cluster behind one service: kill the node a client
            is on, time until a new connection publishes (>= 20 trials)
  reload    --config + SIGHUP while traffic flows: exactly the streams a
            change takes away are reset

Usage: /usr/bin/python3 broker_scenarios.py SCENARIO --bin DIR --repo DIR
       [--trials N] [--keep]
(Debian's python3 is needed: python3-pika, python3-qpid-proton.)
"""

import argparse
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.dont_write_bytecode = True

import pika  # noqa: E402
import pika.exceptions as pe  # noqa: E402

logging.getLogger("pika").setLevel(logging.CRITICAL)

PY = "/usr/bin/python3"


class Fail(Exception):
    """An assertion of the scenario that did not hold."""


def check(cond, msg):
    if not cond:
        raise Fail(msg)


T0 = time.monotonic()


def note(*a):
    print("broker_scenarios: [%6.1fs]" % (time.monotonic() - T0), *a, file=sys.stderr, flush=True)


def now():
    return time.monotonic()


def free_port(host="127.0.0.1"):
    s = socket.socket()
    s.bind((host, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def same_ip(a, b):
    try:
        return ipaddress.ip_address(a.strip("[]")) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return False


def r3(x):
    return None if x is None else round(x, 3)


# ---------------------------------------------------------------------------
# processes and logs


class Proc:
    """A child process with its stderr in a log file; stopped by pid."""

    def __init__(self, name, argv, log, env):
        self.name = name
        self.log = log
        self.argv = argv
        with open(log, "wb") as f:
            self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=f, env=env)
        self.pid = self.p.pid

    def text(self):
        try:
            with open(self.log, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def alive(self):
        return self.p.poll() is None

    def wait_log(self, needle, count=1, timeout=10.0):
        end = now() + timeout
        while True:
            t = self.text()
            if t.count(needle) >= count:
                return t
            if not self.alive():
                raise Fail("%s exited (status %s) before logging %r; log tail:\n%s"
                           % (self.name, self.p.returncode, needle, tail(t)))
            if now() > end:
                raise Fail("%s: %r x%d not logged within %.0fs; log tail:\n%s"
                           % (self.name, needle, count, timeout, tail(t)))
            time.sleep(0.02)

    def wait_re(self, pattern, timeout=10.0, after=0):
        """First match of `pattern` (multiline) in the log at or past offset `after`."""
        rx = re.compile(pattern, re.M)
        end = now() + timeout
        while True:
            t = self.text()
            m = rx.search(t, after)
            if m:
                return m
            if now() > end:
                raise Fail("%s: /%s/ not logged within %.0fs; log tail:\n%s"
                           % (self.name, pattern, timeout, tail(t)))
            time.sleep(0.02)

    def signal(self, sig):
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, grace=5.0):
        if self.p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        return self.p.returncode


def tail(text, n=25):
    return "\n".join(text.splitlines()[-n:])


HOST_STREAM = r"^.*guest %s [^:\n]*: stream %s \((\S+)\) "
GUEST_OPENED = re.compile(r"stream (\d+) \((\S+)\) opened for client [\d.]+:(\d+)$", re.M)


def guest_stream_ids(guest):
    return {int(m.group(1)) for m in GUEST_OPENED.finditer(guest.text())}


def stream_of_port(guest, lport, timeout=5.0):
    """The stream id the guest bridge gave the client whose local port is
    `lport` (the latest such stream: a port may have served an earlier
    client). Call it once the stream has carried a byte, so it is logged."""
    pat = r"stream (\d+) \((\S+)\) opened for client 127\.0\.0\.1:%d$" % lport
    guest.wait_re(pat, timeout)
    return max(int(m.group(1)) for m in re.finditer(pat, guest.text(), re.M))


def host_connected(host, guest_name, sid, timeout=10.0, after=0):
    """ADDR from `stream SID (SVC) connected to ADDR from LOCAL` of that guest."""
    m = host.wait_re((HOST_STREAM % (re.escape(guest_name), sid)) + r"connected to (\S+) from (\S+)$",
                     timeout, after)
    return m.group(2)


def host_ended(host, guest_name, sid, timeout=10.0, after=0):
    """('refused'|'closed', reason) of that guest's stream SID."""
    m = host.wait_re((HOST_STREAM % (re.escape(guest_name), sid)) + r"(refused|closed): (.*)$",
                     timeout, after)
    return m.group(2), m.group(3)


def kind_of(e):
    """How a connection ended, from the exception a client saw."""
    s = repr(e)
    if isinstance(e, ConnectionResetError) or "ConnectionResetError" in s or "Connection reset" in s \
            or "ECONNRESET" in s or "errno 104" in s.lower():
        return "reset"
    if "EOF" in s or isinstance(e, EOFError):
        return "eof"
    if isinstance(e, (socket.timeout, TimeoutError)) or "timed out" in s.lower():
        return "timeout"
    return "error"


# ---------------------------------------------------------------------------
# AMQP clients


def pika_params(port, user="guest", password="guest", host="127.0.0.1", timeout=5.0, heartbeat=0):
    return pika.ConnectionParameters(
        host=host, port=port, virtual_host="/",
        credentials=pika.PlainCredentials(user, password),
        connection_attempts=1, retry_delay=0.1,
        socket_timeout=timeout, stack_timeout=timeout + 5,
        blocked_connection_timeout=30, heartbeat=heartbeat)


def pika_connect(port, **kw):
    return pika.BlockingConnection(pika_params(port, **kw))


def pika_local_port(conn):
    return conn._impl._transport._sock.getsockname()[1]


def refused(e):
    inner = e.args[0] if getattr(e, "args", None) and isinstance(e.args[0], BaseException) else e
    s = repr(e) + repr(inner)
    return (isinstance(e, (pe.ProbableAccessDeniedError, pe.ProbableAuthenticationError, pe.AuthenticationError))
            or isinstance(inner, (pe.ProbableAccessDeniedError, pe.ProbableAuthenticationError,
                                  pe.AuthenticationError))
            or "403" in s or "ACCESS_REFUSED" in s)


def pika_login(port, user="guest", password="guest", host="127.0.0.1"):
    """('accepted'|'refused'|'failed', text, local port or None)."""
    try:
        c = pika_connect(port, user=user, password=password, host=host)
    except pe.AMQPError as e:
        return ("refused" if refused(e) else "failed"), repr(e), None
    except OSError as e:
        return "failed", repr(e), None
    lp = pika_local_port(c)
    try:
        c.close()
    except Exception:
        pass
    return "accepted", "login %s accepted" % user, lp


def pika_roundtrip(conn, queue, n=5, tag="rt"):
    """Confirmed publishes to `queue` (declared, auto-delete) and gets them back."""
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(queue, durable=False, auto_delete=False)
    want = ["%s-%d" % (tag, i) for i in range(n)]
    for b in want:
        ch.basic_publish("", queue, b.encode(), pika.BasicProperties(delivery_mode=1), mandatory=True)
    got = []
    deadline = now() + 10
    while len(got) < n and now() < deadline:
        m, _p, body = ch.basic_get(queue, auto_ack=True)
        if m is None:
            time.sleep(0.02)
            continue
        got.append(body.decode())
    ch.queue_delete(queue)
    ch.close()
    check(got == want, "round trip on %s: sent %s, got %s" % (queue, want, got))
    return n


def proton_open(port, user, password):
    from proton.utils import BlockingConnection
    return BlockingConnection("amqp://127.0.0.1:%d" % port, timeout=15, user=user, password=password,
                              allowed_mechs="PLAIN", allow_insecure_mechs=True)


def proton_roundtrip(conn, queue, n=3):
    """Sends n messages to /queue/QUEUE and receives them; returns the receiver (kept open)."""
    from proton import Message
    addr = "/queue/%s" % queue
    snd = conn.create_sender(addr)
    rcv = conn.create_receiver(addr)
    want = ["p-%d" % i for i in range(n)]
    for b in want:
        snd.send(Message(body=b))
    got = []
    for _ in want:
        m = rcv.receive(timeout=10)
        rcv.accept()
        got.append(m.body)
    check(got == want, "AMQP 1.0 round trip on %s: sent %s, got %s" % (addr, want, got))
    # (no snd.close(): RabbitMQ 3.10 does not answer a sender's detach; the
    # connection's close ends it)
    return rcv


# ---------------------------------------------------------------------------
# the scenario's world


class World:
    """Everything one scenario starts, and its clean-up."""

    def __init__(self, args, name):
        self.args = args
        self.bin = os.path.abspath(args.bin)
        self.lib = os.path.join(os.path.abspath(args.repo), "scripts", "lib")
        self.dir = tempfile.mkdtemp(prefix="vios-broker-%s-" % name)
        self.procs = []
        self.clusters = []
        self.closers = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VIOS_")}
        self.env["RUST_LOG"] = "info"
        for b in ("vios-host-bridge", "vios-guest-bridge", "vios-qemu-standin", "vios-load"):
            check(os.access(os.path.join(self.bin, b), os.X_OK), "%s not found in %s" % (b, self.bin))
        note("%s: working in %s" % (name, self.dir))

    def path(self, *p):
        return os.path.join(self.dir, *p)

    # -- the bash libraries --------------------------------------------------
    def sh(self, script, *args, timeout=240, ok=True):
        """Runs `script` in bash with cluster.sh and netns.sh sourced; returns
        (status, stdout). Its stderr goes to ours."""
        cmd = ["bash", "-c",
               'set -euo pipefail; source "$VIOS_LIB/cluster.sh"; source "$VIOS_LIB/netns.sh"; ' + script,
               "vios-lib"] + [str(a) for a in args]
        env = dict(os.environ)
        env["VIOS_LIB"] = self.lib
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sys.stderr,
                           env=env, timeout=timeout)
        out = r.stdout.decode(errors="replace")
        if ok and r.returncode != 0:
            raise Fail("library call failed (status %d): %s %s\n%s"
                       % (r.returncode, script, " ".join(map(str, args)), out[-2000:]))
        return r.returncode, out

    def single(self, tag, port, extra=""):
        d = self.path(tag)
        self.clusters.append(d)
        t = now()
        self.sh('cluster_single_start "$1" "$2" "$3"', d, port, extra)
        note("broker %s on port %d up in %.1fs" % (tag, port, now() - t))
        return d

    def cluster(self, tag, p1, p2, extra=""):
        d = self.path(tag)
        self.clusters.append(d)
        t = now()
        self.sh('cluster_start "$1" "$2" "$3" "$4"', d, p1, p2, extra)
        note("cluster %s on ports %d, %d up in %.1fs" % (tag, p1, p2, now() - t))
        return d

    def ctl(self, d, n, *args, ok=True):
        return self.sh('d=$1; n=$2; shift 2; cluster_ctl "$d" "$n" "$@"', d, n, *args, ok=ok)[1]

    def broker_log(self, d, n=1):
        out = []
        ld = os.path.join(d, "n%d" % n, "log")
        for f in sorted(os.listdir(ld)) if os.path.isdir(ld) else []:
            if f.endswith("@localhost.log"):
                with open(os.path.join(ld, f), errors="replace") as fh:
                    out.append(fh.read())
        return "".join(out)

    # -- our processes --------------------------------------------------------
    def spawn(self, name, argv):
        p = Proc(name, argv, self.path("%s.log" % name), self.env)
        self.procs.append(p)
        return p

    def standin(self, tag):
        h, g = self.path("%s.host.sock" % tag), self.path("%s.guest.sock" % tag)
        p = self.spawn("standin-%s" % tag, [os.path.join(self.bin, "vios-qemu-standin"), "--host", h, "--guest", g])
        end = now() + 5
        while not os.path.exists(h):
            check(now() < end and p.alive(), "stand-in %s did not create %s" % (tag, h))
            time.sleep(0.01)
        return h, g

    def host_bridge(self, tag, args):
        return self.spawn("host-%s" % tag, [os.path.join(self.bin, "vios-host-bridge"), "--control", "none"] + args)

    def guest_bridge(self, tag, gsock, listens):
        """listens: [(port, service)]"""
        argv = [os.path.join(self.bin, "vios-guest-bridge"), "--control", "none", "--channel", "unix:" + gsock]
        for port, svc in listens:
            argv += ["--listen", "127.0.0.1:%d=%s" % (port, svc)]
        p = self.spawn("guest-%s" % tag, argv)
        p.wait_log("listening on", len(listens))
        return p

    def echo_server(self, tag):
        ready = self.path("%s.ready" % tag)
        p = self.spawn("echo-%s" % tag, [os.path.join(self.bin, "vios-load"), "serve", "--listen", "127.0.0.1:0",
                                          "--mode", "echo", "--ready-file", ready, "--timeout", "0"])
        end = now() + 5
        while not (os.path.exists(ready) and open(ready).read().strip()):
            check(now() < end and p.alive(), "echo server %s did not start" % tag)
            time.sleep(0.01)
        addr = open(ready).read().strip()
        return int(addr.rsplit(":", 1)[1])

    def cleanup(self, failed):
        for c in reversed(self.closers):
            try:
                c()
            except Exception:
                pass
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as e:
                note("stopping %s (pid %d): %r" % (p.name, p.pid, e))
        for d in reversed(self.clusters):
            try:
                self.sh('cluster_stop "$1"', d, ok=False, timeout=120)
            except Exception as e:
                note("cluster_stop %s: %r" % (d, e))
        if failed or self.args.keep:
            note("state kept in %s" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def wait_sessions(host, guests, n=1):
    host.wait_log("session established", n, 20)
    for g in guests:
        g.wait_log("session established", 1, 20)


def identities(host_text):
    return dict(re.findall(r"guest (\S+): serving \d+ channel\(s\); identity (\S+)", host_text))


# ---------------------------------------------------------------------------
# raw TCP helpers (echo streams, refusals)


def refused_at_once(port, timeout=3.0):
    """Connects, sends a few bytes, reads: returns (kind, seconds from connect
    to the end, bytes received, local port)."""
    s = socket.socket()
    s.settimeout(timeout)
    s.bind(("127.0.0.1", 0))  # the local port is known even if connect() fails
    lp = s.getsockname()[1]
    got = b""
    t0 = now()
    try:
        try:
            # The refusal can be so quick that the reset beats connect()'s
            # own check of the socket (Python connects non-blocking).
            s.connect(("127.0.0.1", port))
            s.sendall(b"hello?\n")
        except OSError as e:
            return kind_of(e), now() - t0, got, lp
        while True:
            try:
                b = s.recv(4096)
            except OSError as e:
                return kind_of(e), now() - t0, got, lp
            if not b:
                return "eof", now() - t0, got, lp
            got += b
    finally:
        s.close()


def echo_once(port, data, timeout=10.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    lp = s.getsockname()[1]
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
        return got, lp
    finally:
        s.close()


class Traffic(threading.Thread):
    """A long-lived stream kept busy: an echo connection pinged, or a pika
    connection publishing (confirmed) and getting back. Records how it ended."""

    def __init__(self, label, ping, period):
        super().__init__(daemon=True)
        self.label = label
        self._ping = ping
        self.period = period
        self.count = 0
        self.end = None       # (kind, text, monotonic time)
        self.stop_flag = threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            try:
                self._ping(self.count)
            except Exception as e:  # noqa: BLE001 - any failure ends the stream
                self.end = (kind_of(e), repr(e)[:300], now())
                return
            self.count += 1
            self.stop_flag.wait(self.period)

    def stop(self):
        self.stop_flag.set()
        self.join(10)


def echo_traffic(label, port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lp = s.getsockname()[1]

    def ping(i):
        msg = ("%s %08d\n" % (label, i)).encode()
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            b = s.recv(len(msg) - len(got))
            if not b:
                raise EOFError("EOF from the echo stream")
            got += b
        if got != msg:
            raise Fail("%s: echo mismatch: %r != %r" % (label, got, msg))

    ping(-1)  # the stream is open (and logged) before it is attributed
    t = Traffic(label, ping, 0.02)
    t.sock = s
    t.lport = lp
    return t


def amqp_traffic(label, port):
    c = pika_connect(port, heartbeat=0)
    lp = pika_local_port(c)
    ch = c.channel()
    ch.confirm_delivery()
    q = "reload-%s-%d" % (label.replace(".", "-"), os.getpid())
    ch.queue_declare(q, exclusive=True)

    def ping(i):
        body = ("%s-%d" % (label, i)).encode()
        ch.basic_publish("", q, body, mandatory=True)
        m, _p, got = ch.basic_get(q, auto_ack=True)
        if m is None or got != body:
            raise Fail("%s: published %r, got %r" % (label, body, got))

    t = Traffic(label, ping, 0.05)
    t.conn = c
    t.lport = lp
    return t


# ---------------------------------------------------------------------------
# scenario: proxy


HEADER_STREAMS = 100
PROXY_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


class HeaderRecorder:
    """A service that decodes the PROXY v2 header of every connection and
    notes how many bytes its first read got."""

    def __init__(self):
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(128)
        self.port = self.ls.getsockname()[1]
        self.got = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self.accept, daemon=True).start()

    def close(self):
        self.closed = True
        self.ls.close()

    def accept(self):
        while not self.closed:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        c.settimeout(5)
        try:
            first = c.recv(65536)
            data = first
            while True:
                if len(data) >= 16 and len(data) >= 16 + int.from_bytes(data[14:16], "big"):
                    break
                b = c.recv(65536)
                if not b:
                    break
                data += b
            # the guest's bytes: up to EOF
            while True:
                b = c.recv(65536)
                if not b:
                    break
                data += b
            c.close()
        except OSError as e:
            c.close()
            with self.lock:
                self.got.append({"error": repr(e)})
            return
        h = {"first_read": len(first), "raw": data}
        try:
            check(data[:12] == PROXY_SIG, "no PROXY v2 signature: %r" % data[:16])
            check(data[12] == 0x21, "version/command %#x, not 0x21 (v2 PROXY)" % data[12])
            n = int.from_bytes(data[14:16], "big")
            h["length"] = 16 + n
            body = data[16:16 + n]
            fam = data[13]
            if fam == 0x11:
                src, dst = ipaddress.ip_address(body[0:4]), ipaddress.ip_address(body[4:8])
                sport, dport = int.from_bytes(body[8:10], "big"), int.from_bytes(body[10:12], "big")
                tl = body[12:]
            elif fam == 0x21:
                src, dst = ipaddress.ip_address(body[0:16]), ipaddress.ip_address(body[16:32])
                sport, dport = int.from_bytes(body[32:34], "big"), int.from_bytes(body[34:36], "big")
                tl = body[36:]
            else:
                raise Fail("address family %#x" % fam)
            tlvs = {}
            while len(tl) >= 3:
                t, ln = tl[0], int.from_bytes(tl[1:3], "big")
                tlvs[t] = tl[3:3 + ln]
                tl = tl[3 + ln:]
            h.update(src=src, dst=dst, sport=sport, dport=dport, tlvs=tlvs, payload=data[16 + n:])
        except Fail as e:
            h["error"] = str(e)
        with self.lock:
            self.got.append(h)

    def wait_for(self, sid, identity, guest, timeout=5.0):
        """The header of the stream SID of GUEST (checked); raises if absent or wrong."""
        end = now() + timeout
        want = ipaddress.ip_address(identity)
        while now() < end:
            with self.lock:
                for h in self.got:
                    check("error" not in h, "PROXY header: %s" % h.get("error"))
                    if h["sport"] == sid and h["tlvs"].get(0x02) == guest.encode():
                        self.got.remove(h)
                        src = h["src"]
                        if src.version == 6 and src.ipv4_mapped is not None and want.version == 4:
                            src = src.ipv4_mapped
                        check(src == want, "%s stream %d: PROXY source %s, identity %s" % (guest, sid, src, want))
                        check(h["dport"] == self.port, "PROXY destination port %d" % h["dport"])
                        return h
            time.sleep(0.005)
        raise Fail("no PROXY header with source port %d and authority %s arrived" % (sid, guest))




def scenario_proxy(w, res):
    port = free_port()
    bd = w.single("rabbit", port, "proxy_protocol = true")
    w.sh('d=$1; for u in vm-a vm-b; do cluster_ctl "$d" 1 add_user "$u" "pw-$u" >/dev/null; '
         'cluster_ctl "$d" 1 set_permissions -p / "$u" ".*" ".*" ".*" >/dev/null; done', bd)

    # Premise: this node takes nothing without a PROXY header.
    outcome, text, _ = pika_login(port, "vm-a", "pw-vm-a")
    check(outcome != "accepted", "the proxy_protocol node accepted a connection without a PROXY header")
    res["direct_without_proxy_header"] = text[:300]

    ha, ga = w.standin("vm-a")
    hb, gb = w.standin("vm-b")
    assigned_b = "198.51.100.7"
    rec = HeaderRecorder()
    w.closers.append(rec.close)
    host = w.host_bridge("bridge", [
        "--guest", "vm-a=" + ha, "--guest", "vm-b=" + hb,
        "--service", "amqp=127.0.0.1:%d,proxy=v2,loopback=ok" % port,
        "--service", "headers=127.0.0.1:%d,proxy=v2,loopback=ok" % rec.port,
        "--guest-address", "vm-b=" + assigned_b])
    gports = {g: {"amqp": free_port(), "headers": free_port()} for g in ("vm-a", "vm-b")}
    guests = {"vm-a": (w.guest_bridge("vm-a", ga, [(p_, s_) for s_, p_ in gports["vm-a"].items()]),
                       gports["vm-a"]["amqp"]),
              "vm-b": (w.guest_bridge("vm-b", gb, [(p_, s_) for s_, p_ in gports["vm-b"].items()]),
                       gports["vm-b"]["amqp"])}
    wait_sessions(host, [g for g, _ in guests.values()], 2)
    ids = identities(host.text())
    check(set(ids) == {"vm-a", "vm-b"}, "identities not logged for both guests: %s" % ids)
    res["identities"] = ids
    res["identity_vm_a"], res["identity_vm_b"] = ids["vm-a"], ids["vm-b"]
    check(ipaddress.ip_address(ids["vm-a"]) in ipaddress.ip_network("fd56:696f:7300::/48"),
          "vm-a's derived identity %s is not in fd56:696f:7300::/48" % ids["vm-a"])
    check(same_ip(ids["vm-b"], assigned_b), "vm-b's identity %s is not the assigned %s" % (ids["vm-b"], assigned_b))
    check(not same_ip(ids["vm-a"], ids["vm-b"]), "the two guests have the same identity")
    check("with PROXY v2 headers" in host.text(), "host bridge did not log PROXY v2 for the service")

    # The header itself, as a service receives it: decoded from short streams
    # to a recording service. Source = the guest's identity, source port =
    # the stream id, authority TLV = the guest's name; and whether the header
    # came in the first read (the PROXY spec: "the sender must always ensure
    # that the header is sent at once").
    hdr = {"streams": 0, "split": 0, "split_first_reads": []}
    for gname in ("vm-a", "vm-b"):
        gproc = guests[gname][0]
        for i in range(HEADER_STREAMS):
            _got, lp = echo_once(gports[gname]["headers"], b"AMQP\x00\x00\x09\x01")
            sid = stream_of_port(gproc, lp)
            h = rec.wait_for(sid, ids[gname], gname)
            hdr["streams"] += 1
            if h["first_read"] < h["length"]:
                hdr["split"] += 1
                hdr["split_first_reads"].append("%d of %d" % (h["first_read"], h["length"]))
            check(h["payload"] == b"AMQP\x00\x00\x09\x01", "%s stream %d: the guest's bytes after the header: %r"
                  % (gname, sid, h["payload"]))
    hdr["split_first_reads"] = sorted(set(hdr["split_first_reads"]))
    res["proxy_header"] = hdr
    res["proxy_header_streams"] = hdr["streams"]
    res["proxy_header_split"] = hdr["split"]
    check(hdr["split"] == 0, "the PROXY v2 header reached the service in two reads in %d of %d streams (%s)"
          % (hdr["split"], hdr["streams"], ", ".join(hdr["split_first_reads"])))

    # Open connections one at a time through each guest, so each new stream
    # id in the guest's log is the connection just opened.
    def open_client(gname, proto):
        gproc, gport = guests[gname]
        before = guest_stream_ids(gproc)
        if proto == "0-9-1":
            return before, pika_connect(gport, user=gname, password="pw-" + gname)
        return before, proton_open(gport, gname, "pw-" + gname)

    conns = []
    for gname in ("vm-a", "vm-b"):
        gproc, gport = guests[gname]
        for proto in ("0-9-1", "1.0", "0-9-1", "1.0"):
            before, c = open_client(gname, proto)
            w.closers.append(lambda c=c: c.close())
            if proto == "0-9-1":
                lp = pika_local_port(c)
                sid = stream_of_port(gproc, lp)
                pika_roundtrip(c, "proxy-%s-%d-%d" % (gname, sid, os.getpid()))
            else:
                lp = None
                # The receiver stays attached: its session is the channel
                # list_channels shows. (Not closed on its own: RabbitMQ 3.10
                # does not answer a detach; closing the connection ends it.)
                proton_roundtrip(c, "proxy-%s-%d" % (gname, os.getpid()))
            new = guest_stream_ids(gproc) - before
            check(len(new) == 1, "%s: expected one new stream for the %s connection, got %s" % (gname, proto, new))
            (s_new,) = new
            if proto == "0-9-1":
                check(s_new == sid, "%s: stream of local port %d is %d, new stream is %d" % (gname, lp, sid, s_new))
            addr = host_connected(host, gname, s_new)
            check(addr == "127.0.0.1:%d" % port, "%s stream %d connected to %s" % (gname, s_new, addr))
            conns.append({"guest": gname, "protocol": proto, "stream": s_new, "client_port": lp})
    res["connections"] = conns

    # What the broker says, while every connection is open.
    lc = w.ctl(bd, 1, "list_connections", "-q", "peer_host", "peer_port", "user", "protocol")
    lch = w.ctl(bd, 1, "list_channels", "-q", "name", "user")
    res["list_connections"] = lc
    res["list_channels"] = lch
    note("rabbitmqctl list_connections peer_host peer_port user protocol:\n" + lc)
    note("rabbitmqctl list_channels name user:\n" + lch)
    rows = [l.split("\t") for l in lc.strip().splitlines()]
    check(rows and rows[0][:2] == ["peer_host", "peer_port"], "unexpected list_connections output: %r" % lc)
    rows = [r for r in rows[1:] if len(r) >= 3]
    # Every 0-9-1 connection appears with its guest's identity and its stream id as the port.
    for c in conns:
        if c["protocol"] != "0-9-1":
            continue
        hit = [r for r in rows if same_ip(r[0], ids[c["guest"]]) and r[1] == str(c["stream"])]
        check(len(hit) == 1 and hit[0][2] == c["guest"],
              "list_connections has no row %s:%d user %s: %r" % (ids[c["guest"]], c["stream"], c["guest"], lc))
    n091 = sum(1 for c in conns if c["protocol"] == "0-9-1")
    check(len(rows) == n091, "list_connections lists %d connections, expected exactly our %d: %r" % (len(rows), n091, lc))
    for r in rows:
        check(any(same_ip(r[0], ip) for ip in ids.values()),
              "a connection from %s, which is no guest identity: %r" % (r[0], lc))
    # AMQP 1.0 connections: RabbitMQ 3.10 lists them neither in list_connections
    # nor with a peer in list_amqp10_connections; their sessions' channels are
    # named after the peer the PROXY header gave: "[ADDR]:PORT -> ...".
    chans = []
    for line in lch.strip().splitlines()[1:]:
        m = re.match(r"^\[?([0-9a-fA-F:.]+?)\]?:(\d+) -> \S+ \((\d+)\)\t(\S+)", line)
        if m:
            chans.append((m.group(1), int(m.group(2)), m.group(4)))
    for c in conns:
        if c["protocol"] != "1.0":
            continue
        hit = [x for x in chans if same_ip(x[0], ids[c["guest"]]) and x[1] == c["stream"] and x[2] == c["guest"]]
        check(hit, "list_channels has no channel of %s:%d (AMQP 1.0, %s): %r"
              % (ids[c["guest"]], c["stream"], c["guest"], lch))
    # The broker's own log says the same for every stream.
    blog = w.broker_log(bd)
    seen = 0
    for c in conns:
        ip = ids[c["guest"]]
        pat = r"accepting AMQP connection <[^>]*> \(\[?%s\]?:%d -> 127\.0\.0\.1:%d\)" % (
            re.escape(str(ipaddress.ip_address(ip))), c["stream"], port)
        if re.search(pat, blog):
            seen += 1
    res["broker_log_accepts_with_identity"] = seen
    check(seen == len(conns), "broker log shows %d of %d connections from the guests' identities" % (seen, len(conns)))
    res["proxy_connections"] = len(conns)
    res["proxy_distinct_identities"] = len(set(ids.values()))


# ---------------------------------------------------------------------------
# scenario: trust (the inner part runs inside the namespace)


def scenario_trust_outer(args, res):
    lib = os.path.join(os.path.abspath(args.repo), "scripts", "lib")
    env = dict(os.environ, VIOS_LIB=lib)

    def sh(script, *a, ok=True):
        r = subprocess.run(["bash", "-c", 'set -euo pipefail; source "$VIOS_LIB/netns.sh"; ' + script, "x"] + list(a),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sys.stderr, env=env, timeout=120)
        if ok and r.returncode != 0:
            raise Fail("netns library call failed: %s" % script)
        return r.stdout.decode().strip()

    ns = sh("netns_name vios-trust")
    sh('netns_create "$1" 198.18.0.1/32', ns)
    res["netns"] = ns
    inner = None
    try:
        argv = ["ip", "netns", "exec", ns, PY, os.path.abspath(__file__), "trust-inner",
                "--bin", args.bin, "--repo", args.repo] + (["--keep"] if args.keep else [])
        inner = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sys.stderr)
        try:
            out, _ = inner.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            inner.send_signal(signal.SIGTERM)
            out, _ = inner.communicate(timeout=60)
        line = [l for l in out.decode(errors="replace").splitlines() if l.startswith("{")]
        check(line, "the part inside the namespace printed no result (status %s)" % inner.returncode)
        got = json.loads(line[-1])
        for k, v in got.items():
            if k not in ("scenario", "ok", "seconds"):
                res[k] = v
        if not got.get("ok"):
            raise Fail(got.get("error", "inside the namespace: failed"))
    finally:
        if inner is not None and inner.poll() is None:
            inner.send_signal(signal.SIGTERM)
            try:
                inner.wait(60)
            except subprocess.TimeoutExpired:
                inner.kill()
        sh('netns_delete "$1"', ns, ok=False)
        check(not os.path.exists("/run/netns/" + ns), "namespace %s still exists" % ns)


def scenario_trust_inner(w, res):
    addrs = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", "lo"], stdout=subprocess.PIPE).stdout.decode()
    check("198.18.0.1" in addrs, "not inside the test namespace (no 198.18.0.1 on lo): %s" % addrs)
    port = free_port()
    bd = w.single("rabbit", port, "listeners.tcp.2 = 198.18.0.1:@PORT@")
    w.sh('cluster_ctl "$1" 1 add_user vm-a pw-vm-a >/dev/null; '
         'cluster_ctl "$1" 1 set_permissions -p / vm-a ".*" ".*" ".*" >/dev/null', bd)

    # Premises, straight to the broker: guest/guest works on 127.0.0.1 and
    # not on 198.18.0.1 (loopback_users: judged by the local address).
    o, t, _ = pika_login(port, host="127.0.0.1")
    check(o == "accepted", "host-local guest/guest to 127.0.0.1:%d: %s %s" % (port, o, t))
    res["direct_guest_127_0_0_1"] = o
    o, t, _ = pika_login(port, host="198.18.0.1")
    check(o == "refused", "guest/guest straight to 198.18.0.1:%d was not refused: %s %s" % (port, o, t))
    res["direct_guest_198_18_0_1"] = o

    h, g = w.standin("vm-a")
    host = w.host_bridge("nonloop", ["--guest", "vm-a=" + h, "--service", "amqp=198.18.0.1:%d" % port])
    gp = free_port()
    guest = w.guest_bridge("vm-a", g, [(gp, "amqp")])
    wait_sessions(host, [guest])
    text = host.wait_log("loop thread(s)")
    warn = [l for l in text.splitlines() if "WARN" in l and "loopback" in l]
    check(not warn, "host bridge warned about loopback for a 198.18.0.1 service: %s" % warn)
    res["nonloopback_bridge_warnings"] = len(warn)

    # guest/guest through the bridge: refused by the broker.
    before = len(w.broker_log(bd))
    o, t, lp = pika_login(gp)
    check(o == "refused", "guest/guest through the bridge was not refused: %s %s" % (o, t))
    res["bridge_guest_login"] = o
    res["bridge_guest_error"] = t[:400]
    # It reached the broker (over 198.18.0.1) and the broker said why.
    m = re.search(r"stream (\d+) \(amqp\) connected to 198\.18\.0\.1:%d from (\S+)" % port, host.text())
    check(m, "the refused login never reached 198.18.0.1:%d:\n%s" % (port, tail(host.text())))
    res["bridge_guest_stream"] = m.group(0)
    why = None
    end = now() + 5
    while now() < end and why is None:
        for l in w.broker_log(bd)[before:].splitlines():
            if "can only connect via localhost" in l or "ACCESS_REFUSED" in l:
                why = l.strip()
                break
        time.sleep(0.1)
    check(why, "no loopback_users refusal in the broker log")
    res["broker_refusal_log"] = why

    # A host-local login still works.
    o, t, _ = pika_login(port, host="127.0.0.1")
    check(o == "accepted", "host-local guest/guest after the refusal: %s %s" % (o, t))
    # The guest's own broker user works through the bridge.
    c = pika_connect(gp, user="vm-a", password="pw-vm-a")
    w.closers.append(lambda: c.close())
    res["bridge_vm_a_messages"] = pika_roundtrip(c, "trust-vm-a-%d" % os.getpid(), 10)
    res["bridge_vm_a_login"] = "accepted"
    c.close()

    # The same broker mapped on 127.0.0.1 without loopback=ok: the bridge warns,
    # and rightly: guest/guest through it is accepted.
    h2, g2 = w.standin("vm-l")
    host2 = w.host_bridge("loop", ["--guest", "vm-l=" + h2, "--service", "amqp=127.0.0.1:%d" % port])
    gp2 = free_port()
    guest2 = w.guest_bridge("vm-l", g2, [(gp2, "amqp")])
    wait_sessions(host2, [guest2])
    text2 = host2.wait_log("loop thread(s)")
    warn2 = [l for l in text2.splitlines() if "WARN" in l and "a loopback address" in l]
    check(len(warn2) == 1 and "service amqp maps to 127.0.0.1:%d" % port in warn2[0],
          "no loopback warning for amqp=127.0.0.1:%d:\n%s" % (port, tail(text2)))
    res["loopback_warning"] = re.sub(r"^\[[^]]*\] ", "", warn2[0])[:300]
    o, t, _ = pika_login(gp2)
    check(o == "accepted", "guest/guest through a loopback mapping: %s %s" % (o, t))
    res["loopback_bridge_guest_login"] = o
    # ... and with ,loopback=ok the operator said so: no warning.
    host3 = w.host_bridge("loopok", ["--guest", "vm-x=" + w.path("absent.sock"),
                                     "--service", "amqp=127.0.0.1:%d,loopback=ok" % port])
    text3 = host3.wait_log("loop thread(s)")
    check(not [l for l in text3.splitlines() if "loopback address" in l],
          "warning despite loopback=ok:\n%s" % tail(text3))
    res["loopback_ok_warnings"] = 0


# ---------------------------------------------------------------------------
# scenario: policy


def scenario_policy(w, res):
    port = free_port()
    w.single("rabbit", port)
    eport = w.echo_server("echo")
    ha, ga = w.standin("vm-a")
    hb, gb = w.standin("vm-b")
    host = w.host_bridge("bridge", [
        "--guest", "vm-a=" + ha, "--guest", "vm-b=" + hb,
        "--service", "amqp=127.0.0.1:%d,loopback=ok" % port,
        "--service", "echo=127.0.0.1:%d,loopback=ok" % eport,
        "--allow", "vm-a=amqp", "--allow", "vm-b=amqp,echo"])
    ports = {}
    guests = {}
    for gname, gs in (("vm-a", ga), ("vm-b", gb)):
        ports[gname] = {s: free_port() for s in ("amqp", "echo", "nosuch")}
        guests[gname] = w.guest_bridge(gname, gs, [(p, s) for s, p in ports[gname].items()])
    wait_sessions(host, list(guests.values()), 2)
    text = host.text()
    check('guests "vm-a" may open amqp' in text and 'guests "vm-b" may open amqp, echo' in text,
          "the --allow rules are not logged:\n%s" % tail(text))

    # vm-a to echo: refused at once, NOT_PERMITTED, nothing reaches the echo server.
    lat = []
    for _ in range(5):
        kind, secs, got, lp = refused_at_once(ports["vm-a"]["echo"])
        check(kind == "reset" and not got, "vm-a's echo client: %s after %.3fs, %d bytes" % (kind, secs, len(got)))
        sid = stream_of_port(guests["vm-a"], lp)
        how, why = host_ended(host, "vm-a", sid)
        check(how == "refused" and why.startswith("NOT_PERMITTED"), "vm-a stream %d: %s %s" % (sid, how, why))
        lat.append(secs)
    check(max(lat) < 1.0, "vm-a's refusals took up to %.3fs" % max(lat))
    res["not_permitted_reset_ms"] = [round(x * 1000, 2) for x in lat]
    res["not_permitted_reset_max_ms"] = round(max(lat) * 1000, 2)
    res["not_permitted_log"] = [l.split("] ", 1)[-1] for l in host.text().splitlines() if "NOT_PERMITTED" in l][0]
    check(not re.search(r"guest vm-a \S+: stream \d+ \(echo\) connected", host.text()),
          "a vm-a echo stream was connected to the service")
    gl = guests["vm-a"].text()
    check("refused by host: NOT_PERMITTED" in gl, "vm-a's guest bridge does not log the NOT_PERMITTED refusal")

    # vm-a's AMQP works.
    c = pika_connect(ports["vm-a"]["amqp"])
    w.closers.append(lambda: c.close())
    res["vm_a_amqp_messages"] = pika_roundtrip(c, "policy-a-%d" % os.getpid(), 10)
    c.close()
    # vm-b's echo and AMQP work.
    data = os.urandom(256 * 1024)
    got, lp = echo_once(ports["vm-b"]["echo"], data)
    check(got == data, "vm-b's echo: sent %d bytes, got %d back" % (len(data), len(got)))
    sid = stream_of_port(guests["vm-b"], lp)
    check(host_connected(host, "vm-b", sid) == "127.0.0.1:%d" % eport, "vm-b's echo stream not connected to echo")
    res["vm_b_echo_bytes"] = len(got)
    c = pika_connect(ports["vm-b"]["amqp"])
    w.closers.append(lambda: c.close())
    res["vm_b_amqp_messages"] = pika_roundtrip(c, "policy-b-%d" % os.getpid(), 10)
    c.close()

    # An unknown name is still UNKNOWN_SERVICE, for both guests.
    unknown = {}
    for gname in ("vm-a", "vm-b"):
        kind, secs, got, lp = refused_at_once(ports[gname]["nosuch"])
        check(kind == "reset" and not got, "%s to an unknown service: %s" % (gname, kind))
        sid = stream_of_port(guests[gname], lp)
        how, why = host_ended(host, gname, sid)
        check(how == "refused" and why.startswith("UNKNOWN_SERVICE"), "%s stream %d: %s %s" % (gname, sid, how, why))
        unknown[gname] = why.split(":")[0]
        res["unknown_service_reset_ms_" + gname.replace("-", "_")] = round(secs * 1000, 2)
    res["unknown_service_codes"] = unknown
    n_np = host.text().count("refused: NOT_PERMITTED")
    check(n_np == 5, "%d NOT_PERMITTED refusals logged, expected 5" % n_np)


# ---------------------------------------------------------------------------
# scenario: failover


class Victim(threading.Thread):
    """Publishes confirmed messages on a client connected through the bridge
    until its connection breaks; then retries like an application would,
    until a new connection through the bridge publishes (confirmed) again."""

    def __init__(self, conn, gport, queue, recovery_deadline):
        super().__init__(daemon=True)
        self.conn = conn
        self.gport = gport
        self.queue = queue
        self.deadline_s = recovery_deadline
        self.confirmed = []
        self.end = None            # (kind, text, time)
        self.recovered = None      # (conn, time, attempts)
        self.recovery_errors = []
        self.failure = None

    def run(self):
        try:
            ch = self.conn.channel()
            ch.confirm_delivery()
            ch.queue_declare(self.queue, durable=True)
            i = 0
            while True:
                body = ("%s-%d" % (self.queue, i)).encode()
                try:
                    ch.basic_publish("", self.queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
                except Exception as e:  # noqa: BLE001
                    self.end = (kind_of(e), repr(e)[:300], now())
                    break
                self.confirmed.append(body.decode())
                i += 1
                time.sleep(0.01)
            deadline = now() + self.deadline_s
            attempts = 0
            while now() < deadline:
                attempts += 1
                c = None
                try:
                    c = pika_connect(self.gport, timeout=3)
                    ch = c.channel()
                    ch.confirm_delivery()
                    ch.queue_declare(self.queue, durable=True, passive=True)
                    ch.basic_publish("", self.queue, b"after-kill", pika.BasicProperties(delivery_mode=2),
                                     mandatory=True)
                    self.recovered = (c, now(), attempts, ch)
                    return
                except Exception as e:  # noqa: BLE001
                    self.recovery_errors.append(repr(e)[:200])
                    try:
                        if c is not None and c.is_open:
                            c.close()
                    except Exception:
                        pass
                    time.sleep(0.05)
        except Exception as e:  # noqa: BLE001
            self.failure = traceback.format_exc()
            self.end = self.end or ("error", repr(e)[:300], now())


def scenario_failover(w, res):
    trials = w.args.trials
    p1 = free_port()
    p2 = free_port()
    while p2 == p1:
        p2 = free_port()
    t_start = now()
    cd = w.cluster("cluster", p1, p2)
    res["cluster_start_s"] = r3(now() - t_start)
    node_of = {"127.0.0.1:%d" % p1: 1, "127.0.0.1:%d" % p2: 2}
    h, g = w.standin("vm-a")
    host = w.host_bridge("bridge", ["--guest", "vm-a=" + h,
                                    "--service", "amqp=127.0.0.1:%d|127.0.0.1:%d,loopback=ok" % (p1, p2),
                                    "--connect-timeout", "2s"])
    gp = free_port()
    guest = w.guest_bridge("vm-a", g, [(gp, "amqp")])
    wait_sessions(host, [guest])

    def node_of_conn(c):
        sid = stream_of_port(guest, pika_local_port(c))
        addr = host_connected(host, "vm-a", sid)
        check(addr in node_of, "stream %d connected to %s, which is neither node" % (sid, addr))
        return node_of[addr], sid

    victim = pika_connect(gp)
    vnode, vsid = node_of_conn(victim)
    check(vnode == 1, "the first stream went to node %d, not the first address" % vnode)
    out = []
    res["trials_detail"] = out
    for k in range(trials):
        q = "failover-%d-%d" % (os.getpid(), k)
        tr = {"trial": k + 1, "killed": vnode, "victim_stream": vsid}
        v = Victim(victim, gp, q, 30)
        v.start()
        end = now() + 10
        while len(v.confirmed) < 20:
            check(v.end is None and now() < end, "trial %d: publishing before the kill failed: %s" % (k + 1, v.end))
            time.sleep(0.02)
        # The queue is mirrored on the other node and in sync (else its
        # messages could not survive the kill: that is what is tested).
        w.sh('cluster_wait_synced "$1" 30', cd)
        mark = len(host.text())
        t_kill = now()
        w.sh('cluster_kill "$1" "$2"', cd, vnode)
        t_killed = now()
        v.join(40)
        check(not v.is_alive(), "trial %d: the client neither failed nor recovered" % (k + 1))
        check(v.failure is None, "trial %d: client error: %s" % (k + 1, v.failure))
        check(v.end is not None, "trial %d: the client's publishing never failed" % (k + 1))
        kind, text, t_end = v.end
        tr["client_saw"] = kind
        tr["client_error"] = text[:160]
        tr["reset_after_kill_s"] = r3(t_end - t_kill)
        tr["kill_call_s"] = r3(t_killed - t_kill)
        how, why = host_ended(host, "vm-a", vsid, after=0)
        tr["host_close"] = "%s: %s" % (how, why.split(";")[0])
        check(kind == "reset", "trial %d: the client saw %s, not a reset: %s" % (k + 1, kind, text))
        check(v.recovered is not None, "trial %d: no new connection published within 30 s: %s"
              % (k + 1, v.recovery_errors[-3:]))
        rconn, t_ok, attempts, rch = v.recovered
        w.closers.append(lambda c=rconn: c.close())
        tr["recovery_s"] = r3(t_ok - t_kill)
        tr["recovery_attempts"] = attempts
        tr["recovery_failures"] = sorted(set(re.sub(r"\d{4,}", "N", x)[:120] for x in v.recovery_errors))
        rnode, rsid = node_of_conn(rconn)
        tr["recovered_on"] = rnode
        # How the new streams after the kill went through the addresses.
        seg = host.text()[mark:]
        dead = "127.0.0.1:%d" % (p1 if vnode == 1 else p2)
        retries = re.findall(r"stream (\d+) \(amqp\): connect to (\S+): [^;]*; trying (\S+)$", seg, re.M)
        unreach = re.findall(r"stream (\d+) \(amqp\) closed: refused: UNREACHABLE", seg)
        tr["retries"] = ["stream %s: %s failed, then %s" % r for r in retries]
        tr["same_address_retries"] = sum(1 for r in retries if r[1] == r[2])
        tr["unreachable_refusals"] = len(unreach)
        tr["retried_to_survivor"] = sum(1 for r in retries if r[1] == dead and r[2] != dead)
        # Once an address failed, new streams skip it (1 s, doubling): only the
        # stream that found it dead tried it.
        tried_dead = sorted({int(x) for x in re.findall(r"stream (\d+) \(amqp\): connect to %s:" % re.escape(dead), seg)})
        tr["streams_that_tried_the_dead_node"] = len(tried_dead)
        check(len(tried_dead) <= 1, "trial %d: streams %s all tried the dead node %s" % (k + 1, tried_dead, dead))
        check(not tr["same_address_retries"] and not unreach,
              "trial %d: a stream retried the dead address instead of the next one: %s; UNREACHABLE: %s"
              % (k + 1, tr["retries"], unreach))
        check(rnode != vnode, "trial %d: recovered on the killed node %d" % (k + 1, vnode))
        # Restart the killed node in the background while the survivor is checked.
        t_r = now()
        restart = subprocess.Popen(
            ["bash", "-c", 'set -euo pipefail; source "$VIOS_LIB/cluster.sh"; cluster_restart "$1" "$2"', "x", cd,
             str(vnode)], stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr,
            env=dict(os.environ, VIOS_LIB=w.lib))
        w.closers.append(lambda r=restart: r.poll() is None and (r.terminate(), r.wait(30)))
        try:
            got = []
            while True:
                m, _p, body = rch.basic_get(q, auto_ack=True)
                if m is None:
                    break
                got.append(body.decode())
            gotset = set(got)
            lost = [b for b in v.confirmed if b not in gotset]
            tr["confirmed_before_kill"] = len(v.confirmed)
            tr["found_on_survivor"] = len([b for b in got if b != "after-kill"])
            check(not lost, "trial %d: %d of %d confirmed messages lost on node %d: %s"
                  % (k + 1, len(lost), len(v.confirmed), rnode, lost[:5]))
            check("after-kill" in gotset, "trial %d: the recovery publish is not in the queue" % (k + 1))
            rch.queue_delete(q)
        finally:
            try:
                restart.wait(90)
            except subprocess.TimeoutExpired:
                restart.send_signal(signal.SIGTERM)
                restart.wait(30)
        check(restart.returncode == 0, "trial %d: cluster_restart of node %d failed" % (k + 1, vnode))
        t_back = now()
        tr["restart_s"] = r3(t_back - t_r)
        # New streams: to node 1 whenever it answers and its backoff is over.
        probes = 0
        while True:
            probes += 1
            pc = pika_connect(gp, timeout=3)
            pn, _ = node_of_conn(pc)
            pc.close()
            if pn == 1:
                break
            check(now() - t_back < 35, "trial %d: new streams still avoid node 1 %.0fs after it came back"
                  % (k + 1, now() - t_back))
            time.sleep(0.2)
        tr["new_stream_to_node1_after_s"] = r3(now() - t_back)
        tr["new_stream_probes"] = probes
        if vnode == 1:
            seg = host.text()[mark:]
            check("service amqp: 127.0.0.1:%d failed" % p1 in seg,
                  "trial %d: the host did not mark node 1 down" % (k + 1))
            check("service amqp: 127.0.0.1:%d answers again" % p1 in seg,
                  "trial %d: the host did not log node 1 answering again" % (k + 1))
        else:
            # The restarted node 2 serves (straight to it; the bridge's order
            # keeps new streams on node 1 while it answers).
            o, t, _ = pika_login(p2)
            check(o == "accepted", "trial %d: restarted node 2 does not serve: %s" % (k + 1, t))
        out.append(tr)
        note("trial %d: killed node %d, client saw %s after %.3fs, recovered on node %d after %.3fs "
             "(%d attempt(s)), %d/%d confirmed messages on the survivor, restart %.1fs"
             % (k + 1, vnode, kind, t_end - t_kill, rnode, t_ok - t_kill, attempts, tr["found_on_survivor"],
                tr["confirmed_before_kill"], t_back - t_r))
        try:
            victim.close()
        except Exception:
            pass
        victim, vnode, vsid = rconn, rnode, rsid
    rec = [t["recovery_s"] for t in out]
    res["trials"] = len(out)
    res["killed_node1"] = sum(1 for t in out if t["killed"] == 1)
    res["killed_node2"] = sum(1 for t in out if t["killed"] == 2)
    res["resets_seen"] = sum(1 for t in out if t["client_saw"] == "reset")
    res["recovery_p50_s"] = r3(statistics.median(rec))
    res["recovery_max_s"] = r3(max(rec))
    res["reset_after_kill_p50_s"] = r3(statistics.median([t["reset_after_kill_s"] for t in out]))
    res["restart_p50_s"] = r3(statistics.median([t["restart_s"] for t in out]))
    res["messages_confirmed_before_kills"] = sum(t["confirmed_before_kill"] for t in out)
    res["messages_lost"] = 0
    res["streams_retried_to_survivor"] = sum(t["retried_to_survivor"] for t in out)
    res["host_closes"] = sorted({re.sub(r"127\.0\.0\.1:\d+", "NODE", t["host_close"]) for t in out})
    try:
        victim.close()
    except Exception:
        pass


# ---------------------------------------------------------------------------
# scenario: reload


def scenario_reload(w, res):
    port = free_port()
    w.single("rabbit", port)
    e = {s: w.echo_server(s) for s in ("echo1", "echo2", "echo3")}
    ha, ga = w.standin("vm-a")
    hb, gb = w.standin("vm-b")
    conf = w.path("vios-host-bridge.conf")

    def write_conf(services, allow, extra=""):
        svc = ";".join("%s=127.0.0.1:%d,loopback=ok" % (s, port if s == "amqp" else e[s]) for s in services)
        text = ("# written by broker_scenarios.py reload\n"
                'VIOS_GUESTS="vm-a=%s;vm-b=%s"\n' % (ha, hb) +
                'VIOS_SERVICES="%s"\n' % svc +
                "VIOS_ALLOW='%s'\n" % allow + extra)
        tmp = conf + ".new"
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, conf)
        return text

    write_conf(["amqp", "echo1", "echo2"], "vm-a=*;vm-b=*")
    host = w.host_bridge("bridge", ["--config", conf])
    ports = {}
    guests = {}
    for gname, gs in (("vm-a", ga), ("vm-b", gb)):
        ports[gname] = {s: free_port() for s in ("amqp", "echo1", "echo2", "echo3")}
        guests[gname] = w.guest_bridge(gname, gs, [(p, s) for s, p in ports[gname].items()])
    wait_sessions(host, list(guests.values()), 2)

    streams = {}
    for label in ("vm-a.amqp", "vm-a.echo1", "vm-a.echo2", "vm-b.amqp", "vm-b.echo1"):
        gname, svc = label.split(".")
        t = amqp_traffic(label, ports[gname][svc]) if svc == "amqp" else echo_traffic(label, ports[gname][svc])
        t.guest = gname
        t.service = svc
        t.sid = stream_of_port(guests[gname], t.lport)
        addr = host_connected(host, gname, t.sid)
        want = "127.0.0.1:%d" % (port if svc == "amqp" else e[svc])
        check(addr == want, "%s connected to %s, not %s" % (label, addr, want))
        streams[label] = t
        w.closers.append(t.stop)
        t.start()
    time.sleep(0.5)
    for t in streams.values():
        check(t.end is None and t.count > 0, "%s does not work before any reload: %s" % (t.label, t.end))

    def short_echo(gname, svc):
        """A short echo through a guest's SVC listener: "ok", or how it failed."""
        data = ("%s %s %f\n" % (gname, svc, now())).encode()
        try:
            got, _lp = echo_once(ports[gname][svc], data)
        except OSError as ex:
            return kind_of(ex)
        return "ok" if got == data else "got %d of %d bytes" % (len(got), len(data))

    def short_refusal(gname, svc):
        kind, secs, got, lp = refused_at_once(ports[gname][svc])
        sid = stream_of_port(guests[gname], lp)
        how, why = host_ended(host, gname, sid)
        return kind, how, why.split(":")[0]

    steps = []
    res["steps"] = steps
    reloads = [0]
    refusals = [0]

    def step(name, write, expect_reset, expect_log, checks):
        counts = {l: t.count for l, t in streams.items()}
        live = [l for l, t in streams.items() if t.end is None]
        mark = len(host.text())
        write()
        t_hup = now()
        host.signal(signal.SIGHUP)
        if expect_log == "reloaded":
            reloads[0] += 1
            host.wait_log("configuration reloaded:", reloads[0], 10)
        else:
            refusals[0] += 1
            host.wait_log("reload refused, keeping the running configuration", refusals[0], 10)
        end = now() + 5
        while now() < end and not all(streams[l].end for l in expect_reset):
            time.sleep(0.02)
        time.sleep(1.0)  # traffic goes on; anything else reset would show now
        reset = sorted(l for l in live if streams[l].end is not None)
        info = {"step": name, "reset": reset, "log": None}
        for l in reset:
            t = streams[l]
            how, why = host_ended(host, t.guest, t.sid, after=0)
            info.setdefault("detail", {})[l] = {"client_saw": t.end[0], "after_sighup_s": r3(t.end[2] - t_hup),
                                                "host": "%s: %s" % (how, why.split(";")[0])}
        seg = host.text()[mark:]
        logl = [x.split("] ", 1)[-1] for x in seg.splitlines()
                if "configuration reloaded" in x or "reload refused" in x or "reload reset" in x]
        info["log"] = logl
        still = [l for l in live if l not in reset]
        info["kept_working"] = still
        steps.append(info)
        note("step %s: reset %s; log %s" % (name, reset, logl))
        check(reset == sorted(expect_reset), "step %s: reset %s, expected exactly %s" % (name, reset, expect_reset))
        n_reset = sum(int(m) for m in re.findall(r"reload reset (\d+) stream", seg))
        check(n_reset == len(expect_reset), "step %s: the host reset %d stream(s) on reload, expected %d"
              % (name, n_reset, len(expect_reset)))
        for l in expect_reset:
            check(streams[l].end[0] == "reset", "step %s: %s saw %s, not a reset" % (name, l, streams[l].end))
        for l in still:
            check(streams[l].count > counts[l] + 5, "step %s: %s stopped moving (%d -> %d pings)"
                  % (name, l, counts[l], streams[l].count))
        checks(info)

    # (a) a new service.
    k, how, code = short_refusal("vm-a", "echo3")
    check(k == "reset" and code == "UNKNOWN_SERVICE", "before echo3 exists: %s %s %s" % (k, how, code))

    def a_checks(info):
        for gname in ("vm-a", "vm-b"):
            r = short_echo(gname, "echo3")
            check(r == "ok", "echo3 from %s after the reload: %s" % (gname, r))
        info["echo3"] = "works for vm-a and vm-b"
        check(info["log"] and "services amqp, echo1, echo2, echo3" in info["log"][0], "reload log: %s" % info["log"])

    step("a: add echo3", lambda: write_conf(["amqp", "echo1", "echo2", "echo3"], "vm-a=*;vm-b=*"), [], "reloaded",
         a_checks)

    # (b) a service removed.
    def b_checks(info):
        d = info["detail"]["vm-a.echo2"]
        check("UNKNOWN_SERVICE" in d["host"], "vm-a.echo2 closed with %s" % d["host"])
        kk, hh, cc = short_refusal("vm-b", "echo2")
        check(kk == "reset" and cc == "UNKNOWN_SERVICE", "new echo2 stream: %s %s %s" % (kk, hh, cc))
        info["new_echo2"] = cc
        check(any("reload reset 1 stream(s)" in x for x in info["log"]), "no 'reload reset 1' line: %s" % info["log"])

    step("b: remove echo2", lambda: write_conf(["amqp", "echo1", "echo3"], "vm-a=*;vm-b=*"), ["vm-a.echo2"],
         "reloaded", b_checks)

    # (c) policy: vm-b may open only amqp.
    def c_checks(info):
        d = info["detail"]["vm-b.echo1"]
        check("NOT_PERMITTED" in d["host"], "vm-b.echo1 closed with %s" % d["host"])
        kk, hh, cc = short_refusal("vm-b", "echo3")
        check(kk == "reset" and cc == "NOT_PERMITTED", "vm-b to echo3: %s %s %s" % (kk, hh, cc))
        r = short_echo("vm-a", "echo3")
        check(r == "ok", "vm-a to echo3 after the policy change: %s" % (r,))
        info["vm_b_echo3"] = cc

    step("c: vm-b may open only amqp", lambda: write_conf(["amqp", "echo1", "echo3"], "vm-a=*;vm-b=amqp"),
         ["vm-b.echo1"], "reloaded", c_checks)

    # (d) a broken file: refused, nothing changes. Applied, it would have
    # taken amqp away (resetting both AMQP streams) and given vm-b echo1.
    def broken():
        with open(conf, "w") as f:
            f.write('# broken on purpose\nVIOS_GUESTS="vm-a=%s;vm-b=%s"\n'
                    'VIOS_SERVICES="echo1=127.0.0.1:%d,proxy=v9"\nVIOS_ALLOW="*=*"\n' % (ha, hb, e["echo1"]))

    def d_checks(info):
        check(any("reload refused" in x for x in info["log"]), "no refusal logged: %s" % info["log"])
        check(not any("configuration reloaded" in x for x in info["log"]), "reloaded anyway: %s" % info["log"])
        kk, hh, cc = short_refusal("vm-b", "echo3")
        check(cc == "NOT_PERMITTED", "after the broken file vm-b to echo3 gives %s" % cc)
        r = short_echo("vm-a", "echo3")
        check(r == "ok", "after the broken file vm-a to echo3: %s" % (r,))
        info["running_configuration"] = "kept (vm-b echo3 NOT_PERMITTED, vm-a echo3 works)"

    step("d: broken file", broken, [], "refused", d_checks)

    # (d2) a file that does not even parse.
    def broken2():
        with open(conf, "w") as f:
            f.write("this is not a VIOS line\n")

    step("d2: unparsable file", broken2, [], "refused", d_checks)

    for t in streams.values():
        t.stop()
    res["pings"] = {l: t.count for l, t in streams.items()}
    res["reset_by_step"] = {s["step"].split(":")[0]: s["reset"] for s in steps}
    res["reload_reset_latency_s"] = {l: d["after_sighup_s"] for s in steps for l, d in s.get("detail", {}).items()}
    res["step_b_reset_after_sighup_ms"] = round(steps[1]["detail"]["vm-a.echo2"]["after_sighup_s"] * 1000, 1)
    res["step_c_reset_after_sighup_ms"] = round(steps[2]["detail"]["vm-b.echo1"]["after_sighup_s"] * 1000, 1)
    for t in streams.values():
        if getattr(t, "conn", None) is not None:
            try:
                t.conn.close()
            except Exception:
                pass
        if getattr(t, "sock", None) is not None:
            t.sock.close()


# ---------------------------------------------------------------------------


SCENARIOS = {
    "proxy": (scenario_proxy, 150),
    "trust-inner": (scenario_trust_inner, 140),
    "policy": (scenario_policy, 150),
    "failover": (scenario_failover, 420),
    "reload": (scenario_reload, 150),
}


class Timeout(Exception):
    pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["proxy", "trust", "trust-inner", "policy", "failover", "reload"])
    p.add_argument("--bin", required=True, help="directory of the release binaries")
    p.add_argument("--repo", required=True, help="the repository (for scripts/lib)")
    p.add_argument("--trials", type=int, default=20, help="failover: trials (default 20)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args()

    name = "trust" if a.scenario == "trust-inner" else a.scenario
    res = {"scenario": name, "ok": False}
    t0 = now()

    def on_signal(sig, _frame):
        raise Timeout("signal %d" % sig)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    w = None
    failed = True
    try:
        if os.geteuid() != 0:
            raise Fail("needs root (network namespaces, private brokers)")
        if a.scenario == "trust":
            signal.alarm(200)
            scenario_trust_outer(a, res)
        else:
            fn, budget = SCENARIOS[a.scenario]
            signal.alarm(budget)
            w = World(a, name)
            fn(w, res)
        failed = False
        res["ok"] = True
    except Timeout as e:
        res["error"] = "stopped: %s (time limit or SIGTERM) after %.0fs" % (e, now() - t0)
    except Fail as e:
        res["error"] = str(e)[:4000]
    except Exception as e:  # noqa: BLE001
        res["error"] = "%r\n%s" % (e, traceback.format_exc()[-3000:])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if w is not None:
            w.cleanup(failed)
    if not res["ok"]:
        note("FAILED: " + res.get("error", "?"))
    res["seconds"] = round(now() - t0, 1)
    sys.stdout.write(json.dumps(res, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    # proton's destructors complain at interpreter shutdown; nothing is left to do.
    os._exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
