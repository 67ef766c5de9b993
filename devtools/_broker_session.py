"""The embedded broker's state (:mod:`devtools._minibroker`): sessions with their queues
and in-flight QoS 1 messages, subscriptions, shared-subscription groups, and the
connection a session is attached to.  Wire encoding is :mod:`devtools._mqtt_codec`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from devtools import _mqtt_codec as wire

__all__ = [
    "DEFAULT_INFLIGHT_V311",
    "DEFAULT_MAX_QUEUED",
    "NEVER_EXPIRES",
    "WRITE_BUFFER_LIMIT",
    "Connection",
    "Message",
    "SessionInfo",
    "Session",
    "SharedGroup",
    "Subscription",
]

#: MQTT 3.1.1 clients have no Receive Maximum; this matches edgepipe's mosquitto setting.
DEFAULT_INFLIGHT_V311 = 1000
DEFAULT_MAX_QUEUED = 100_000
#: QoS 0 messages are dropped for a client whose socket buffer is this full.
WRITE_BUFFER_LIMIT = 8 * 1024 * 1024
NEVER_EXPIRES = 0xFFFFFFFF


@dataclass(slots=True)
class Message:
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
class Subscription:
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
class Session:
    client_id: str
    max_queued: int
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    queue: deque[tuple[Message, bool]] = field(default_factory=deque)
    inflight: dict[int, tuple[Message, bool]] = field(default_factory=dict)
    qos2_received: set[int] = field(default_factory=set)
    conn: Connection | None = None
    expiry: int = 0
    expires_at: float | None = None
    pending_will: tuple[Message, float] | None = None
    receive_max: int = DEFAULT_INFLIGHT_V311
    max_packet: int = wire.MAX_PACKET_SIZE
    dropped: int = 0
    last_pid: int = 0

    def attach(
        self, conn: Connection, props: dict[int, Any], clean: bool, receive_max: int
    ) -> None:
        """``conn`` (just connected) takes this session, with the limits of its CONNECT."""
        self.pending_will = None  # the client is back before its will delay ran out
        if conn.v5:
            self.expiry = int(props.get(wire.P_SESSION_EXPIRY, 0))
        else:
            self.expiry = 0 if clean else NEVER_EXPIRES
        self.expires_at = None
        self.receive_max = receive_max
        self.max_packet = int(props.get(wire.P_MAX_PACKET, wire.MAX_PACKET_SIZE))
        self.conn, conn.session = conn, self

    def deliver(self, msg: Message, qos: int, retain: bool) -> bool:
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
class SharedGroup:
    levels: list[str]
    members: dict[str, int] = field(default_factory=dict)  # client id -> granted QoS
    turn: int = 0

    def pick(self, sessions: dict[str, Session]) -> tuple[str, int]:
        """The next member in turn, preferring connected ones: (client id, granted QoS)."""
        members = list(self.members.items())
        n = len(members)
        order = [members[(self.turn + i) % n] for i in range(n)]
        cid, qos = next(((c, q) for c, q in order if sessions[c].conn is not None), order[0])
        self.turn = (members.index((cid, qos)) + 1) % n
        return cid, qos


class Connection:
    __slots__ = ("writer", "peer", "version", "keepalive", "session", "will", "ended")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.peer = writer.get_extra_info("peername")
        self.version = 4
        self.keepalive = 0
        self.session: Session | None = None
        self.will: Message | None = None
        self.ended = False

    @property
    def v5(self) -> bool:
        return self.version == 5

    def send(self, data: bytes) -> None:
        if not self.ended:
            self.writer.write(data)

    def buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    def send_publish(self, msg: Message, qos: int, retain: bool, pid: int, dup: bool) -> None:
        props = msg.properties if self.v5 else None
        self.send(wire.encode_publish(msg.topic_bytes, msg.payload, props, qos, retain, pid, dup))

    def send_disconnect(self, reason: int) -> None:
        if self.v5 and self.session is not None:
            self.send(wire.packet(wire.DISCONNECT, 0, bytes([reason, 0])))
