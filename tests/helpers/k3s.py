"""The K3s manifests (k3s/) as the tests see them: a renderer for the small subset of
kustomize they use (it refuses any other field, so the manifests cannot drift into something
it would get wrong), lookups into the rendered documents, the Containerfile's instructions,
and the device overlay's pod run as local processes (:class:`Pod`, with the kubelet's way of
updating a ConfigMap volume)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools._mosquitto import free_port, mosquitto_binary
from storage import generate_key_line
from tests.helpers.edge import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
K3S = ROOT / "k3s"
K8S_VERSION = "1.31.0"  # K3s v1.31
OVERLAYS = ["device", "fleet"]
WORKLOAD_KINDS = {"Deployment", "DaemonSet"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}

Doc = dict[str, Any]


# -- a kustomize subset ---------------------------------------------------------------

_SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}


def render(directory: Path) -> list[Doc]:
    """``kustomize build directory`` for: resources (files and directories), namespace,
    labels (metadata only: includeSelectors/includeTemplates false) and images."""
    kfile = directory / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unsupported = set(k) - _SUPPORTED
    assert not unsupported, f"{kfile}: fields this renderer does not implement: {unsupported}"
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    docs: list[Doc] = []
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            docs += render(target)
        else:
            assert target.is_relative_to(directory), f"{kfile}: {entry} is outside the root"
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d is not None]
    docs = copy.deepcopy(docs)
    for doc in docs:
        if "namespace" in k and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = k["namespace"]
        for spec in k.get("labels", []):
            assert not spec.get("includeSelectors") and not spec.get("includeTemplates")
            doc["metadata"].setdefault("labels", {}).update(spec["pairs"])
        for image in k.get("images", []):
            for c in _containers(doc):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    new = image.get("newName", name)
                    c["image"] = (
                        f"{new}:{image.get('newTag', tag)}" if tag or "newTag" in image else new
                    )
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate resources"
    return docs


def _containers(doc: Doc) -> list[Doc]:
    if doc["kind"] not in WORKLOAD_KINDS:
        return []
    pod = doc["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def workload(docs: list[Doc], name: str) -> Doc:
    hits = [d for d in docs if d["kind"] in WORKLOAD_KINDS and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one workload {name}, found {len(hits)}"
    return hits[0]


def pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def container(doc: Doc, name: str) -> Doc:
    return next(c for c in pod_spec(doc)["containers"] if c["name"] == name)


def configmap_file(docs: list[Doc], name: str, key: str) -> str:
    return find(docs, "ConfigMap", name)["data"][key]


# -- Containerfile ---------------------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Containerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


# -- the ConfigMaps' files, run for real ----------------------------------------------------


def kubelet_write(directory: Path, files: dict[str, str]) -> None:
    """Update ``directory`` the way the kubelet updates a ConfigMap volume (AtomicWriter):

    ..2026_11_29_18_40_00.123456789/filters.yaml   the files of this version
    ..data -> ..2026_11_29_18_40_00.123456789      swapped by one rename()
    filters.yaml -> ..data/filters.yaml            made once, never changes
    """
    directory.mkdir(exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    version = Path(tempfile.mkdtemp(prefix=stamp, dir=directory))
    for name, text in files.items():
        (version / name).write_text(text)
        (version / name).chmod(0o644)
    version.chmod(0o755)
    data = directory / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    os.symlink(version.name, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", data)
    for name in files:
        if not (directory / name).is_symlink():
            os.symlink(f"..data/{name}", directory / name)
    if old:
        shutil.rmtree(directory / old)


class Pod:
    """The device overlay's mosquitto and edgepipe containers as local processes: the
    ConfigMaps' files with the pod's paths mapped into a temporary directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.docs = render(K3S / "overlays" / "device")
        self.port, self.metrics_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.metrics_port}"
        self.device = "pi-node-1"
        # the Secrets, as the guide makes them
        secrets = tmp / "secrets"
        secrets.mkdir()
        self.password = "pw-" + os.urandom(8).hex()
        (secrets / "mqtt-password").write_text(self.password + "\n")
        (secrets / "device-secret").write_text(os.urandom(32).hex() + "\n")
        subprocess.run(
            ["mosquitto_passwd", "-c", "-b", str(tmp / "passwd"), "edgepipe", self.password],
            check=True,
            capture_output=True,
        )
        keys = tmp / "keys"
        keys.mkdir()
        (keys / "store.key").write_text(generate_key_line() + "\n")
        (keys / "store.key").chmod(0o400)
        self.chain_dir = tmp / "chain"
        self.update_chain(configmap_file(self.docs, "edgepipe-chain", "filters.yaml"))
        self.store = tmp / "store"
        self.store.mkdir()
        text = configmap_file(self.docs, "edgepipe-pipeline", "pipeline.yaml")
        for pod_path, here in {
            "/run/secrets/edgepipe/": f"{secrets}/",
            "/run/edgepipe/keys/": f"{keys}/",
            "/etc/edgepipe/chain/": f"{self.chain_dir}/",
            "/var/lib/edgepipe/": f"{self.store}/",
            "mosquitto.edgepipe.svc.cluster.local": "127.0.0.1",
            "port: 1883": f"port: {self.port}",
            "0.0.0.0:9108": f"127.0.0.1:{self.metrics_port}",
            "https://edgepipe-cloud.example.com": f"http://127.0.0.1:{free_port()}",
        }.items():
            assert pod_path in text, pod_path
            text = text.replace(pod_path, here)
        (tmp / "pipeline.yaml").write_text(text)
        self.broker: subprocess.Popen[bytes] | None = None
        self.edge: subprocess.Popen[bytes] | None = None

    def update_chain(self, filters_yaml: str) -> None:
        library = f"{ROOT / 'filters' / 'lib'}/"
        kubelet_write(
            self.chain_dir,
            {"filters.yaml": filters_yaml.replace("/opt/edgepipe/filters/", library)},
        )

    def start_broker(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
        (self.tmp / "data").mkdir()
        conf = configmap_file(self.docs, "mosquitto-config", "mosquitto.conf")
        conf = conf.replace("/mosquitto/secret/passwd", str(self.tmp / "passwd"))
        conf = conf.replace("/mosquitto/data/", f"{self.tmp / 'data'}/")
        assert re.search(r"^listener 1883$", conf, re.M)
        conf = re.sub(r"^listener 1883$", f"listener {self.port} 127.0.0.1", conf, flags=re.M)
        if os.geteuid() == 0:  # as root mosquitto would switch to user 'mosquitto'
            conf = "user root\n" + conf
        (self.tmp / "mosquitto.conf").write_text(conf)
        with open(self.tmp / "mosquitto.log", "wb") as log:
            self.broker = subprocess.Popen(
                [binary, "-c", str(self.tmp / "mosquitto.conf")], stdout=log, stderr=log
            )
        self._until(lambda: _listening(self.port), "mosquitto listening", self.broker)

    def start_edge(self) -> None:
        env = dict(os.environ, EDGEPIPE_DEVICE_ID=self.device)
        with open(self.tmp / "edge.log", "wb") as log:
            self.edge = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", "-c", str(self.tmp / "pipeline.yaml")],
                stdout=log,
                stderr=log,
                cwd=str(ROOT),
                env=env,
            )
        self._until(lambda: self.get("/readyz")[0] == 200, "/readyz 200", self.edge)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def publish(self, metric: str, payload: str, user: str = "edgepipe", password: str = "") -> str:
        """Publish one QoS 1 message as ``user`` (none: anonymous); the CONNACK reason,
        "Success" once the broker has acknowledged the message."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        connack: list[str] = []
        done = threading.Event()

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            connack.append(str(reason))
            done.set()

        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        c.on_connect = on_connect
        if user:
            c.username_pw_set(user, password or self.password)
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        try:
            assert done.wait(20), "no CONNACK"
            if connack[0] != "Success":
                return connack[0]
            c.publish(f"sensors/{self.device}/{metric}", payload, qos=1).wait_for_publish(20)
            return connack[0]
        finally:
            c.disconnect()
            c.loop_stop()

    def wait_acked(self, n: int) -> None:
        self._until(
            lambda: self.metric("edgepipe_messages_acked_total") >= n, f"{n} acked", self.edge
        )

    def _until(self, pred: Any, what: str, proc: subprocess.Popen[bytes] | None) -> None:
        def done() -> object:
            assert proc is None or proc.poll() is None, f"exited before {what}: {self.logs()}"
            return pred()

        try:
            wait_for(done, 60, what)
        except AssertionError as e:
            if "exited before" in str(e):
                raise
            raise AssertionError(f"{e}: {self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(
            f"--- {n}\n" + (self.tmp / n).read_text(errors="replace")[-4000:]
            for n in ("edge.log", "mosquitto.log")
            if (self.tmp / n).exists()
        )

    def close(self) -> None:
        for proc in (self.edge, self.broker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False
