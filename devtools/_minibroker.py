"""An embedded MQTT broker for ``edgepipe demo`` when mosquitto is not installed.

Pure Python (asyncio, stdlib only), in memory, loopback by default. It speaks MQTT 3.1.1
and MQTT 5 well enough for edgepipe and paho-mqtt 2.x clients:

* CONNECT/CONNACK with clean session (3.1.1) or clean start + session expiry (5) and the
  session-present flag; persistent sessions keep their subscriptions, queue QoS 1
  messages while the client is away (bounded: the oldest are dropped and counted) and
  redeliver unacknowledged messages with DUP=1 and the same packet id on reconnect.
* SUBSCRIBE/UNSUBSCRIBE with ``+``/``#`` wildcards and ``$share/GROUP/filter`` shared
  subscriptions (round-robin within a group, preferring connected members); MQTT 5
  subscription options No Local, Retain As Published and Retain Handling.
* PUBLISH QoS 0 and 1 both ways. QoS 2 is downgraded: an incoming QoS 2 PUBLISH gets the
  PUBREC/PUBREL/PUBCOMP handshake (duplicates suppressed) but is routed as QoS 1, and
  subscriptions are granted at most QoS 1.
* Retained messages, Last Will (with the MQTT 5 will delay), PINGREQ, DISCONNECT, keep
  alive enforcement (1.5 x the client's keep alive), Receive Maximum as the per-client
  in-flight limit (1000 for 3.1.1 clients).

Not supported: authentication (every client is accepted), MQTT 5 enhanced auth (AUTH),
topic aliases (Topic Alias Maximum is 0), subscription identifiers (advertised as
unavailable), message expiry (the property is forwarded unchanged), persistence to disk,
TLS and MQTT 3.1. A malformed packet or protocol violation closes that connection only.
The wire format (packet framing, fields, properties, topic syntax) is
:mod:`devtools._mqtt_codec`; the sessions' state is
:mod:`devtools._broker_session`; this module holds routing and the server.

Why not amqtt (the maintained pure-Python broker on PyPI): amqtt 0.12.1 was tried for the
demo's data path -- edgepipe on MQTT 3.1.1 with a persistent session (clean session
off), QoS 1, manual acks after commit, and the retained status topic with a Last Will.
Live QoS 1 delivery, subscriptions kept across a reconnect, the session-present flag and
the retained will all worked, but the guarantees the demo shows did not: QoS 1 messages
published while the client was away (after a clean DISCONNECT or an abrupt close) were
not delivered when it came back, QoS 1 messages delivered but not yet acknowledged were
not redelivered after an abrupt close, and the reconnecting session was sent the
retained ``offline`` status on a topic it had never subscribed to.  Losing messages
across a restart is exactly what the demo must not show, so the broker stays here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter

from devtools import _mqtt_codec as wire
from devtools._broker_session import (
    DEFAULT_INFLIGHT_V311,
    DEFAULT_MAX_QUEUED,
    NEVER_EXPIRES,
    Connection,
    Message,
    Session,
    SessionInfo,
    SharedGroup,
    Subscription,
)
from devtools._mosquitto import free_port
from devtools._mqtt_codec import ProtocolViolation

__all__ = ["MiniBroker", "ProtocolViolation", "SessionInfo"]

log = logging.getLogger("edgepipe.minibroker")

CONNECT_TIMEOUT_S = 10.0


# -- the broker -------------------------------------------------------------------------


class MiniBroker:
    """``with MiniBroker() as broker: ... broker.host, broker.port ...``

    The asyncio server runs on its own daemon thread. Sessions and retained messages live
    in memory and survive ``restart()`` (not the process). ``max_queued`` bounds each
    session's queue of QoS 1 messages (the oldest are dropped and counted). ``stats``
    counts ``connections``, ``messages_received``, ``messages_routed`` (one per copy sent or
    queued), ``messages_acked``, ``messages_dropped`` (queue overflow, too large for the
    client, or QoS 0 for an absent or stalled client), ``protocol_violations``,
    ``keepalive_timeouts`` and ``refused``; ``sessions()`` gives a snapshot per client.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.max_queued = max_queued
        self.stats: Counter[str] = Counter()
        self._sessions: dict[str, Session] = {}
        self._shared: dict[tuple[str, str], SharedGroup] = {}
        self._retained: dict[str, Message] = {}
        self._connections: set[Connection] = set()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._shutting_down = False

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> MiniBroker:
        """Start serving on a background thread; returns once the port is listening."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._serve(ready))
            except BaseException as e:  # reported to start()
                failure.append(e)
                ready.set()

        self._thread = threading.Thread(target=run, name=f"minibroker-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            self.stop()
            if failure:
                raise failure[0]
            raise TimeoutError(f"MQTT broker did not listen on port {self.port}")
        return self

    def stop(self) -> None:
        """Close every connection and stop serving (idempotent); sessions are kept."""
        thread, loop, stop = self._thread, self._loop, self._stop
        self._thread = None
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop has just finished
                pass
        thread.join(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> MiniBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sessions(self) -> dict[str, SessionInfo]:
        """A consistent snapshot of every session (callable from any thread)."""
        loop = self._loop
        if self._thread is None or loop is None:
            return {cid: s.info() for cid, s in self._sessions.items()}

        async def snapshot() -> dict[str, SessionInfo]:
            return {cid: s.info() for cid, s in self._sessions.items()}

        return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(10)

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._shutting_down = False
        tasks: set[asyncio.Task[None]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await self._handle(reader, writer)
            except asyncio.CancelledError:  # the broker is stopping
                pass
            finally:
                tasks.discard(task)

        server = await asyncio.start_server(handle, self.host, self.port)
        sweeper = asyncio.create_task(self._sweep())
        ready.set()
        log.info("MQTT broker listening on %s:%d", self.host, self.port)
        try:
            await self._stop.wait()
        finally:
            self._shutting_down = True
            server.close()
            sweeper.cancel()
            for conn in list(self._connections):
                conn.send_disconnect(wire.RC_SERVER_SHUTTING_DOWN)
                self._end(conn, graceful=True)
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, sweeper, return_exceptions=True)
            await server.wait_closed()
            self._loop = None

    async def _sweep(self) -> None:
        """Expire sessions and publish delayed wills that are due."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for s in list(self._sessions.values()):
                if s.pending_will is not None and s.pending_will[1] <= now:
                    self._publish(s.pending_will[0], None)
                    s.pending_will = None
                if s.conn is None and s.expires_at is not None and s.expires_at <= now:
                    self._drop_session(s)

    # -- connections --------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        self._connections.add(conn)
        self.stats["connections"] += 1
        graceful = False
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                ptype, flags, body = await wire.read_packet(reader)
            if ptype != wire.CONNECT:
                raise ProtocolViolation("first packet is not CONNECT", wire.RC_PROTOCOL_ERROR)
            if not self._on_connect(conn, flags, body):
                return
            while True:
                async with asyncio.timeout(conn.keepalive * 1.5 or None):
                    ptype, flags, body = await wire.read_packet(reader)
                if conn.ended:  # taken over while the packet was on its way
                    break
                outcome = self._dispatch(conn, ptype, flags, wire.Reader(body))
                if outcome is not None:
                    graceful = outcome
                    break
        except ProtocolViolation as e:
            self.stats["protocol_violations"] += 1
            log.warning("MQTT client %s (%s): %s; closing", _cid(conn), conn.peer, e)
            conn.send_disconnect(e.reason)
        except TimeoutError:
            self.stats["keepalive_timeouts"] += 1
            log.info("MQTT client %s (%s) timed out; closing", _cid(conn), conn.peer)
            conn.send_disconnect(wire.RC_KEEPALIVE_TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._end(conn, graceful=graceful)

    def _end(self, conn: Connection, *, graceful: bool) -> None:
        """The connection is over: detach it from its session, publish the will. Idempotent."""
        if conn.ended:
            return
        conn.ended = True
        self._connections.discard(conn)
        try:
            conn.writer.close()
        except RuntimeError:  # the loop is shutting down
            pass
        s = conn.session
        if s is None or s.conn is not conn:
            return
        s.conn = None
        will = None if graceful or self._shutting_down else conn.will
        if s.expiry == 0:
            self._drop_session(s)
        elif s.expiry != NEVER_EXPIRES:
            s.expires_at = time.monotonic() + s.expiry
        if will is not None:
            if will.delay and s.client_id in self._sessions:
                s.pending_will = (will, time.monotonic() + will.delay)
            else:
                self._publish(will, None)

    def _drop_session(self, s: Session) -> None:
        if self._sessions.get(s.client_id) is s:
            del self._sessions[s.client_id]
        for sub in s.subscriptions.values():
            self._unshare(s.client_id, sub)
        if s.pending_will is not None and not self._shutting_down:
            self._publish(s.pending_will[0], None)  # the session ended before the will delay
        s.pending_will = None

    def _on_connect(self, conn: Connection, flags: int, body: bytes) -> bool:
        try:
            c = wire.decode_connect(flags, body)
        except wire.Refused as e:
            if e.counted:
                self.stats["refused"] += 1
            conn.send(wire.packet(wire.CONNACK, 0, e.connack))
            return False
        conn.version, conn.keepalive = c.version, c.keepalive
        clean, props, client_id = c.clean, c.props, c.client_id
        if c.will is not None:
            topic, payload, qos, retain, forward, delay = c.will
            conn.will = Message(topic, payload, qos, retain, forward)
            conn.will.delay = delay

        ack_props: dict[int, int | str] = {}
        if not client_id:
            if not conn.v5 and not clean:
                conn.send(wire.packet(wire.CONNACK, 0, b"\x00\x02"))  # identifier rejected
                return False
            client_id = f"minibroker-{next(self._ids)}"
            ack_props[wire.P_ASSIGNED_ID] = client_id
        receive_max = int(
            props.get(wire.P_RECEIVE_MAX, 65535 if conn.v5 else DEFAULT_INFLIGHT_V311)
        )
        if receive_max == 0:
            raise ProtocolViolation("Receive Maximum 0", wire.RC_PROTOCOL_ERROR)

        s = self._sessions.get(client_id)
        if s is not None and s.conn is not None:  # session takeover
            old = s.conn
            old.send_disconnect(wire.RC_SESSION_TAKEN_OVER)
            self._end(old, graceful=False)
            s = self._sessions.get(client_id)
        if s is not None and s.expires_at is not None and s.expires_at <= time.monotonic():
            self._drop_session(s)
            s = None
        present = s is not None and not clean
        if s is not None and clean:
            self._drop_session(s)
        if not present:
            s = self._sessions[client_id] = Session(client_id, self.max_queued)
        assert s is not None
        s.attach(conn, props, clean, receive_max)
        ack = bytes([present, 0])
        if conn.v5:
            ack_props[wire.P_MAX_PACKET] = wire.MAX_PACKET_SIZE
            ack_props[wire.P_SUB_IDS_AVAILABLE] = 0
            ack += wire.encode_properties(ack_props)
        conn.send(wire.packet(wire.CONNACK, 0, ack))
        s.resume()
        return True

    def _dispatch(self, conn: Connection, ptype: int, flags: int, r: wire.Reader) -> bool | None:
        """Handle one packet; True/False when the client disconnected (gracefully or not)."""
        s = conn.session
        assert s is not None
        if ptype == wire.PUBLISH:
            self._on_publish(conn, s, flags, r)
            return None
        expected_flags = 2 if ptype in (wire.PUBREL, wire.SUBSCRIBE, wire.UNSUBSCRIBE) else 0
        if flags != expected_flags:
            raise ProtocolViolation(f"invalid flags 0x{flags:X} on packet type {ptype}")
        if ptype == wire.PUBACK:
            if s.inflight.pop(r.u16(), None) is not None:
                self.stats["messages_acked"] += 1
            s.pump()
        elif ptype == wire.PUBREL:
            pid = r.u16()
            s.qos2_received.discard(pid)
            conn.send(wire.packet(wire.PUBCOMP, 0, wire.u16(pid)))
        elif ptype == wire.SUBSCRIBE:
            self._on_subscribe(conn, s, r)
        elif ptype == wire.UNSUBSCRIBE:
            self._on_unsubscribe(conn, s, r)
        elif ptype == wire.PINGREQ:
            conn.send(b"\xd0\x00")
        elif ptype == wire.DISCONNECT:
            reason = r.u8() if conn.v5 and r.remaining else 0
            if conn.v5 and r.remaining:
                expiry = r.properties()[0].get(wire.P_SESSION_EXPIRY)
                if expiry is not None:
                    if s.expiry == 0 and expiry:
                        raise ProtocolViolation(
                            "session expiry set at DISCONNECT", wire.RC_PROTOCOL_ERROR
                        )
                    s.expiry = int(expiry)
            return reason != wire.RC_DISCONNECT_WITH_WILL
        else:
            raise ProtocolViolation(f"unexpected packet type {ptype}", wire.RC_PROTOCOL_ERROR)
        return None

    def _on_publish(self, conn: Connection, s: Session, flags: int, r: wire.Reader) -> None:
        qos, retain = (flags >> 1) & 3, bool(flags & 1)
        if qos == 3:
            raise ProtocolViolation("PUBLISH with QoS 3")
        topic = r.string()
        wire.check_topic_name(topic)
        pid = r.u16() if qos else 0
        if qos and pid == 0:
            raise ProtocolViolation("PUBLISH with packet id 0")
        forwarded = b""
        if conn.v5:
            props, forwarded = r.properties()
            if wire.P_TOPIC_ALIAS in props:
                raise ProtocolViolation("topic alias (maximum is 0)", wire.RC_PROTOCOL_ERROR)
        msg = Message(topic, r.rest(), min(qos, 1), retain, forwarded)
        self.stats["messages_received"] += 1
        if qos == 2:
            if pid not in s.qos2_received:  # else a resend before PUBREL: already routed
                s.qos2_received.add(pid)
                self._publish(msg, s.client_id)
            conn.send(wire.packet(wire.PUBREC, 0, wire.u16(pid)))
            return
        self._publish(msg, s.client_id)
        if qos == 1:
            conn.send(wire.packet(wire.PUBACK, 0, wire.u16(pid)))

    def _publish(self, msg: Message, origin: str | None) -> None:
        if msg.retain:
            if msg.payload:
                self._retained[msg.topic] = msg
            else:
                self._retained.pop(msg.topic, None)
        self._route(msg, origin)

    def _route(self, msg: Message, origin: str | None) -> None:
        levels = msg.topic.split("/")
        size = len(msg.payload) + len(msg.topic_bytes) + len(msg.properties) + 16
        for s in self._sessions.values():
            best = -1
            keep_retain = False
            for sub in s.subscriptions.values():
                if sub.group is not None or (sub.no_local and s.client_id == origin):
                    continue
                if wire.matches(sub.levels, levels):
                    best = max(best, sub.qos)
                    keep_retain |= sub.retain_as_published
            if best >= 0:
                self._deliver(s, msg, min(best, msg.qos), msg.retain and keep_retain, size)
        for group in self._shared.values():
            if not group.members or not wire.matches(group.levels, levels):
                continue
            cid, qos = group.pick(self._sessions)
            self._deliver(self._sessions[cid], msg, min(qos, msg.qos), False, size)

    def _deliver(self, s: Session, msg: Message, qos: int, retain: bool, size: int) -> None:
        if size > s.max_packet or not s.deliver(msg, qos, retain):
            self.stats["messages_dropped"] += 1
        else:
            self.stats["messages_routed"] += 1

    def _on_subscribe(self, conn: Connection, s: Session, r: wire.Reader) -> None:
        pid, requests = wire.decode_subscribe(r, conn.v5)
        codes = bytearray()
        retained: list[tuple[Subscription, bool, int]] = []
        for text, options in requests:
            parsed = wire.parse_filter(text)
            if parsed is None:
                codes.append(wire.RC_TOPIC_FILTER_INVALID if conn.v5 else 0x80)
                continue
            group, levels = parsed
            qos = min(options & 3, 1)
            sub = Subscription(levels, qos, group, bool(options & 4), bool(options & 8))
            is_new = text not in s.subscriptions
            if not is_new:
                self._unshare(s.client_id, s.subscriptions[text])
            s.subscriptions[text] = sub
            if group is not None:
                key = (group, "/".join(levels))
                self._shared.setdefault(key, SharedGroup(levels)).members[s.client_id] = qos
            else:
                retained.append((sub, is_new, (options >> 4) & 3))
            codes.append(qos)
        conn.send(
            wire.packet(wire.SUBACK, 0, wire.u16(pid) + (b"\x00" if conn.v5 else b"") + codes)
        )
        for sub, is_new, handling in retained:
            if handling == 2 or (handling == 1 and not is_new):
                continue
            for msg in list(self._retained.values()):
                if wire.matches(sub.levels, msg.topic.split("/")):
                    size = len(msg.payload) + len(msg.topic_bytes) + len(msg.properties) + 16
                    self._deliver(s, msg, min(sub.qos, msg.qos), True, size)

    def _on_unsubscribe(self, conn: Connection, s: Session, r: wire.Reader) -> None:
        pid = r.u16()
        if conn.v5:
            r.properties()
        codes = bytearray()
        while r.remaining:
            sub = s.subscriptions.pop(r.string(), None)
            codes.append(0x00 if sub is not None else 0x11)  # success / no subscription
            if sub is not None:
                self._unshare(s.client_id, sub)
        if not codes:
            raise ProtocolViolation("UNSUBSCRIBE without topic filters", wire.RC_PROTOCOL_ERROR)
        body = wire.u16(pid) + (b"\x00" + codes if conn.v5 else b"")
        conn.send(wire.packet(wire.UNSUBACK, 0, body))

    def _unshare(self, client_id: str, sub: Subscription) -> None:
        if sub.group is None:
            return
        key = (sub.group, "/".join(sub.levels))
        group = self._shared.get(key)
        if group is not None:
            group.members.pop(client_id, None)
            if not group.members:
                del self._shared[key]


def _cid(conn: Connection) -> str:
    return conn.session.client_id if conn.session else "<connecting>"
