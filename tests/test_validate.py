"""``edgepipe validate`` refuses everything ``run`` and ``deploy`` refuse, at the stage's
node in the YAML, with exit code 2; a stage's ``config:`` is checked against the config
its module declares (``edgepipe.config``); ``edgepipe filter describe`` prints it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime
import yaml

from core._metrics import METRICS
from core._model import Batch, SeriesRegistry
from devtools._mosquitto import free_port
from pipeline.chain._chain import Chain
from pipeline.chain._declared import read_declaration
from pipeline.cli import main
from tests.helpers.wasm import LIB, REPO, stage

# A minimal ABI v1 module; {imports} and {init} are spliced in, {version} is its ABI.
WAT = """
(module
  {imports}
  (memory (export "memory") 1)
  (func (export "ep_abi_version") (result i32) i32.const {version})
  (func (export "ep_input") (param i32) (result i32) i32.const 1024)
  (func (export "ep_process") (param i32) (result i64)
    (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.extend_i32_u (local.get 0))))
  {init})
"""
INIT_TRAPS = """
  (func (export "ep_alloc") (param i32) (result i32) i32.const 2048)
  (func (export "ep_init") (param i32 i32) (result i32) unreachable)
"""
# ep_init logs why it refuses, then returns -3
LOG = '(import "edgepipe" "log" (func $log (param i32 i32 i32)))'
INIT_REFUSES = """
  (data (i32.const 4096) "threshold must be above low")
  (func (export "ep_alloc") (param i32) (result i32) i32.const 2048)
  (func (export "ep_init") (param i32 i32) (result i32)
    (call $log (i32.const 3) (i32.const 4096) (i32.const 27)) i32.const -3)
"""
WASI = '(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))'


def wat_module(path: Path, *, imports: str = "", init: str = "", version: int = 1) -> Path:
    path.write_bytes(wasmtime.wat2wasm(WAT.format(imports=imports, init=init, version=version)))
    return path


def pipeline_yaml(tmp_path: Path, keyfile: Path, **top: object) -> Path:
    """A pipeline.yaml whose chain is the problem; the broker port has no broker (nothing
    here may connect)."""
    cfg: dict[str, object] = {
        "device": {"id": "test-device"},
        "broker": {"host": "127.0.0.1", "port": free_port()},
        "subscriptions": [{"topic": "sensors/{device}/{metric}"}],
        "store": {"path": str(tmp_path / "store.db"), "key": {"file": str(keyfile)}},
        "sync": {"enabled": False},
        "metrics": {"listen": None},
        **top,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def stage_at(path: Path, name: str, key: str | None = None) -> str:
    """``LINE:COL`` (1-based) of the ``- name: NAME`` stage node in a YAML file, or of the
    value of that stage's ``key``."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if line.strip() == f"- name: {name}":
            if key is None:
                return f"{i}:{line.index('name') + 1}"
            for j, other in enumerate(lines[i:], i + 1):
                if other.strip().startswith(f"{key}: "):
                    return f"{j}:{other.index(key) + len(key) + 3}"
    raise AssertionError(f"no stage {name} (key {key}) in {path}")


def edgepipe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYDANTIC_DISABLE_PLUGINS": "__all__"},
    )


#: the key of the stage each refusal is located at (None: the stage's node)
KEY_OF = {"sha256": "sha256", "init_refuses": None}


