"""paho-mqtt, wrapped once for asyncio.

paho's network loop is driven from the event loop (the socket is registered with
``add_reader``/``add_writer``, keepalive from a small timer task), so there is no extra
thread and *backpressure is real*: when the consumer falls behind, the reader is removed
and edgepipe stops reading the socket; the broker holds the rest.

QoS 1 messages are acknowledged manually (``manual_ack=True``) with :meth:`MQTTClient.ack`,
which the runtime calls only after the readings a message produced are durably committed.
Each connection has a *generation*; an ack for a message received on an earlier
connection is not sent (the broker redelivers it on the new one, and the store's
de-duplication recognises it).

paho's own receive path is replaced by a faster one, and everything else that reaches
into paho's internals lives in :mod:`._paho`; this module uses only its small API.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho

from config._models import BrokerConfig
from core._backoff import Backoff
from core._clock import SYSTEM_CLOCK, Clock
from core._errors import IngestError
from core._metrics import METRICS

from ._message import Message
from ._paho import PahoClient, connect_properties, make_client, quick_ack, set_credentials
from ._redelivery import RedeliveryWindow

__all__ = ["Message", "MQTTClient"]

log = logging.getLogger("edgepipe.mqtt")

_pauses = METRICS.counter(
    "edgepipe_mqtt_reader_pauses_total",
    "times edgepipe stopped reading the MQTT socket because max_pending messages waited",
)
_sessions_lost = METRICS.counter(
    "edgepipe_mqtt_sessions_lost_total", "reconnects on which the broker had no session"
)
_connects = METRICS.counter("edgepipe_mqtt_connects_total", "successful MQTT connections")
_connect_failures = METRICS.counter(
    "edgepipe_mqtt_connect_failures_total",
    "MQTT connection attempts that failed (each is retried after a backoff)",
)
_subscribes = METRICS.counter(
    "edgepipe_mqtt_subscribes_total", "subscriptions the broker acknowledged (one per connect)"
)

_tuple_new = tuple.__new__
_READS_PER_WAKE = 64  # TLS: records decrypted but not yet read
#: how long closing waits for the broker to confirm it read the last acknowledgements
CLOSE_SETTLE_S = 2.0


class MQTTClient:
    """An asyncio MQTT client with manual acknowledgement and bounded buffering.

    >>> async with MQTTClient(cfg, ["sensors/+/+"], device_id="pi-1") as mqtt:
    ...     msgs = await mqtt.get_batch(500, 0.02)
    ...     ...
    ...     mqtt.ack(msgs)
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        subscriptions: list[tuple[str, int]],
        *,
        device_id: str,
        max_pending: int = 5000,
        on_state: Callable[[bool], None] | None = None,
        expect_session: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.cfg = cfg
        self.subscriptions = subscriptions
        self.device_id = device_id
        self.max_pending = max_pending
        self.on_state = on_state
        self.client_id = cfg.client_id or f"edgepipe-{device_id}"
        t = cfg.status_topic
        self.status_topic = t.replace("{device}", device_id) if t else None
        #: True when this client id has had a session before (the store holds data): a
        #: first CONNACK without one means the broker lost it
        self.expect_session = expect_session
        self.connected = False
        self.session_present: bool | None = None
        self.generation = 0
        self.stats = collections.Counter()
        self._pending: collections.deque[Message] = collections.deque()
        self._wakeup = asyncio.Event()
        self._pong = asyncio.Event()  # a PINGRESP came (see _settle)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        # registrations are kept by file descriptor number: paho may close a socket (from
        # the connect thread) before the loop thread hears of it, and a closed socket no
        # longer knows its descriptor
        self._fd = -1
        self._writer_fd = -1
        self._reading = False
        self._paused = False
        self._closing = False
        self._interrupted = False
        self._connected_evt = asyncio.Event()
        self._subscribed_evt = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._disconnected = asyncio.Event()
        self._loop_thread: int | None = None
        self._connack: asyncio.Future[tuple[bool, int, str]] | None = None
        #: what the broker sends first after a connect may have been delivered before
        self.redelivery_window = RedeliveryWindow(cfg.redelivery_window_s, clock)
        self._in_window = False  # the window's state at the current socket read
        self._now_ms = 0
        self._client = self._make_client()

    # -- paho set-up ------------------------------------------------------------------
    def _make_client(self) -> PahoClient:
        c = make_client(self.cfg, self.client_id, self.status_topic)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.fast_publish = self._on_publishes
        c.on_pong = self._pong.set
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._in_loop(self._socket_opened)
        c.on_socket_close = self._in_loop(self._socket_closed)
        c.on_socket_register_write = self._in_loop(self._register_write)
        c.on_socket_unregister_write = self._in_loop(self._unregister_write)
        return c

    def _in_loop(self, fn: Callable[[socket.socket], None]) -> Callable[..., None]:
        """A paho socket callback that runs ``fn(sock)`` on the event loop thread: paho
        calls them from connect(), which runs in an executor thread (the TCP/TLS handshake
        blocks)."""

        def callback(client: object, userdata: object, sock: socket.socket) -> None:
            if self._loop is None:
                return
            if threading.get_ident() == self._loop_thread:
                fn(sock)
            else:
                self._loop.call_soon_threadsafe(fn, sock)

        return callback

    # -- lifecycle --------------------------------------------------------------------
    async def __aenter__(self) -> MQTTClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start connecting in the background (retrying with backoff); returns at once."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._supervisor = asyncio.create_task(self._supervise(), name="mqtt-supervisor")
        self._misc = asyncio.create_task(self._misc_loop(), name="mqtt-keepalive")

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected_evt.wait(), timeout)

    async def wait_subscribed(self, timeout: float | None = None) -> None:
        """Until the broker has acknowledged this connection's subscriptions (SUBACK):
        messages published from then on are delivered to this session."""
        await asyncio.wait_for(self._subscribed_evt.wait(), timeout)

    async def close(self) -> None:
        """Publish the offline status, disconnect, stop the background tasks. Idempotent."""
        if self._closing:
            return
        self._closing = True
        c = self._client
        if self.connected:
            try:
                if self.status_topic:
                    c.publish(self.status_topic, b"offline", qos=0, retain=True)
                await self._settle(CLOSE_SETTLE_S)
                c.disconnect()
                c.loop_write()
            except Exception:  # pragma: no cover - best effort on the way out
                pass
        tasks = [t for t in (self._supervisor, self._misc) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.redelivery_window.close()
        self._remove_reader()
        self._remove_writer()
        try:
            c.socket() and c.socket().close()  # type: ignore[union-attr]
        except Exception:
            pass
        self._wakeup.set()

    async def _settle(self, timeout: float) -> None:
        """Before disconnecting: write what is queued (the last PUBACKs) and wait, at most
        ``timeout`` seconds, for the broker's answer to a PINGREQ sent behind it.  A broker
        busy sending may leave a burst of PUBACKs unread in its socket for a while, and the
        reset its next write to a closed socket meets throws away what it had not read:
        those messages would be sent again (and skipped as redeliveries -- nothing lost,
        but a drain's worth of traffic again).  Messages that arrive meanwhile are not
        taken (not acknowledged: the broker keeps them for the session)."""
        c = self._client
        barrier = c.send_barrier()
        if barrier is None:
            return
        self._paused = False  # read again (interrupt() paused it) to see the answer
        self._add_reader()
        c.loop_write()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not c.barrier_passed(barrier) and self.connected:
            left = deadline - loop.time()
            if left <= 0:
                log.warning(
                    "closing before the broker answered within %.1f s; it sends again what "
                    "it had not read the acknowledgement of (skipped as redeliveries)",
                    timeout,
                )
                return
            self._pong.clear()
            try:
                await asyncio.wait_for(self._pong.wait(), left)
            except TimeoutError:
                pass

    async def _supervise(self) -> None:
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        first = True
        while not self._closing:
            self._disconnected.clear()
            try:
                await self._connect(first)
            except (OSError, IngestError, ssl.SSLError) as e:
                wait = backoff.next()
                log.warning(
                    "cannot connect to MQTT broker %s:%d: %s; retrying in %.2fs",
                    self.cfg.host,
                    self.cfg.port,
                    e,
                    wait,
                )
                self.stats["connect_failures"] += 1
                _connect_failures.inc()
                await asyncio.sleep(wait)
                continue
            first = False
            since = time.monotonic()
            await self._disconnected.wait()
            if time.monotonic() - since > 10:
                backoff.reset()  # a healthy connection resets the backoff
            else:
                # dropped soon after connecting: back off before trying again
                await asyncio.sleep(backoff.next())

    async def _connect(self, first: bool) -> None:
        assert self._loop is not None
        c = self._client
        self._connack = self._loop.create_future()
        props = connect_properties(self.cfg)
        v5 = self.cfg.protocol == "5"

        if not first:
            try:
                set_credentials(c, self.cfg)
            except LookupError as e:
                raise IngestError(f"MQTT password: {e}") from None

        def blocking_connect() -> None:
            if first:
                kw = {"clean_start": False} if v5 else {}
                c.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive, properties=props, **kw)
            else:
                c.reconnect()

        await self._loop.run_in_executor(None, blocking_connect)
        try:
            ok, rc, reason = await asyncio.wait_for(self._connack, self.cfg.keepalive)
        except TimeoutError:
            c.drop_socket()
            raise IngestError("no CONNACK from broker") from None
        if not ok:
            c.drop_socket()
            raise IngestError(f"broker refused the connection: {reason} (code {rc})")

    async def _misc_loop(self) -> None:
        c = self._client
        while True:
            await asyncio.sleep(1.0)
            c.keepalive(self._paused)

    # -- paho callbacks (run in the event loop thread) --------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            if self._connack is not None and not self._connack.done():
                self._connack.set_result((False, reason_code.value, str(reason_code)))
            return
        self.generation += 1
        self.connected = True
        self.session_present = bool(flags.session_present)
        # whatever the broker sends first on this connection may have been delivered (and
        # committed) before: check it against the store, DUP flag or not (this may run
        # inside a socket read whose following packets are the first redeliveries)
        self._in_window = self.redelivery_window.open(self._loop)
        if not self.session_present and (self.generation > 1 or self.expect_session):
            # a reconnect, or the first connect of a process whose store already holds
            # data: the broker lost (or expired) the session
            log.warning(
                "broker has no session for %s: messages published while edgepipe was "
                "disconnected may not have been queued (broker restarted without "
                "persistence, or session_expiry too short?)",
                self.client_id,
            )
            self.stats["sessions_lost"] += 1
            _sessions_lost.inc()
        self.stats["sessions"] += 1
        self.stats["connects"] += 1
        _connects.inc()
        # resubscribe every time: harmless with a session, required without one
        client.subscribe([(t, q) for t, q in self.subscriptions])
        if self.status_topic:
            client.publish(self.status_topic, b"online", qos=1, retain=True)
        log.info(
            "connected to %s:%d as %s (session present: %s)",
            self.cfg.host,
            self.cfg.port,
            self.client_id,
            self.session_present,
        )
        self._connected_evt.set()
        if self.on_state:
            self.on_state(True)
        if self._connack is not None and not self._connack.done():
            self._connack.set_result((True, 0, "ok"))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("broker refused %d subscription(s): %s", len(failed), failed)
        else:
            log.info("subscribed to %d topic filter(s)", len(reason_codes))
            _subscribes.inc()
            self._subscribed_evt.set()
        self.stats["subscribed"] += 1

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        connack = self._connack
        if connack is not None and not connack.done():
            # e.g. a TLS 1.3 server rejecting the client certificate after the handshake
            connack.set_result((False, -1, f"connection closed before CONNACK ({reason_code})"))
        was = self.connected
        self.connected = False
        self._connected_evt.clear()
        self._subscribed_evt.clear()
        # messages not yet handed to the runtime will be redelivered on the next session
        dropped = len(self._pending)
        self._pending.clear()
        if was and not self._closing:
            log.warning(
                "disconnected from broker (%s); %d unacknowledged message(s) will be redelivered",
                reason_code,
                dropped,
            )
        self.stats["disconnects"] += 1
        if self.on_state:
            self.on_state(False)
        self._disconnected.set()
        self._wakeup.set()

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:  # noqa: ANN001
        # only QoS 2 gets here (QoS 0/1 take the fast path)
        self._on_publish(msg.topic, msg.payload, msg.qos, msg.mid, bool(msg.dup))

    def _on_publish(self, topic: str, payload: bytes, qos: int, mid: int, dup: bool) -> None:
        self._on_publishes([(topic, payload, qos, mid, dup)])

    def _on_publishes(self, pubs: list[tuple[str, bytes, int, int, bool]]) -> None:
        if self._closing:
            return  # not taken, never acknowledged: the broker keeps them for the session
        # per message: keep this lean (arrival time is taken once per socket read);
        # tuple.__new__ straight: a NamedTuple's own __new__ is one more Python frame
        now, gen, window = self._now_ms, self.generation, self._in_window
        pending = self._pending
        pending.extend(
            [
                _tuple_new(Message, (topic, payload, qos, mid, dup, now, gen, dup or window))
                for topic, payload, qos, mid, dup in pubs
            ]
        )
        if len(pending) >= self.max_pending:
            self._pause()

    def _socket_opened(self, sock: socket.socket) -> None:
        self._remove_reader()
        self._remove_writer()
        self._client.reset_buffer()
        self._sock = sock
        self._fd = sock.fileno()
        self._paused = False
        self._add_reader()

    def _socket_closed(self, sock: socket.socket) -> None:
        if self._sock is sock:
            self._remove_reader()
            self._remove_writer()
            self._sock = None
            self._fd = -1

    def _register_write(self, sock: socket.socket) -> None:
        if self._sock is sock and self._loop is not None and self._writer_fd < 0:
            self._loop.add_writer(self._fd, self._do_write)
            self._writer_fd = self._fd

    def _unregister_write(self, sock: socket.socket) -> None:
        if self._sock is sock:
            self._remove_writer()

    def _remove_writer(self) -> None:
        if self._writer_fd >= 0 and self._loop is not None:
            self._loop.remove_writer(self._writer_fd)
        self._writer_fd = -1

    def _do_write(self) -> None:
        self._client.loop_write()

    def _do_read(self) -> None:
        c = self._client
        pending = self._pending
        self._now_ms = int(time.time() * 1000)
        self._in_window = self.redelivery_window.is_open()
        before = len(pending)
        self.stats["reader_wakes"] += 1
        for _ in range(_READS_PER_WAKE):
            sock = c.socket()
            if sock is None or self._paused:
                break
            if c.read_burst() != paho.MQTT_ERR_SUCCESS:
                break  # an error paho already handled (on_disconnect ran)
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break  # the selector wakes us again if the kernel holds more
        if len(pending) != before:
            self._wakeup.set()
        if self._sock is not None:
            quick_ack(self._sock)

    # -- backpressure -----------------------------------------------------------------
    def _add_reader(self) -> None:
        if self._fd >= 0 and self._loop is not None and not self._reading:
            self._loop.add_reader(self._fd, self._do_read)
            self._reading = True

    def _remove_reader(self) -> None:
        if self._fd >= 0 and self._loop is not None and self._reading:
            self._loop.remove_reader(self._fd)
        self._reading = False

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._remove_reader()
            self.stats["pauses"] += 1
            _pauses.inc()

    def _maybe_resume(self) -> None:
        if self._paused and len(self._pending) < self.max_pending // 2:
            self._paused = False
            self._add_reader()
            if self._loop is not None and self._fd >= 0:
                # TLS may hold decrypted bytes the selector cannot see
                self._loop.call_soon(self._do_read)

    def interrupt(self) -> None:
        """Stop reading the socket and make :meth:`get_batch` return what is buffered."""
        self._interrupted = True
        self._pause()
        self._wakeup.set()

    @property
    def paused(self) -> bool:
        return self._paused

    # -- consuming --------------------------------------------------------------------
    async def get_batch(self, max_messages: int, max_delay: float) -> list[Message]:
        """Wait for at least one message, then fill the batch to ``max_messages`` until
        the oldest message has waited ``max_delay`` seconds (messages that arrived during
        the previous commit have been waiting already).  Returns [] only when closing."""
        pending = self._pending
        while not pending:
            if self._closing or self._interrupted:
                return []
            self._wakeup.clear()
            self._maybe_resume()
            await self._wakeup.wait()
        if len(pending) < max_messages and max_delay > 0:
            waited = time.time() - pending[0].arrival_ms / 1000
            deadline = time.monotonic() + max_delay - max(0.0, waited)
            while len(pending) < max_messages and not (
                self._closing or self._interrupted or self._paused
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
        n = min(max_messages, len(pending))
        out = [pending.popleft() for _ in range(n)]
        self._maybe_resume()
        return out

    def ack(self, messages: list[Message]) -> int:
        """Acknowledge ``messages`` in arrival order; returns how many acks were sent.

        The PUBACKs of a batch go out as one write (one system call, not one per message).
        Messages received on an earlier connection are not acknowledged: the broker
        redelivers them on the current one."""
        if not self.connected:
            return 0
        gen = self.generation
        mids = [m.mid for m in messages if m.qos == 1 and m.generation == gen]
        if not mids:
            return 0
        self._client.send_pubacks(mids, self._sock is not None)
        return len(mids)
