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
:mod:`devtools._mqtt_codec`; this module holds sessions, routing and the server.

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
from collections import Counter, deque
from dataclasses import dataclass, field

from devtools import _mqtt_codec as wire
from devtools._mosquitto import free_port
from devtools._mqtt_codec import ProtocolViolation

__all__ = ["MiniBroker", "ProtocolViolation", "SessionInfo"]

log = logging.getLogger("edgepipe.minibroker")

#: MQTT 3.1.1 clients have no Receive Maximum; this matches edgepipe's mosquitto setting.
DEFAULT_INFLIGHT_V311 = 1000
DEFAULT_MAX_QUEUED = 100_000
CONNECT_TIMEOUT_S = 10.0
#: QoS 0 messages are dropped for a client whose socket buffer is this full.
WRITE_BUFFER_LIMIT = 8 * 1024 * 1024
NEVER_EXPIRES = 0xFFFFFFFF


# -- state ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Message:
    topic: str
    payload: bytes
    qos: int  # 0 or 1 (QoS 2 is downgraded)
    retain: bool
    properties: bytes = b""  # forwarded MQTT 5 properties, already encoded
    topic_bytes: bytes = b""
    delay: int = 0  # will delay interval (wills only)

    def __post_init__(self) -> None:
        self.topic_bytes = wire.utf8(self.topic)


