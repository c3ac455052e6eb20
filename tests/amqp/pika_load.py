#!/usr/bin/python3
"""AMQP 0-9-1 load / integrity test (pika BlockingConnection).

For each of --connections workers:
  * a producer thread with its own BlockingConnection declares a uniquely
    named queue (x-expires safety net, deleted explicitly at the end) and
    publishes its share of --messages random bodies with publisher confirms
    (mandatory, so an unroutable message is an error);
  * a consumer thread with a second BlockingConnection consumes the same queue
    concurrently (manual acks) and verifies every body by sha256 against the
    producer's ordered list (content and order).
  With --same-connection the worker uses ONE connection: publish all, then
  consume all.

Prints exactly one JSON line on stdout:
  {"client":"pika","connections":C,"messages":M,"verified":K,"seconds":T,
   "msgs_per_sec":R,"errors":[...], ...extra keys}
Exit 0 only if all M messages were verified and there were no errors;
1 on failure, 3 on --timeout, 2 on usage error.

Must run under Debian's /usr/bin/python3 (python3-pika).
"""

import os
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loadcommon as lc  # noqa: E402

try:
    import pika  # noqa: E402
    import pika.exceptions as pex  # noqa: E402
except ImportError as e:  # pragma: no cover
    sys.stdout.write('{"client":"pika","errors":["cannot import pika (run with /usr/bin/python3, '
                     'apt install python3-pika): %s"]}\n' % str(e).replace('"', "'"))
    sys.exit(lc.EXIT_FAIL)

import logging  # noqa: E402

logging.getLogger("pika").setLevel(logging.CRITICAL)

PREFETCH = 500
ACK_EVERY = 100


def _innermost(e):
    """Unwrap pika's nested connection-workflow exceptions."""
    seen = 0
    while seen < 10:
        seen += 1
        inner = getattr(e, "exception", None)
        if isinstance(inner, BaseException):
            e = inner
            continue
        if getattr(e, "args", None) and isinstance(e.args[0], BaseException):
            e = e.args[0]
            continue
        break
    return e


def _fmt(e):
    if isinstance(e, OSError) and e.strerror:
        return "%s: %s" % (type(e).__name__, e.strerror)
    text = str(e) or repr(e)
    return "%s: %s" % (type(e).__name__, text)


def describe_exc(e, args):
    """Human-readable one-liner for pika / socket exceptions."""
    if isinstance(e, pex.AMQPConnectionError) and not isinstance(
            e, (pex.ConnectionClosed, pex.StreamLostError, pex.ConnectionWrongStateError)):
        inner = _innermost(e)
        return "cannot connect to %s:%d: %s" % (args.host, args.port, _fmt(inner))
    if type(e).__name__.startswith("AMQPConnector"):   # e.g. handshake timeout
        return "cannot connect to %s:%d: %s" % (args.host, args.port, _fmt(_innermost(e)))
    if isinstance(e, pex.ChannelClosedByBroker):
        return "channel closed by broker: %d %s" % (e.reply_code, e.reply_text)
    if isinstance(e, pex.ConnectionClosedByBroker):
        return "connection closed by broker: %d %s" % (e.reply_code, e.reply_text)
    if isinstance(e, OSError):
        return _fmt(e)
    return _fmt(e)


def make_params(args):
    return pika.ConnectionParameters(
        host=args.host,
        port=args.port,
        virtual_host="/",
        credentials=pika.PlainCredentials(args.user, args.password),
        connection_attempts=1,
        retry_delay=0,
        socket_timeout=5,
        stack_timeout=15,
        blocked_connection_timeout=30,
    )


