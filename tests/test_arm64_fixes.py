"""What running on arm64 under qemu-user found (docs/arm64.md), on every architecture.

- The ``process_*`` gauges come from ``statm`` and ``os.times``: qemu-user's emulated
  ``/proc/self/stat`` is all zeros, so memory read from it was 0.
- The AOT cache is keyed by the CPU the code was compiled for: boards of two CPU models
  sharing a cache directory each keep their own entry instead of refusing and overwriting
  each other's on every start.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from core._metrics import Metrics
from pipeline._http import register_process_metrics
from pipeline.chain._engine import engine, engine_settings
from pipeline.wasm._aot import ModuleCache, cache_key, host_target
from tests.helpers.wasm import LIB

PAGE = os.sysconf("SC_PAGE_SIZE")


def _fake_proc(tmp_path: Path, *, starttime: int = 0, fds: int = 3) -> Path:
    """A ``/proc/self`` as qemu-user shows it: ``stat`` with zeros after the name (here
    the start time may be set), the host's ``statm``, ``limits`` and ``fd/``."""
    proc = tmp_path / "proc-self"
    (proc / "fd").mkdir(parents=True)
    for i in range(fds):
        (proc / "fd" / str(i)).touch()
    fields = ["R"] + ["0"] * 50
    fields[19] = str(starttime)  # field 22 of proc(5), counted after "pid (comm)"
    (proc / "stat").write_text(f"4242 (edge (x) run) {' '.join(fields)}\n")
    (proc / "statm").write_text("30000 12000 3000 700 0 9000 0\n")
    (proc / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        "Max open files            1024                 524288               files\n"
    )
    return proc


def _scrape(m: Metrics) -> dict[str, float]:
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in m.render().splitlines()
        if line and not line.startswith("#")
    }


def test_process_gauges_read_statm_when_stat_is_zeros(tmp_path):
    before = time.time()
    m = Metrics()
    register_process_metrics(m, proc=str(_fake_proc(tmp_path)))
    s = _scrape(m)
    assert s["process_resident_memory_bytes"] == 12000 * PAGE
    assert s["process_virtual_memory_bytes"] == 30000 * PAGE
    assert s["process_open_fds"] == 3
    assert s["process_max_fds"] == 1024
    # CPU time from the times() system call, which qemu-user answers correctly
    t = os.times()
    assert 0 < s["process_cpu_seconds_total"] <= t.user + t.system
    # no start time in stat: the moment the gauges were registered, at start-up
    assert before <= s["process_start_time_seconds"] <= time.time()


def test_process_start_time_from_stat_when_it_has_one(tmp_path):
    with open("/proc/stat") as f:
        boot = next(float(ln.split()[1]) for ln in f if ln.startswith("btime "))
    ticks = os.sysconf("SC_CLK_TCK")
    m = Metrics()
    register_process_metrics(m, proc=str(_fake_proc(tmp_path, starttime=ticks * 5)))
    assert _scrape(m)["process_start_time_seconds"] == boot + 5


def test_process_gauges_follow_the_real_process():
    m = Metrics()
    register_process_metrics(m)
    junk = bytearray(64 << 20)  # 64 MB, touched page by page
    for i in range(0, len(junk), PAGE):
        junk[i] = 1
    s = _scrape(m)
    with open("/proc/self/status") as f:
        vm_rss = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
    assert s["process_resident_memory_bytes"] > 64 << 20
    # statm and status describe the same pages (read a moment apart)
    assert abs(s["process_resident_memory_bytes"] - vm_rss) < 16 << 20
    assert s["process_virtual_memory_bytes"] >= s["process_resident_memory_bytes"]
    assert s["process_cpu_seconds_total"] > 0
    assert s["process_start_time_seconds"] <= time.time()
    del junk


def test_process_gauges_need_statm(tmp_path):
    proc = _fake_proc(tmp_path)
    (proc / "statm").unlink()
    m = Metrics()
    register_process_metrics(m, proc=str(proc))
    assert "process_resident_memory_bytes" not in _scrape(m)


# -- the AOT cache and the CPU ---------------------------------------------------------------


def test_host_target_names_the_architecture_and_its_features():
    target = host_target()
    machine, _, features = target.partition(":")
    assert machine.startswith(os.uname().machine)
    if os.uname().machine == "aarch64":
        assert features.startswith("hwcap=0x")  # qemu-user sets these per CPU model
    else:
        assert features.startswith("flags=")
    # the default key is the host's
    assert cache_key("00" * 32, "s") == cache_key("00" * 32, "s", target)
    assert cache_key("00" * 32, "s") != cache_key("00" * 32, "s", machine + ":other")


@pytest.fixture
def wasm() -> tuple[bytes, str]:
    data = (LIB / "validity.wasm").read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def test_two_cpus_sharing_a_cache_directory_keep_one_entry_each(tmp_path, wasm):
    data, digest = wasm
    a53, a72 = "aarch64-linux:hwcap=0x887", "aarch64-linux:hwcap=0xefffff"
    first = ModuleCache(tmp_path, engine(), engine_settings(), target=a53)
    first.load(data, digest)
    second = ModuleCache(tmp_path, engine(), engine_settings(), target=a72)
    second.load(data, digest)
    assert (first.misses, second.misses) == (1, 1)
    entries = {p: p.read_bytes() for p in tmp_path.glob("*.cwasm")}
    assert len(entries) == 2
    # every later start of either board finds its own entry; neither rewrites the other's
    for _ in range(3):
        for target in (a53, a72):
            c = ModuleCache(tmp_path, engine(), engine_settings(), target=target)
            c.load(data, digest)
            assert (c.hits, c.misses) == (1, 0)
    assert {p: p.read_bytes() for p in tmp_path.glob("*.cwasm")} == entries


def test_a_foreign_cpus_entry_is_never_loaded(tmp_path, wasm, caplog):
    data, digest = wasm
    ours = ModuleCache(tmp_path, engine(), engine_settings())
    ours.load(data, digest)
    [own] = tmp_path.glob("*.cwasm")
    foreign = ModuleCache(tmp_path, engine(), engine_settings(), target="aarch64-linux:other")
    foreign.load(data, digest)
    [other] = set(tmp_path.glob("*.cwasm")) - {own}
    # the foreign CPU's file copied under our name: refused by its key, recompiled, replaced
    good = own.read_bytes()
    own.write_bytes(other.read_bytes())
    again = ModuleCache(tmp_path, engine(), engine_settings())
    with caplog.at_level("WARNING", logger="edgepipe.aot"):
        again.load(data, digest)
    assert (again.hits, again.misses) == (0, 1)
    assert "key mismatch" in caplog.text
    assert own.read_bytes() == good
