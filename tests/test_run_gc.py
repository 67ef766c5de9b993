"""``edgepipe run`` moves what its start built out of the cyclic collector's way."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_start_objects_frozen_later_garbage_collected() -> None:
    # in a fresh interpreter: gc.freeze is process-wide
    code = textwrap.dedent(
        """
        import gc, weakref
        from pipeline.cli._run import _freeze_start_objects

        class Node:
            pass

        kept = [Node() for _ in range(100)]
        assert gc.get_freeze_count() == 0
        _freeze_start_objects()
        frozen = gc.get_freeze_count()
        assert frozen > 1000, frozen
        assert not any(any(k is o for o in gc.get_objects()) for k in kept[:3])
        # what the readings allocate later is still collected, and only that is traversed
        a, b = Node(), Node()
        a.other, b.other = b, a
        garbage = weakref.ref(a)
        del a, b
        assert gc.collect() >= 2
        assert garbage() is None
        assert gc.get_freeze_count() == frozen, "a collection leaves the frozen objects"
        print("ok")
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"
