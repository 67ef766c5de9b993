"""Where the chain comes from, hot swap when its file changes, and deploy/rollback.

The chain lives either inline in ``pipeline.yaml`` (``chain:``) or in a separate filters
file (``chain_file:``), which is watched.  A filters file looks like::

    version: 1
    chain:
      - name: valid
        module: lib/validity.wasm      # relative to the filters file
        kind: filter
        config: {range: {T: [-40, 60]}}

:class:`ChainWatcher` notices a changed file cheaply (resolved path + mtime + size of the
file and of every module it names, then a sha256 of the text), including a kubelet-style
``..data`` symlink swap of a mounted ConfigMap.  It parses and compiles the new chain on
a worker thread so batches keep flowing; ``poll()`` then instantiates it on the caller's
thread and returns it.  A chain that fails leaves the old one running; the reason (with
``file:line:col`` for YAML problems) is logged, counted and kept in ``last_error``.

:func:`check_chain` is what ``edgepipe validate``, ``run`` and ``deploy`` all refuse a
chain for: every stage's module is read, checked (size, pin, ABI, imports), compiled and
instantiated in the sandbox, its ``config:`` checked against the module's declaration and
``ep_init`` run with it; each problem is reported at the stage's key it is about in the
YAML (``module:``, ``sha256:``, ``config:``: ``file:line:col: stage 'NAME': ...``) as a
:class:`ConfigError`.

``edgepipe deploy`` validates and compiles a filters file, copies its modules into a
content-addressed store beside the installed file, pins their sha256, atomically
replaces the watched file and keeps every installed version for ``edgepipe rollback``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from config._loader import load_yaml_located, locate_validation_error, read_text
from config._models import StageConfig, unique_stage_names
from core._errors import ConfigError, FilterError
from core._fsutil import atomic_write
from core._metrics import METRICS
from core._model import SeriesRegistry

from ._chain import Chain, compile_stages
from ._module import LoadedModule, load_module
from ._stage import StageConfigError, WasmStage

__all__ = [
    "ChainFile",
    "ChainSpec",
    "ChainWatcher",
    "check_chain",
    "deploy",
    "history",
    "load_chain_file",
    "locate_stage_error",
    "rollback",
]

log = logging.getLogger("edgepipe.deploy")

_RELOADS = METRICS.counter(
    "edgepipe_chain_reloads_total", "Chain file reloads, by result", ("result",)
)

STATE_DIR = ".edgepipe"  # beside the installed chain file: modules/ and history/


class ChainFile(BaseModel):
    """A filters file: the chain on its own."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="edgepipe filters file")

    version: Literal[1] = 1
    chain: list[StageConfig]

    @field_validator("chain")
    @classmethod
    def _unique(cls, chain: list[StageConfig]) -> list[StageConfig]:
        return unique_stage_names(chain)


@dataclass(frozen=True)
class ChainSpec:
    """The stages to build, where their relative module paths start, and the file."""

    stages: list[StageConfig]
    base_dir: Path
    path: Path | None = None  # the filters file, when the chain lives in one
    sha256: str | None = None  # of its text
    source: str | None = None  # the YAML file the stages are in, as messages name it
    #: (line, col) by key path in that file; the stages are under ("chain", i)
    locs: dict[tuple[Any, ...], tuple[int, int]] | None = None


def load_chain_file(path: Path, text: str | None = None) -> ChainSpec:
    """Parse and validate a filters file; :class:`ConfigError` at file:line:col."""
    shown = str(path)
    if text is None:
        text = read_text(path, "filters file")
    data, locs = load_yaml_located(text, shown)
    if isinstance(data, list):  # a bare list of stages is accepted too
        data, locs = {"chain": data}, {("chain", *k): v for k, v in locs.items()}
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping with a `chain:` list", path=shown, line=1, col=1)
    try:
        model = ChainFile.model_validate(data)
    except ValidationError as e:
        raise locate_validation_error(e, locs, shown) from None
    return ChainSpec(
        list(model.chain),
        path.resolve().parent,
        path,
        hashlib.sha256(text.encode()).hexdigest(),
        shown,
        locs,
    )


# -- checking -----------------------------------------------------------------------


