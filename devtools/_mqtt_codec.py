"""MQTT 3.1.1 and 5 on the wire, for the embedded broker (:mod:`devtools._minibroker`):
packet types, reason codes and property identifiers, reading one packet from a stream,
encoding and decoding fields and MQTT 5 properties, and topic name / filter syntax.
A malformed packet raises :class:`ProtocolViolation`."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

__all__ = [
    "Connect",
    "ProtocolViolation",
    "Reader",
    "Refused",
    "check_topic_name",
    "decode_connect",
    "decode_subscribe",
    "encode_properties",
    "encode_publish",
    "matches",
    "packet",
    "parse_filter",
    "read_packet",
    "u16",
    "utf8",
    "varint",
]

MAX_PACKET_SIZE = 16 * 1024 * 1024

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = range(8, 15)

# MQTT 5 reason codes used here
RC_MALFORMED = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_SERVER_SHUTTING_DOWN = 0x8B
RC_KEEPALIVE_TIMEOUT = 0x8D
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_FILTER_INVALID = 0x8F
RC_TOPIC_NAME_INVALID = 0x90
RC_PACKET_TOO_LARGE = 0x95
RC_DISCONNECT_WITH_WILL = 0x04

# MQTT 5 property identifiers -> wire type (b byte, h two bytes, i four bytes, v varint,
# s UTF-8 string, d binary data, p string pair)
_PROPERTY_TYPES = {
    0x01: "b", 0x02: "i", 0x03: "s", 0x08: "s", 0x09: "d", 0x0B: "v", 0x11: "i",
    0x12: "s", 0x13: "h", 0x15: "s", 0x16: "d", 0x17: "b", 0x18: "i", 0x19: "b",
    0x1A: "s", 0x1C: "s", 0x1F: "s", 0x21: "h", 0x22: "h", 0x23: "h", 0x24: "b",
    0x25: "b", 0x26: "p", 0x27: "i", 0x28: "b", 0x29: "b", 0x2A: "b",
}  # fmt: skip
#: PUBLISH/will properties forwarded to subscribers as they came (payload format,
#: message expiry, content type, response topic, correlation data, user properties).
_FORWARDED = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x26})
P_SESSION_EXPIRY, P_ASSIGNED_ID, P_AUTH_METHOD, P_WILL_DELAY = 0x11, 0x12, 0x15, 0x18
P_RECEIVE_MAX, P_TOPIC_ALIAS_MAX, P_TOPIC_ALIAS, P_MAX_PACKET = 0x21, 0x22, 0x23, 0x27
P_SUB_IDS_AVAILABLE = 0x29


class ProtocolViolation(Exception):
    """A client broke the protocol; its connection is closed with ``reason`` (MQTT 5 code)."""

    def __init__(self, detail: str, reason: int = RC_MALFORMED) -> None:
        self.detail, self.reason = detail, reason
        super().__init__(f"{detail} (reason 0x{reason:02X})")


# -- wire encoding ----------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def utf8(s: str) -> bytes:
    b = s.encode()
    return u16(len(b)) + b


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([ptype << 4 | flags]) + varint(len(body)) + body


class Reader:
    """Bounds-checked reads from one packet body; anything short is malformed."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise ProtocolViolation("packet shorter than its contents")
        b, self.pos = self.buf[self.pos : end], end
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            digit = self.u8()
            value |= (digit & 0x7F) << shift
            if not digit & 0x80:
                return value
        raise ProtocolViolation("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            s = raw.decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("string is not valid UTF-8") from None
        if "\0" in s:
            raise ProtocolViolation("string contains U+0000")
        return s

    def rest(self) -> bytes:
        b, self.pos = self.buf[self.pos :], len(self.buf)
        return b

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def properties(self) -> tuple[dict[int, Any], bytes]:
        """MQTT 5 properties: (single-valued ones by id, raw bytes of the forwarded ones)."""
        length = self.varint()
        end = self.pos + length
        if end > len(self.buf):
            raise ProtocolViolation("property length exceeds the packet")
        values: dict[int, Any] = {}
        forwarded = bytearray()
        while self.pos < end:
            start = self.pos
            pid = self.varint()
            kind = _PROPERTY_TYPES.get(pid)
            if kind is None:
                raise ProtocolViolation(f"unknown property 0x{pid:02X}")
            value: object
            if kind == "b":
                value = self.u8()
            elif kind == "h":
                value = self.u16()
            elif kind == "i":
                value = self.u32()
            elif kind == "v":
                value = self.varint()
            elif kind == "s":
                value = self.string()
            elif kind == "d":
                value = self.binary()
            else:
                value = (self.string(), self.string())
            if self.pos > end:
                raise ProtocolViolation("property overruns the property length")
            if pid in _FORWARDED:
                forwarded += self.buf[start : self.pos]
            if pid in (0x26, 0x0B):  # user properties / subscription ids may repeat
                continue
            if pid in values:
                raise ProtocolViolation(f"property 0x{pid:02X} twice", RC_PROTOCOL_ERROR)
            values[pid] = value
        return values, bytes(forwarded)


def encode_properties(props: dict[int, int | str]) -> bytes:
    out = bytearray()
    for pid, value in props.items():
        out += varint(pid)
        kind = _PROPERTY_TYPES[pid]
        if kind == "s":
            out += utf8(str(value))
        else:
            out += int(value).to_bytes({"b": 1, "h": 2, "i": 4}[kind], "big")
    return varint(len(out)) + bytes(out)


# -- topics -----------------------------------------------------------------------------


def check_topic_name(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolViolation(f"invalid topic name {topic!r}", RC_TOPIC_NAME_INVALID)


def parse_filter(text: str) -> tuple[str | None, list[str]] | None:
    """``(share group or None, filter levels)``, or None when the filter is invalid."""
    group = None
    if text.startswith("$share/"):
        parts = text.split("/", 2)
        if len(parts) < 3:
            return None
        _, group, text = parts
        if not group or "+" in group or "#" in group:
            return None
    if not text:
        return None
    levels = text.split("/")
    for i, level in enumerate(levels):
        if level == "#" and i != len(levels) - 1:
            return None
        if level not in ("+", "#") and ("+" in level or "#" in level):
            return None
    return group, levels


def matches(filter_levels: list[str], topic_levels: list[str]) -> bool:
    if topic_levels[0].startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(filter_levels):
        if f == "#":
            return True
        if i >= len(topic_levels) or (f != "+" and f != topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


def encode_publish(
    topic: bytes,
    payload: bytes,
    properties: bytes | None,
    qos: int,
    retain: bool,
    pid: int,
    dup: bool,
) -> bytes:
    """A PUBLISH packet; ``topic`` already UTF-8 encoded with its length, ``properties``
    the encoded MQTT 5 properties (``None`` for MQTT 3.1.1)."""
    body = topic + (u16(pid) if qos else b"")
    if properties is not None:
        body += varint(len(properties)) + properties
    return packet(PUBLISH, dup << 3 | qos << 1 | retain, body + payload)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    header, digit = await reader.readexactly(2)
    length = digit & 0x7F
    shift = 7
    while digit & 0x80:
        if shift == 28:
            raise ProtocolViolation("remaining length longer than 4 bytes")
        digit = (await reader.readexactly(1))[0]
        length |= (digit & 0x7F) << shift
        shift += 7
    if length > MAX_PACKET_SIZE:
        raise ProtocolViolation(f"packet of {length} bytes is too large", RC_PACKET_TOO_LARGE)
    body = await reader.readexactly(length) if length else b""
    return header >> 4, header & 0x0F, body


class Refused(Exception):
    """A CONNECT answered with a refusing CONNACK (``connack``: its variable header)."""

    def __init__(self, connack: bytes, why: str, *, counted: bool = False) -> None:
        super().__init__(why)
        self.connack = connack
        self.counted = counted  # an unsupported protocol (counted in the broker's stats)


class Connect(NamedTuple):
    """The fields of a CONNECT packet the broker uses."""

    version: int  # 4 (3.1.1) or 5
    clean: bool
    keepalive: int
    props: dict[int, Any]
    client_id: str
    #: topic, payload, QoS (2 downgraded to 1), retain, forwarded properties, delay
    will: tuple[str, bytes, int, bool, bytes, int] | None


def decode_connect(flags: int, body: bytes) -> Connect:
    """A CONNECT packet's body; :class:`Refused` for an unsupported protocol or an
    authentication method, :class:`ProtocolViolation` for a malformed packet."""
    r = Reader(body)
    name, version = r.string(), r.u8()
    if name != "MQTT" or version not in (4, 5):
        raise Refused(b"\x00\x01", "unacceptable protocol version", counted=True)
    v5 = version == 5
    cflags = r.u8()
    if flags or cflags & 0x01:
        raise ProtocolViolation("reserved CONNECT flags set")
    keepalive = r.u16()
    props = r.properties()[0] if v5 else {}
    if P_AUTH_METHOD in props:
        raise Refused(b"\x00\x8c\x00", "bad authentication method")
    client_id = r.string()
    will = None
    if cflags & 0x04:
        will_qos = (cflags >> 3) & 3
        if will_qos == 3:
            raise ProtocolViolation("will QoS 3")
        wprops, wforward = r.properties() if v5 else ({}, b"")
        topic = r.string()
        check_topic_name(topic)
        payload = r.binary()
        delay = int(wprops.get(P_WILL_DELAY, 0))
        will = (topic, payload, min(will_qos, 1), bool(cflags & 0x20), wforward, delay)
    elif cflags & 0x38:
        raise ProtocolViolation("will QoS/retain set without a will")
    if cflags & 0x80:
        r.string()  # user name: every client is accepted
    if cflags & 0x40:
        r.binary()  # password
    if r.remaining:
        raise ProtocolViolation("trailing bytes after CONNECT payload")
    return Connect(version, bool(cflags & 0x02), keepalive, props, client_id, will)


def decode_subscribe(r: Reader, v5: bool) -> tuple[int, list[tuple[str, int]]]:
    """A SUBSCRIBE packet's body: its packet id and (topic filter, options) requests."""
    pid = r.u16()
    if v5:
        r.properties()  # subscription identifiers are not supported (and say so)
    requests = []
    while r.remaining:
        text, options = r.string(), r.u8()
        if options & (0xC0 if v5 else 0xFC) or options & 3 == 3:
            raise ProtocolViolation("reserved subscription option bits set")
        if (options >> 4) & 3 == 3:
            raise ProtocolViolation("retain handling 3")
        requests.append((text, options))
    if not requests:
        raise ProtocolViolation("SUBSCRIBE without topic filters", RC_PROTOCOL_ERROR)
    return pid, requests
