"""What one sync request carries, and how it is built.

* :func:`encode_batch` -- one stored batch in the wire format (columnar, with a series
  table local to the batch); :func:`encode_request` -- the request body (msgpack, then
  zstd/gzip/identity), with the device's status and dead-letter metadata
  (:func:`dead_letter_meta`, never a raw payload); docs/sync-protocol.md has the format;
* :func:`encode_within` -- as many batches as fit ``sync.max_request_bytes`` and, on a
  metered link, what is left of the daily byte budget;
* :func:`classify` and :func:`select_metered` -- on a metered link, which batches go
  first: the classes of ``sync.metered.priority`` in order (alerts = a flagged reading,
  recent = newer than ``recent_hours``, bulk = the rest), each in seq order, the store
  scanned page by page from a cursor per class.

The scheduling (when to send, backoff, links) is :mod:`sync._worker`'s.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from typing import Any

import msgpack

from config._models import SyncConfig
from core._errors import SyncError
from core._model import SeriesRegistry

__all__ = [
    "DEAD_LETTERS_PER_REQUEST",
    "classify",
    "compress",
    "dead_letter_meta",
    "encode_batch",
    "encode_request",
    "encode_within",
    "select_metered",
]

#: Batches decrypted per page while looking for a priority class on a metered link.
_SCAN_PAGE = 64
#: Most batches looked at per request while scanning (bounds the work of one step).
_SCAN_MAX = 4096


def encode_batch(seq: int, batch: Any, registry: SeriesRegistry) -> bytes:
    """One batch in the wire format: columnar, with a series table local to the batch."""
    sids = batch.series
    # the batch's series in order of first use, then each reading's index among them
    local = dict.fromkeys(sids)
    series: list[list[Any]] = []
    for i, sid in enumerate(local):
        key = registry.key(sid)
        local[sid] = i
        series.append([key.device, key.metric, key.tag_dict])
    sid_out = list(map(local.__getitem__, sids))
    return msgpack.packb(
        {
            "seq": seq,
            "series": series,
            "sid": sid_out,
            "ts": batch.ts,
            "val": batch.value,
            "flags": batch.flags,
        },
        use_bin_type=True,
    )


def compress(body: bytes, compression: str) -> tuple[bytes, str]:
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(body), "zstd"
    if compression == "gzip":
        return gzip.compress(body, compresslevel=6, mtime=0), "gzip"
    return body, "identity"


def encode_request(
    device: str,
    blobs: list[bytes],
    status: dict[str, Any],
    compression: str,
    dead_letters: list[dict[str, Any]] | None = None,
    extras: dict[str, Any] | None = None,
) -> tuple[bytes, str]:
    """The request body; ``extras`` are the optional device-record parts (``health``: the
    block of :func:`sync._health.encode_health`, ``logs``: log records)."""
    top: dict[str, Any] = {"v": 1, "device": device, "status": status, "batches": blobs}
    if dead_letters:
        top["dead_letters"] = dead_letters
    for k, v in (extras or {}).items():
        if v:
            top[k] = v
    return compress(msgpack.packb(top, use_bin_type=True), compression)


def dead_letter_meta(seq: int, d: Any) -> dict[str, Any]:
    """What the cloud's dead-letter log shows of one dead letter (never the raw payload)."""
    return {
        "seq": seq,
        "ts": d.ts,
        "topic": d.topic,
        "stage": d.stage,
        "reason": d.reason,
        "size": len(d.payload),
    }


#: Dead letters (metadata) sent along with one request.
DEAD_LETTERS_PER_REQUEST = 200


def classify(batch: Any, recent_after_ms: int) -> str:
    """alerts (a flagged reading), recent (newest reading after the cut-off) or bulk."""
    if any(batch.column("flags")):
        return "alerts"
    if len(batch) and max(batch.column("ts")) >= recent_after_ms:
        return "recent"
    return "bulk"


async def select_metered(
    store: Any,
    priority: Sequence[str],
    limit: int,
    cursors: dict[str, int],
    recent_after_ms: int,
) -> tuple[list[Any], dict[str, int], str | None]:
    """Up to ``limit`` batches of the first class of ``priority`` that has any, the seq to
    advance that class's cursor to once they are acknowledged, and (nothing to send) why
    the rest waits.  ``cursors`` (class -> seq scanned up to) is updated for classes found
    empty; ``store`` is the worker's ``BatchSource``."""
    for cls in priority:
        if cls == "bulk":  # everything that is left, oldest first
            got = await store.unsynced(limit=limit)
            if got:
                return got, {}, None
            continue
        after = cursors.get(cls, 0)
        picked: list[Any] = []
        scanned = 0
        while len(picked) < limit and scanned < _SCAN_MAX:
            page = await store.unsynced(after=after, limit=_SCAN_PAGE)
            if not page:
                break
            for sb in page:
                scanned += 1
                if classify(sb.batch, recent_after_ms) == cls:
                    picked.append(sb)
                    if len(picked) >= limit:
                        break
                after = sb.seq
            if picked and len(picked) >= limit:
                after = picked[-1].seq
        if picked:
            return picked, {cls: after}, None
        cursors[cls] = after  # nothing of this class up to here
    left = [c for c in ("alerts", "recent", "bulk") if c not in priority]
    why = f"{', '.join(left)} batches wait for an unmetered link" if left else None
    return [], {}, why


def encode_within(
    device: str,
    registry: SeriesRegistry,
    cfg: SyncConfig,
    batches: list[Any],
    status: dict[str, Any],
    budget_left: int | None,
    dead_letters: list[dict[str, Any]] | None = None,
    extras: dict[str, Any] | None = None,
) -> tuple[bytes, str, list[Any]]:
    """The body of one request (and its encoding) with the leading ``batches`` that fit
    ``cfg.max_request_bytes`` and ``budget_left`` bytes (None: no budget), and those
    batches; an empty body when not even one fits the budget.  ``extras`` (health, logs)
    ride along (see :func:`encode_request`)."""
    blobs, size = [], 0
    for sb in batches:
        try:
            blob = encode_batch(sb.seq, sb.batch, registry)
        except IndexError:
            if blobs:  # send what this process can name; the rest on the next run
                break
            raise SyncError(
                f"batch {sb.seq} uses a series this process has not loaded (another "
                "edgepipe process added it since the store was opened); run again"
            ) from None
        if blobs and size + len(blob) > cfg.max_request_bytes:
            break
        blobs.append(blob)
        size += len(blob)
    while True:
        body, encoding = encode_request(
            device, blobs, status, cfg.compression, dead_letters, extras
        )
        if budget_left is None or len(body) <= budget_left:
            return body, encoding, batches[: len(blobs)]
        if len(blobs) <= 1:
            return b"", encoding, []
        blobs = blobs[: len(blobs) // 2]
