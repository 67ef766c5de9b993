"""The composition root: the one place that turns ``pipeline.yaml`` sections into runtime
objects and hands each component what it needs.

Components below this module never see the whole :class:`~config._models.PipelineConfig`:
each gets its own typed section, resolved paths and its collaborators (the store gets a
keyring, the sync worker a transport, a link monitor and its state; the MQTT client the
decoder's topic filters).  Path resolution against the config file's directory happens
here and nowhere else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from config._models import PipelineConfig, SyncConfig
from config._secrets import device_secret, store_keyring
from core._clock import SYSTEM_CLOCK, Clock
from core._errors import ConfigError, FilterError, SyncError
from protocol._keys import Keyring
from storage import Store

from ._parts import FilterChain, NoChain, Parts
from ._runtime import Pipeline, chain_load_errors

if TYPE_CHECKING:
    from sync import BatchSource, BundleAgent, SyncWorker

    from .chain import ChainSpec, ChainWatcher

__all__ = [
    "ChainDeployer",
    "bundle_agent",
    "build_pipeline",
    "bundle_cache_dir",
    "bundle_state_path",
    "cache_dir",
    "chain",
    "chain_spec",
    "chain_target",
    "keyring",
    "make_sync_worker",
    "pulled_chain_target",
    "open_store",
    "store_path",
    "sync_state_path",
    "sync_worker",
]

log = logging.getLogger("edgepipe")


def store_path(cfg: PipelineConfig) -> Path:
    return cfg.resolve(cfg.store.path)


def sync_state_path(cfg: PipelineConfig) -> Path:
    """The sync worker's state file: ``sync.state_file``, else beside the store."""
    if cfg.sync.state_file is not None:
        return cfg.resolve(Path(cfg.sync.state_file))
    return _beside(store_path(cfg), ".sync.json")


def _beside(p: Path, suffix: str) -> Path:
    return p.with_name(p.name + suffix)


def keyring(cfg: PipelineConfig) -> Keyring:
    """The store keyring of ``store.key``; a located :class:`ConfigError` (``store.key: ...``)
    when it is not set, unreadable, too permissive or does not parse."""
    return store_keyring(cfg)


async def open_store(cfg: PipelineConfig, *, create: bool = True) -> Store:
    """The encrypted store of ``cfg`` (``create=False`` for tools: a missing store is an
    error, not a new empty one)."""
    sc = cfg.store
    return await Store.open(
        store_path(cfg),
        keyring(cfg),
        device_id=cfg.device.id,
        quota_bytes=int(sc.quota_mb * 1024 * 1024),
        on_full=sc.on_full,
        synchronous=sc.synchronous,
        create=create,
    )


