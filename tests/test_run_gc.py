"""``edgepipe run`` moves what its start built out of the cyclic collector's way."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_start_objects_frozen_and_start_garbage_collected() -> None:
    # in a fresh interpreter: gc.freeze is process-wide
    code = textwrap.dedent(
        """
        import gc, weakref
        from pipeline.cli._run import _freeze_start_objects

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a
        garbage = weakref.ref(a)
        del a, b
        kept = [Node() for _ in range(100)]
        assert gc.get_freeze_count() == 0
        _freeze_start_objects()
        assert garbage() is None, "the start's reference cycles are collected first"
        frozen = gc.get_freeze_count()
        assert frozen > 1000, frozen
        assert not any(gc.is_tracked(k) and k in gc.get_objects() for k in kept[:3])
        gc.collect()
        assert gc.get_freeze_count() == frozen, "a collection leaves the frozen objects"
        print("ok")
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"