#: the key of a stage a refusal is about, by code (anything else is about its module:
#: unreadable, not Wasm, too large, bad ABI or imports, a trap in ep_init)
_KEY_OF: dict[str, tuple[str, ...]] = {
    "sha256_mismatch": ("sha256",),
    "memory_limit": ("limits", "memory_mb"),
    "init": ("config",),
    "bad_config": ("config",),
    "name": ("name",),
}


def locate_stage_error(err: FilterError, spec: ChainSpec) -> ConfigError:
    """A stage's refusal as a :class:`ConfigError` at the value of the stage's key it is
    about (``module:``, ``sha256:``, ``config:`` or, for a config problem, the offending key
    or value; the stage's node when that key is not written), ``file:line:col: stage
    'NAME': ...``."""
    return _located([err], spec)


def _located(errors: list[FilterError], spec: ChainSpec) -> ConfigError:
    locs = spec.locs or {}
    index = {st.name: i for i, st in enumerate(spec.stages)}
    found: list[tuple[tuple[int, int], str]] = []
    for err in errors:
        i = index.get(err.stage or "")
        base: tuple[Any, ...] = ("chain", i)
        stage_at = locs.get(base) or locs.get(("chain",)) or (1, 1)
        if isinstance(err, StageConfigError):
            for p in err.problems:
                at = (*base, "config", *p.path)
                pos = locs.get((*at, "__key__")) if p.at_key else locs.get(at)
                probe = at
                while pos is None and len(probe) > len(base):
                    probe = probe[:-1]
                    pos = locs.get(probe)
                found.append((pos or stage_at, f"stage {err.stage!r}: {p}"))
        else:
            key = _KEY_OF.get(err.code or "", ("module",))
            found.append((locs.get((*base, *key)) or stage_at, str(err)))
    shown = spec.source or (str(spec.path) if spec.path else "pipeline.yaml")
    found.sort(key=lambda f: f[0])
    (line, col), text = found[0]
    text += "".join(f"\n{shown}:{ln}:{cl}: {m}" for (ln, cl), m in found[1:])
    return ConfigError(text, path=shown, line=line, col=col)


def check_chain(spec: ChainSpec, *, cache_dir: Path | None) -> dict[str, LoadedModule]:
    """Everything ``run`` and ``deploy`` refuse a chain for, with nothing started: each
    stage's module loaded and checked, instantiated in the sandbox with its config
    checked and ``ep_init`` run, then dropped.  Returns the compiled modules; raises one
    located :class:`ConfigError` listing the problem of every failing stage."""
    from ..wasm._aot import ModuleCache
    from ._engine import engine, engine_settings

    cache = ModuleCache(cache_dir, engine(), engine_settings())
    registry = SeriesRegistry()
    loaded: dict[str, LoadedModule] = {}
    errors: list[FilterError] = []
    for st in spec.stages:
        try:
            mod = load_module(st, spec.base_dir, cache)
            WasmStage(st, registry, base_dir=spec.base_dir, cache=cache, loaded=mod).close()
        except FilterError as e:
            errors.append(e)
        else:
            loaded[st.name] = mod
    if errors:
        raise _located(errors, spec)
    return loaded


# -- watching ---------------------------------------------------------------------------


def _stat_sig(path: Path) -> tuple[str, int, int] | None:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return real, st.st_mtime_ns, st.st_size


