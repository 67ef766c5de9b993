"""What the store's files give away (nothing readable), tamper detection, wrong keys, and
the forward migration from a schema-1 file."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
import struct
from pathlib import Path

import msgpack
import pytest

from core._errors import KeyError_, StoreError, TamperedError
from core._model import Batch, DeadLetter
from storage import SCHEMA_VERSION, Keyring, Sealer, Store, generate_key_line
from storage._schema import _V1

DEVICE = "sec-dev"
CANARY_VALUE = 12345.678901
CANARIES = [
    b"CANARYDEVICE7",
    b"CANARYMETRIC7",
    b"CANARYTAGKEY7",
    b"CANARYTAGVAL7",
    b"CANARYTOPIC7",
    b"CANARYPAYLOAD7",
    b"CANARYSTAGE7",
    b"CANARYSTATE7",
    b"CANARYREASON7",
    DEVICE.encode(),  # even the device id (bound into the AAD) is never stored in rows
    struct.pack(">d", CANARY_VALUE),  # msgpack float64
    struct.pack("<d", CANARY_VALUE),
]


def raw(db: Path) -> bytes:
    """Every byte of the database, its WAL and its shared-memory file."""
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")))


def leaks(db: Path, needles: list[bytes]) -> list[bytes]:
    data = raw(db)
    return [n for n in needles if n in data]


def ring(text: str) -> Keyring:
    return Keyring.parse(text, "test")


async def _fill(s: Store, count: int, start: int = 0, canary: bool = True) -> list[int]:
    seqs = []
    for i in range(start, start + count):
        b = Batch()
        if canary:
            sid = s.registry.intern(
                "CANARYDEVICE7", "CANARYMETRIC7", {"CANARYTAGKEY7": "CANARYTAGVAL7"}
            )
            b.append(1_700_000_000_000 + i, CANARY_VALUE, sid)
        other = s.registry.intern("plain", "x")
        for j in range(150):
            b.append(1_700_000_000_000 + i * 1000 + j, i + j * 0.25, other)
        dead = [DeadLetter(1, "CANARYTOPIC7", "CANARYREASON7", b"CANARYPAYLOAD7")] if canary else []
        states = {"CANARYSTAGE7": b"CANARYSTATE7"} if canary else {}
        seqs.append(await s.commit(b, dead, [bytes(16)], states))
    return seqs


def test_nothing_readable_after_insert_eviction_and_rotation(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    k1 = generate_key_line("k1")

    async def go() -> None:
        # 1. insert: check while the store is open (WAL full of frames) and after close
        s = await Store.open(db, ring(k1), device_id=DEVICE, quota_bytes=120_000)
        await _fill(s, 5)
        assert Path(f"{db}-wal").stat().st_size > 0
        assert leaks(db, CANARIES) == []
        await s.close()
        assert leaks(db, CANARIES) == []

        con = sqlite3.connect(db)
        first = [bytes(r[0][40:72]) for r in con.execute("SELECT blob FROM batches ORDER BY seq")]
        con.close()
        # 2. eviction (drop_oldest): the evicted rows' ciphertext is gone from every file
        s = await Store.open(
            db, ring(k1), device_id=DEVICE, quota_bytes=120_000, on_full="drop_oldest"
        )
        await _fill(s, 200, start=5, canary=False)
        st = await s.stats()
        assert st["evicted_batches"] >= 5
        assert leaks(db, first) == [], "ciphertext of evicted rows lingers (WAL or free pages)"
        assert leaks(db, CANARIES) == []
        await s.close()

        # 3. rotation + re-encryption: no ciphertext made under the old key remains
        s = await Store.open(db, ring(k1), device_id=DEVICE, quota_bytes=10**9)
        await _fill(s, 3, start=300)
        await s.close()
        con = sqlite3.connect(db)
        old = [
            bytes(r[0][12:44])
            for t in ("batches", "series", "dead_letters", "filter_state", "secrets")
            for r in con.execute(f"SELECT blob FROM {t}")
        ]
        con.close()
        k2 = generate_key_line("k2")
        s = await Store.open(db, ring(k1 + "\n" + k2), device_id=DEVICE, quota_bytes=10**9)
        assert await s.reencrypt(chunk=16) == len(old)
        assert set(await s.rows_by_key()) == {"k2"}
        assert leaks(db, old) == [], "old-key ciphertext lingers after re-encryption"
        assert leaks(db, CANARIES) == []
        await s.close()
        assert leaks(db, old) == [] and leaks(db, CANARIES) == []
        # and the data is all there under the new key alone
        async with await Store.open(db, ring(k2), device_id=DEVICE) as s:
            await s.verify()
            assert await s.load_states() == {"CANARYSTAGE7": b"CANARYSTATE7"}
            assert {sb.seq for sb in await s.batches()} >= {206, 207, 208}

    asyncio.run(go())


# -- tampering -------------------------------------------------------------------------


@pytest.fixture
def small_store(tmp_path: Path) -> tuple[Path, Keyring]:
    db = tmp_path / "store.db"
    kr = ring(generate_key_line("k1"))

    async def go() -> None:
        async with await Store.open(db, kr, device_id=DEVICE) as s:
            await _fill(s, 6)

    asyncio.run(go())
    return db, kr


def _sql(db: Path, *stmts: str) -> None:
    con = sqlite3.connect(db, isolation_level=None)
    for st in stmts:
        con.execute(st)
    con.close()


def _read_all(db: Path, kr: Keyring) -> None:
    async def go() -> None:
        async with await Store.open(db, kr, device_id=DEVICE) as s:
            await s.batches()
            await s.dead_letters()
            await s.load_states()

    asyncio.run(go())


@pytest.mark.parametrize(
    "stmts, table, seq",
    [
        (
            [
                "UPDATE batches SET blob = CAST(substr(blob, 1, 40) || "
                "x'ff' || substr(blob, 42) AS BLOB) WHERE seq = 3"
            ],
            "batches",
            3,
        ),  # fmt: skip
        (
            ["UPDATE batches SET blob = (SELECT blob FROM batches WHERE seq = 5) WHERE seq = 2"],
            "batches",
            2,
        ),  # fmt: skip
        (
            [
                "UPDATE batches SET seq = 100 WHERE seq = 2",
                "UPDATE batches SET seq = 2 WHERE seq = 4",
                "UPDATE batches SET seq = 4 WHERE seq = 100",
            ],
            "batches",
            2,
        ),  # fmt: skip
        (
            [
                "UPDATE dead_letters SET blob = (SELECT blob FROM batches WHERE seq = 1) "
                "WHERE seq = 1"
            ],
            "dead_letters",
            1,
        ),  # fmt: skip
        (["UPDATE batches SET n = n - 1 WHERE seq = 6"], "batches", 6),
        (["UPDATE batches SET t_min = t_min + 5 WHERE seq = 4"], "batches", 4),
        (["UPDATE filter_state SET blob = (SELECT blob FROM secrets)"], "filter_state", None),
    ],
    ids=[
        "flipped-byte",
        "copied-blob",
        "swapped-seq",
        "moved-table",
        "count",
        "time-range",
        "state-from-secrets",
    ],  # fmt: skip
)
def test_tampering_is_detected(small_store, stmts, table, seq) -> None:
    db, kr = small_store
    _sql(db, *stmts)
    with pytest.raises(TamperedError) as e:
        _read_all(db, kr)
    assert e.value.table == table
    if seq is not None:
        assert e.value.seq == seq
    with pytest.raises(TamperedError):  # verify() finds it too
        asyncio.run(_verify(db, kr))


async def _verify(db: Path, kr: Keyring) -> dict[str, int]:
    async with await Store.open(db, kr, device_id=DEVICE) as s:
        return await s.verify()


def test_deleted_batch_is_reported_missing(small_store) -> None:
    db, kr = small_store
    _sql(db, "DELETE FROM batches WHERE seq = 3")
    with pytest.raises(TamperedError, match="1 batch\\(es\\) missing"):
        asyncio.run(_verify(db, kr))


def test_truncated_file_is_a_store_error(small_store) -> None:
    db, kr = small_store
    data = db.read_bytes()
    assert not Path(f"{db}-wal").exists()
    db.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError) as e:
        asyncio.run(_verify(db, kr))
    assert "integrity" in str(e.value) or "damaged" in str(e.value)
    # reading it plainly fails too (never a silently shorter list)
    try:
        _read_all(db, kr)
    except StoreError:
        pass
    else:
        raise AssertionError("reading a truncated store succeeded")


def test_garbage_file_is_a_store_error(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="damaged or not an edgepipe store"):
        asyncio.run(_verify(db, ring(generate_key_line())))
    assert db.read_bytes() == b"this is not sqlite" * 100


# -- wrong or missing keys ---------------------------------------------------------------


def _digest(db: Path) -> str:
    return hashlib.sha256(db.read_bytes()).hexdigest()


def test_wrong_or_missing_key_is_clear_and_changes_nothing(small_store) -> None:
    db, kr = small_store
    before = _digest(db)
    wrong_same_id = generate_key_line("k1")
    other_id = generate_key_line("zz")
    for text, match in [
        (wrong_same_id, "is not the key this store was written with"),
        (other_id, r"key id\(s\) \['k1'\] that are not in the keyring"),
    ]:
        with pytest.raises(KeyError_, match=match) as e:
            asyncio.run(_verify(db, ring(text)))
        assert text.split()[1] not in str(e.value)  # no key material in the message
        assert "nothing was changed" in str(e.value)
        assert _digest(db) == before
    # the right key still reads everything
    assert asyncio.run(_verify(db, kr))["batches"] == 6


# -- migration -------------------------------------------------------------------------


def _v1_key_check(key: bytes, kid: str) -> bytes:
    """Schema 1's key check value, written out independently of the code that reads it: a
    constant sealed under an all-zero nonce with the row-place associated data."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aad = b"edgepipe|%s|meta|kcv|%s|v1" % (DEVICE.encode(), kid.encode())
    return AESGCM(key).encrypt(b"\0" * 12, b"edgepipe key check", aad)