class Worker:
    def __init__(self, index, count, args, rid, errors, abort, deadline):
        self.index = index
        self.count = count
        self.args = args
        self.queue = "%s-pika-%s-%d" % (args.queue_prefix, rid, index)
        self.errors = errors
        self.abort = abort
        self.deadline = deadline
        self.tracker = lc.Tracker(index, count)
        self.payloads = lc.Payloads(args.seed, index, args.size)
        self.declare_args = {"x-expires": int((args.timeout + 60) * 1000)}
        self.producer_done = threading.Event()

    def fail(self, role, e):
        msg = describe_exc(e, self.args) if isinstance(e, BaseException) else str(e)
        self.errors.add(msg, "conn %d %s" % (self.index, role))
        self.tracker.state = "failed"
        self.abort.set()

    # -- producer -----------------------------------------------------------
    def publish_all(self, ch):
        props_base = dict(content_type="application/octet-stream", delivery_mode=1)
        for seq in range(self.count):
            if self.abort.is_set():
                return
            body = self.payloads.body(seq)
            self.tracker.add_sent(body)
            ch.basic_publish(
                exchange="",
                routing_key=self.queue,
                body=body,
                properties=pika.BasicProperties(message_id="%d:%d" % (self.index, seq),
                                                **props_base),
                mandatory=True,
            )
            # confirm_delivery() makes basic_publish synchronous: returning
            # means the broker acked it (nack/unroutable raise).
            self.tracker.confirmed += 1

    def producer(self):
        conn = None
        try:
            self.tracker.state = "connecting"
            conn = pika.BlockingConnection(make_params(self.args))
            ch = conn.channel()
            ch.confirm_delivery()
            ch.queue_declare(self.queue, durable=False, arguments=self.declare_args)
            self.tracker.state = "publishing"
            self.publish_all(ch)
            if self.tracker.state == "publishing":
                self.tracker.state = "published"
        except Exception as e:
            self.fail("producer", e)
        finally:
            self.producer_done.set()
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass

    # -- consumer -----------------------------------------------------------
    def consume_all(self, ch):
        t = self.tracker
        ch.basic_qos(prefetch_count=PREFETCH)
        unacked = 0
        last_tag = None
        for method, _props, body in ch.consume(self.queue, auto_ack=False,
                                               inactivity_timeout=0.5):
            if method is not None:
                t.check(body, self.errors)
                last_tag = method.delivery_tag
                unacked += 1
                if unacked >= ACK_EVERY or t.done():
                    ch.basic_ack(last_tag, multiple=True)
                    unacked = 0
            if t.done() or self.abort.is_set() or time.monotonic() > self.deadline:
                break
        if unacked and last_tag is not None:
            ch.basic_ack(last_tag, multiple=True)
        ch.cancel()

    def consumer(self, conn=None):
        own = conn is None
        try:
            if own:
                conn = pika.BlockingConnection(make_params(self.args))
            ch = conn.channel()
            ch.queue_declare(self.queue, durable=False, arguments=self.declare_args)
            self.tracker.state = "consuming"
            if self.count > 0:
                self.consume_all(ch)
            if self.tracker.done():
                # wait for producer to finish before deleting the queue
                self.producer_done.wait(max(0.0, self.deadline - time.monotonic()))
                ch.queue_delete(self.queue)
                if self.tracker.state != "failed":
                    self.tracker.state = "done"
        except Exception as e:
            self.fail("consumer", e)
        finally:
            if own and conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass

    def same_connection(self):
        conn = None
        try:
            self.tracker.state = "connecting"
            conn = pika.BlockingConnection(make_params(self.args))
            ch = conn.channel()
            ch.confirm_delivery()
            ch.queue_declare(self.queue, durable=False, arguments=self.declare_args)
            self.tracker.state = "publishing"
            self.publish_all(ch)
            ch.close()
        except Exception as e:
            self.fail("producer", e)
            self.producer_done.set()
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
            return
        self.producer_done.set()
        self.consumer(conn)
        try:
            conn.close()
        except Exception:
            pass


def main():
    def extra(p):
        p.add_argument("--same-connection", action="store_true",
                       help="publish then consume on one connection per worker "
                            "(default: separate concurrent consumer connection)")

    args = lc.parse_args("pika", __doc__.splitlines()[0], extra)
    errors = lc.Errors()
    abort = threading.Event()
    rid = lc.run_id()
    deadline = time.monotonic() + args.timeout
    counts = lc.split_messages(args.messages, args.connections)
    workers = [Worker(i, n, args, rid, errors, abort, deadline) for i, n in enumerate(counts)]
    trackers = [w.tracker for w in workers]
    rep = lc.Reporter("pika", args, trackers, errors)
    rep.extra["tcp_connections"] = args.connections * (1 if args.same_connection else 2)
    rep.extra["queue_prefix"] = "%s-pika-%s" % (args.queue_prefix, rid)
    rep.start_watchdog(args.timeout, lambda: lc.describe_trackers(trackers))

    threads = []
    for w in workers:
        if args.same_connection:
            threads.append(threading.Thread(target=w.same_connection, daemon=True))
        else:
            threads.append(threading.Thread(target=w.producer, daemon=True))
            threads.append(threading.Thread(target=w.consumer, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rep.finish()


if __name__ == "__main__":
    main()