def refused_case(tmp_path: Path, case: str) -> tuple[dict[str, object], str]:
    """A stage ``run`` refuses, and what the message must say."""
    ema = str(LIB / "ema.wasm")
    if case == "missing":
        return {"name": "bad", "module": str(tmp_path / "gone.wasm")}, "cannot read module"
    if case == "wasi":
        mod = wat_module(tmp_path / "wasi.wasm", imports=WASI)
        return {"name": "bad", "module": str(mod)}, "imports wasi_snapshot_preview1.fd_write"
    if case == "abi":
        mod = wat_module(tmp_path / "v2.wasm", version=2)
        return {"name": "bad", "module": str(mod)}, "ep_abi_version() returned 2"
    if case == "oversized":
        mod = tmp_path / "big.wasm"
        mod.write_bytes(b"\0asm\x01\0\0\0" + bytes(4096 * 1024))
        return {"name": "bad", "module": str(mod)}, "larger than limits.module_max_kb"
    if case == "init_trap":
        mod = wat_module(tmp_path / "trap.wasm", init=INIT_TRAPS)
        return {
            "name": "bad",
            "module": str(mod),
        }, "ep_init: trap (unreachable): wasm `unreachable`"
    if case == "init_refuses":
        mod = wat_module(tmp_path / "refuses.wasm", imports=LOG, init=INIT_REFUSES)
        return (
            {"name": "bad", "module": str(mod)},
            "ep_init refused the config (returned -3): threshold must be above low",
        )
    if case == "sha256":
        return (
            {"name": "bad", "module": ema, "kind": "map", "sha256": "0" * 64},
            "the pinned sha256 is " + "0" * 64,
        )
    raise AssertionError(case)


CASES = ["missing", "wasi", "abi", "oversized", "init_trap", "init_refuses", "sha256"]