@dataclass(slots=True)
class _Subscription:
    levels: list[str]
    qos: int
    group: str | None = None
    no_local: bool = False
    retain_as_published: bool = False


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A snapshot of one session (``MiniBroker.sessions()``)."""

    client_id: str
    connected: bool
    subscriptions: tuple[str, ...]
    inflight: int
    queued: int
    dropped: int


@dataclass(eq=False, slots=True)
class _Session:
    client_id: str
    max_queued: int
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    queue: deque[tuple[_Message, bool]] = field(default_factory=deque)
    inflight: dict[int, tuple[_Message, bool]] = field(default_factory=dict)
    qos2_received: set[int] = field(default_factory=set)
    conn: _Connection | None = None
    expiry: int = 0
    expires_at: float | None = None
    pending_will: tuple[_Message, float] | None = None
    receive_max: int = DEFAULT_INFLIGHT_V311
    max_packet: int = wire.MAX_PACKET_SIZE
    dropped: int = 0
    last_pid: int = 0

    def deliver(self, msg: _Message, qos: int, retain: bool) -> bool:
        """Send now or queue; False when the message had to be dropped."""
        conn = self.conn
        if qos == 0:
            if conn is None or conn.buffered() > WRITE_BUFFER_LIMIT:
                return False  # QoS 0 is not queued for absent or stalled clients
            conn.send_publish(msg, 0, retain, 0, False)
            return True
        self.queue.append((msg, retain))
        dropped = len(self.queue) > self.max_queued
        if dropped:
            self.queue.popleft()
            self.dropped += 1
        self.pump()
        return not dropped

    def pump(self) -> None:
        conn = self.conn
        while conn is not None and self.queue and len(self.inflight) < self.receive_max:
            msg, retain = self.queue.popleft()
            pid = self.last_pid
            while True:  # inflight < receive_max <= 65535 ids: this ends
                pid = pid % 65535 + 1
                if pid not in self.inflight:
                    break
            self.last_pid = pid
            self.inflight[pid] = (msg, retain)
            conn.send_publish(msg, 1, retain, pid, False)

    def resume(self) -> None:
        assert self.conn is not None
        for pid, (msg, retain) in self.inflight.items():
            self.conn.send_publish(msg, 1, retain, pid, True)
        self.pump()

    def info(self) -> SessionInfo:
        return SessionInfo(
            self.client_id,
            self.conn is not None,
            tuple(self.subscriptions),
            len(self.inflight),
            len(self.queue),
            self.dropped,
        )


@dataclass(slots=True)
class _SharedGroup:
    levels: list[str]
    members: dict[str, int] = field(default_factory=dict)  # client id -> granted QoS
    turn: int = 0


class _Connection:
    __slots__ = ("writer", "peer", "version", "keepalive", "session", "will", "ended")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.peer = writer.get_extra_info("peername")
        self.version = 4
        self.keepalive = 0
        self.session: _Session | None = None
        self.will: _Message | None = None
        self.ended = False

    @property
    def v5(self) -> bool:
        return self.version == 5

    def send(self, data: bytes) -> None:
        if not self.ended:
            self.writer.write(data)

    def buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    def send_publish(self, msg: _Message, qos: int, retain: bool, pid: int, dup: bool) -> None:
        props = msg.properties if self.v5 else None
        self.send(wire.encode_publish(msg.topic_bytes, msg.payload, props, qos, retain, pid, dup))

    def send_disconnect(self, reason: int) -> None:
        if self.v5 and self.session is not None:
            self.send(wire.packet(wire.DISCONNECT, 0, bytes([reason, 0])))


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
        self._sessions: dict[str, _Session] = {}
        self._shared: dict[tuple[str, str], _SharedGroup] = {}
        self._retained: dict[str, _Message] = {}
        self._connections: set[_Connection] = set()
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
        conn = _Connection(writer)
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

    def _end(self, conn: _Connection, *, graceful: bool) -> None:
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

    def _drop_session(self, s: _Session) -> None:
        if self._sessions.get(s.client_id) is s:
            del self._sessions[s.client_id]
        for sub in s.subscriptions.values():
            self._unshare(s.client_id, sub)
        if s.pending_will is not None and not self._shutting_down:
            self._publish(s.pending_will[0], None)  # the session ended before the will delay
        s.pending_will = None

    def _on_connect(self, conn: _Connection, flags: int, body: bytes) -> bool:
        r = wire.Reader(body)
        name, version = r.string(), r.u8()
        if name != "MQTT" or version not in (4, 5):
            self.stats["refused"] += 1
            conn.send(wire.packet(wire.CONNACK, 0, b"\x00\x01"))  # unacceptable protocol version
            return False
        conn.version = version
        cflags = r.u8()
        if flags or cflags & 0x01:
            raise ProtocolViolation("reserved CONNECT flags set")
        clean = bool(cflags & 0x02)
        conn.keepalive = r.u16()
        props = r.properties()[0] if conn.v5 else {}
        if wire.P_AUTH_METHOD in props:
            conn.send(wire.packet(wire.CONNACK, 0, b"\x00\x8c\x00"))  # bad authentication method
            return False
        client_id = r.string()
        if cflags & 0x04:  # will
            will_qos = (cflags >> 3) & 3
            if will_qos == 3:
                raise ProtocolViolation("will QoS 3")
            wprops, wforward = r.properties() if conn.v5 else ({}, b"")
            topic = r.string()
            wire.check_topic_name(topic)
            conn.will = _Message(topic, r.binary(), min(will_qos, 1), bool(cflags & 0x20), wforward)
            conn.will.delay = int(wprops.get(wire.P_WILL_DELAY, 0))
        elif cflags & 0x38:
            raise ProtocolViolation("will QoS/retain set without a will")
        if cflags & 0x80:
            r.string()  # user name: every client is accepted
        if cflags & 0x40:
            r.binary()  # password
        if r.remaining:
            raise ProtocolViolation("trailing bytes after CONNECT payload")

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
            s = self._sessions[client_id] = _Session(client_id, self.max_queued)
        assert s is not None
        s.pending_will = None  # the client is back before its will delay ran out
        if conn.v5:
            s.expiry = int(props.get(wire.P_SESSION_EXPIRY, 0))
        else:
            s.expiry = 0 if clean else NEVER_EXPIRES
        s.expires_at = None
        s.receive_max = receive_max
        s.max_packet = int(props.get(wire.P_MAX_PACKET, wire.MAX_PACKET_SIZE))
        s.conn, conn.session = conn, s
        if conn.v5:
            ack_props[wire.P_MAX_PACKET] = wire.MAX_PACKET_SIZE
            ack_props[wire.P_SUB_IDS_AVAILABLE] = 0
            conn.send(
                wire.packet(
                    wire.CONNACK, 0, bytes([present, 0]) + wire.encode_properties(ack_props)
                )
            )
        else:
            conn.send(wire.packet(wire.CONNACK, 0, bytes([present, 0])))
        s.resume()
        return True

    def _dispatch(self, conn: _Connection, ptype: int, flags: int, r: wire.Reader) -> bool | None:
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

    def _on_publish(self, conn: _Connection, s: _Session, flags: int, r: wire.Reader) -> None:
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
        msg = _Message(topic, r.rest(), min(qos, 1), retain, forwarded)
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

    def _publish(self, msg: _Message, origin: str | None) -> None:
        if msg.retain:
            if msg.payload:
                self._retained[msg.topic] = msg
            else:
                self._retained.pop(msg.topic, None)
        self._route(msg, origin)

    def _route(self, msg: _Message, origin: str | None) -> None:
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
            members = list(group.members.items())
            n = len(members)
            order = [members[(group.turn + i) % n] for i in range(n)]
            cid, qos = next(
                ((c, q) for c, q in order if self._sessions[c].conn is not None), order[0]
            )
            group.turn = (members.index((cid, qos)) + 1) % n
            self._deliver(self._sessions[cid], msg, min(qos, msg.qos), False, size)

    def _deliver(self, s: _Session, msg: _Message, qos: int, retain: bool, size: int) -> None:
        if size > s.max_packet or not s.deliver(msg, qos, retain):
            self.stats["messages_dropped"] += 1
        else:
            self.stats["messages_routed"] += 1

    def _on_subscribe(self, conn: _Connection, s: _Session, r: wire.Reader) -> None:
        pid = r.u16()
        if conn.v5:
            r.properties()  # subscription identifiers are not supported (and say so)
        requests = []
        while r.remaining:
            text, options = r.string(), r.u8()
            if options & (0xC0 if conn.v5 else 0xFC) or options & 3 == 3:
                raise ProtocolViolation("reserved subscription option bits set")
            if (options >> 4) & 3 == 3:
                raise ProtocolViolation("retain handling 3")
            requests.append((text, options))
        if not requests:
            raise ProtocolViolation("SUBSCRIBE without topic filters", wire.RC_PROTOCOL_ERROR)
        codes = bytearray()
        retained: list[tuple[_Subscription, bool, int]] = []
        for text, options in requests:
            parsed = wire.parse_filter(text)
            if parsed is None:
                codes.append(wire.RC_TOPIC_FILTER_INVALID if conn.v5 else 0x80)
                continue
            group, levels = parsed
            qos = min(options & 3, 1)
            sub = _Subscription(levels, qos, group, bool(options & 4), bool(options & 8))
            is_new = text not in s.subscriptions
            if not is_new:
                self._unshare(s.client_id, s.subscriptions[text])
            s.subscriptions[text] = sub
            if group is not None:
                key = (group, "/".join(levels))
                self._shared.setdefault(key, _SharedGroup(levels)).members[s.client_id] = qos
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

    def _on_unsubscribe(self, conn: _Connection, s: _Session, r: wire.Reader) -> None:
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

    def _unshare(self, client_id: str, sub: _Subscription) -> None:
        if sub.group is None:
            return
        key = (sub.group, "/".join(sub.levels))
        group = self._shared.get(key)
        if group is not None:
            group.members.pop(client_id, None)
            if not group.members:
                del self._shared[key]


def _cid(conn: _Connection) -> str:
    return conn.session.client_id if conn.session else "<connecting>"
