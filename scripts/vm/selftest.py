#!/usr/bin/env python3
"""Check that the test guest works, and print its numbers.

Usage:
  scripts/vm/selftest.py [--image DIR] [--bzimage] [--keep DIR]

Needs an image (scripts/vm/build-image). Boots guests with scripts/vm/run-vm
in a temporary channel directory (or DIR with --keep, left in place), and
checks, printing what it sees:
  1. boot to VIOS-GUEST-READY (time), virtio-serial nodes, symlinks, modules;
  2. raw port throughput guest->host (dd 64 KiB writes to /dev/vport0p1,
     the host reads the chardev socket) and host->guest;
  3. the console shell: status codes, syntax errors, Ctrl-C, exit;
  4. `reboot -f` restarts the guest inside the same QEMU process;
  5. a kernel panic reboots the guest too (panic=-1);
  6. vios.autostart=1 vios.args=... starts the guest bridge (its log).
Every QEMU it starts is stopped by pid before it exits. Exit status 0 when
all checks pass.
"""

import argparse
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in scripts/vm
HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("console", os.path.join(HERE, "console.py"))
console = importlib.util.module_from_spec(spec)
spec.loader.exec_module(console)

failures = []


def check(cond, what):
    print(("  ok   " if cond else "  FAIL ") + what)
    if not cond:
        failures.append(what)


