#!/usr/bin/env python3
"""Talk to a vios test guest's serial console (for humans debugging).

Usage:
  scripts/vm/console.py [--timeout S] [--boot-timeout S] SOCK [COMMAND...]

  SOCK      the console socket of scripts/vm/run-vm (--console; default
            CHANNEL_DIR/NAME.console.sock)
  COMMAND   a shell command line to run in the guest (several words are
            joined with spaces). Its output is printed and its exit status
            becomes ours (255 when it has none: timeout, shell exited,
            guest rebooted). Without COMMAND: read command lines from stdin,
            one at a time, printing each one's output and "[rc=N]".

  --boot-timeout S  how long to wait for the guest to be ready (default 60)
  --timeout S       how long one command may take (default 30)

It implements the protocol documented at the top of scripts/vm/init:
connect (retrying until the socket exists), then wait for the line
VIOS-GUEST-READY; since QEMU drops console output while nobody is connected,
a guest that is already up never prints it, so every second it also sends
`echo __VIOS_SYNC_""<token>__` and takes __VIOS_SYNC_<token>__ as "ready" too.
Each command is sent as `<command>\\n echo __VIOS_RC_<token>=$?__\\n` and its
output is everything before the marker. With -v, raw lines the guest prints
while we wait for it to be ready go to stderr.
"""

import argparse
import os
import re
import secrets
import socket
import sys
import time

READY = b"VIOS-GUEST-READY\n"
BOOT = b"VIOS-GUEST-BOOT "


class Console:
    def __init__(self, path, verbose=False):
        self.path = path
        self.verbose = verbose
        self.buf = b""
        self.sock = None

    def connect(self, deadline):
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                self.sock = s
                return
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cannot connect to {self.path}")
                time.sleep(0.05)

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(min(left, 1.0))
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        if not chunk:
            raise EOFError("console closed (QEMU exited?)")
        self.buf += chunk
        return True

    def wait_ready(self, timeout):
        """Wait for READY (or the answer to a sync probe), then sync once more
        and drop everything before that answer: echoes of probes sent while
        the guest booted, complaints about probes cut short, late answers."""
        deadline = time.monotonic() + timeout
        token = secrets.token_hex(6)
        sync = f"__VIOS_SYNC_{token}__\n".encode()
        next_probe = time.monotonic()  # probe at once, then every second
        while True:
            hits = [(self.buf.find(m), m) for m in (READY, sync)]
            hits = [(i, m) for i, m in hits if i >= 0]
            if hits:
                i, m = min(hits)
                if self.verbose:
                    sys.stderr.buffer.write(self.buf[: i + len(m)])
                self.buf = self.buf[i + len(m):]
                break
            if time.monotonic() >= next_probe:
                self.send(f'echo __VIOS_SYNC_""{token}__\n'.encode())
                next_probe = time.monotonic() + 1.0
            self._fill(deadline)
        token = secrets.token_hex(6)
        sync = f"__VIOS_SYNC_{token}__\n".encode()
        self.send(f'echo __VIOS_SYNC_""{token}__\n'.encode())
        while sync not in self.buf:
            self._fill(deadline)
        i = self.buf.find(sync)
        if self.verbose:
            sys.stderr.buffer.write(self.buf[:i])
        self.buf = self.buf[i + len(sync):]

    def run(self, command, timeout=30.0):
        """Run one command line; returns (output bytes, rc or None)."""
        token = secrets.token_hex(6)
        self.send(f"{command}\necho __VIOS_RC_{token}=$?__\n".encode())
        end = re.compile(rb"__VIOS_RC_" + token.encode() + rb"=([0-9]+)__\n")
        deadline = time.monotonic() + timeout
        while True:
            m = end.search(self.buf)
            if m:
                out, self.buf = self.buf[: m.start()], self.buf[m.end():]
                return out, int(m.group(1))
            for marker in (READY, BOOT):
                i = self.buf.find(marker)
                if i >= 0:  # shell exited or guest rebooted: no status
                    out = self.buf[:i]
                    self.buf = self.buf[i:]
                    return out, None
            try:
                self._fill(deadline)
            except TimeoutError:
                out, self.buf = self.buf, b""
                return out, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--boot-timeout", type=float, default=60.0)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("sock")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()

    con = Console(a.sock, a.verbose)
    t0 = time.monotonic()
    con.connect(t0 + a.boot_timeout)
    try:
        con.wait_ready(a.boot_timeout - (time.monotonic() - t0))
    except TimeoutError:
        sys.exit(f"console.py: guest not ready after {a.boot_timeout:g} s")
    print(f"console.py: guest ready ({time.monotonic() - t0:.2f} s after connecting)", file=sys.stderr)

    if a.command:
        out, rc = con.run(" ".join(a.command), a.timeout)
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
        print(f"console.py: exit status {rc if rc is not None else 'unknown'}", file=sys.stderr)
        sys.exit(255 if rc is None else rc)

    interactive = os.isatty(0)
    while True:
        if interactive:
            print("guest# ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        out, rc = con.run(line, a.timeout)
        sys.stdout.buffer.write(out)
        print(f"[rc={rc if rc is not None else 'unknown (timeout, shell exit or reboot)'}]", flush=True)
        if rc is None and con.buf.startswith((READY, BOOT)):
            con.wait_ready(a.boot_timeout)


if __name__ == "__main__":
    main()
