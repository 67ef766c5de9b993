"""MQTT messages -> a columnar batch, dead letters and message identities.

Message identity (de-duplication rule): a message is identified by a keyed 128-bit hash of
its topic and payload bytes.  The identities of committed messages are stored with the
batch; a message that may have been delivered before -- the broker set its DUP flag, or it
arrived in the redelivery window after a (re)connect (:mod:`._redelivery`) -- whose
identity is already stored is acknowledged and skipped, so a redelivery never becomes a
duplicate reading.  Other messages are not checked, so two identical payloads that really
were published twice outside the window are both kept.  Give payloads a sequence number or
a timestamp if identical repeats matter (docs/ingest.md, "Redeliveries").

Per batch, the identities and the common JSON payload (what :func:`._codecs.simple_json`
turns into one reading, on a topic whose series is known) are computed by one call of the
ingest kernel (:mod:`._kernel`); Python decodes only what it leaves (``kernel=False``: the
pure-Python path for everything, which the kernel path must match byte for byte).
"""

from __future__ import annotations

import hashlib
import logging
import os
from array import array
from collections.abc import Awaitable, Callable
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

from config._models import SubscriptionConfig
from core._errors import DecodeError
from core._metrics import METRICS
from core._model import Batch, DeadLetter, SeriesRegistry

from ._codecs import TopicTemplate, decode_payload, object_rows, simple_json
from ._kernel import IngestKernel
from ._message import Message
from ._names import check_names

__all__ = ["Decoded", "Decoder"]

_blake2b = hashlib.blake2b

log = logging.getLogger("edgepipe.ingest")

_received = METRICS.counter("edgepipe_messages_received_total", "MQTT messages received", ["qos"])
_readings_in = METRICS.counter("edgepipe_readings_in_total", "readings decoded from messages")
_dead = METRICS.counter(
    "edgepipe_dead_letters_total", "messages or batches dead-lettered", ["stage", "reason"]
)
_dupes = METRICS.counter("edgepipe_redeliveries_skipped_total", "redelivered messages skipped")
_checked = METRICS.counter(
    "edgepipe_redelivery_checks_total",
    "QoS 1 messages looked up in the store as possible redeliveries, by why: the DUP flag "
    "(dup) or arrival in the redelivery window after a connect (window)",
    ["reason"],
)


#: (subscription, device and metric from the topic, the timestamp field when the
#: subscription's payloads may take simple_json's one-call path, else None)
_Route = tuple[SubscriptionConfig, str | None, str | None, str | None]
_NO_ROUTE = object()  # a topic not looked up yet (None: looked up, matches nothing)
_SERIES_CACHE_MAX = 100_000
_topic_of, _payload_of, _qos_of, _arrival_of = (
    itemgetter(0),
    itemgetter(1),
    itemgetter(2),
    itemgetter(5),
)
_first, _second = itemgetter(0), itemgetter(1)
#: the kernel's series code of a message it must leave to Python
_SLOW = -1


class Decoded(NamedTuple):
    batch: Batch
    dead_letters: list[DeadLetter]
    keys: list[bytes]  # identities of every QoS>0 message in this batch


def _counted(out: Decoded, n_qos1: int, n: int) -> Decoded:
    """``out``, its readings and the ``n`` messages it came from (by QoS) counted."""
    _readings_in.inc(len(out.batch))
    if n_qos1:
        _received.inc(n_qos1, "1")
    if n_qos1 != n:
        _received.inc(n - n_qos1, "0")
    return out


