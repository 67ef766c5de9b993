"""The K3s manifests (k3s/), the Containerfile and the edge dependencies' aarch64 wheels.

Everything is checked offline against the Kubernetes v1.31 API schemas (K3s v1.31) with
``kubernetes-validate``.  There is no kustomize binary here, so :func:`render` implements
the small subset of kustomize the manifests use -- and refuses any other field, so the
manifests cannot drift into something this renderer would get wrong.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from config._loader import load_config
from devtools._mosquitto import free_port, mosquitto_binary
from storage import generate_key_line
from tests.helpers.edge import wait_for

ROOT = Path(__file__).resolve().parent.parent
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


def test_renderer_refuses_unsupported_fields(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "patches: [{path: p.yaml}]\n"
    )
    with pytest.raises(AssertionError, match="patches"):
        render(tmp_path)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(K3S / "overlays" / request.param)


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


# -- schema validation ------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K3S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K3S)))
def test_manifest_file_validates(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no manifests"
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_rendered_overlay_validates(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "edgepipe"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "edgepipe"


def test_validation_catches_errors() -> None:
    doc = copy.deepcopy(find(render(K3S / "overlays" / "device"), "Deployment", "edgepipe"))
    pod_spec(doc)["containers"][0]["securityContext"]["runAsUsr"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_kustomization_is_reachable() -> None:
    rendered: set[Path] = set()

    def walk(d: Path) -> None:
        rendered.add(d)
        for entry in yaml.safe_load((d / "kustomization.yaml").read_text())["resources"]:
            target = (d / entry).resolve()
            if target.is_dir():
                walk(target)
            else:
                rendered.add(target)

    for name in OVERLAYS:
        walk(K3S / "overlays" / name)
    for path in K3S.rglob("*.yaml"):
        assert (path.parent if path.name == "kustomization.yaml" else path) in rendered, path


# -- overlay structure ----------------------------------------------------------------------


def test_device_overlay_is_one_deployment() -> None:
    docs = render(K3S / "overlays" / "device")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("DaemonSet", "edgepipe") not in kinds
    dep = find(docs, "Deployment", "edgepipe")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert find(docs, "Deployment", "mosquitto")["spec"]["strategy"] == {"type": "Recreate"}
    for name in ("edgepipe-store", "mosquitto-data"):
        assert find(docs, "PersistentVolumeClaim", name)["spec"]["storageClassName"] == "local-path"
    store = next(v for v in pod_spec(dep)["volumes"] if v["name"] == "store")
    assert store["persistentVolumeClaim"]["claimName"] == "edgepipe-store"
    # on the broker's node, which the node-local mosquitto Service requires
    (term,) = pod_spec(dep)["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    mosquitto = find(docs, "Deployment", "mosquitto")
    assert term["labelSelector"]["matchLabels"] == mosquitto["spec"]["selector"]["matchLabels"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert find(docs, "Service", "mosquitto")["spec"]["internalTrafficPolicy"] == "Local"


def test_fleet_overlay_is_a_daemonset_on_arm64_edge_nodes() -> None:
    docs = render(K3S / "overlays" / "fleet")
    assert not [d for d in docs if d["kind"] == "Deployment"]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    for name in ("edgepipe", "mosquitto"):
        ds = find(docs, "DaemonSet", name)
        assert pod_spec(ds)["nodeSelector"] == {
            "kubernetes.io/arch": "arm64",
            "edgepipe.io/edge": "true",
        }
        assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
    env = {e["name"]: e for e in container(find(docs, "DaemonSet", "edgepipe"), "edgepipe")["env"]}
    assert env["EDGEPIPE_DEVICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_overlays_run_the_same_containers() -> None:
    """The pod template is written out in both overlays (a kind can't be patched into
    another): everything but the storage and the placement must stay identical."""
    dev, fleet = (render(K3S / "overlays" / o) for o in OVERLAYS)
    for name in ("edgepipe", "mosquitto"):
        a, b = pod_spec(workload(dev, name)), pod_spec(workload(fleet, name))
        assert a["containers"] == b["containers"]
        assert a["securityContext"] == b["securityContext"]
        assert a["terminationGracePeriodSeconds"] == b["terminationGracePeriodSeconds"]
        vols_a = {v["name"]: v for v in a["volumes"] if v["name"] not in ("store", "data")}
        vols_b = {v["name"]: v for v in b["volumes"] if v["name"] not in ("store", "data")}
        assert vols_a == vols_b
        init_b = {c["name"]: c for c in b.get("initContainers", [])}
        for c in a.get("initContainers", []):
            assert init_b[c["name"]] == c


# -- the edgepipe pod ------------------------------------------------------------------------


def test_security_context(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    for name, uid in (("edgepipe", 10001), ("mosquitto", 1883)):
        pod = pod_spec(workload(docs, name))
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] == uid and psc["fsGroup"] == uid
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
            assert sc.get("privileged") is not True
            if sc.get("runAsUser") == 0:  # only the fleet's directory-preparing init steps
                assert c in pod.get("initContainers", [])
                assert set(sc["capabilities"]["add"]) <= {"CHOWN", "FOWNER"}
            else:
                assert sc["runAsNonRoot"] is True and "add" not in sc["capabilities"]
        for c in pod["containers"]:
            assert c["securityContext"].get("runAsUser", uid) == uid
    tmp = next(v for v in pod_spec(workload(docs, "edgepipe"))["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp
    mounts = {
        m["mountPath"] for m in container(workload(docs, "edgepipe"), "edgepipe")["volumeMounts"]
    }
    assert "/tmp" in mounts


def test_probes_and_metrics_port(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    wl = workload(docs, "edgepipe")
    c = container(wl, "edgepipe")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9108}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    ann = wl["spec"]["template"]["metadata"]["annotations"]
    assert ann == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9108",
        "prometheus.io/path": "/metrics",
    }


def _cpu(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _mib(q: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(q[:-2]) * units[q[-2:]]


def test_resources_within_design_budget(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    res = container(workload(docs, "edgepipe"), "edgepipe")["resources"]
    # design: < 50 MB RSS steady, 0.5-1 CPU; limits 64-256 MB memory
    assert 0.25 <= _cpu(res["requests"]["cpu"]) <= 0.5
    assert _cpu(res["limits"]["cpu"]) == 1
    assert 50 < _mib(res["requests"]["memory"]) <= 64
    assert 64 <= _mib(res["limits"]["memory"]) <= 256
    for name in ("edgepipe", "mosquitto"):
        for c in pod_spec(workload(docs, name))["containers"]:
            assert {"requests", "limits"} <= set(c["resources"]), c["name"]


def test_graceful_termination(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    pod = pod_spec(workload(docs, "edgepipe"))
    assert pod["terminationGracePeriodSeconds"] >= 60


def test_edgepipe_command(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    c = container(workload(docs, "edgepipe"), "edgepipe")
    assert c["command"] + c["args"] == ["edgepipe", "run", "-c", "/etc/edgepipe/pipeline.yaml"]
    assert c["image"] == "registry.example.com/edgepipe:0.1.0"


def _mounts(c: Doc) -> dict[str, Doc]:
    return {m["name"]: m for m in c["volumeMounts"]}


def test_chain_configmap_is_a_directory_mount(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    wl = workload(docs, "edgepipe")
    vols = {v["name"]: v for v in pod_spec(wl)["volumes"]}
    chain_mounts = [
        m
        for c in pod_spec(wl)["containers"]
        for m in c["volumeMounts"]
        if vols[m["name"]].get("configMap", {}).get("name") == "edgepipe-chain"
    ]
    assert chain_mounts, "the chain ConfigMap is not mounted"
    for m in chain_mounts:
        assert "subPath" not in m and "subPathExpr" not in m
        assert m["mountPath"] == "/etc/edgepipe/chain"
    assert "items" not in vols["chain"]["configMap"]  # every key appears, and new ones too
    assert "filters.yaml" in find(docs, "ConfigMap", "edgepipe-chain")["data"]
    modules = vols["filter-modules"]["configMap"]
    assert modules == {"name": "edgepipe-filter-modules", "optional": True}


def test_image_volume_variant_from_the_guide_validates() -> None:
    """The guide's image-volume alternative for the filter modules is valid 1.31 API."""
    guide = (ROOT / "docs" / "deploy-k3s.md").read_text()
    block = re.search(r"replace the `filter-modules` volume with\s*```yaml\n(.*?)```", guide, re.S)
    assert block, "the image volume example is missing from the guide"
    (volume,) = yaml.safe_load(textwrap.dedent(block.group(1)))
    assert volume["name"] == "filter-modules" and "image" in volume
    for name in OVERLAYS:
        doc = copy.deepcopy(workload(render(K3S / "overlays" / name), "edgepipe"))
        vols = pod_spec(doc)["volumes"]
        vols[[v["name"] for v in vols].index("filter-modules")] = volume
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_secrets_are_read_only_files(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    wl = workload(docs, "edgepipe")
    vols = {v["name"]: v for v in pod_spec(wl)["volumes"]}
    projected = vols["secrets"]["projected"]
    assert projected["defaultMode"] == 0o400
    names = {s["secret"]["name"] for s in projected["sources"]}
    assert names == {"edgepipe-store-key", "edgepipe-device-secret", "edgepipe-mqtt"}
    for c in pod_spec(wl)["containers"] + pod_spec(wl)["initContainers"]:
        m = _mounts(c).get("secrets")
        if m:
            assert m["readOnly"] is True
    # the key copy is memory-backed and read-only for the main container
    assert vols["keys"]["emptyDir"]["medium"] == "Memory"
    assert _mounts(container(wl, "edgepipe"))["keys"]["readOnly"] is True
    mosq = {v["name"]: v for v in pod_spec(workload(docs, "mosquitto"))["volumes"]}
    assert mosq["passwd"]["secret"] == {"secretName": "mosquitto-passwd", "defaultMode": 0o400}


def test_secret_names_match_the_guide(overlay: tuple[str, list[Doc]]) -> None:
    """Every Secret (and key) the pods read is one docs/deploy-k3s.md tells you to create."""
    _, docs = overlay
    guide = (ROOT / "docs" / "deploy-k3s.md").read_text()
    created: dict[str, set[str]] = {}
    command = (
        r"kubectl -n edgepipe create secret generic ([\w-]+)((?:\s+\\?\s*--from-\w+=[\w.-]+)+)"
    )
    for m in re.finditer(command, guide):
        created[m.group(1)] = set(re.findall(r"--from-\w+=([\w.-]+)", m.group(2)))
    wanted: dict[str, set[str]] = {}
    for name in ("edgepipe", "mosquitto"):
        for v in pod_spec(workload(docs, name))["volumes"]:
            sources = v.get("projected", {}).get("sources", [])
            for s in sources:
                if "secret" in s:
                    wanted.setdefault(s["secret"]["name"], set()).update(
                        i["key"] for i in s["secret"]["items"]
                    )
            if "secret" in v:
                wanted.setdefault(v["secret"]["secretName"], set())
    assert set(wanted) == set(created)
    for name, keys in wanted.items():
        assert keys <= created[name], name
    assert "passwd" in created["mosquitto-passwd"]


# -- pipeline.yaml and mosquitto.conf against the pod that runs them ---------------------------


def _mount_of(c: Doc, path: str) -> Doc:
    """The volume mount that holds ``path`` (the longest mountPath prefix)."""
    hits = [
        m
        for m in c["volumeMounts"]
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert hits, f"nothing mounted at {path}"
    return max(hits, key=lambda m: len(m["mountPath"]))


def test_pipeline_yaml_loads_and_matches_the_pod(
    overlay: tuple[str, list[Doc]], tmp_path: Path
) -> None:
    _, docs = overlay
    text = configmap_file(docs, "edgepipe-pipeline", "pipeline.yaml")
    cfg = load_config("/etc/edgepipe/pipeline.yaml", text=text)
    wl = workload(docs, "edgepipe")
    c = container(wl, "edgepipe")
    vols = {v["name"]: v for v in pod_spec(wl)["volumes"]}
    # the config file itself
    m = _mount_of(c, "/etc/edgepipe/pipeline.yaml")
    assert (
        m["subPath"] == "pipeline.yaml"
        and vols[m["name"]]["configMap"]["name"] == "edgepipe-pipeline"
    )
    # metrics listener == probe port, on all interfaces
    host, _, port = cfg.metrics.listen.rpartition(":")
    assert (host, int(port)) == ("0.0.0.0", 9108)
    # the store lives on the store volume, writable
    m = _mount_of(c, str(cfg.store.path))
    assert m["name"] == "store" and not m.get("readOnly")
    # secrets come from files the pod has
    projected = {
        f"/run/secrets/edgepipe/{i['path']}"
        for s in vols["secrets"]["projected"]["sources"]
        for i in s["secret"]["items"]
    }
    assert str(cfg.broker.password.file) in projected
    assert str(cfg.sync.device_secret.file) in projected
    key_copy = str(cfg.store.key.file)
    assert _mount_of(c, key_copy)["name"] == "keys"
    init = next(i for i in pod_spec(wl)["initContainers"] if i["name"] == "store-key")
    script = " ".join(init["command"])
    assert f"/run/secrets/edgepipe/store.key {key_copy}" in script and "-m 0400" in script
    # the broker is the mosquitto Service in this namespace
    svc = find(docs, "Service", "mosquitto")
    assert cfg.broker.host in ("mosquitto", "mosquitto.edgepipe.svc.cluster.local")
    assert cfg.broker.port == svc["spec"]["ports"][0]["port"]
    # the chain file is in the chain ConfigMap's directory mount
    chain_file = str(cfg.chain_file)
    m = _mount_of(c, chain_file)
    assert m["name"] == "chain" and "subPath" not in m
    assert Path(chain_file).name in find(docs, "ConfigMap", "edgepipe-chain")["data"]


def test_chain_file_in_configmap_loads(tmp_path: Path) -> None:
    docs = render(K3S / "overlays" / "device")
    chain = tmp_path / "chain" / "filters.yaml"
    chain.parent.mkdir()
    chain.write_text(configmap_file(docs, "edgepipe-chain", "filters.yaml"))
    text = configmap_file(docs, "edgepipe-pipeline", "pipeline.yaml")
    text = text.replace("/etc/edgepipe/chain/filters.yaml", str(chain))
    cfg = load_config(tmp_path / "pipeline.yaml", text=text)
    assert cfg.chain_file is not None


def test_chain_modules_are_in_the_image() -> None:
    """Stages use the image's library (/opt/edgepipe/filters, copied from filters/lib by the
    Containerfile) or the optional modules ConfigMap (/etc/edgepipe/modules)."""
    docs = render(K3S / "overlays" / "device")
    chain = yaml.safe_load(configmap_file(docs, "edgepipe-chain", "filters.yaml"))
    stages = chain["chain"] if isinstance(chain, dict) else chain
    assert stages
    copies = [rest for instr, rest in containerfile() if instr == "COPY" and ".wasm" in rest]
    assert copies == ["filters/lib/*.wasm /opt/edgepipe/filters/"]
    for stage in stages:
        module = Path(stage["module"])
        assert module.parent == Path("/opt/edgepipe/filters"), module
        assert (ROOT / "filters" / "lib" / module.name).is_file(), module


def test_mosquitto_conf_matches_the_pod(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    conf = configmap_file(docs, "mosquitto-config", "mosquitto.conf")
    opts: dict[str, str] = {}
    for line in conf.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            opts.setdefault(key, value)
    assert opts["allow_anonymous"] == "false"
    assert opts["persistence"] == "true"
    assert int(opts["max_inflight_messages"]) >= 1000
    assert int(opts["max_queued_messages"]) >= 100_000
    assert int(opts["max_queued_bytes"]) > 0
    wl = workload(docs, "mosquitto")
    c = container(wl, "mosquitto")
    vols = {v["name"]: v for v in pod_spec(wl)["volumes"]}
    m = _mount_of(c, opts["password_file"])
    assert vols[m["name"]]["secret"]["secretName"] == "mosquitto-passwd"
    assert opts["password_file"].rsplit("/", 1)[1] == "passwd"
    m = _mount_of(c, opts["persistence_location"].rstrip("/"))
    assert m["name"] == "data" and not m.get("readOnly")
    assert c["command"] == ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
    assert _mount_of(c, "/mosquitto/config/mosquitto.conf")["name"] == "config"
    # the broker's in-flight window matches what edgepipe asks for
    pipeline = yaml.safe_load(configmap_file(docs, "edgepipe-pipeline", "pipeline.yaml"))
    assert int(opts["max_inflight_messages"]) >= pipeline["broker"]["receive_maximum"]


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


def test_containerfile_base_images_are_pinned() -> None:
    args = {}
    for instr, rest in containerfile():
        if instr == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
    froms = [rest for instr, rest in containerfile() if instr == "FROM"]
    assert len(froms) >= 2, "a builder stage and a final stage"
    stages = set()
    for f in froms:
        image = f.split()[0]
        for k, v in args.items():
            image = image.replace("${" + k + "}", v).replace("$" + k, v)
        if image in stages:
            continue
        assert image.startswith("python:3.11-slim-bookworm"), image
        name = image.split("@")[0]
        assert ":" in name and not name.endswith(":latest"), image
        if " AS " in f.upper():
            stages.add(f.split()[-1])


def test_containerfile_runs_as_non_root_edgepipe() -> None:
    instrs = containerfile()
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    final = instrs[max(i for i, (instr, _) in enumerate(instrs) if instr == "FROM") :]
    assert any(instr == "USER" for instr, _ in final)
    assert ("ENTRYPOINT", '["edgepipe"]') in final
    assert not any(instr == "HEALTHCHECK" for instr, _ in instrs)


def test_containerfile_installs_only_the_edge_dependencies() -> None:
    text = " ".join(rest for instr, rest in containerfile() if instr == "RUN")
    assert "pip" in text
    assert "[cloud" not in text and "cloud]" not in text and "[test" not in text
    for pkg in ("starlette", "uvicorn", "psycopg", "argon2"):
        assert pkg not in text
    ignore = (ROOT / ".containerignore").read_text().splitlines()
    assert "cloud/" in ignore or "cloud" in ignore or "/cloud" in ignore


def test_containerfile_copy_sources_exist() -> None:
    ignored = [
        ln.strip().strip("/")
        for ln in (ROOT / ".containerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#") and not ln.startswith("!")
    ]
    for instr, rest in containerfile():
        if instr not in ("COPY", "ADD") or "--from=" in rest:
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        for src in parts[:-1]:
            matches = (
                list(ROOT.glob(src.rstrip("/"))) if any(ch in src for ch in "*?[") else [ROOT / src]
            )
            assert matches and all(m.exists() for m in matches), f"COPY source {src} missing"
            for m in matches:
                rel = m.relative_to(ROOT).as_posix()
                assert not any(rel == i or rel.startswith(i + "/") for i in ignored), (
                    f"COPY source {src} is excluded by .containerignore"
                )


# -- aarch64 wheels ---------------------------------------------------------------------------


def _index_unreachable() -> str | None:
    """Why the package index can't be reached (None: it can)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    hosts = {urllib.parse.urlsplit(index).hostname or "pypi.org"}
    if hosts == {"pypi.org"}:
        hosts.add("files.pythonhosted.org")  # where PyPI serves the files from
    for host in sorted(hosts):
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as e:
            return f"{host}:443: {e}"
    return None


@pytest.mark.network
def test_edge_dependencies_have_aarch64_wheels(tmp_path: Path) -> None:
    """Every edge dependency installs from a wheel on linux/arm64 (no compiler in the image)."""
    why = _index_unreachable()
    if why:
        pytest.skip(f"the package index is unreachable ({why}): aarch64 wheels not checked")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--only-binary=:all:",
        "--platform", "manylinux2014_aarch64",
        "--platform", "manylinux_2_17_aarch64",
        "--platform", "manylinux_2_28_aarch64",
        "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
        "-d", str(tmp_path), *deps,
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    wheels = sorted(p.name for p in tmp_path.iterdir())
    assert all(w.endswith(".whl") for w in wheels), wheels
    for dep in deps:
        name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower().replace("-", "_")
        assert any(w.lower().startswith(name + "-") for w in wheels), (dep, wheels)
    native = [w for w in wheels if not w.endswith("-none-any.whl")]
    assert native and all("aarch64" in w for w in native), native


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


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    p = Pod(tmp_path)
    try:
        p.start_broker()
        yield p
    finally:
        p.close()


def test_pod_configuration_runs(pod: Pod) -> None:
    """mosquitto with the ConfigMap's mosquitto.conf and `edgepipe run` with the ConfigMaps'
    pipeline.yaml and filters.yaml become ready, take a reading over authenticated MQTT and
    stop cleanly on SIGTERM."""
    assert pod.publish("temperature", "1", user="") == "Not authorized"  # anonymous
    assert pod.publish("temperature", "1", password="wrong") == "Not authorized"
    pod.start_edge()
    assert pod.get("/healthz") == (200, "ok\n")
    assert pod.publish("temperature", '{"value": 21.5, "seq": 1}') == "Success"
    assert (
        pod.publish("temperature", '{"value": 120, "seq": 2}') == "Success"
    )  # impossible: dropped
    pod.wait_acked(2)
    # the chain from the chain ConfigMap ran
    assert pod.metric("edgepipe_readings_dropped_total", stage="validity") == 1
    assert pod.metric("process_resident_memory_bytes") > 0
    assert pod.edge is not None
    pod.edge.send_signal(signal.SIGTERM)
    assert pod.edge.wait(60) == 0, pod.logs()
    assert (pod.store / "store.db").exists()


def test_configmap_update_hot_reloads_the_chain(pod: Pod) -> None:
    """A ConfigMap update (the kubelet's ..data swap) reaches the running pipeline: the new
    chain takes over without a restart; a broken one is refused and the old one stays."""
    pod.start_edge()
    assert pod.edge is not None
    pid = pod.edge.pid

    def dropped() -> float:
        return pod.metric("edgepipe_readings_dropped_total", stage="validity")

    assert pod.publish("temperature", '{"value": 120, "seq": 1}') == "Success"  # above 85: dropped
    pod.wait_acked(1)
    assert dropped() == 1

    original = configmap_file(pod.docs, "edgepipe-chain", "filters.yaml")
    assert "temperature: [-40, 85]" in original
    pod.update_chain(original.replace("temperature: [-40, 85]", "temperature: [-40, 150]"))
    pod._until(
        lambda: pod.metric("edgepipe_chain_reloads_total", result="ok") >= 1,
        "the chain reload",
        pod.edge,
    )
    assert pod.publish("temperature", '{"value": 120, "seq": 2}') == "Success"  # now within range
    pod.wait_acked(2)
    assert dropped() == 1

    pod.update_chain(original.replace("validity.wasm", "no-such-filter.wasm"))
    pod._until(
        lambda: (
            pod.metric("edgepipe_chain_reloads_total")
            > pod.metric("edgepipe_chain_reloads_total", result="ok")
        ),
        "the refused reload",
        pod.edge,
    )
    assert (
        pod.publish("temperature", '{"value": 140, "seq": 3}') == "Success"
    )  # the [-40, 150] chain
    pod.wait_acked(3)
    assert dropped() == 1
    assert pod.edge.pid == pid and pod.edge.poll() is None


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr, rest in containerfile():
        if instr == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((instr, rest))
    return stages


@pytest.mark.network
def test_builder_stage_recipe_makes_an_edge_only_venv(tmp_path: Path) -> None:
    """No container engine here: run the builder stage's COPY and RUN steps on the host
    (paths mapped into a temporary directory) and inspect the venv the image would get."""
    why = _index_unreachable()
    if why:
        pytest.skip(f"the package index is unreachable ({why}): builder stage not run")
    builder = _stages()[0]
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    src.mkdir()
    env = dict(os.environ)
    for instr, rest in builder:
        if instr == "ENV":
            env.update(kv.split("=", 1) for kv in rest.split())
        elif instr == "COPY":
            *sources, dest = rest.split()
            for s in sources:
                assert (ROOT / s).exists(), f"COPY source {s} missing"
                if (ROOT / s).is_dir():  # a directory's contents go to dest
                    shutil.copytree(
                        ROOT / s, src / dest, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:  # a file goes into dest/ or becomes dest
                    target = src / dest / s if dest.endswith("/") else src / dest
                    shutil.copy2(ROOT / s, target)
    runs = [rest for instr, rest in builder if instr == "RUN"]
    assert len(runs) == 1
    script = runs[0].replace("/wheels", str(wheels)).replace("/opt/venv", str(venv))
    result = subprocess.run(
        ["bash", "-ec", script], cwd=src, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    python = venv / "bin" / "python"
    out = subprocess.run(
        [str(python), "-c",
         "import importlib.metadata as m, sys; "
         "print('\\n'.join(sorted(d.metadata['Name'].lower() for d in m.distributions())))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower()
        assert name in out, (name, out)
    for web in ("starlette", "uvicorn", "psycopg", "psycopg-binary", "argon2-cffi", "httpx", "pip"):
        assert web not in out, f"{web} must not be in the edge image"
    assert not (venv / "bin" / "edgepipe-cloud").exists()
    site = next(venv.glob("lib/python3.11/site-packages"))
    assert not (site / "cloud").exists()
    assert (venv / "bin" / "edgepipe").exists()
    help_text = subprocess.run(
        [str(venv / "bin" / "edgepipe"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "run" in help_text
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file())
    # the venv is the image's only big layer above the base (compressed about a third)
    assert size < 150 * 2**20, f"venv is {size / 2**20:.0f} MiB"
