"""Coverage-guided fuzzing of the ABI output parser (``pipeline.chain._records``): the
:class:`core._model.Batch` of a stage's packed output, and the host's own check that a filter
stage's output is a subsequence of its input (``pipeline.chain._check.OutputCheck``).

Any bytes either parse, to records that pack back to the same bytes and read the same
columns, or raise a :class:`core._errors.FilterRuntimeError` with a code; the subsequence
check agrees with a plain two-pointer reference.  Run from the repository root (docs/security.md, "Fuzzing")::

    python fuzz/records.py -runs=20000 CORPUS_DIR fuzz/corpus/records
"""

from __future__ import annotations

import struct
import sys

import atheris

with atheris.instrument_imports(include=["pipeline.chain._records", "core._model"]):
    from core._errors import FilterRuntimeError
    from pipeline.chain._check import OutputCheck
    from pipeline.chain._records import REC, unpack

_CHECK = OutputCheck()

_RECORD = struct.Struct("<qdII")


def _reference_subsequence(out: bytes, inp: bytes) -> bool:
    outs = [out[i : i + REC] for i in range(0, len(out), REC)]
    ins = [inp[i : i + REC] for i in range(0, len(inp), REC)]
    j = 0
    for rec in outs:
        while j < len(ins) and ins[j] != rec:
            j += 1
        if j == len(ins):
            return False
        j += 1
    return True


def _parse(raw: bytes) -> None:
    try:
        batch = unpack(raw)
    except FilterRuntimeError as exc:
        assert exc.code, f"a FilterRuntimeError without a code: {exc!r}"
        assert len(raw) % REC, f"whole records refused: {exc}"
        return
    assert len(raw) % REC == 0, f"{len(raw)} bytes parsed as records"
    assert batch.pack() == raw, "records do not pack back to the same bytes"
    ref = list(_RECORD.iter_unpack(raw))
    assert batch.ts == [r[0] for r in ref] and batch.series == [r[2] for r in ref]
    assert batch.flags == [r[3] for r in ref]
    assert struct.pack(f"<{len(ref)}d", *batch.value) == struct.pack(
        f"<{len(ref)}d", *(r[1] for r in ref)
    )


def one_input(data: bytes) -> None:
    _parse(data)
    if len(data) < 1 + REC:
        return
    mode, body = data[0], data[1:]
    nrec = len(body) // REC
    recs = [body[i * REC : (i + 1) * REC] for i in range(nrec)]
    if mode & 1:  # out drawn from inp: every record whose bit is set in the trailing bytes
        mask = int.from_bytes(body[nrec * REC :] or b"\xff", "little")
        out_recs = [r for i, r in enumerate(recs) if mask >> (i % 64) & 1]
        if mode & 2 and len(out_recs) > 1:
            out_recs.reverse()
        if mode & 4 and out_recs:
            out_recs[0] = bytes([out_recs[0][0] ^ 1]) + out_recs[0][1:]
        inp, out = b"".join(recs), b"".join(out_recs)
    else:  # two halves
        half = (mode >> 1) % (nrec + 1)
        inp, out = b"".join(recs[:half]), b"".join(recs[half:])
    assert _CHECK.is_subsequence(out, inp) == _reference_subsequence(out, inp), (
        out.hex(),
        inp.hex(),
    )


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
