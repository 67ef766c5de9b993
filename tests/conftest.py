"""Fixtures only (helpers are in ``tests/helpers``): a private mosquitto per test session,
keys, a receiver, edgepipe processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools._mosquitto import Mosquitto
from storage import generate_key_line
from tests.helpers.edge import EdgeProcess

pytest_plugins = ["tests.skip_gate"]


@pytest.fixture(scope="session")
def broker() -> Iterator[Mosquitto]:
    with Mosquitto() as b:
        yield b


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    p = tmp_path / "store.key"
    p.write_text(generate_key_line() + "\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[object]:
    """``edgepipe-cloud serve`` (``tests.helpers.sync_env.Receiver``) with the device
    ``edge-1`` registered; its secret is ``receiver.secret``."""
    from tests.helpers.sync_env import Receiver

    r = Receiver(tmp_path)
    r.secret = r.add_device("edge-1")  # type: ignore[attr-defined]
    with r:
        yield r


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Callable[[Path], EdgeProcess]]:
    procs: list[EdgeProcess] = []

    def start(config: Path) -> EdgeProcess:
        p = EdgeProcess(config, tmp_path / f"edge-{len(procs)}.log").start()
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()
