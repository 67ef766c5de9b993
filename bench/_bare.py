"""The ceiling: a bare paho-mqtt subscriber that only counts messages (auto ack).

    python -m bench._bare HOST PORT TOPIC QOS EXPECTED OUT.json [CA.pem]

With CA.pem (the CA that signed the broker's certificate) it connects over TLS."""

from __future__ import annotations

import json
import sys
import time


def main(
    host: str, port: int, topic: str, qos: int, expected: int, out: str, ca: str | None = None
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    state = {"n": 0, "first": None, "last": None}

    def on_message(client, userdata, msg):  # noqa: ANN001
        now = time.perf_counter()
        if state["first"] is None:
            state["first"] = now
        state["n"] += 1
        state["last"] = now
        if state["n"] >= expected:
            client.disconnect()

    def on_connect(client, userdata, flags, rc, props):  # noqa: ANN001
        client.subscribe(topic, qos)

    def on_subscribe(client, userdata, mid, rcs, props):  # noqa: ANN001
        print("subscribed", flush=True)

    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-bare",
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    c.on_message, c.on_connect, c.on_subscribe = on_message, on_connect, on_subscribe
    if ca is not None:
        c.tls_set(ca_certs=ca)
    c.connect(host, port, keepalive=60)
    deadline = time.time() + 600
    while state["n"] < expected and time.time() < deadline:
        c.loop(timeout=0.5)
    with open(out, "w") as f:
        json.dump(state, f)


if __name__ == "__main__":
    h, p, t, q, e, o = sys.argv[1:7]
    main(h, int(p), t, int(q), int(e), o, *sys.argv[7:8])