class ChainWatcher:
    """Polls a filters file between batches; see the module docstring.

    ``poll()`` costs a few ``stat`` calls at most every ``interval_s`` and returns a new,
    ready :class:`Chain` exactly once per successful change (else ``None``).
    """

    def __init__(
        self,
        spec: ChainSpec,
        registry: SeriesRegistry,
        *,
        cache_dir: Path | None,
        interval_s: float = 1.0,
    ) -> None:
        if spec.path is None:
            raise ValueError("only a chain file can be watched")
        self.path = spec.path
        self.registry = registry
        self.cache_dir = cache_dir
        self.interval_s = interval_s
        self.current_sha256 = spec.sha256
        self.last_error: str | None = None
        self.reloads = 0
        self._spec = spec
        self._sig = self._signature(spec)
        self._next_check = time.monotonic() + interval_s
        self._job: threading.Thread | None = None
        self._result: tuple[ChainSpec, dict[str, LoadedModule]] | BaseException | None = None
        self._job_sig: Any = None

    def retarget(self, path: Path) -> None:
        """Watch ``path`` from now on (a pulled bundle's chain file replacing a local one);
        the next poll loads it, between batches like any change."""
        self.path = path
        self._sig = ()
        self._next_check = 0.0

    def _signature(self, spec: ChainSpec | None) -> tuple[Any, ...]:
        sig: list[Any] = [_stat_sig(self.path)]
        if spec is not None:
            for st in spec.stages:
                mod = st.module if st.module.is_absolute() else spec.base_dir / st.module
                sig.append(_stat_sig(mod))
        return tuple(sig)

    def poll(self, *, force: bool = False) -> Chain | None:
        if self._job is not None:
            if self._job.is_alive():
                return None
            return self._finish()
        now = time.monotonic()
        if not force and now < self._next_check:
            return None
        self._next_check = now + self.interval_s
        probe = self._signature(self._spec)
        if probe == self._sig:
            return None
        self._job_sig = probe
        self._job = threading.Thread(
            target=self._compile, name="edgepipe-chain-compile", daemon=True
        )
        self._job.start()
        return None

    def wait(self, timeout: float = 30.0) -> Chain | None:
        """Block until a pending compile is done and return what ``poll`` would (tests, CLI)."""
        for _ in range(2):  # finish a pending job, then look for a newer change
            if self._job is not None:
                self._job.join(timeout)
            chain = self.poll(force=True)
            if chain is not None:
                return chain
        if self._job is not None:
            self._job.join(timeout)
            return self.poll(force=True)
        return None

    def _compile(self) -> None:
        try:
            spec = load_chain_file(self.path)
            if spec.sha256 == self.current_sha256 and self._signature(spec)[1:] == self._sig[1:]:
                self._result = (spec, {})  # touched, not changed
                return
            try:
                loaded = compile_stages(
                    spec.stages, base_dir=spec.base_dir, cache_dir=self.cache_dir
                )
            except FilterError as e:
                raise locate_stage_error(e, spec) from None
            self._result = (spec, loaded)
        except BaseException as e:  # reported by poll() on the caller's thread
            self._result = e

    def _finish(self) -> Chain | None:
        result, self._result, self._job = self._result, None, None
        if isinstance(result, BaseException):
            self._sig = self._job_sig  # don't retry until the file changes again
            self._fail(result)
            return None
        assert result is not None
        spec, loaded = result
        self._sig = self._signature(spec)
        self._spec = spec
        if not loaded:  # touched, not changed
            return None
        try:
            chain = Chain.build(
                spec.stages,
                self.registry,
                base_dir=spec.base_dir,
                cache_dir=self.cache_dir,
                loaded=loaded,
            )
        except FilterError as e:
            self._fail(locate_stage_error(e, spec))
            return None
        except Exception as e:
            self._fail(e)
            return None
        self.current_sha256 = spec.sha256
        self.last_error = None
        self.reloads += 1
        _RELOADS.inc(1, "ok")
        log.info("chain file %s changed: new chain with %d stages", self.path, len(chain))
        return chain

    def _fail(self, e: BaseException) -> None:
        if isinstance(e, ConfigError | FilterError):
            msg = str(e)
        else:
            msg = f"{self.path}: {type(e).__name__}: {e}"
        self.last_error = msg
        _RELOADS.inc(1, "error")
        log.error("new chain refused, the running chain stays: %s", msg)

    def close(self) -> None:
        if self._job is not None:
            self._job.join()
            self._job = None


# -- deploy and rollback ----------------------------------------------------------------


def _history_dir(target: Path) -> Path:
    return target.parent / STATE_DIR / "history"


def history(target: Path) -> tuple[list[Path], int | None]:
    """Installed versions of the chain file ``target`` (oldest first) and the number of the
    current one."""
    hdir = _history_dir(target)
    entries = sorted(hdir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].yaml")) if hdir.exists() else []
    try:
        current = int((hdir / "CURRENT").read_text().strip())
    except (OSError, ValueError):
        current = None
    return entries, current


