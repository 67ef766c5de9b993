"""edgepipe's own MQTT packet reader against a real mosquitto: packets split across reads
at every possible point (sizes up to 150 KB, both protocol versions) arrive intact."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from config._models import BrokerConfig
from core._clock import ManualClock
from core._metrics import METRICS
from pipeline.ingest._mqtt import MQTTClient
from tests.helpers.mqtt import Publisher


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_every_packet_arrives_intact_whatever_its_size(broker, protocol):
    rng = random.Random(7)
    sizes = [rng.choice([0, 1, 2, 126, 127, 128, 16383, 16384, 70_000, 150_000]) for _ in range(60)]
    sizes += [rng.randrange(0, 5000) for _ in range(400)]
    msgs = [
        (f"rd/{i}/{'x' * rng.randrange(0, 300)}", rng.randbytes(n), i % 2)
        for i, n in enumerate(sizes)
    ]

    async def scenario() -> list:
        cfg = BrokerConfig(
            host=broker.host,
            port=broker.port,
            protocol=protocol,
            client_id=f"reader-{protocol}",
            status_topic=None,
        )
        got: list = []
        async with MQTTClient(cfg, [("rd/#", 1)], device_id="rd") as m:
            await m.wait_subscribed(10)  # SUBACK: messages from now on are ours
            for qos in (0, 1):  # one publisher per QoS keeps each stream's order
                pub = Publisher(broker, [(t, p) for t, p, q in msgs if q == qos], qos=qos)
                pub.start()
                # wait off the loop: a blocked loop stops reading and the broker drops
                # QoS 0 messages it cannot deliver (at most once)
                await asyncio.to_thread(pub.join_ok)
            deadline = time.monotonic() + 30
            while len(got) < len(msgs) and time.monotonic() < deadline:
                try:
                    batch = await asyncio.wait_for(m.get_batch(500, 0), 1)
                except TimeoutError:
                    continue
                m.ack(batch)
                got += batch
        return got

    got = asyncio.run(scenario())
    assert len(got) == len(msgs)
    for qos in (0, 1):
        sent = [(t, p) for t, p, q in msgs if q == qos]
        received = [(g.topic, g.payload) for g in got if g.qos == qos]
        assert received == sent
        assert all(isinstance(g.payload, bytes) for g in got)
    assert all(g.mid > 0 for g in got if g.qos == 1)


def test_redelivery_window_follows_the_injected_clock(broker):
    """What arrives within ``redelivery_window_s`` of a connect is marked for the store
    check (``maybe_seen``) whatever its DUP flag; once the client's clock has passed the
    window, nothing is, and the gauge says the window is closed."""
    clock = ManualClock()
    cfg = BrokerConfig(
        host=broker.host,
        port=broker.port,
        client_id="reader-window",
        status_topic=None,
        redelivery_window_s=5,
    )

    async def receive(m: MQTTClient, payload: bytes) -> list:
        pub = Publisher(broker, [("win/x", payload)])
        pub.start()
        await asyncio.to_thread(pub.join_ok)  # off the loop: it must keep reading
        return await asyncio.wait_for(m.get_batch(10, 0), 30)

    async def scenario() -> None:
        async with MQTTClient(cfg, [("win/#", 1)], device_id="w", clock=clock) as m:
            await m.wait_subscribed(10)
            assert METRICS.value("edgepipe_redelivery_window_open") == 1
            clock.advance(4.9)
            first = await receive(m, b"1")
            assert [(x.payload, x.dup, x.maybe_seen) for x in first] == [(b"1", False, True)]
            clock.advance(0.1)  # the window is over
            second = await receive(m, b"2")
            assert [(x.payload, x.dup, x.maybe_seen) for x in second] == [(b"2", False, False)]
            assert METRICS.value("edgepipe_redelivery_window_open") == 0
            m.ack(first + second)

    asyncio.run(scenario())