@pytest.mark.parametrize("case", CASES)
def test_validate_and_run_refuse_the_same_stage_with_exit_2(tmp_path, keyfile, case, capsys):
    bad, says = refused_case(tmp_path, case)
    good = {"name": "ema", "module": str(LIB / "ema.wasm"), "kind": "map"}
    cfg = pipeline_yaml(tmp_path, keyfile, chain=[good, bad])
    # at the value of the key the refusal is about (module: unless said otherwise)
    where = f"{cfg}:{stage_at(cfg, 'bad', KEY_OF.get(case, 'module'))}: stage 'bad': "

    assert main(["validate", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert where in err and says in err, err
    # what the guest logged is said once, in the refusal, not again as a log line
    assert err.count("threshold must be above low") == (case == "init_refuses"), err
    assert "ema" not in err.replace(str(LIB / "ema.wasm"), "")  # the good stage is fine
    assert not (tmp_path / "store.db").exists()  # validate started nothing

    r = edgepipe("run", "-c", str(cfg))
    assert r.returncode == 2, r.stderr
    assert where in r.stderr and says in r.stderr, r.stderr


@pytest.mark.parametrize("case", CASES)
def test_deploy_refuses_the_same_stage_with_exit_2(tmp_path, keyfile, case, capsys):
    bad, says = refused_case(tmp_path, case)
    filters = tmp_path / "new-filters.yaml"
    filters.write_text(yaml.safe_dump({"version": 1, "chain": [bad]}, sort_keys=False))
    cfg = pipeline_yaml(tmp_path, keyfile, chain_file="filters.yaml")
    assert main(["deploy", str(filters), "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    where = stage_at(filters, "bad", KEY_OF.get(case, "module"))
    assert f"{filters}:{where}: stage 'bad': " in err and says in err, err
    assert not (tmp_path / "filters.yaml").exists()  # nothing installed


def test_chain_file_stages_are_checked_and_counted(tmp_path, keyfile, capsys):
    chain = tmp_path / "filters.yaml"
    ema = {"name": "ema", "module": str(LIB / "ema.wasm"), "kind": "map"}
    chain.write_text(yaml.safe_dump({"version": 1, "chain": [ema]}, sort_keys=False))
    cfg = pipeline_yaml(tmp_path, keyfile, chain_file="filters.yaml")
    assert main(["validate", "-c", str(cfg)]) == 0
    assert "1 filter stage(s) in " in capsys.readouterr().out

    broken = {"name": "broken", "module": "missing.wasm"}
    chain.write_text(yaml.safe_dump({"version": 1, "chain": [ema, broken]}, sort_keys=False))
    assert main(["validate", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{chain}:{stage_at(chain, 'broken', 'module')}: stage 'broken': " in err, err
    assert "missing.wasm: cannot read module" in err


# -- typed filter configuration ------------------------------------------------------


def window_config(tmp_path: Path, keyfile: Path, config: dict[str, object]) -> Path:
    win = {"name": "window", "module": str(LIB / "window.wasm"), "kind": "aggregate"}
    return pipeline_yaml(tmp_path, keyfile, chain=[{**win, "config": config}])


def key_position(path: Path, key: str) -> str:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith(f"{key}:"):
            return f"{i}:{line.index(key) + 1}"
    raise AssertionError(key)


def test_misspelled_key_is_refused_with_location_and_suggestion(tmp_path, keyfile, capsys):
    cfg = window_config(tmp_path, keyfile, {"windw_s": 600, "passthrough": True})
    assert main(["validate", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{cfg}:{key_position(cfg, 'windw_s')}: stage 'window': config.windw_s: unknown key; "
        "did you mean 'window_s'?"
    ) in err, err

    r = edgepipe("run", "-c", str(cfg))  # the same refusal from run, not a silent default
    assert r.returncode == 2, r.stderr
    assert "config.windw_s: unknown key; did you mean 'window_s'?" in r.stderr


def test_wrong_type_is_refused_at_the_value(tmp_path, keyfile, capsys):
    cfg = window_config(tmp_path, keyfile, {"passthrough": "sometimes"})
    assert main(["validate", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    line, col = key_position(cfg, "passthrough").split(":")
    value_col = int(col) + len("passthrough: ")
    assert (
        f"{cfg}:{line}:{value_col}: stage 'window': config.passthrough: expected true or "
        "false, got string 'sometimes'"
    ) in err, err


def test_out_of_range_and_bad_choice_are_refused(tmp_path, keyfile, capsys):
    cfg = window_config(tmp_path, keyfile, {"window_s": 0, "stats": "mean,median"})
    assert main(["validate", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "stage 'window': config.window_s: 0 is out of range (must be >= 0.001)" in err, err
    assert "config.stats: item 2: 'median' is not one of mean, min, max, count" in err, err

    ema = {"name": "ema", "module": str(LIB / "ema.wasm"), "kind": "map"}
    cfg = pipeline_yaml(tmp_path, keyfile, chain=[{**ema, "config": {"alpha": 1.5}}])
    assert main(["validate", "-c", str(cfg)]) == 2
    assert "config.alpha: 1.5 is out of range (must be > 0 and <= 1)" in capsys.readouterr().err


def test_per_metric_keys_and_the_example_pipeline_are_accepted(
    tmp_path, keyfile, capsys, monkeypatch
):
    valid = {"name": "v", "module": str(LIB / "validity.wasm"), "kind": "filter"}
    cfg = pipeline_yaml(
        tmp_path,
        keyfile,
        chain=[{**valid, "config": {"sentinel": None, "range": {"T": [-40, 60]}}}],
    )
    assert main(["validate", "-c", str(cfg)]) == 0
    cfg = pipeline_yaml(tmp_path, keyfile, chain=[{**valid, "config": {"range": {"T": [1]}}}])
    assert main(["validate", "-c", str(cfg)]) == 2
    assert "config.range.T: needs at least 2 item(s), got 1" in capsys.readouterr().err
    # the example, with its store key where this test has one and its device secret set
    example = (REPO / "pipeline.yaml").read_text()
    example = example.replace("/etc/edgepipe/store.key", str(keyfile))
    copy = tmp_path / "example.yaml"
    copy.write_text(example.replace("filters/lib/", f"{LIB}/"))
    monkeypatch.setenv("EDGEPIPE_DEVICE_SECRET", "ab" * 32)
    assert main(["validate", "-c", str(copy)]) == 0


def test_every_library_filter_declares_its_config():
    for mod in sorted(LIB.glob("*.wasm")):
        decl = read_declaration(mod.read_bytes())
        assert decl is not None, f"{mod.name} declares no config"
    names = {k.name for k in read_declaration((LIB / "window.wasm").read_bytes()).keys}
    assert names == {"window_s", "stats", "passthrough"}
    assert read_declaration((LIB / "dedup.wasm").read_bytes()).keys == ()


def test_filter_describe_prints_the_declaration(capsys):
    assert main(["filter", "describe", str(LIB / "window.wasm")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == {"window_s", "stats", "passthrough"}
    assert "number" in rows["window_s"] and ">= 0.001" in rows["window_s"]
    assert main(["filter", "describe", "--json", str(LIB / "ema.wasm")]) == 0
    (alpha,) = json.loads(capsys.readouterr().out)["keys"]
    assert alpha == {
        "name": "alpha",
        "type": "number",
        "default": 0.2,
        "exclusive_minimum": 0,
        "maximum": 1,
        "description": "smoothing factor: weight of the newest reading",
    }


def test_schema_completes_library_filter_config():
    schema = json.loads(edgepipe("schema").stdout)
    rules = schema["$defs"]["StageConfig"]["allOf"]
    window = next(r for r in rules if "window" in r["if"]["properties"]["module"]["pattern"])
    config = window["then"]["properties"]["config"]
    assert set(config["properties"]) == {"window_s", "stats", "passthrough"}
    assert config["additionalProperties"] is False


def test_module_without_declaration_warns_once_and_runs(tmp_path, keyfile, caplog):
    mod = wat_module(tmp_path / "plain.wasm")
    before = METRICS.value("edgepipe_filter_undeclared_modules_total")
    reg = SeriesRegistry()
    sid = reg.intern("d", "T")
    stages = [stage("a", mod, "map", {"anything": 1}), stage("b", mod, "map")]
    with caplog.at_level(logging.WARNING, logger="edgepipe.filter"):
        with Chain.build(stages, reg, base_dir=tmp_path, cache_dir=None) as chain:
            out = chain.process(Batch([1, 2], [1.0, 2.0], [sid, sid]))
    assert out.batch.value == [1.0, 2.0] and not out.dead_letters
    warned = [r for r in caplog.records if "declares no configuration" in r.getMessage()]
    assert len(warned) == 1 and "plain.wasm" in warned[0].getMessage()
    assert METRICS.value("edgepipe_filter_undeclared_modules_total") == before + 1

    cfg = pipeline_yaml(
        tmp_path, keyfile, chain=[{"name": "p", "module": str(mod), "config": {"x": 1}}]
    )
    r = edgepipe("validate", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "stage p: module plain.wasm declares no configuration" in r.stderr


def test_run_logs_a_broken_chain_file_located(tmp_path, keyfile, edge):
    """A chain file whose stage is refused at start: the process waits, not ready, and
    the log line an operator reads says where the problem is (file:line:col of module:)."""
    from devtools._mosquitto import Mosquitto
    from tests.helpers.edge import make_config

    chain = tmp_path / "filters.yaml"
    broken = {"name": "broken", "module": str(tmp_path / "missing.wasm")}
    chain.write_text(yaml.safe_dump({"version": 1, "chain": [broken]}, sort_keys=False))
    cfg = make_config(tmp_path, Mosquitto(port=free_port()), keyfile, chain_file=str(chain))
    proc = edge(cfg)
    proc.wait_metric("edgepipe_chain_load_errors_total", 1, 60)
    assert proc.readyz() == (503, "not ready: filter chain not loaded")
    where = f"{chain}:{stage_at(chain, 'broken', 'module')}: stage 'broken': "
    # the log line is the operator-facing feature under test
    line = next(ln for ln in proc.output().splitlines() if "cannot be loaded" in ln)
    assert where in line and "missing.wasm: cannot read module" in line, line
    assert proc.terminate() == 0


def test_a_number_beyond_the_digit_limit_is_a_located_error(tmp_path, capsys):
    # int() refuses more than 4300 digits: that was a ValueError traceback, exit 1
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("version: 1\nbatch_size: 1" + "0" * 5000 + "\n")
    assert main(["validate", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:2:13: invalid value: Exceeds the limit (4300 digits)" in err, err[:300]
    assert "Traceback" not in err and "set_int_max_str_digits" not in err
