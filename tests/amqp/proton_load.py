#!/usr/bin/python3
"""AMQP 1.0 load / integrity test (python3-qpid-proton reactor).

One proton Container drives --connections connections concurrently.  Each
connection attaches a sender and a receiver to its own queue (address
"/queue/<name>" by default -- RabbitMQ 3.10's rabbitmq_amqp1_0 plugin declares
that queue on attach), sends its share of --messages random bodies (AMQP data
sections) and counts broker dispositions (accepted == confirmed), while the
receiver verifies every body by sha256 against the ordered list of what was
sent (content and order).

Queue life cycle: queues declared by the 1.0 plugin are non-durable but are
NOT deleted afterwards (AMQP 1.0 in RabbitMQ 3.10 cannot delete queues).
With --predeclare the queue is instead declared over AMQP 0-9-1 (pika, same
host/port) with x-expires, addressed as "/amq/queue/<name>", and deleted at
the end.

Prints exactly one JSON line on stdout:
  {"client":"proton","connections":C,"messages":M,"verified":K,"seconds":T,
   "msgs_per_sec":R,"errors":[...], ...extra keys}
Exit 0 only if all M messages were verified and there were no errors;
1 on failure, 3 on --timeout, 2 on usage error.

Must run under Debian's /usr/bin/python3 (python3-qpid-proton).
"""

import os
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loadcommon as lc  # noqa: E402

try:
    from proton import Message  # noqa: E402
    from proton.handlers import MessagingHandler  # noqa: E402
    from proton.reactor import Container  # noqa: E402
except ImportError as e:  # pragma: no cover
    sys.stdout.write('{"client":"proton","errors":["cannot import proton (run with /usr/bin/python3, '
                     'apt install python3-qpid-proton): %s"]}\n' % str(e).replace('"', "'"))
    sys.exit(lc.EXIT_FAIL)

PREFETCH = 500          # receiver credit window
MAX_INFLIGHT = 1000     # unconfirmed (unsettled) messages per sender
SEND_BATCH = 100        # messages sent per reactor callback


def cond_text(cond):
    if cond is None:
        return "no error condition"
    if cond.description:
        return "%s: %s" % (cond.name, cond.description)
    return str(cond.name)


