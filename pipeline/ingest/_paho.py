"""paho-mqtt's client, set up from the broker config, with its receive path replaced: the
only module that touches paho's private API.

The small API :class:`pipeline.ingest._mqtt.MQTTClient` builds on:

- :func:`make_client` -- a :class:`PahoClient` for a :class:`BrokerConfig` (protocol,
  persistent session, manual acks, TLS, credentials, Last Will); :func:`set_credentials`
  re-reads the password before a reconnect; :func:`connect_properties` are the MQTT 5
  CONNECT properties;
- :meth:`PahoClient.read_burst` -- read the socket once and hand every run of QoS 0/1
  PUBLISH packets to :attr:`PahoClient.fast_publish` as one list, every other packet to
  paho's own handlers;
  :meth:`PahoClient.reset_buffer` forgets a partial packet when a new socket opens;
- :meth:`PahoClient.send_pubacks` -- the PUBACKs of a batch in one write;
- :meth:`PahoClient.keepalive` -- paho's ``loop_misc``, counting unread bytes in the
  kernel as a sign of life while edgepipe is not reading (backpressure);
- :meth:`PahoClient.drop_socket` -- close the socket the way paho does (its callbacks run).

Everything here is written against paho-mqtt 2.1 (pinned ``<3`` in pyproject.toml).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from config._models import BrokerConfig

__all__ = ["PahoClient", "connect_properties", "make_client", "quick_ack", "set_credentials"]

log = logging.getLogger("edgepipe.mqtt")

_RECV_SIZE = 65536
_PUBACK = struct.Struct("!BBH")
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux


def make_client(cfg: BrokerConfig, client_id: str, status_topic: str | None) -> PahoClient:
    """A paho client for ``cfg``: persistent session, manual acks, no automatic reconnect
    (the caller supervises the connection), TLS and credentials, and a retained
    ``offline`` Last Will on ``status_topic``.  Callbacks are the caller's to set."""
    v5 = cfg.protocol == "5"
    c = PahoClient(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else False,
        manual_ack=True,
        reconnect_on_failure=False,
    )
    # paho's own outgoing queue is only used for the status messages
    c.max_inflight_messages_set(20)
    set_credentials(c, cfg)
    if cfg.tls is not None:
        ctx = ssl.create_default_context(cafile=str(cfg.tls.ca_file) if cfg.tls.ca_file else None)
        if cfg.tls.cert_file:
            ctx.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file))
        if cfg.tls.insecure:
            ctx.check_hostname = False
        c.tls_set_context(ctx)
    if status_topic:
        c.will_set(status_topic, b"offline", qos=1, retain=True)
    return c


def set_credentials(c: paho.Client, cfg: BrokerConfig) -> None:
    """Username and password from ``cfg``, read now: call it before every connect, so a
    rotated secret file or env var takes effect on reconnect."""
    if cfg.username is not None:
        password = cfg.password.get() if cfg.password is not None else None
        c.username_pw_set(cfg.username, password)


def connect_properties(cfg: BrokerConfig) -> Properties | None:
    """The MQTT 5 CONNECT properties (session expiry, Receive Maximum, packet size)."""
    if cfg.protocol != "5":
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = cfg.session_expiry
    props.ReceiveMaximum = cfg.receive_maximum
    props.MaximumPacketSize = cfg.max_packet_kb * 1024
    return props


