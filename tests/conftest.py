"""Fixtures only (helpers are in ``tests/helpers``): a private mosquitto per test session,
keys, a receiver, edgepipe processes, and the receiver contract's backends (SQLite and
PostgreSQL), in-process server, device client and operator client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devtools._mosquitto import Mosquitto
from storage import generate_key_line
from tests.helpers.edge import EdgeProcess

if TYPE_CHECKING:
    import httpx

    from cloud import Backend
    from tests.helpers.cloud_client import DeviceClient, LiveServer

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
def browser() -> Iterator[object]:
    """Headless Chromium (``tests.helpers.browser``), one per test."""
    from tests.helpers.browser import headless_chromium

    with headless_chromium() as b:
        yield b


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


# -- the receiver contract (tests/test_cloud_contract.py, tests/test_cloud_master_key.py) --
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    """A receiver backend of each kind (a real SQLite file, a schema of the real
    PostgreSQL), one per test module."""
    from tests.helpers.cloud_client import open_test_backend

    with open_test_backend(request.param, tmp_path_factory.mktemp("cloud")) as b:
        yield b


@pytest.fixture(scope="module")
def server(backend: Backend) -> Iterator[LiveServer]:
    """The receiver app over ``backend`` in a real uvicorn server on loopback, with the
    contract's operator token and body limits."""
    from cloud import Settings, create_app
    from tests.helpers.cloud_client import MAX_BODY, MAX_DECOMPRESSED, TOKEN, LiveServer

    settings = Settings(
        api_token=TOKEN,
        max_body_bytes=MAX_BODY,
        max_decompressed_bytes=MAX_DECOMPRESSED,
        max_inflight_per_device=8,  # the concurrency tests upload 6 at once from one device
    )
    with LiveServer(create_app(settings, backend=backend)) as s:
        yield s


@pytest.fixture
def device(backend: Backend, server: LiveServer) -> Iterator[DeviceClient]:
    """A newly registered device and a wire-protocol client signing as it."""
    from tests.helpers.cloud_client import DeviceClient, new_device

    name, secret = new_device(backend)
    client = DeviceClient(server.url, name, secret)
    yield client
    client.close()


@pytest.fixture
def operator(server: LiveServer) -> Iterator[httpx.Client]:
    """An HTTP client of ``server``'s read API with the operator token."""
    import httpx

    from tests.helpers.cloud_client import TOKEN

    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as c:
        yield c
