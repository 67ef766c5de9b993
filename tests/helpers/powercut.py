"""Power-cut simulation for a real process's files.

``kill -9`` cannot lose data that a process wrote but did not fsync: the kernel's page cache
keeps it and writes it out later.  A power cut loses it, in part or whole, torn at sector
boundaries.  This module reproduces that for the files of one directory:

1. :class:`PowerCut` compiles ``powercut_shim.c`` (with the system C compiler) and gives
   the environment that loads it into a child process (``LD_PRELOAD``).  The shim records
   every write, truncate, unlink and fsync the child makes under the directory.
2. The test kills the child (``kill -9``) at any moment: that instant is the power cut.
3. :meth:`PowerCut.image` rebuilds what the disk may hold after the cut: each file as it
   was at its last fsync, plus, depending on ``keep``, none, all or a random subset of the
   writes made after it, each torn into 512-byte sectors that survive independently.  The
   image replaces the directory (or goes elsewhere) and the process is started on it again.

``-shm`` files are not part of an image: SQLite rebuilds its WAL index from the WAL when the
first connection opens after a crash, whatever the old file held.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

_SHIM = Path(__file__).with_name("powercut_shim.c")
_REC = struct.Struct("<B3xIQQ")
SECTOR = 512


def build_shim(out_dir: Path) -> Path:
    """Compile the shim into ``out_dir``; raises ``FileNotFoundError`` with no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise FileNotFoundError("no C compiler (cc/gcc) to build the power-cut shim")
    so = out_dir / "powercut.so"
    subprocess.run(
        [cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(so), str(_SHIM), "-ldl", "-lpthread"],
        check=True,
    )
    return so


@dataclass
class Op:
    op: str
    name: str
    off: int = 0
    data: bytes = b""


@dataclass
class CutStats:
    """What one image kept of the unsynced tail."""

    ops: int = 0
    synced: int = 0
    unsynced: int = 0
    unsynced_kept: int = 0
    sectors_dropped: int = 0
    files: dict[str, int] = field(default_factory=dict)


class PowerCut:
    """Record one child process's file operations under ``directory`` into ``log``; build
    post-power-cut images of the directory from the record."""

    def __init__(self, shim: Path, directory: Path, log: Path) -> None:
        self.shim, self.dir, self.log = shim, directory.resolve(), log
        self._base: dict[str, bytes] = {}
        self._reset_record()

    def arm(self) -> dict[str, str]:
        """Snapshot the directory as the durable starting state, start a fresh record, and
        return the environment variables that make a child process record into it."""
        self._base = {
            str(p.relative_to(self.dir)): p.read_bytes()
            for p in sorted(self.dir.rglob("*"))
            if p.is_file() and not p.name.endswith("-shm")
        }
        self.log.write_bytes(b"")
        self._reset_record()
        return {
            "LD_PRELOAD": str(self.shim),
            "POWERCUT_DIR": str(self.dir),
            "POWERCUT_LOG": str(self.log),
        }

    def _reset_record(self) -> None:
        """Forget what was parsed of the record: read position, ops, file names, dirty set."""
        self._pos = 0
        self._ops: list[Op] = []
        self._names: dict[int, str] = {}
        self._dirty: set[str] = set()

    def ops(self) -> list[Op]:
        """The operations recorded since :meth:`arm` (read incrementally)."""
        with open(self.log, "rb") as f:
            f.seek(self._pos)
            raw = f.read()
        pos = 0
        while pos + _REC.size <= len(raw):
            op_b, fid, off, n = _REC.unpack_from(raw, pos)
            op = chr(op_b)
            has_data = op in "NW"
            end = pos + _REC.size + (n if has_data else 0)
            if end > len(raw):  # the process died between a record's header and its data
                break
            data = raw[pos + _REC.size : end] if has_data else b""
            pos = end
            if op == "N":
                self._names[fid] = data.decode()
                continue
            name = self._names[fid]
            self._ops.append(Op(op, name, off, data))
            if op == "S":
                self._dirty.discard(name)
            elif op in "WT":
                self._dirty.add(name)
        self._pos += pos
        return self._ops

    def unsynced(self) -> set[str]:
        """The files written since their last fsync, as of now."""
        self.ops()
        return {n for n in self._dirty if not n.endswith("-shm")}

    def image(self, out: Path | None = None, *, keep: str = "random", seed: int = 0) -> CutStats:
        """Write the post-cut state to ``out`` (default: replace the directory itself).

        ``keep``: ``"none"`` (nothing unsynced reached the disk), ``"all"`` (everything did:
        what a kill -9 leaves), ``"random"`` (any subset, torn at sector boundaries)."""
        assert keep in ("none", "all", "random")
        rng = random.Random(seed)
        ops = self.ops()
        last_sync: dict[str, int] = {}
        for i, o in enumerate(ops):
            if o.op == "S":
                last_sync[o.name] = i
        files: dict[str, bytearray | None] = {k: bytearray(v) for k, v in self._base.items()}
        st = CutStats(ops=len(ops))
        for i, o in enumerate(ops):
            if o.op == "S" or o.name.endswith("-shm") or o.name == ".":
                continue
            durable = i <= last_sync.get(o.name, -1)
            if durable:
                st.synced += 1
            else:
                st.unsynced += 1
                if keep == "none" or (keep == "random" and o.op != "W" and rng.random() < 0.5):
                    continue
            if o.op == "U":
                files[o.name] = None
                continue
            cur = files.get(o.name)
            if cur is None:
                cur = files[o.name] = bytearray()
            if o.op == "T":
                del cur[o.off :]
                cur.extend(bytes(max(0, o.off - len(cur))))
                st.unsynced_kept += not durable
            else:
                torn = rng if not durable and keep == "random" else None
                kept, dropped = _write(cur, o.off, o.data, torn)
                st.sectors_dropped += dropped
                st.unsynced_kept += not durable and kept > 0
        target = out or self.dir
        if out is None:
            for p in sorted(self.dir.rglob("*"), reverse=True):
                if p.is_file() or p.is_symlink():
                    p.unlink()
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if data is None:
                continue
            p = target / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(bytes(data))
            st.files[name] = len(data)
        return st


def _write(buf: bytearray, off: int, data: bytes, rng: random.Random | None) -> tuple[int, int]:
    """Apply a write; with ``rng``, each sector it touches survives with probability 1/2.
    Returns the numbers of sectors kept and dropped."""
    kept = dropped = 0
    pos, end = off, off + len(data)
    while pos < end:
        nxt = min(end, (pos // SECTOR + 1) * SECTOR)
        if rng is None or rng.random() < 0.5:
            if len(buf) < pos:
                buf.extend(bytes(pos - len(buf)))
            buf[pos:nxt] = data[pos - off : nxt - off]
            kept += 1
        else:
            dropped += 1
        pos = nxt
    return kept, dropped