def _install(target: Path, text: bytes, number: int) -> None:
    if target.is_symlink():
        raise ConfigError(
            f"{target} is a symlink (a mounted ConfigMap?); update it through its source",
            path=str(target),
        )
    atomic_write(target, text)
    atomic_write(_history_dir(target) / "CURRENT", f"{number}\n".encode())


def _pinned(target: Path, source: Path, spec: ChainSpec, loaded: dict[str, LoadedModule]) -> bytes:
    """The chain as installed: modules copied into a content-addressed store beside the
    target, referred to relatively and pinned by sha256."""
    modules_dir = target.parent / STATE_DIR / "modules"
    modules_dir.mkdir(parents=True, exist_ok=True)
    stages_out = []
    for st in spec.stages:
        mod = loaded[st.name]
        dest = modules_dir / f"{mod.sha256}.wasm"
        if not dest.exists():
            atomic_write(dest, mod.path.read_bytes())
        data = st.model_dump(mode="json", exclude_defaults=True)
        data["module"] = os.path.relpath(dest, target.parent)
        data["sha256"] = mod.sha256
        data.setdefault("kind", st.kind)
        stages_out.append(data)
    body = yaml.safe_dump({"version": 1, "chain": stages_out}, sort_keys=False)
    header = f"# installed by `edgepipe deploy` from {source.resolve()}\n"
    return (header + body).encode()


def deploy(target: Path, source: Path, *, cache_dir: Path | None) -> dict[str, Any]:
    """Validate, compile and install ``source`` as the watched chain file ``target``
    (``pipeline._compose.chain_target``), compiling into ``cache_dir``."""
    spec = load_chain_file(source)  # ConfigError at file:line:col
    loaded = check_chain(spec, cache_dir=cache_dir)  # what `edgepipe validate` checks
    text = _pinned(target, source, spec, loaded)
    entries, _ = history(target)
    if not entries and target.exists() and not target.is_symlink():
        # the chain that was there before the first deploy (written by hand): keep it,
        # pinned like a deployed one, as version 1 so that `edgepipe rollback` returns to it
        try:
            before = load_chain_file(target)
            pinned = _pinned(
                target,
                target,
                before,
                compile_stages(before.stages, base_dir=before.base_dir, cache_dir=cache_dir),
            )
        except (ConfigError, FilterError) as e:
            log.warning("the chain installed before this deploy is not kept for rollback: %s", e)
        else:
            atomic_write(_history_dir(target) / f"{1:06d}.yaml", pinned)
            entries = [_history_dir(target) / f"{1:06d}.yaml"]
    number = int(entries[-1].stem) + 1 if entries else 1
    atomic_write(_history_dir(target) / f"{number:06d}.yaml", text)
    _install(target, text, number)
    return {
        "installed": str(target),
        "version": number,
        "stages": [
            {"name": st.name, "kind": st.kind, "sha256": loaded[st.name].sha256}
            for st in spec.stages
        ],
    }


def rollback(target: Path, to: int | None = None) -> dict[str, Any]:
    """Re-install an earlier deployed version of ``target`` (default: the one before the
    current)."""
    entries, current = history(target)
    numbers = [int(p.stem) for p in entries]
    if not numbers:
        raise ConfigError("nothing to roll back to: no deploy history", path=str(target))
    if to is None:
        cur = current if current is not None else numbers[-1]
        older = [n for n in numbers if n < cur]
        if not older:
            raise ConfigError(f"version {cur} is the oldest deployed version", path=str(target))
        to = older[-1]
    if to not in numbers:
        raise ConfigError(f"no deployed version {to} (have {numbers})", path=str(target))
    entry = _history_dir(target) / f"{to:06d}.yaml"
    text = entry.read_bytes()
    spec = load_chain_file(entry)
    for st in spec.stages:  # the content-addressed modules must still be there, intact
        path = target.parent / st.module
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            raise ConfigError(
                f"module {path} of version {to}: {e.strerror}", path=str(entry)
            ) from None
        if digest != st.sha256:
            raise ConfigError(f"module {path} of version {to} was modified", path=str(entry))
    _install(target, text, to)
    return {"installed": str(target), "version": to, "stages": [s.name for s in spec.stages]}
