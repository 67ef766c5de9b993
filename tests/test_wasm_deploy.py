"""Chain files: hot swap on change (also a kubelet ``..data`` symlink swap), refused
changes leave the running chain alone, ``edgepipe deploy`` / ``rollback``,
``edgepipe filter build`` / ``test``."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from config._loader import load_config
from core._errors import ConfigError
from core._model import Batch, SeriesRegistry
from pipeline._compose import chain_spec
from pipeline.chain._chain import Chain
from pipeline.chain._deploy import ChainWatcher, load_chain_file
from pipeline.cli import main
from tests.helpers.wasm import LIB

FILTERS = """\
version: 1
chain:
  - name: ema
    module: {mod}
    kind: map
    config: {{alpha: {alpha}}}
"""


def write_filters(path: Path, alpha: str, mod: str | Path = LIB / "ema.wasm") -> None:
    path.write_text(FILTERS.format(mod=mod, alpha=alpha))


def ema_out(chain: Chain, sid: int) -> list[float]:
    return chain.process(Batch([1, 2], [0.0, 10.0], [sid, sid])).batch.value


@pytest.fixture
def reg():
    r = SeriesRegistry()
    r.intern("d", "T")
    return r


def test_watcher_swaps_on_change_and_keeps_old_on_error(tmp_path, reg):
    path = tmp_path / "filters.yaml"
    write_filters(path, "0.5")
    spec = load_chain_file(path)
    chain = Chain.build(spec.stages, reg, base_dir=spec.base_dir, cache_dir=tmp_path / "aot")
    w = ChainWatcher(spec, reg, cache_dir=tmp_path / "aot", interval_s=0)
    assert w.poll() is None and w.wait() is None  # unchanged

    os.utime(path)  # touched, same content: no new chain
    assert w.wait() is None

    # a broken file: the running chain stays, the error is located
    path.write_text(FILTERS.format(mod=LIB / "ema.wasm", alpha="0.5") + "    bogus: 1\n")
    assert w.wait() is None
    assert w.last_error is not None and f"{path}:7:5" in w.last_error
    assert "bogus" in w.last_error
    assert ema_out(chain, 0) == [0.0, 5.0]

    # a config the module refuses (alpha outside its declared range) is refused too,
    # located at the value
    write_filters(path, "7")
    assert w.wait() is None
    assert f"{path}:6:21: stage 'ema': config.alpha: 7 is out of range" in (w.last_error or "")

    write_filters(path, "0.25")
    new = w.wait()
    assert new is not None and w.last_error is None
    flushed = chain.hand_over(new)
    assert len(flushed.batch) == 0
    assert new.process(Batch([3], [10.0], [0])).batch.value == [5.0 + 0.25 * 5.0]
    new.close()


def test_watcher_sees_module_replaced(tmp_path, reg):
    mod = tmp_path / "f.wasm"
    shutil.copy(LIB / "ema.wasm", mod)
    path = tmp_path / "filters.yaml"
    write_filters(path, "0.5", mod="f.wasm")
    spec = load_chain_file(path)
    w = ChainWatcher(spec, reg, cache_dir=None, interval_s=0)
    shutil.copy(LIB / "zscore.wasm", mod)  # same YAML (zscore takes alpha too), new bytes
    new = w.wait()
    assert new is not None
    assert new.describe()[0]["sha256"] != spec.sha256
    new.close()


def test_watcher_follows_kubelet_symlink_swap(tmp_path, reg):
    mount = tmp_path / "mount"
    v1, v2 = mount / "..2026_11_29_1", mount / "..2026_11_29_2"
    v1.mkdir(parents=True)
    v2.mkdir()
    write_filters(v1 / "filters.yaml", "0.50")
    write_filters(v2 / "filters.yaml", "0.25")  # same size
    st = (v1 / "filters.yaml").stat()
    os.utime(v2 / "filters.yaml", ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    os.symlink(v1.name, mount / "..data")
    os.symlink("..data/filters.yaml", mount / "filters.yaml")
    spec = load_chain_file(mount / "filters.yaml")
    w = ChainWatcher(spec, reg, cache_dir=None, interval_s=0)
    assert w.wait() is None
    os.symlink(v2.name, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap kubelet does
    new = w.wait()
    assert new is not None
    assert ema_out(new, 0) == [0.0, 2.5]
    new.close()


PIPELINE = """\
subscriptions:
  - topic: sensors/{{device}}/{{metric}}