class Worker(MessagingHandler):
    """Handler for one connection: one sender + one receiver on one queue."""

    def __init__(self, main, index, count):
        super().__init__(prefetch=PREFETCH, auto_accept=True, auto_settle=True)
        self.main = main
        self.index = index
        self.count = count
        self.queue = "%s-proton-%s-%d" % (main.args.queue_prefix, main.rid, index)
        self.address = main.args.address_template.format(queue=self.queue)
        self.tracker = lc.Tracker(index, count)
        self.payloads = lc.Payloads(main.args.seed, index, main.args.size)
        self.conn = None
        self.sender = None
        self.receiver = None
        self.finished = False
        self.next_seq = 0
        self.unsettled_problem = 0

    # -- life cycle -----------------------------------------------------------
    def open(self, container):
        a = self.main.args
        self.tracker.state = "connecting"
        self.conn = container.connect(
            url="amqp://%s:%d" % (a.host if ":" not in a.host else "[%s]" % a.host, a.port),
            handler=self,
            reconnect=False,
            user=a.user,
            password=a.password,
            allowed_mechs=a.sasl_mechs,
            allow_insecure_mechs=True,
            sasl_enabled=True,
        )
        self.receiver = container.create_receiver(self.conn, self.address, name="rx-%s" % self.queue)
        self.sender = container.create_sender(self.conn, self.address, name="tx-%s" % self.queue)

    def error(self, msg):
        self.main.errors.add(msg, "conn %d" % self.index)
        self.tracker.state = "failed"
        self.finish()
        self.main.abort()

    def finish(self):
        if self.finished:
            return
        self.finished = True
        if self.tracker.state != "failed":
            self.tracker.state = "done"
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
        self.main.worker_finished(self)

    def check_done(self):
        t = self.tracker
        if not self.finished and t.received >= self.count and t.confirmed >= self.count:
            self.finish()

    # -- connection events ------------------------------------------------------
    def on_connection_opened(self, event):
        if self.tracker.state == "connecting":
            self.tracker.state = "attaching"

    def on_link_opened(self, event):
        if self.sender is not None and self.receiver is not None \
                and self.sender.state & self.sender.REMOTE_ACTIVE \
                and self.receiver.state & self.receiver.REMOTE_ACTIVE:
            self.tracker.state = "running"
            self.main.worker_running()
            if self.count == 0:
                self.check_done()

    def on_transport_error(self, event):
        if self.finished:
            return
        a = self.main.args
        self.error("transport error talking to %s:%d: %s"
                   % (a.host, a.port, cond_text(event.transport.condition)))

    def on_connection_error(self, event):
        if not self.finished:
            self.error("connection closed by peer: %s" % cond_text(event.connection.remote_condition))

    def on_session_error(self, event):
        if not self.finished:
            self.error("session ended by peer: %s" % cond_text(event.session.remote_condition))

    def on_link_error(self, event):
        if not self.finished:
            self.error("link %s detached by peer: %s"
                       % (event.link.name, cond_text(event.link.remote_condition)))

    def on_disconnected(self, event):
        if self.finished:
            return
        a = self.main.args
        cond = event.transport.condition if event.transport is not None else None
        why = cond_text(cond) if cond is not None else "connection lost"
        if self.tracker.state == "connecting":
            self.error("cannot connect to %s:%d: %s" % (a.host, a.port, why))
        else:
            self.error("disconnected from %s:%d while %s: %s"
                       % (a.host, a.port, self.tracker.state, why))

    def on_connection_closed(self, event):
        if not self.finished:
            self.error("connection closed by peer before completion")

    # -- sending ------------------------------------------------------------------
    def on_sendable(self, event):
        self.send_some()

    def send_some(self):
        # Bounded: at most MAX_INFLIGHT unconfirmed messages and SEND_BATCH
        # per callback, so one connection never starves the reactor (the
        # broker may grant a lot of credit); more is sent as acks arrive.
        snd = self.sender
        if snd is None:
            return
        budget = min(SEND_BATCH, MAX_INFLIGHT - (self.tracker.sent - self.tracker.confirmed))
        while budget > 0 and snd.credit > 0 and self.next_seq < self.count and not self.finished:
            budget -= 1
            seq = self.next_seq
            self.next_seq += 1
            body = self.payloads.body(seq)
            self.tracker.add_sent(body)
            msg = Message(body=body, inferred=True, durable=False,
                          id="%d:%d" % (self.index, seq),
                          content_type="application/octet-stream")
            snd.send(msg)

    def on_accepted(self, event):
        self.tracker.confirmed += 1
        self.check_done()
        if self.next_seq < self.count and not self.finished:
            self.send_some()

    def on_rejected(self, event):
        self.error("message rejected by broker: %s"
                   % cond_text(event.delivery.remote.condition))

    def on_released(self, event):
        # on_released is also dispatched for 'modified' outcomes
        self.error("message released/modified by broker (not delivered)")

    # -- receiving ----------------------------------------------------------------
    def on_message(self, event):
        body = event.message.body
        if body is None:
            body = b""
        elif isinstance(body, memoryview):
            body = body.tobytes()
        elif isinstance(body, str):
            self.main.errors.add("received a string body, expected binary", "conn %d" % self.index)
            body = body.encode("utf-8")
        elif not isinstance(body, (bytes, bytearray)):
            self.main.errors.add("received body of type %s, expected binary" % type(body).__name__,
                                 "conn %d" % self.index)
            body = repr(body).encode()
        self.tracker.check(bytes(body), self.main.errors)
        self.check_done()


