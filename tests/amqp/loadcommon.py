"""Shared helpers for tests/amqp/pika_load.py and tests/amqp/proton_load.py.

Standard library only.  Both load clients:
  * split --messages over --connections (first ones get the remainder),
  * generate random payloads (sizes random in [0, --size], always including
    0-byte and --size-byte ones),
  * track per connection the ordered list of sha256 digests that were sent and
    verify every received body against it (content + order),
  * print exactly ONE JSON line on stdout and exit 0 only on full success,
  * enforce --timeout with a watchdog that os._exit()s, so they never hang.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import threading
import time

MAX_ERRORS = 50

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_TIMEOUT = 3
EXIT_USAGE = 2


def parse_args(client, description, extra=None):
    p = argparse.ArgumentParser(prog=client + "_load", description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--messages", type=int, required=True,
                   help="total messages over all connections")
    p.add_argument("--size", type=int, default=1024,
                   help="max body size in bytes (default 1024)")
    p.add_argument("--queue-prefix", default="vios-load",
                   help="queue name prefix (default vios-load)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="overall deadline in seconds (default 120)")
    p.add_argument("--user", default="guest")
    p.add_argument("--password", default="guest")
    p.add_argument("--seed", type=int, default=None,
                   help="RNG seed for payloads (default: random)")
    if extra:
        extra(p)
    a = p.parse_args()
    if a.connections < 1:
        p.error("--connections must be >= 1")
    if a.messages < 0:
        p.error("--messages must be >= 0")
    if a.size < 0:
        p.error("--size must be >= 0")
    if a.timeout <= 0:
        p.error("--timeout must be > 0")
    if a.seed is None:
        a.seed = int.from_bytes(os.urandom(4), "big")
    return a


def split_messages(total, conns):
    base, rem = divmod(total, conns)
    return [base + (1 if i < rem else 0) for i in range(conns)]


def run_id():
    return "%d-%s" % (os.getpid(), os.urandom(3).hex())


class Payloads:
    """Deterministic random payload generator for one connection.

    Sizes: message 0 is empty, message 1 is --size bytes; after that ~5% empty,
    ~5% exactly --size, the rest uniform in [1, --size]."""

    def __init__(self, seed, index, max_size):
        self.rng = random.Random((seed << 16) ^ index)
        self.max = max_size

    def body(self, seq):
        if seq == 0 or self.max == 0:
            n = 0
        elif seq == 1:
            n = self.max
        else:
            r = self.rng.random()
            if r < 0.05:
                n = 0
            elif r < 0.10:
                n = self.max
            else:
                n = self.rng.randint(1, self.max)
        return self.rng.randbytes(n)


def digest(body):
    return hashlib.sha256(body).digest()


class Tracker:
    """Per-connection expected digests (in send order) and verification."""

    def __init__(self, index, expected_count):
        self.index = index
        self.expected_count = expected_count
        self.expected = []          # digests in publish order
        self.sent = 0               # published (attempted)
        self.confirmed = 0          # broker-confirmed
        self.received = 0
        self.verified = 0
        self.bytes = 0
        self.mismatch = 0
        self.state = "init"

    def add_sent(self, body):
        self.expected.append(digest(body))
        self.sent += 1

    def check(self, body, errors):
        """Verify the next received body. Returns True if it matched."""
        k = self.received
        self.received += 1
        d = digest(body)
        if k >= len(self.expected):
            errors.add("conn %d: unexpected extra message #%d (%d bytes)"
                       % (self.index, k, len(body)))
            self.mismatch += 1
            return False
        if self.expected[k] == d:
            self.verified += 1
            self.bytes += len(body)
            return True
        self.mismatch += 1
        if d in self.expected:
            errors.add("conn %d: message #%d out of order (matches #%d)"
                       % (self.index, k, self.expected.index(d)))
        else:
            errors.add("conn %d: message #%d corrupt (%d bytes, sha256 %s not sent)"
                       % (self.index, k, len(body), d.hex()[:16]))
        return False

    def done(self):
        return self.received >= self.expected_count


class Errors:
    """Thread-safe bounded error list.

    Identical messages from several connections are merged into one entry:
    add("cannot connect ...", "conn 3 producer") ->
    "cannot connect ... [conn 0 producer, conn 3 producer, ...; 16x]"."""

    def __init__(self):
        self.lock = threading.Lock()
        self.order = []             # distinct messages, first-seen order
        self.who = {}               # message -> list of sources
        self.dropped = 0

    def add(self, msg, who=None):
        with self.lock:
            if msg not in self.who:
                if len(self.order) >= MAX_ERRORS:
                    self.dropped += 1
                    return
                self.order.append(msg)
                self.who[msg] = []
            if who is not None:
                self.who[msg].append(who)

    def __len__(self):
        with self.lock:
            return len(self.order) + self.dropped

    def snapshot(self):
        with self.lock:
            out = []
            for m in self.order:
                w = self.who[m]
                if not w:
                    out.append(m)
                elif len(w) == 1:
                    out.append("%s: %s" % (w[0], m))
                else:
                    shown = ", ".join(sorted(w)[:4]) + (", ..." if len(w) > 4 else "")
                    out.append("%s [%s; %dx]" % (m, shown, len(w)))
            if self.dropped:
                out.append("... %d more distinct errors suppressed" % self.dropped)
            return out


class Reporter:
    """Prints the single JSON result line exactly once, then exits."""

    def __init__(self, client, args, trackers, errors):
        self.client = client
        self.args = args
        self.trackers = trackers
        self.errors = errors
        self.t0 = time.monotonic()
        self.t_end = None
        self.lock = threading.Lock()
        self.printed = False
        self.extra = {}

    def mark_end(self):
        if self.t_end is None:
            self.t_end = time.monotonic()

    def result(self):
        end = self.t_end if self.t_end is not None else time.monotonic()
        secs = max(end - self.t0, 1e-9)
        verified = sum(t.verified for t in self.trackers)
        errors = self.errors.snapshot()
        if verified != self.args.messages and not errors:
            errors.append("only %d of %d messages verified" % (verified, self.args.messages))
        out = {
            "client": self.client,
            "connections": self.args.connections,
            "messages": self.args.messages,
            "verified": verified,
            "seconds": round(secs, 3),
            "msgs_per_sec": round(verified / secs, 1),
            "errors": errors,
        }
        out["bytes"] = sum(t.bytes for t in self.trackers)
        out["max_size"] = self.args.size
        out["seed"] = self.args.seed
        out.update(self.extra)
        return out

    def finish(self, code=None):
        """Print the JSON line (once) and terminate the process."""
        with self.lock:
            if self.printed:
                return
            self.printed = True
            self.mark_end()
            out = self.result()
            if code is None:
                ok = (out["verified"] == self.args.messages and not out["errors"])
                code = EXIT_OK if ok else EXIT_FAIL
            try:
                sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")
                sys.stdout.flush()
            except Exception:
                pass
        # os._exit: do not wait for stuck threads / sockets
        os._exit(code)

    def start_watchdog(self, timeout, describe=None):
        """After `timeout` seconds, report a timeout and exit (never hangs)."""

        def fire():
            detail = ""
            if describe is not None:
                try:
                    detail = ": " + describe()
                except Exception as e:  # pragma: no cover
                    detail = ": (state unavailable: %s)" % e
            self.errors.add("timeout after %.1fs (%d/%d verified)%s" % (
                timeout, sum(t.verified for t in self.trackers), self.args.messages, detail))
            self.finish(EXIT_TIMEOUT)

        t = threading.Timer(timeout, fire)
        t.daemon = True
        t.start()
        return t


def describe_trackers(trackers):
    parts = []
    for t in trackers:
        if t.received < t.expected_count or t.state not in ("done",):
            parts.append("conn %d %s sent=%d confirmed=%d received=%d/%d"
                         % (t.index, t.state, t.sent, t.confirmed, t.received, t.expected_count))
    return "; ".join(parts[:8]) + ("; ..." if len(parts) > 8 else "")