class Decoder:
    def __init__(
        self,
        subscriptions: list[SubscriptionConfig],
        registry: SeriesRegistry,
        *,
        device_id: str,
        max_payload: int,
        identity_key: bytes = b"",
        kernel: bool = True,
        cache_dir: Path | None = None,
    ) -> None:
        self.subs = [(TopicTemplate(s.topic), s) for s in subscriptions]
        self.registry = registry
        self.device_id = device_id
        self.max_payload = max_payload
        self._key = identity_key[:64]
        self._keys_for: tuple[list[Message], list[bytes]] | None = None
        self._routes: dict[str, _Route | None] = {}
        #: (device, metric) -> series id of untagged series whose names passed check_names
        self._series: dict[tuple[str, str], int] = {}
        #: the kernel's view of a topic: its bytes and b"\0", and its series code
        #: (series id << 8 | index of its timestamp field) or _SLOW
        self._fast: dict[str, tuple[bytes, int]] = {}
        self._kernel_for: tuple[list[Message], tuple[bytes, bytes, bytes]] | None = None
        fields: list[str] = []
        for s in subscriptions:
            if s.timestamp_field not in fields and len(fields) < 255:
                fields.append(s.timestamp_field)
        self._field_ix = {f: i for i, f in enumerate(fields)}
        self._kernel = IngestKernel(self._key, fields, max_payload, cache_dir) if kernel else None

    @property
    def topic_filters(self) -> list[tuple[str, int]]:
        return [(t.filter, s.qos) for t, s in self.subs]

    def identity(self, m: Message) -> bytes:
        return _blake2b(
            b"%s\0%s" % (m.topic.encode(), m.payload), digest_size=16, key=self._key
        ).digest()

    def _route(self, topic: str) -> _Route | None:
        try:
            return self._routes[topic]
        except KeyError:
            pass
        found = None
        for tmpl, sub in self.subs:
            hit = tmpl.match(topic)
            if hit is not None:
                device, metric = hit[0], hit[1] or sub.metric
                simple = (
                    sub.format in ("json", "auto")
                    and sub.timestamp == "payload"
                    and bool(device)
                    and bool(metric)
                )
                found = (sub, hit[0], hit[1], sub.timestamp_field if simple else None)
                break
        if len(self._routes) > 100_000:
            self._routes.clear()
        self._routes[topic] = found
        return found

    def decode(
        self,
        msgs: list[Message],
        skip: set[bytes] | frozenset[bytes] = frozenset(),
    ) -> Decoded:
        """Decode ``msgs``; messages whose identity is in ``skip`` are already stored."""
        if self._kernel is None or not msgs:
            return self.decode_python(msgs, skip)
        ids, status, recs = self._kernel_run(msgs)
        n = len(msgs)
        n_qos1 = n - list(map(_qos_of, msgs)).count(0)
        if n_qos1 == n and not skip and len(recs) == 24 * n:
            # the common batch: every message a QoS 1 simple reading, none stored before
            keys = [ids[j : j + 16] for j in range(0, 16 * n, 16)]
            batch, dead = Batch.from_records(recs), []
        else:
            batch, dead, keys = self._merge(msgs, skip, ids, status, recs)
        return _counted(Decoded(batch, dead, keys), n_qos1, n)

    def _merge(
        self,
        msgs: list[Message],
        skip: set[bytes] | frozenset[bytes],
        ids: bytes,
        status: bytes,
        recs: bytes,
    ) -> tuple[Batch, list[DeadLetter], list[bytes]]:
        """The kernel's records and Python's rows of the messages it left, in message order."""
        pieces: list[bytes] = []
        dead: list[DeadLetter] = []
        keys: list[bytes] = []
        todo: list[Message] = []  # messages left to Python since the last kernel record
        r = run = 0  # the kernel's records: the next one, the start of the pending run
        for i, m in enumerate(msgs):
            if m.qos:
                key = ids[16 * i : 16 * i + 16]
                if skip and key in skip:
                    _dupes.inc()
                    if status[i]:  # drop its record
                        if r > run:
                            pieces.append(recs[run:r])
                        r += 24
                        run = r
                    continue
                keys.append(key)
            if status[i]:
                if todo:
                    pieces.append(self._rows(todo, dead))
                    todo = []
                r += 24
            else:
                if r > run:
                    pieces.append(recs[run:r])
                    run = r
                todo.append(m)
        if todo:
            pieces.append(self._rows(todo, dead))
        if r > run:
            pieces.append(recs[run:r])
        return Batch.from_records(b"".join(pieces)), dead, keys

    def _kernel_run(self, msgs: list[Message]) -> tuple[bytes, bytes, bytes]:
        """The kernel's (identities, statuses, records) of ``msgs`` (kept from
        :meth:`dup_identities` when it was given the same list)."""
        cached = self._kernel_for
        self._kernel_for = None
        if cached is not None and cached[0] is msgs:
            return cached[1]
        topics = list(map(_topic_of, msgs))
        ents = list(map(self._fast.get, topics))
        if None in ents:
            ents = [
                e if e is not None else self._fast_entry(t)
                for e, t in zip(ents, topics, strict=True)
            ]
        parts: list[bytes] = [b""] * (2 * len(msgs))
        parts[0::2] = map(_first, ents)
        parts[1::2] = map(_payload_of, msgs)
        codes = array("q", map(_second, ents))
        try:
            arrivals = array("q", map(_arrival_of, msgs))
        except OverflowError:  # an arrival time no clock gives: Python decodes them all
            arrivals, codes = array("q", bytes(8 * len(msgs))), array("q", [_SLOW] * len(msgs))
        assert self._kernel is not None
        return self._kernel.run(parts, codes, arrivals)

    def _fast_entry(self, topic: str) -> tuple[bytes, int]:
        """The kernel's view of ``topic`` (see ``_fast``), remembered (bounded)."""
        code = _SLOW
        route = self._route(topic)
        if route is not None and route[3] is not None and "\0" not in topic:
            sub, device, metric, ts_field = route
            sid = self._series.get((device, metric or sub.metric))  # type: ignore[arg-type]
            if sid is not None and ts_field in self._field_ix:
                code = sid << 8 | self._field_ix[ts_field]
        if len(self._fast) >= _SERIES_CACHE_MAX:
            self._fast.clear()
        entry = self._fast[topic] = (topic.encode() + b"\0", code)
        return entry

    def decode_python(
        self,
        msgs: list[Message],
        skip: set[bytes] | frozenset[bytes] = frozenset(),
    ) -> Decoded:
        """:meth:`decode` without the kernel: every message decoded in Python."""
        keys: list[bytes] = []
        identity = self.identity
        cached = self._keys_for
        self._keys_for = None
        known = cached[1] if cached is not None and cached[0] is msgs else None
        todo: list[Message] = []
        n_qos1 = 0
        for i, m in enumerate(msgs):
            if m.qos:
                n_qos1 += 1
                key = known[i] if known is not None else identity(m)
                if skip and key in skip:
                    _dupes.inc()
                    continue
                keys.append(key)
            todo.append(m)
        dead: list[DeadLetter] = []
        batch = Batch.from_records(self._rows(todo, dead))
        return _counted(Decoded(batch, dead, keys), n_qos1, len(msgs))

    def _rows(self, msgs: list[Message], dead: list[DeadLetter]) -> bytes:
        """The packed records of ``msgs`` decoded in Python; their dead letters to ``dead``."""
        # typed columns (no Python object kept per reading), packed once at the end
        ts_l, val_l, sid_l = array("q"), array("d"), array("I")
        add_ts, add_val, add_sid = ts_l.append, val_l.append, sid_l.append
        routes, route_of = self._routes, self._route
        series, fast = self._series, self._fast
        max_payload = self.max_payload
        for m in msgs:
            mark = len(sid_l)
            try:
                payload = m.payload
                if len(payload) > max_payload:
                    raise DecodeError(
                        f"payload of {len(payload)} bytes exceeds max_payload_bytes ({max_payload})"
                    )
                route = routes.get(m.topic, _NO_ROUTE)
                if route is _NO_ROUTE:
                    route = route_of(m.topic)
                if route is None:
                    raise DecodeError("topic matches no subscription template")
                sub, t_device, t_metric, ts_field = route
                metric = t_metric or sub.metric
                if ts_field is not None and payload[:1] == b"{":
                    got = simple_json(payload, ts_field, m.arrival_ms)
                    if type(got) is tuple:  # one reading, device and metric from the topic
                        sid = series.get((t_device, metric))
                        if sid is None:
                            sid = self._new_series(t_device, metric)  # type: ignore[arg-type]
                        entry = fast.get(m.topic)
                        if entry is not None and entry[1] == _SLOW:  # the kernel's from now on
                            fast[m.topic] = self._fast_entry(m.topic)
                        add_ts(got[0])
                        add_val(got[1])
                        add_sid(sid)
                        continue
                    if got is not None:
                        rows = object_rows(got, metric, m.arrival_ms, sub)
                    else:
                        rows = decode_payload(payload, sub, metric, m.arrival_ms)
                else:
                    rows = decode_payload(payload, sub, metric, m.arrival_ms)
                for device, metric, ts, value, tags in rows:
                    dev = device or t_device or sub.device
                    if tags is None:
                        sid = series.get((dev, metric))
                        if sid is None:
                            sid = self._new_series(dev, metric)
                    else:
                        sid = self._tagged_series(dev, metric, tags)
                    add_ts(ts)
                    add_val(value)
                    add_sid(sid)
            except DecodeError as e:
                # drop whatever this message appended before the error
                del ts_l[mark:], val_l[mark:], sid_l[mark:]
                reason = e.reason
                _dead.inc(1, "ingest", reason.split(":")[0][:60])
                dead.append(DeadLetter(m.arrival_ms, m.topic, reason, bytes(m.payload), None))
        if not sid_l:
            return b""
        return Batch.from_columns(ts_l, val_l, sid_l).raw  # type: ignore[return-value]

    def _new_series(self, device: str | None, metric: str) -> int:
        """The id of the untagged series (device, metric), after checking both names;
        remembered (bounded), so the next reading of the series costs one lookup."""
        if device is None:
            raise DecodeError("no device: neither the topic nor the payload names one")
        check_names(device, metric)
        sid = self.registry.intern(device, metric)
        if len(self._series) >= _SERIES_CACHE_MAX:
            self._series.clear()
        self._series[(device, metric)] = sid
        return sid

    def _tagged_series(self, device: str | None, metric: str, tags: dict[str, str]) -> int:
        if device is None:
            raise DecodeError("no device: neither the topic nor the payload names one")
        check_names(device, metric)
        return self.registry.intern(device, metric, tags)

    def dup_identities(self, msgs: list[Message]) -> list[bytes]:
        """Identities of the messages that may have been delivered before: DUP flag set or
        received in the redelivery window after a (re)connect.  (The kernel's results for
        the whole batch are kept for the :meth:`decode` call that follows.)"""
        if self._kernel is None or not msgs:
            return self.dup_identities_python(msgs)
        done = self._kernel_run(msgs)
        self._kernel_for = (msgs, done)
        ids = done[0]
        out = [ids[16 * i : 16 * i + 16] for i, m in enumerate(msgs) if m.maybe_seen and m.qos]
        if out:
            self._count_checks(msgs, len(out))
        return out

    def dup_identities_python(self, msgs: list[Message]) -> list[bytes]:
        """:meth:`dup_identities` without the kernel (for :meth:`decode_python`)."""
        key, b2 = self._key, _blake2b  # identity() inline: one call less per message
        keys = [
            b2(b"%s\0%s" % (m.topic.encode(), m.payload), digest_size=16, key=key).digest()
            if m.qos
            else b""
            for m in msgs
        ]
        self._keys_for = (msgs, keys)
        out = [k for m, k in zip(msgs, keys, strict=True) if m.maybe_seen and m.qos]
        if out:
            self._count_checks(msgs, len(out))
        return out

    @staticmethod
    def _count_checks(msgs: list[Message], n_out: int) -> None:
        """A batch after a connect or with redeliveries: counting costs a pass."""
        n_dup = sum(1 for m in msgs if m.dup and m.qos)
        if n_dup:
            _checked.inc(n_dup, "dup")
        if n_dup != n_out:
            _checked.inc(n_out - n_dup, "window")


def fault_hook() -> Callable[[], Awaitable[None] | None] | None:
    """Test-only fault hooks, from ``EDGEPIPE_FAULT`` (unset in production), run by the
    runtime right after each commit and before the acknowledgement:

    ``crash_after_commit:K``  exit abruptly (``os._exit(137)``, like ``kill -9``) after the
                              K-th commit, so tests can prove such a batch is redelivered
                              and stored once;
    ``slow_commit:MS``        every commit takes MS milliseconds longer (without blocking
                              the event loop), a store that cannot keep up.
    """
    spec = os.environ.get("EDGEPIPE_FAULT", "")
    if not spec:
        return None
    name, _, arg = spec.partition(":")
    if name not in ("crash_after_commit", "slow_commit") or not arg.isdigit() or int(arg) < 1:
        raise ValueError(
            f"EDGEPIPE_FAULT={spec!r}: expected crash_after_commit:K or slow_commit:MS"
        )
    if name == "slow_commit":
        import asyncio

        delay = int(arg) / 1000
        return lambda: asyncio.sleep(delay)
    left = int(arg)

    def tick() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            log.warning("EDGEPIPE_FAULT: exiting after a commit, before acknowledging")
            logging.shutdown()
            os._exit(137)

    return tick