class Guest:
    def __init__(self, name, chdir, image, bzimage, append="", ports=1):
        self.name = name
        cmd = [os.path.join(HERE, "run-vm"), "--name", name, "--channel-dir", chdir,
               "--image", image, "--ports", str(ports), "--append", append,
               "--console-log", os.path.join(chdir, f"{name}.console.log")]
        if bzimage:
            cmd.append("--bzimage")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()  # "run-vm: guest NAME: id N, ..."
        m = re.search(r"id (\d+)", line)
        if not m:
            raise RuntimeError(f"run-vm failed: {line}{self.proc.stderr.read()}")
        self.gdir = os.path.join(chdir, f"{m.group(1)}-{name}")
        self.con = console.Console(os.path.join(chdir, f"{name}.console.sock"))
        self.con.connect(self.t0 + 10)

    def wait_ready(self, timeout=60):
        """Wait for READY without probing (we connected before boot)."""
        deadline = time.monotonic() + timeout
        while console.READY not in self.con.buf:
            self.con._fill(deadline)
        i = self.con.buf.find(console.READY)
        before, self.con.buf = self.con.buf[:i], self.con.buf[i + len(console.READY):]
        return time.monotonic() - self.t0, before

    def run(self, cmd, timeout=30):
        return self.con.run(cmd, timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def host_reader(path, want, result):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(60)
    n, t0 = 0, None
    try:
        while n < want:
            b = s.recv(1 << 20)
            if not b:
                break
            if t0 is None:
                t0 = time.monotonic()
            n += len(b)
    finally:
        s.close()
    result.append((n, time.monotonic() - (t0 or time.monotonic())))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default=os.path.join(HERE, "..", "..", "target", "vm", "image"))
    ap.add_argument("--bzimage", action="store_true")
    ap.add_argument("--keep", metavar="DIR")
    a = ap.parse_args()
    image = os.path.abspath(a.image)
    chdir = a.keep or tempfile.mkdtemp(prefix="vios-vm-")
    os.makedirs(chdir, exist_ok=True)
    guests = []
    try:
        # 1. boot
        print("== boot")
        g = Guest("st1", chdir, image, a.bzimage)
        guests.append(g)
        t, before = g.wait_ready()
        boot = re.search(rb"VIOS-GUEST-BOOT [^\n]*", before)
        print(f"  boot to READY {t:.2f} s; {boot.group(0).decode() if boot else 'no BOOT line'}")
        check(boot is not None, "VIOS-GUEST-BOOT before READY")
        out, rc = g.run("ls -l /dev/virtio-ports/ /dev/vport*; cat /sys/class/virtio-ports/*/name; cat /proc/modules")
        print("  | " + out.decode().rstrip("\n").replace("\n", "\n  | "))
        check(rc == 0 and b"org.qpid.vios.0 -> ../vport0p1" in out, "/dev/virtio-ports/org.qpid.vios.0 -> ../vport0p1")
        check(b"virtio_console" in out, "virtio_console loaded")
        out, rc = g.run("ping -c1 -W1 127.0.0.1 >/dev/null && echo lo-ok; dmesg | grep -c 'crng init done'")
        check(b"lo-ok" in out, "127.0.0.1 answers in the guest")
        check(out.strip().endswith(b"1"), "random pool ready (virtio-rng)")

        # 2. throughput
        print("== raw port throughput")
        chan = os.path.join(g.gdir, "org.qpid.vios.0")
        for bs, count in (("64k", 4000), ("4k", 16000)):
            size = count * (65536 if bs == "64k" else 4096)
            res = []
            th = threading.Thread(target=host_reader, args=(chan, size, res))
            th.start()
            time.sleep(0.3)
            out, rc = g.run(f"dd if=/dev/zero of=/dev/vport0p1 bs={bs} count={count} 2>/dev/null", 60)
            th.join(60)
            n, secs = res[0] if res else (0, 0)
            mbs = n / secs / 1e6 if secs else 0
            print(f"  guest->host, {bs} writes: {n} bytes in {secs:.3f} s = {mbs:.0f} MB/s")
            check(n == size, f"host received all {size} bytes ({bs} writes)")
        # host -> guest: the guest reads with dd (fullblock: a read of the
        # port returns at most 4 KiB) and reports the records it got
        size = 64 * 1024 * 1024
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(chan)
        g.con.send(f"dd if=/dev/vport0p1 of=/dev/null bs=64k count={size // 65536} iflag=fullblock 2>&1 "
                   f"| head -1\necho __VIOS_RC_h2g=$?__\n".encode())
        time.sleep(0.3)
        t0 = time.monotonic()
        s.sendall(b"\0" * size)
        deadline = time.monotonic() + 60
        while not re.search(rb"__VIOS_RC_h2g=\d+__\n", g.con.buf):
            g.con._fill(deadline)
        secs = time.monotonic() - t0
        m = re.search(rb"(\d+)\+0 records in\n__VIOS_RC_h2g=(\d+)__\n", g.con.buf)
        g.con.buf = b""
        s.close()
        got = int(m.group(1)) * 65536 if m else 0
        print(f"  host->guest, guest reads via dd: {got} bytes in {secs:.3f} s = {got / secs / 1e6:.0f} MB/s")
        check(got == size, f"guest received all {size} bytes")

        # 3. console shell behaviour
        print("== console shell")
        out, rc = g.run("false")
        check(rc == 1, f"status of false is 1 (got {rc})")
        out, rc = g.run("printf 'no newline'")
        check(out == b"no newline" and rc == 0, "output without trailing newline kept exactly")
        out, rc = g.run("if then")
        check(rc == 2 and b"syntax error" in out, f"syntax error -> status 2, shell survives (got {rc})")
        out, rc = g.run("echo $$")
        pid = out.strip()
        g.con.send(b"sleep 100\n")
        time.sleep(0.5)
        g.con.send(b"\x03")
        out, rc = g.run("echo $$")
        check(out.strip() == pid and rc == 0, "Ctrl-C stops the command, same shell")
        out, rc = g.run("exit 3")
        check(rc is None, "exit ends the shell (no status)")
        t, _ = g.wait_ready(10)
        check(True, "READY again after exit")

        # 4. reboot -f
        print("== reboot -f")
        out, rc = g.run("cat /proc/sys/kernel/random/boot_id")
        boot1 = out.strip()
        qemu_pid = g.proc.pid
        t0 = time.monotonic()
        g.run("reboot -f", 60)
        g.t0 = t0
        t, before = g.wait_ready()
        out, rc = g.run("cat /proc/sys/kernel/random/boot_id; ls /dev/virtio-ports/")
        print(f"  READY again {t:.2f} s after reboot -f; QEMU pid {qemu_pid} "
              f"{'still running' if g.proc.poll() is None else 'EXITED'}")
        check(b"VIOS-GUEST-BOOT" in before, "VIOS-GUEST-BOOT after reboot")
        check(out.split(b"\n")[0] != boot1 and b"org.qpid.vios.0" in out, "new boot_id, port back")
        check(g.proc.poll() is None, "same QEMU process")

        # 5. panic
        print("== kernel panic")
        t0 = time.monotonic()
        g.con.send(b"echo 1 >/proc/sys/kernel/sysrq; echo c >/proc/sysrq-trigger\n")
        g.t0 = t0
        t, before = g.wait_ready()
        print(f"  READY again {t:.2f} s after the panic")
        check(b"VIOS-GUEST-BOOT" in before and g.proc.poll() is None, "panic reboots in the same QEMU")
        g.stop()

        # 6. autostart
        print("== vios.autostart=1")
        g2 = Guest("st2", chdir, image, a.bzimage, ports=2,
                   append="vios.autostart=1 vios.args=--channel,org.qpid.vios.0,--idle-timeout,3s")
        guests.append(g2)
        g2.wait_ready()
        out, rc = g2.run("sleep 1; cat /tmp/guest-bridge.log; ls /dev/virtio-ports/; "
                         "kill -0 $(cat /run/vios-guest-bridge.pid) && echo bridge-running")
        print("  | " + out.decode().rstrip("\n").replace("\n", "\n  | "))
        check(b"listening on 127.0.0.1:5672" in out, "guest bridge listens on 127.0.0.1:5672")
        check(b"bridge-running" in out, "guest bridge running")
        check(b"org.qpid.vios.1" in out, "second port with --ports 2")
        g2.stop()
    finally:
        for g in guests:
            g.stop()
        if not a.keep:
            shutil.rmtree(chdir, ignore_errors=True)
    print(f"{len(failures)} failed" if failures else "all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