class PahoClient(paho.Client):
    """paho, with its receive path replaced for throughput.

    paho reads one packet per ``loop_read`` in three or more ``recv`` calls (type byte,
    length bytes, body) and turns every PUBLISH into an ``MQTTMessage`` with an MQTT 5
    ``Properties`` object and a topic-matcher pass -- well over half of the per-message
    cost.  :meth:`read_burst` reads up to 64 KiB at once, splits it into packets, hands
    QoS 0/1 PUBLISH packets straight to :attr:`fast_publish` and passes every other packet
    (CONNACK, SUBACK, PINGRESP, PUBACK of our own publishes, QoS 2) to paho's handler.
    edgepipe never sets Topic Alias Maximum, so no PUBLISH needs its properties.
    """

    #: ``fn([(topic, payload, qos, mid, dup), ...])`` for each run of QoS 0/1 PUBLISH
    #: packets in a read (called before any other packet after them is handled)
    fast_publish: Callable[[list[tuple[str, bytes, int, int, bool]]], None] | None = None
    #: ``fn()`` after each PINGRESP (see :meth:`send_barrier`)
    on_pong: Callable[[], None] | None = None
    _rest: bytes = b""  # the start of a packet whose remainder has not arrived yet
    _pings = 0  # PINGREQs sent on this client, and PINGRESPs received
    _pongs = 0

    def _send_pingreq(self) -> paho.MQTTErrorCode:
        rc = super()._send_pingreq()
        if rc == paho.MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._pings += 1
        return rc

    def _handle_pingresp(self) -> paho.MQTTErrorCode:
        rc = super()._handle_pingresp()
        self._pongs += 1
        if self.on_pong is not None:
            self.on_pong()
        return rc

    def send_barrier(self) -> int | None:
        """Queue a PINGREQ behind everything queued so far; the broker reads in order, so
        once :meth:`barrier_passed` says its PINGRESP came it has read all of that (the
        PUBACKs included).  Returns the barrier's number, None if it could not be queued."""
        if self._send_pingreq() != paho.MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        # answers come in order (a keepalive ping still unanswered is answered first), and
        # both counts start from 0 on each connection (reset_buffer)
        return self._pings

    def barrier_passed(self, barrier: int) -> bool:
        return self._pongs >= barrier

    def reset_buffer(self) -> None:
        """A new connection: no partial packet, no ping outstanding."""
        self._rest = b""
        self._pings = self._pongs = 0

    def read_burst(self) -> paho.MQTTErrorCode:
        """Read once from the socket and handle every complete packet; an error is
        handled like paho's ``loop_read`` does (socket closed, on_disconnect called)."""
        if self._sock is None:
            return paho.MQTTErrorCode.MQTT_ERR_NO_CONN
        try:
            data = self._sock_recv(_RECV_SIZE)
        except BlockingIOError:
            return paho.MQTTErrorCode.MQTT_ERR_SUCCESS
        except OSError as err:
            log.debug("receive failed: %s", err)
            return self._loop_rc_handle(paho.MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not data:
            return self._loop_rc_handle(paho.MQTTErrorCode.MQTT_ERR_CONN_LOST)
        lost = False
        if isinstance(self._sock, ssl.SSLSocket):
            data, lost = self._more_records(data)
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        buf = self._rest + data if self._rest else data
        n = len(buf)
        pos = 0
        fast = self.fast_publish
        pubs: list[tuple[str, bytes, int, int, bool]] = []  # handed over once per run
        add = pubs.append
        v5 = self._protocol == paho.MQTTv5
        while pos < n:
            start = pos
            cmd = buf[pos]
            pos += 1
            length = buf[pos] if pos < n else 0x80
            if length < 0x80:  # a remaining length of one byte (< 128): inline
                pos += 1
            else:
                try:
                    length, pos = _varint(buf, pos)  # the remaining length
                except IndexError:
                    pos = start  # the length itself is incomplete
                    break
                except ValueError:
                    if pubs:
                        fast(pubs)  # type: ignore[misc]
                    return self._loop_rc_handle(paho.MQTTErrorCode.MQTT_ERR_PROTOCOL)
            end = pos + length
            if end > n:
                pos = start
                break
            if cmd & 0xF0 == 0x30 and cmd & 0x06 != 0x04 and fast is not None:
                # PUBLISH, QoS 0 or 1
                qos = (cmd & 0x06) >> 1
                t_end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
                topic = buf[pos + 2 : t_end]
                pos = t_end
                mid = 0
                if qos:
                    mid = (buf[pos] << 8) | buf[pos + 1]
                    pos += 2
                if v5:  # skip the properties (usually none: one 0 byte)
                    if buf[pos]:
                        plen, pos = _varint(buf, pos)
                        pos += plen
                    else:
                        pos += 1
                add((topic.decode("utf-8", "replace"), buf[pos:end], qos, mid, bool(cmd & 0x08)))
            else:
                if pubs:  # the PUBLISHes before this packet go first: a CONNACK after
                    fast(pubs)  # type: ignore[misc]  # them starts a new generation
                    pubs = []
                    add = pubs.append
                rc = self._handle_other(cmd, buf[pos:end])
                if rc:
                    self._rest = b""
                    return self._loop_rc_handle(rc)
                if self._sock is None:  # e.g. the broker sent DISCONNECT
                    self._rest = b""
                    return paho.MQTTErrorCode.MQTT_ERR_SUCCESS
            pos = end
        if pubs:
            fast(pubs)  # type: ignore[misc]
        self._rest = buf[pos:] if pos < n else b""
        if lost:  # after handling the packets that came before the end
            return self._loop_rc_handle(paho.MQTTErrorCode.MQTT_ERR_CONN_LOST)
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _more_records(self, data: bytes) -> tuple[bytes, bool]:
        """TLS: an SSL socket returns one record per ``recv`` (at most 16 KiB, and mosquitto
        writes each packet as a record of its own), so read on until the socket would block
        or ``_RECV_SIZE`` is reached: one wake then handles a burst, as over plain TCP.
        Each ``recv`` asks for ``_RECV_SIZE``, more than a record holds, so no decrypted
        bytes stay behind in the SSL object where the selector cannot see them.
        Returns (the bytes, whether the connection ended after them)."""
        chunks = [data]
        size = len(data)
        while size < _RECV_SIZE:
            try:
                more = self._sock_recv(_RECV_SIZE)
            except BlockingIOError:
                break  # SSLWantRead: nothing more yet (paho registers a WantWrite)
            except OSError as err:
                log.debug("receive failed: %s", err)
                more = b""
            if not more:
                return b"".join(chunks), True
            chunks.append(more)
            size += len(more)
        return (b"".join(chunks) if len(chunks) > 1 else data), False

    def _handle_other(self, cmd: int, body: bytes) -> paho.MQTTErrorCode:
        self._in_packet = {
            "command": cmd,
            "have_remaining": 1,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": len(body),
            "packet": bytearray(body),
            "to_process": 0,
            "pos": 0,
        }
        try:
            rc = self._packet_handle()
        except paho.MalformedPacket as exc:
            log.debug("malformed packet from the broker: %s", exc)
            rc = paho.MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        return rc

    def send_pubacks(self, mids: list[int], write: bool) -> None:
        """Queue the PUBACKs of ``mids`` as one write; send it now if ``write``."""
        # PUBACK: fixed header 0x40, remaining length 2, packet id (the same bytes in
        # MQTT 3.1.1 and 5, where reason code 0 and no properties may be omitted)
        pack = _PUBACK.pack
        self._packet_queue(paho.PUBACK, b"".join([pack(0x40, 2, mid) for mid in mids]), 0, 0)
        if write:
            self.loop_write()

    def keepalive(self, reading_paused: bool) -> None:
        """paho's ``loop_misc`` (PINGREQ, keepalive timeout).  While edgepipe is not reading
        on purpose (``reading_paused``, backpressure) and the broker keeps sending, the
        broker is alive, so paho's keepalive must not time the connection out."""
        sock = self.socket()
        if sock is None:
            return
        if reading_paused and _unread_bytes(sock):
            with self._msgtime_mutex:
                self._last_bytes_received = paho.time_func()
        self.loop_misc()

    def drop_socket(self) -> None:
        """Close the socket as paho does (the socket-close callbacks run first)."""
        try:
            self._sock_close()
        except Exception:
            pass


def quick_ack(sock: socket.socket) -> None:
    """Acknowledge the received TCP segments now (Linux; call after each read): edgepipe
    answers with PUBACKs only after a commit, so a delayed ACK would let the broker's Nagle
    algorithm hold back the next messages for up to 40 ms (mosquitto without
    set_tcp_nodelay; docs/ingest.md, "Nagle and delayed ACKs")."""
    if _QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass


def _unread_bytes(sock: socket.socket) -> bool:
    """True if the kernel holds received bytes edgepipe has not read yet."""
    try:
        return bool(socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """An MQTT variable byte integer at ``buf[pos]``: (value, position after it).
    IndexError if ``buf`` ends inside it, ValueError if it is longer than 4 bytes."""
    b = buf[pos]
    if b < 0x80:  # the common case: one byte
        return b, pos + 1
    value, shift = b & 0x7F, 7
    for i in range(pos + 1, pos + 4):
        b = buf[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
    raise ValueError("variable byte integer longer than 4 bytes")