def sync_worker(
    cfg: PipelineConfig,
    store: BatchSource,
    *,
    secret: str | None = None,
    link: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> SyncWorker:
    """The sync worker of ``cfg`` over ``store``; ``sync.device_secret`` not set or not to
    be had is a located :class:`ConfigError`."""
    sc = cfg.sync
    if secret is None:
        secret = device_secret(cfg)
    return make_sync_worker(
        sc,
        store,
        device_id=cfg.device.id,
        secret=secret,
        base_dir=cfg.base_dir,
        state_path=sync_state_path(cfg),
        link=link,
        clock=clock,
    )


def make_sync_worker(
    sc: SyncConfig,
    store: BatchSource,
    *,
    device_id: str,
    secret: str | None,
    base_dir: Path,
    state_path: Path | None = None,
    link: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> SyncWorker:
    """A sync worker from its section: the transport (``sync.url``, the device secret,
    ``sync.ca_file``), the link monitor (``sync.links``) and the state file (default: beside
    the store), relative paths resolved against ``base_dir``."""
    from sync import LinkMonitor, SyncWorker, Transport, secret_bytes

    def resolve(p: Path | str | None) -> Path | None:
        return None if p is None else (Path(p) if Path(p).is_absolute() else base_dir / p)

    transport = Transport(
        sc.url,
        device_id=device_id,
        secret=secret_bytes(secret),
        timeout_s=sc.timeout_s,
        ca_file=resolve(sc.ca_file),
        clock=clock.time,
    )
    if state_path is None:
        state_path = resolve(sc.state_file) or _beside(Path(store.path), ".sync.json")
    return SyncWorker(
        store,
        sc,
        transport=transport,
        links=LinkMonitor(sc.links, resolve(sc.links.sysfs_root)),
        state_path=state_path,
        link=link,
        clock=clock,
        health_every_s=sc.health_interval_s,
    )


def cache_dir(cfg: PipelineConfig) -> Path:
    """The AOT cache directory the runtime and ``edgepipe deploy`` share (beside the store)."""
    return store_path(cfg).parent / ".edgepipe-cache"


def chain_spec(cfg: PipelineConfig, chain_file: Path | None = None) -> ChainSpec:
    """The chain of a pipeline: ``chain_file`` (argument or config) or the inline chain."""
    from .chain import ChainSpec, load_chain_file

    path = chain_file or cfg.chain_file
    if path is None:
        return ChainSpec(list(cfg.chain), cfg.base_dir, source=cfg.source, locs=cfg.locations)
    if cfg.chain:
        line, col = cfg.locations.get(("chain_file", "__key__"), (None, None))
        raise ConfigError(
            "give either `chain:` or `chain_file:`, not both", path=cfg.source, line=line, col=col
        )
    return load_chain_file(cfg.resolve(path))


def chain_target(cfg: PipelineConfig) -> Path:
    """The chain file ``edgepipe deploy`` installs and the runtime watches."""
    if cfg.chain_file is None:
        raise ConfigError(
            "pipeline.yaml has no `chain_file:`; add e.g. `chain_file: filters.yaml` so "
            "the runtime watches the file that `edgepipe deploy` installs",
            path=cfg.source or "pipeline.yaml",
        )
    return cfg.resolve(cfg.chain_file)


def pulled_chain_target(cfg: PipelineConfig) -> Path:
    """Where an applied bundle's chain is installed: beside the store, on the writable
    volume (``<store>.chain/filters.yaml``, with the deployer's history and modules)."""
    return _beside(store_path(cfg), ".chain") / "filters.yaml"


def bundle_state_path(cfg: PipelineConfig) -> Path:
    """The bundle agent's state (the highest version applied, what runs): beside the store."""
    return _beside(store_path(cfg), ".bundle.json")


def bundle_cache_dir(cfg: PipelineConfig) -> Path:
    """The bundle agent's content-addressed module cache and staging: beside the store."""
    return _beside(store_path(cfg), ".bundles")


def _uses_pulled_chain(cfg: PipelineConfig) -> bool:
    b = cfg.sync.bundles
    return (
        cfg.sync.enabled
        and b.enabled
        and b.chain_source == "cloud"
        and cfg.chain_file is not None
        and pulled_chain_target(cfg).exists()
        and not _runs_local_bundle(cfg)
    )


def _runs_local_bundle(cfg: PipelineConfig) -> bool:
    """Whether the last bundle applied is a local bundle (back to ``chain_file``)."""
    from sync import BundleState

    try:
        return BundleState.load(bundle_state_path(cfg)).chain == "local"
    except (SyncError, TypeError):  # unreadable: the agent says so and refuses bundles
        return False


def chain(
    cfg: PipelineConfig, store: Store, *, clock: Clock = SYSTEM_CLOCK
) -> tuple[FilterChain | None, ChainWatcher | None]:
    """The chain from ``chain:`` or ``chain_file:``, and the watcher of a chain file.  With
    ``sync.bundles.chain_source: cloud`` an applied bundle's chain, once there is one,
    replaces the chain file's (docs/rollout.md).

    The chain is None while a chain file is broken: the process then runs but is not ready
    and does not consume (the broker holds the messages) until a fixed file appears."""
    if cfg.chain_file is None and not cfg.chain:
        return NoChain(), None
    from .chain import Chain, ChainSpec, ChainWatcher
    from .chain._deploy import locate_stage_error

    cache = cache_dir(cfg)
    built: FilterChain | None = None
    spec: ChainSpec | None = None
    pulled = pulled_chain_target(cfg) if _uses_pulled_chain(cfg) else None
    try:
        spec = chain_spec(cfg, pulled)
        built = Chain.build(
            spec.stages, store.registry, base_dir=spec.base_dir, cache_dir=cache, clock=clock
        )
    except (ConfigError, FilterError) as e:
        if cfg.chain_file is None:
            raise
        # a stage's refusal, located in the chain file like `edgepipe validate` reports it
        why = locate_stage_error(e, spec) if isinstance(e, FilterError) and spec else e
        log.error(
            "the filter chain cannot be loaded, waiting for a fixed chain file "
            "(not consuming meanwhile): %s",
            why,
        )
        chain_load_errors.inc()
        spec = ChainSpec([], cfg.base_dir, pulled or cfg.resolve(cfg.chain_file), None)
    watcher = None
    if spec.path is not None:
        watcher = ChainWatcher(spec, store.registry, cache_dir=cache)
    return built, watcher


async def build_pipeline(cfg: PipelineConfig, *, clock: Clock = SYSTEM_CLOCK) -> Pipeline:
    """Everything ``edgepipe run`` runs, wired: the store, the chain (and its watcher), the
    decoder, the MQTT client and, when enabled, the sync worker.  Nothing is connected yet;
    :meth:`Pipeline.run` starts it and closes every part when it ends.  ``clock`` is the one
    every part reads (breaker cooldowns, the redelivery window, signing timestamps)."""
    from .ingest import BloomBits, Decoder, MQTTClient

    store = await open_store(cfg)
    try:
        filters, watcher = chain(cfg, store, clock=clock)
        cache = cache_dir(cfg)
        store.use_seen_bits(lambda log2: BloomBits(log2, cache))  # the redelivery filter
        decoder = Decoder(
            cfg.subscriptions,
            store.registry,
            device_id=cfg.device.id,
            max_payload=cfg.batch.max_payload_bytes,
            identity_key=store.identity_key,
            cache_dir=cache,
        )
        mqtt = MQTTClient(
            cfg.broker,
            decoder.topic_filters,
            device_id=cfg.device.id,
            max_pending=cfg.batch.max_pending,
            expect_session=store.last_seq > 0,
            clock=clock,
        )
        worker = sync_worker(cfg, store, clock=clock) if cfg.sync.enabled else None
    except BaseException:
        await store.close()
        raise
    parts = Parts(store, decoder, mqtt, filters, watcher, worker)
    pipeline = Pipeline(
        parts,
        batch=cfg.batch,
        metrics_listen=cfg.metrics.listen,
        reencrypt=cfg.store.reencrypt,
    )
    if worker is not None:
        device_records(worker, store, pipeline, clock=clock)
        if cfg.sync.bundles.enabled:
            worker.bundles = bundle_agent(cfg, worker, watcher, clock=clock)
    return pipeline


class ChainDeployer:
    """The bundle agent's applier (``sync.BundleApplier``): ``edgepipe deploy`` of a
    verified bundle's filters file to the pulled chain file, then the running chain's
    watcher moved onto that file if it watched the local one."""

    def __init__(self, cfg: PipelineConfig, watcher: ChainWatcher | None) -> None:
        self.cfg = cfg
        self.source = cfg.sync.bundles.chain_source
        self.has_chain_file = cfg.chain_file is not None
        self.target = pulled_chain_target(cfg)
        self.cache = cache_dir(cfg)
        self.watcher = watcher

    def refusal(self) -> Exception | None:
        from sync import CannotApply

        if self.source == "local":
            return CannotApply(
                "chain_source_local",
                "sync.bundles.chain_source is local: this device runs its chain_file "
                "(e.g. a ConfigMap) and takes no chain from the cloud",
            )
        if not self.has_chain_file or self.watcher is None:
            return CannotApply(
                "install_failed",
                "pipeline.yaml has no chain_file: give one (the chain runs from it until the "
                "first bundle) so that the running chain can be swapped",
            )
        return None

    def apply(self, filters: Path) -> list[str]:
        from sync import CannotApply

        from .chain._deploy import deploy

        try:
            done = deploy(self.target, filters, cache_dir=self.cache)
        except ConfigError as e:
            raise CannotApply(
                "invalid_chain", str(e).replace(str(filters.parent) + "/", "")
            ) from None
        except OSError as e:
            raise CannotApply("install_failed", f"cannot install the chain: {e}") from None
        if self.watcher is not None and self.watcher.path != self.target:
            self.watcher.retarget(self.target)
        return [st["name"] for st in done["stages"]]

    def apply_local(self) -> tuple[list[str], str | None]:
        """A local bundle: the watcher moved back onto ``chain_file`` (the pulled chain file
        stays, unused); with ``chain_source: local`` nothing changes."""
        from sync import CannotApply

        local = chain_target(self.cfg) if self.has_chain_file else None
        try:
            spec = chain_spec(self.cfg, local)
        except ConfigError as e:
            raise CannotApply("invalid_chain", f"the configured chain: {e}") from None
        names = [st.name for st in spec.stages]
        if self.source == "local":
            return names, "sync.bundles.chain_source is local: it runs its chain_file already"
        if self.watcher is None or local is None:
            raise CannotApply("install_failed", "pipeline.yaml has no chain_file to go back to")
        if self.watcher.path == local:
            return names, "it runs its configured chain_file already"
        self.watcher.retarget(local)
        return names, None


def bundle_agent(
    cfg: PipelineConfig, worker: SyncWorker, watcher: ChainWatcher | None, *, clock: Clock
) -> BundleAgent:
    """The signed-bundle agent of ``cfg.sync.bundles`` on ``worker``'s transport; its state
    and module cache live beside the store."""
    from sync import BundleAgent

    return BundleAgent(
        cfg.sync.bundles,
        transport=worker.transport,
        applier=ChainDeployer(cfg, watcher),  # type: ignore[arg-type]
        state_path=bundle_state_path(cfg),
        cache_dir=bundle_cache_dir(cfg),
        clock=clock,
    )


def device_records(
    worker: SyncWorker, store: Store, pipeline: Pipeline, *, clock: Clock = SYSTEM_CLOCK
) -> None:
    """Health snapshots and warning logs for the cloud (docs/health.md): the sampler gets
    the application's own state (MQTT, readiness, the active chain's hash) as a collector;
    the pipeline attaches the log collector while it runs."""
    from sync import HealthSampler, LogCollector

    def app_fields() -> dict[str, object]:
        ready, _ = pipeline.ready()
        out: dict[str, object] = {
            "mqtt_connected": int(bool(pipeline.mqtt.connected)),
            "ready": int(ready),
        }
        chain = pipeline.chain
        if chain is not None:
            out["chain"] = chain_hash(chain.describe())
        return out

    worker.health = HealthSampler(store_path=store.path, extra=[app_fields])
    worker.logs = LogCollector(clock=clock.time)


def chain_hash(stages: list[dict[str, object]]) -> str:
    """A short hash of the active chain: its stages' names and module digests in order
    (``-`` for no chain)."""
    if not stages:
        return "-"
    import hashlib

    text = "\n".join(f"{d.get('name')}:{d.get('sha256')}" for d in stages)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