class Main(MessagingHandler):
    def __init__(self, args, rid, counts, errors, rep):
        super().__init__()
        self.args = args
        self.rid = rid
        self.errors = errors
        self.rep = rep
        self.workers = [Worker(self, i, n) for i, n in enumerate(counts)]
        self.container = None
        self.remaining = len(self.workers)
        self.aborted = False
        self.connect_timer = None

    def on_start(self, event):
        self.container = event.container
        for w in self.workers:
            try:
                w.open(event.container)
            except Exception as e:
                w.error("cannot open connection: %s: %s" % (type(e).__name__, e))
        if not self.aborted and self.args.connect_timeout > 0:
            self.connect_timer = event.container.schedule(self.args.connect_timeout, self)

    def on_timer_task(self, event):
        self.connect_timer = None
        a = self.args
        for w in self.workers:
            if not w.finished and w.tracker.state in ("connecting", "attaching"):
                w.error("no AMQP 1.0 %s with %s:%d within %.0fs (--connect-timeout)"
                        % ("connection" if w.tracker.state == "connecting" else "link attach",
                           a.host, a.port, a.connect_timeout))
                return

    def worker_running(self):
        if self.connect_timer is not None and all(
                w.finished or w.tracker.state == "running" for w in self.workers):
            self.connect_timer.cancel()
            self.connect_timer = None

    def worker_finished(self, w):
        self.remaining -= 1
        if self.remaining == 0:
            # the container returns from run() once the closes are flushed
            self.rep.mark_end()
        self.worker_running()

    def abort(self):
        if self.aborted:
            return
        self.aborted = True
        others = sum(1 for w in self.workers if not w.finished)
        if others:
            self.errors.add("aborted the other %d connection(s) after the first error" % others)
        for w in self.workers:
            if not w.finished:
                w.finished = True   # suppress follow-up errors
                if w.tracker.state != "failed":
                    w.tracker.state = "aborted"
                if w.conn is not None:
                    try:
                        w.conn.close()
                    except Exception:
                        pass
        self.rep.mark_end()
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None
        if self.container is not None:
            self.container.stop()


def predeclare(args, queues, delete=False):
    """Declare (or delete) the queues over AMQP 0-9-1 with pika."""
    import pika
    import logging
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    params = pika.ConnectionParameters(
        host=args.host, port=args.port,
        credentials=pika.PlainCredentials(args.user, args.password),
        connection_attempts=1, retry_delay=0, socket_timeout=5, stack_timeout=15)
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        for q in queues:
            if delete:
                ch.queue_delete(q)
            else:
                ch.queue_declare(q, durable=False,
                                 arguments={"x-expires": int((args.timeout + 60) * 1000)})
    finally:
        conn.close()


def main():
    def extra(p):
        p.add_argument("--address-template", default=None,
                       help='AMQP 1.0 address, "{queue}" is replaced by the queue name '
                            '(default "/queue/{queue}", or "/amq/queue/{queue}" with --predeclare)')
        p.add_argument("--predeclare", action="store_true",
                       help="declare the queues via AMQP 0-9-1 (pika) with x-expires and "
                            "delete them at the end")
        p.add_argument("--connect-timeout", type=float, default=15.0,
                       help="max seconds until every connection has its links attached "
                            "(default 15, 0 = only --timeout)")
        p.add_argument("--sasl-mechs", default="PLAIN ANONYMOUS",
                       help='allowed SASL mechanisms (default "PLAIN ANONYMOUS")')

    args = lc.parse_args("proton", __doc__.splitlines()[0], extra)
    if args.address_template is None:
        args.address_template = "/amq/queue/{queue}" if args.predeclare else "/queue/{queue}"
    errors = lc.Errors()
    rid = lc.run_id()
    counts = lc.split_messages(args.messages, args.connections)
    trackers = []
    rep = lc.Reporter("proton", args, trackers, errors)
    handler = Main(args, rid, counts, errors, rep)
    trackers.extend(w.tracker for w in handler.workers)
    rep.extra["tcp_connections"] = args.connections
    rep.extra["address_example"] = handler.workers[0].address
    rep.start_watchdog(args.timeout, lambda: lc.describe_trackers(trackers))

    queues = [w.queue for w in handler.workers]
    if args.predeclare:
        try:
            predeclare(args, queues)
        except Exception as e:
            errors.add("predeclare over AMQP 0-9-1 failed: %s: %s" % (type(e).__name__, e))
            rep.finish()
        rep.t0 = time.monotonic()

    container = Container(handler)
    container.container_id = "vios-proton-load-%s" % rid
    try:
        container.run()
    except Exception as e:
        errors.add("proton container failed: %s: %s" % (type(e).__name__, e))
    rep.mark_end()

    if args.predeclare:
        try:
            predeclare(args, queues, delete=True)
        except Exception as e:
            errors.add("queue cleanup over AMQP 0-9-1 failed: %s: %s" % (type(e).__name__, e))
    rep.finish()


if __name__ == "__main__":
    main()
