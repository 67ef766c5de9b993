"""The K3s manifests (k3s/): every file and both rendered overlays validate against the
Kubernetes v1.31 API schemas (K3s v1.31) offline with ``kubernetes-validate``; the overlays'
structure, the edgepipe pod (security context, probes, resources, mounts, secrets), and the
ConfigMaps' pipeline.yaml, filters.yaml and mosquitto.conf against the pod that runs them.
There is no kustomize binary here: :func:`tests.helpers.k3s.render` implements the subset
the manifests use.
"""

from __future__ import annotations

import copy
import re
import textwrap
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from config._loader import load_config
from tests.helpers.k3s import (
    CLUSTER_SCOPED,
    K3S,
    K8S_VERSION,
    OVERLAYS,
    ROOT,
    Doc,
    configmap_file,
    container,
    containerfile,
    find,
    pod_spec,
    render,
    workload,
)


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


def test_pulled_bundles_live_on_the_writable_store_volume(
    overlay: tuple[str, list[Doc]],
) -> None:
    """A chain pulled from the cloud (docs/rollout.md), its modules, the bundle state and
    the module cache are beside the store: on the store volume, writable, not on the
    read-only root or in the ConfigMap."""
    from pipeline._compose import bundle_cache_dir, bundle_state_path, pulled_chain_target

    _, docs = overlay
    text = configmap_file(docs, "edgepipe-pipeline", "pipeline.yaml")
    cfg = load_config("/etc/edgepipe/pipeline.yaml", text=text)
    c = container(workload(docs, "edgepipe"), "edgepipe")
    for path in (
        pulled_chain_target(cfg),
        pulled_chain_target(cfg).parent / ".edgepipe" / "modules",
        bundle_state_path(cfg),
        bundle_cache_dir(cfg) / "modules",
    ):
        m = _mount_of(c, str(path))
        assert m["name"] == "store" and not m.get("readOnly"), path


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
