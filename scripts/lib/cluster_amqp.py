#!/usr/bin/python3
"""scripts/lib/cluster_amqp.py -- tiny AMQP 0-9-1 client for the broker
harness self-tests (scripts/lib/selftest-brokers.sh).

Run it with /usr/bin/python3 (Debian's python3-pika lives there, not in the
pyenv python3 that may be first on PATH).

  publish --port P --queue Q --count N      declare durable Q, publish N
                                            persistent messages "m-0".."m-<N-1>"
                                            with publisher confirms
  consume --port P --queue Q --count N      retry (connect + passive declare +
          [--timeout S]                     basic.get) until exactly the N
                                            messages published above were got
                                            and acked, or S seconds passed;
                                            prints the time to first success
  login   --host H --port P                 exit 0 if the login is accepted,
                                            3 if refused (403 ACCESS_REFUSED /
                                            authentication failure), 1 otherwise
  hold    --host H --port P                 connect, print "connected
                                            LOCAL -> PEER", keep the connection
                                            open until stdin reaches EOF

Common options: --host (default 127.0.0.1), --user/--password (guest/guest),
--vhost (/).  Every outcome is one line on stdout.
"""
import argparse
import select
import sys
import time

import pika
import pika.exceptions as pe


def params(a, attempts=1):
    return pika.ConnectionParameters(
        host=a.host,
        port=a.port,
        virtual_host=a.vhost,
        credentials=pika.PlainCredentials(a.user, a.password),
        connection_attempts=attempts,
        retry_delay=0.2,
        socket_timeout=3,
        blocked_connection_timeout=10,
        heartbeat=0,
    )


def cmd_publish(a):
    conn = pika.BlockingConnection(params(a))
    ch = conn.channel()
    ch.queue_declare(a.queue, durable=True)
    ch.confirm_delivery()
    for i in range(a.count):
        ch.basic_publish(
            "",
            a.queue,
            ("m-%d" % i).encode(),
            pika.BasicProperties(delivery_mode=2),
            mandatory=True,
        )
    conn.close()
    print("published %d confirmed messages to %s on %s:%d" % (a.count, a.queue, a.host, a.port))
    return 0


def cmd_consume(a):
    t0 = time.monotonic()
    deadline = t0 + a.timeout
    last_err = None
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        conn = None
        try:
            conn = pika.BlockingConnection(params(a))
            ch = conn.channel()
            ch.queue_declare(a.queue, durable=True, passive=True)
            first = time.monotonic()
            got = []
            while len(got) < a.count:
                m, _props, body = ch.basic_get(a.queue, auto_ack=False)
                if m is None:
                    break
                got.append(body.decode())
                ch.basic_ack(m.delivery_tag)
            want = ["m-%d" % i for i in range(a.count)]
            if sorted(got) != sorted(want):
                print("consume: got %d/%d messages from %s: %s" % (len(got), a.count, a.queue, got[:5]))
                return 1
            conn.close()
            print("consumed %d/%d messages from %s on %s:%d, queue usable %.2fs after start (%d tries)"
                  % (len(got), a.count, a.queue, a.host, a.port, first - t0, tries))
            return 0
        except (pe.AMQPError, OSError) as e:
            last_err = e
            try:
                if conn is not None and conn.is_open:
                    conn.close()
            except Exception:
                pass
            time.sleep(0.2)
    print("consume: queue %s on %s:%d not usable within %.0fs: %r" % (a.queue, a.host, a.port, a.timeout, last_err))
    return 1


def refused(e):
    s = repr(e)
    return (
        isinstance(e, (pe.ProbableAccessDeniedError, pe.ProbableAuthenticationError, pe.AuthenticationError))
        or "403" in s
        or "ACCESS_REFUSED" in s
    )


def cmd_login(a):
    try:
        conn = pika.BlockingConnection(params(a))
    except pe.AMQPConnectionError as e:
        # pika wraps the broker's reason in the last attempt's exception
        inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else e
        if refused(e) or refused(inner):
            print("login %s@%s:%d refused: %r" % (a.user, a.host, a.port, inner))
            return 3
        print("login %s@%s:%d failed: %r" % (a.user, a.host, a.port, inner))
        return 1
    conn.close()
    print("login %s@%s:%d accepted" % (a.user, a.host, a.port))
    return 0


def cmd_hold(a):
    conn = pika.BlockingConnection(params(a))
    sock = conn._impl._transport._sock  # only for printing the addresses
    lo, pe_ = sock.getsockname(), sock.getpeername()
    print("connected %s:%d -> %s:%d as %s" % (lo[0], lo[1], pe_[0], pe_[1], a.user), flush=True)
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 0.5)
        if r and not sys.stdin.readline():
            break
        conn.process_data_events(time_limit=0)
    conn.close()
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["publish", "consume", "login", "hold"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", default="guest")
    p.add_argument("--password", default="guest")
    p.add_argument("--vhost", default="/")
    p.add_argument("--queue", default="vios-selftest")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--timeout", type=float, default=30)
    a = p.parse_args()
    return {"publish": cmd_publish, "consume": cmd_consume, "login": cmd_login, "hold": cmd_hold}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