def _make_v1(db: Path, kr: Keyring) -> None:
    """A store exactly as schema-1 edgepipe wrote it (stage names in clear)."""
    s = Sealer(kr, DEVICE)
    kid = kr.active_id
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA secure_delete=ON")
    for st in _V1.split(";"):
        if st.strip():
            con.execute(st)
    con.execute("INSERT INTO meta VALUES ('device', ?)", (DEVICE,))
    con.execute(
        "INSERT INTO meta VALUES (?, ?)",
        (f"kcv:{kid}", _v1_key_check(kr.key(kid), kid)),
    )
    _, blob = s.seal("series", 0, msgpack.packb(["boiler", "temp", []]))
    con.execute("INSERT INTO series VALUES (0, ?, ?)", (kid, blob))
    for seq in (1, 2, 3):
        ts = [1_700_000_000_000 + seq * 10 + j for j in range(4)]
        _, blob = s.seal("batches", seq, msgpack.packb([[0] * 4, ts, [1.5] * 4, [0] * 4]))
        con.execute(
            "INSERT INTO batches (seq, key_id, blob, n, t_min, t_max) VALUES (?,?,?,?,?,?)",
            (seq, kid, blob, 4, ts[0], ts[-1]),
        )
    _, blob = s.seal("filter_state", "CANARYSTAGE7", b"CANARYSTATE7")
    con.execute("INSERT INTO filter_state VALUES ('CANARYSTAGE7', ?, ?)", (kid, blob))
    con.execute("INSERT INTO seen VALUES (?, 3)", (b"\x01" * 16,))
    con.execute("INSERT INTO meta VALUES (?, 5)", (f"uses:{kid}",))
    con.execute("PRAGMA user_version=1")
    con.close()


def test_migration_from_schema_1(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    kr = ring(generate_key_line("k1"))
    _make_v1(db, kr)
    assert b"CANARYSTAGE7" in raw(db)
    shutil.copy(db, tmp_path / "v1-copy.db")

    async def go() -> None:
        async with await Store.open(db, kr, device_id=DEVICE) as s:
            assert s.schema_version == SCHEMA_VERSION
            assert s.identity_key == kr.derive("message-identity")  # dedupe continuity
            assert await s.load_states() == {"CANARYSTAGE7": b"CANARYSTATE7"}
            assert [sb.seq for sb in await s.batches()] == [1, 2, 3]
            assert await s.seen([b"\x01" * 16, b"\x02" * 16]) == {b"\x01" * 16}
            assert await s.commit(Batch([1], [2.0], [0])) == 4
            await s.verify()
        assert leaks(db, [b"CANARYSTAGE7"]) == []  # the clear stage name is zeroed away
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        con.close()

    asyncio.run(go())