store:
  path: {store}
chain_file: installed/filters.yaml
"""


def test_deploy_and_rollback_cli(tmp_path, capsys, reg):
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(PIPELINE.format(store=tmp_path / "store.db"))
    (tmp_path / "installed").mkdir()
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(LIB / "ema.wasm", src / "ema.wasm")
    write_filters(src / "filters.yaml", "0.5", mod="ema.wasm")

    assert main(["deploy", str(src / "filters.yaml"), "-c", str(cfg_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == 1
    cfg = load_config(cfg_path)
    spec = chain_spec(cfg)
    assert spec.path == tmp_path / "installed" / "filters.yaml"
    assert spec.stages[0].sha256 == out["stages"][0]["sha256"]
    assert list((tmp_path / ".edgepipe-cache").glob("*.cwasm"))  # AOT cache filled
    # the installed chain does not depend on the source tree any more
    shutil.rmtree(src)
    with Chain.build(spec.stages, reg, base_dir=spec.base_dir, cache_dir=None) as ch:
        assert ema_out(ch, 0) == [0.0, 5.0]

    src.mkdir()
    shutil.copy(LIB / "ema.wasm", src / "ema.wasm")
    write_filters(src / "filters.yaml", "0.25", mod="ema.wasm")
    assert main(["deploy", str(src / "filters.yaml"), "-c", str(cfg_path)]) == 0
    assert "version 2" in capsys.readouterr().out

    # a broken file is refused with file:line:col and the installed chain is untouched
    before = (tmp_path / "installed" / "filters.yaml").read_text()
    (src / "bad.yaml").write_text(
        "version: 1\nchain:\n  - name: x\n    module: ema.wasm\n    kind: mapp\n"
    )
    assert main(["deploy", str(src / "bad.yaml"), "-c", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'bad.yaml'}:5:11" in err and "kind" in err
    (src / "init.yaml").write_text(FILTERS.format(mod="ema.wasm", alpha="9"))
    assert main(["deploy", str(src / "init.yaml"), "-c", str(cfg_path)]) == 2
    assert "init.yaml:6:21: stage 'ema': config.alpha: 9 is out of range" in (
        capsys.readouterr().err
    )
    assert (tmp_path / "installed" / "filters.yaml").read_text() == before

    assert main(["rollback", "-c", str(cfg_path)]) == 0
    assert "version 1" in capsys.readouterr().out
    spec = chain_spec(load_config(cfg_path))
    assert spec.stages[0].config == {"alpha": 0.5}
    assert main(["rollback", "-c", str(cfg_path)]) == 2  # nothing older
    assert "oldest" in capsys.readouterr().err
    assert main(["rollback", "-c", str(cfg_path), "--to", "2"]) == 0
    assert chain_spec(load_config(cfg_path)).stages[0].config == {"alpha": 0.25}
    assert main(["rollback", "-c", str(cfg_path), "--list"]) == 0
    assert "*      2" in capsys.readouterr().out


def test_deploy_needs_chain_file(tmp_path, capsys):
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text("subscriptions:\n  - topic: a/{device}/{metric}\n")
    write_filters(tmp_path / "f.yaml", "0.5")
    assert main(["deploy", str(tmp_path / "f.yaml"), "-c", str(cfg_path)]) == 2
    assert "chain_file" in capsys.readouterr().err


def test_chain_and_chain_file_are_exclusive(tmp_path):
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(
        "subscriptions:\n  - topic: a/{device}/{metric}\nchain_file: f.yaml\n"
        f"chain:\n  - name: e\n    module: {LIB / 'ema.wasm'}\n    kind: map\n"
    )
    with pytest.raises(ConfigError):
        chain_spec(load_config(cfg_path))


def test_filter_build_and_test_cli(tmp_path, capsys):
    src = tmp_path / "pos.c"
    src.write_text(
        '#include "edgepipe.h"\nstatic double lo;\n'
        'EP_INIT { lo = ep_config_f64("min", 0); return 0; }\n'
        "EP_FILTER(keep) { return rec->value >= lo; }\n"
    )
    assert main(["filter", "build", str(src), "-o", str(tmp_path / "pos.wasm")]) == 0
    capsys.readouterr()
    sample = tmp_path / "s.jsonl"
    sample.write_text(
        "\n".join(
            json.dumps({"device": "d", "metric": "T", "ts": i * 1000, "value": v})
            for i, v in enumerate([1.5, -3, 7, 0.5])
        )
    )
    rc = main(
        [
            "filter",
            "test",
            str(tmp_path / "pos.wasm"),
            "-i",
            str(sample),
            "--kind",
            "filter",
            "--config",
            "min=1",
        ]
    )
    assert rc == 0
    cap = capsys.readouterr()
    assert [json.loads(x)["value"] for x in cap.out.splitlines()] == [1.5, 7]
    assert "4 in, 2 out" in cap.err and "ns/record" in cap.err
    assert _SUMMARY.fullmatch(cap.err)

    sample.write_text('{"device": "d", "metric": "T", "ts": 1}\n')
    assert main(["filter", "test", str(tmp_path / "pos.wasm"), "-i", str(sample)]) == 2
    assert f"{sample}:1" in capsys.readouterr().err


_SUMMARY = re.compile(
    r"# (\d+) in, (\d+) out, 0 dead letters; (\d+) batches; load [\d.]+ ms; [\d.]+ us/batch, "
    r"(\d+) ns/record; sha256 [0-9a-f]{16}\n"
    r"# ns/record: guest (\d+), host calls (\d+) \((\d+) calls?\), host (\d+)\n$"
)


def test_filter_test_reports_guest_host_calls_and_host_time(tmp_path, capsys):
    """The summary splits the cost: the module's own code, the host functions it called
    (window derives 4 series per input series, once per instance), and the host."""
    t0 = 1_699_999_800_000  # a window boundary
    sample = tmp_path / "s.jsonl"
    sample.write_text(
        "\n".join(
            json.dumps({"device": "d", "metric": m, "ts": t0 + i * 60_000, "value": i})
            for i in range(300)
            for m in ("T", "RH")
        )
    )
    args = ["filter", "test", str(LIB / "window.wasm"), "-i", str(sample), "--kind", "aggregate"]
    rc = main([*args, "--config", "window_s=600", "--batch", "100", "--repeat", "2", "-q"])
    assert rc == 0
    m = _SUMMARY.fullmatch(capsys.readouterr().err)
    assert m, "summary not in the expected shape"
    n_in, n_out, batches, total, guest, calls_ns, calls, host = map(int, m.groups())
    assert (n_in, batches) == (600, 12)
    assert n_out == 2 * (300 // 10) * 4  # 10-minute windows of 2 series, 4 stats each
    assert calls == 2 * 2 * 4  # 2 instances (--repeat 2) x 2 series x 4 derived series
    assert abs(guest + calls_ns + host - total) <= 2  # the parts add up (each rounded)


def test_filter_build_zig(tmp_path, capsys):
    src = tmp_path / "neg.zig"
    src.write_text(
        'const ep = @import("edgepipe");\n'
        "fn neg(rec: *ep.Record) void { rec.value = -rec.value; }\n"
        "comptime { ep.map(neg, .{}); }\n"
    )
    out = tmp_path / "neg.wasm"
    assert main(["filter", "build", str(src), "-o", str(out)]) == 0
    reg = SeriesRegistry()
    sid = reg.intern("d", "T")
    from tests.helpers.wasm import stage

    with Chain.build([stage("neg", out, "map")], reg, base_dir=tmp_path, cache_dir=None) as ch:
        assert ch.process(Batch([1, 2], [1.5, -2.0], [sid, sid])).batch.value == [-1.5, 2.0]
