"""``edgepipe filter build|test|describe``: compile a filter from C, Zig or Rust, try it on
sample data, print the configuration it declares."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["RUST_PACKAGES", "add_parser", "compile_filter", "find_rustc", "find_sdk"]

C_FLAGS = (
    "--target=wasm32-freestanding",
    "-nostdlib",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Wno-unused-function",
    "-Wno-unused-parameter",
    "-Wl,--no-entry",
    "-Wl,--export-dynamic",
    "-Wl,--strip-debug",
    "-Wl,-z,stack-size=65536",
)

RUST_TARGET = "wasm32-unknown-unknown"
#: Debian's packages that give a wasm32-capable rustc (rust-lld comes from lld-14).
RUST_PACKAGES = ("rustc", "libstd-rust-dev-wasm32", "lld-14")
RUST_FLAGS = (
    "--edition",
    "2021",
    "--target",
    RUST_TARGET,
    "-C",
    "opt-level=2",
    "-C",
    "panic=abort",
    "-C",
    "codegen-units=1",
)


def _rustc_has_wasm32(rustc: str) -> bool:
    """``rustc`` has the wasm32 core library and a linker for it."""
    try:
        proc = subprocess.run(
            [rustc, "--print", "target-libdir", "--target", RUST_TARGET],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            return False
        libdir = Path(proc.stdout.strip())
        if not any(libdir.glob("libcore-*.rlib")):
            return False
        # rust-lld: in the toolchain (rustup) or next to rustc (Debian, a link to lld-14)
        lld = [libdir.parent / "bin" / "rust-lld", Path(rustc).resolve().parent / "rust-lld"]
        return any(p.exists() for p in lld)  # exists() follows a dangling link to False
    except (OSError, subprocess.SubprocessError):
        return False


def find_rustc() -> str | None:
    """A rustc that can build for wasm32-unknown-unknown: $EDGEPIPE_RUSTC, else Debian's
    /usr/bin/rustc, else any rustc on PATH (the first on PATH often lacks the target)."""
    env = os.environ.get("EDGEPIPE_RUSTC")
    if env:
        return env if _rustc_has_wasm32(env) else None
    seen: set[str] = set()
    candidates = ["/usr/bin/rustc"]
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d:
            candidates.append(str(Path(d) / "rustc"))
    for c in candidates:
        if c in seen or not os.access(c, os.X_OK):
            continue
        seen.add(c)
        if _rustc_has_wasm32(c):
            return c
    return None


def _rust_commands(src: Path, out: Path, sdk: Path, tmp: Path, werror: bool) -> list[list[str]]:
    """The SDK crate as an rlib, then the filter as a cdylib linked against it."""
    rustc = find_rustc()
    if rustc is None:
        raise SystemExit(
            f"edgepipe: building {src.name} needs a Rust compiler with the {RUST_TARGET} "
            f"target; on Debian: apt-get install {' '.join(RUST_PACKAGES)} "
            "(or set EDGEPIPE_RUSTC to such a rustc)"
        )
    crate = sdk / "rust"
    if not (crate / "src" / "lib.rs").exists():
        raise SystemExit(f"edgepipe: Rust SDK not found at {crate}")
    rlib = tmp / "libedgepipe_filter.rlib"
    lints = ["-D", "warnings"] if werror else []
    name = re.sub(r"\W", "_", src.stem)
    if not name or name[0].isdigit():
        name = f"filter_{name}"
    return [
        [
            rustc,
            *RUST_FLAGS,
            *lints,
            "--crate-type",
            "rlib",
            "--crate-name",
            "edgepipe_filter",
            "-C",
            "metadata=edgepipe_filter",
            f"--remap-path-prefix={crate.resolve()}=edgepipe_filter",
            str(crate / "src" / "lib.rs"),
            "-o",
            str(rlib),
        ],
        [
            rustc,
            *RUST_FLAGS,
            *lints,
            "--crate-type",
            "cdylib",
            "--crate-name",
            name,
            "-C",
            "lto",
            "-C",
            "strip=symbols",
            "-C",
            "link-arg=-zstack-size=65536",
            f"--remap-path-prefix={src.parent}=.",
            f"--remap-path-prefix={crate.resolve()}=edgepipe_filter",
            "--extern",
            f"edgepipe_filter={rlib}",
            "-L",
            str(tmp),
            str(src),
            "-o",
            str(out),
        ],
    ]


def find_sdk() -> Path:
    """filters/sdk: $EDGEPIPE_SDK, else the source tree this package runs from."""
    env = os.environ.get("EDGEPIPE_SDK")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "filters" / "sdk")
    for c in candidates:
        if (c / "edgepipe.h").exists():
            return c
    raise SystemExit(
        "edgepipe: filter SDK not found; set EDGEPIPE_SDK to the filters/sdk directory"
    )


def compile_filter(src: Path, out: Path, *, sdk: Path | None = None, werror: bool = False) -> None:
    """C or Zig source -> .wasm with ``python -m ziglang``, Rust source -> .wasm with a
    wasm32-capable rustc (reproducible flags)."""
    sdk = sdk or find_sdk()
    src = src.resolve()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    zig = [sys.executable, "-m", "ziglang"]
    with tempfile.TemporaryDirectory() as tmp:
        cmds: list[list[str]] = []
        if src.suffix == ".rs":
            cmds = _rust_commands(src, out, sdk, Path(tmp), werror)
        elif src.suffix == ".c":
            cmd = [
                *zig,
                "cc",
                *C_FLAGS,
                *(["-Werror"] if werror else []),
                f"-ffile-prefix-map={src.parent}=.",
                "-I",
                str(sdk),
                str(src),
                "-o",
                str(out),
            ]
        elif src.suffix == ".zig":
            cmd = [
                *zig,
                "build-exe",
                "-target",
                "wasm32-freestanding",
                "-O",
                "ReleaseSmall",
                "-fno-entry",
                "-rdynamic",
                "-fstrip",
                "--dep",
                "edgepipe",
                f"-Mroot={src}",
                f"-Medgepipe={sdk / 'edgepipe.zig'}",
                "--cache-dir",
                str(Path(tmp) / "cache"),
                "--global-cache-dir",
                str(Path(tmp) / "global"),
                f"-femit-bin={out}",
            ]
        else:
            raise SystemExit(f"edgepipe: {src}: expected a .c, .zig or .rs filter source")
        env = dict(os.environ, SOURCE_DATE_EPOCH="0")
        for step in cmds or [cmd]:
            proc = subprocess.run(step, cwd=src.parent, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"edgepipe: building {src.name} failed")
    _check_declaration(src, out)


def _check_declaration(src: Path, out: Path) -> None:
    """A built module's config declaration must be readable by the host."""
    from pipeline.chain._declared import DeclarationError, read_declaration

    try:
        read_declaration(out.read_bytes())
    except DeclarationError as e:
        out.unlink()
        raise SystemExit(f"edgepipe: {src.name}: bad config declaration: {e}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filter", help="build a Wasm filter or try one on sample readings")
    fsub = p.add_subparsers(dest="filter_command", metavar="ACTION", required=True)

    b = fsub.add_parser("build", help="compile a C, Zig or Rust filter (with the edgepipe SDK)")
    b.add_argument("source", type=Path, help="my_filter.c, my_filter.zig or my_filter.rs")
    b.add_argument("-o", "--output", type=Path, help="output .wasm (default: next to SOURCE)")
    b.add_argument("--sdk", type=Path, help="filters/sdk directory (default: auto)")
    b.set_defaults(func=_build)

    t = fsub.add_parser(
        "test", help="run a module on sample readings; print the output and its cost"
    )
    t.add_argument("module", type=Path, help="the .wasm module")
    t.add_argument(
        "--input",
        "-i",
        required=True,
        help='JSON lines {"device","metric","ts","value"} ("-" for stdin)',
    )
    t.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="stage config (repeatable; dotted keys nest, VALUE is YAML)",
    )
    t.add_argument(
        "--kind",
        default="filter_map",
        choices=["filter", "map", "filter_map", "expand", "aggregate"],
    )
    t.add_argument("--batch", type=int, default=0, help="records per batch (default: all)")
    t.add_argument("--repeat", type=int, default=1, help="run N times to measure cost")
    t.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    t.set_defaults(func=_test)

    d = fsub.add_parser("describe", help="print the configuration a module declares")
    d.add_argument("module", type=Path, help="the .wasm module")
    d.add_argument("--json", action="store_true", help="the declaration as JSON")
    d.set_defaults(func=_describe)


def _describe(args: argparse.Namespace) -> int:
    import hashlib
    import json

    from core._errors import ConfigError
    from pipeline.chain._declared import DeclarationError, read_declaration

    try:
        wasm = args.module.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read module: {e.strerror}", path=str(args.module)) from None
    try:
        decl = read_declaration(wasm)
    except DeclarationError as e:
        raise ConfigError(f"bad config declaration: {e}", path=str(args.module)) from None
    if args.json:
        print(json.dumps(decl.to_json() if decl else None, indent=2))
        return 0
    print(f"{args.module}: {len(wasm)} bytes, sha256 {hashlib.sha256(wasm).hexdigest()}")
    if decl is None:
        print("declares no configuration: its config: is passed on unchecked")
        return 0
    if not decl.keys:
        print("takes no configuration")
        return 0
    rows = []
    for k in decl.keys:
        kind = k.type + (f" {'|'.join(k.enum)}" if k.enum else "")
        if k.min_items is not None and k.min_items == k.max_items:
            kind += f" [{k.min_items}]"
        rows.append(
            (
                k.name.replace(".*", ".NAME"),
                kind,
                "" if k.default is None else json.dumps(k.default),
                k.range_text(),
                k.description,
            )
        )
    head = ("key", "type", "default", "range", "description")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(4)]
    for r in (head, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0


def _build(args: argparse.Namespace) -> int:
    out = args.output or args.source.with_suffix(".wasm")
    compile_filter(args.source, out, sdk=args.sdk)
    print(f"{out}: {out.stat().st_size} bytes")
    return 0


def _parse_config(items: list[str]) -> dict:
    import yaml

    from core._errors import ConfigError

    cfg: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config {item!r}: expected KEY=VALUE", path="--config")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        cfg[key] = value
    return cfg


def _summary(
    n: int, n_out: int, n_dead: int, times: list, calls: list, load_ms: float, desc: dict
) -> str:
    """The cost summary of ``filter test``: the whole, then where it goes -- guest (the
    module's own Wasm code), host calls (the edgepipe functions it imported) and host
    (records into and out of the sandbox, the output checks, the chain around them)."""
    total = sum(t for t, _ in times)
    n_in = sum(k for _, k in times)
    batches = sum(1 for _, k in times if k)
    window = sum(c.guest_s for c in calls)  # inside the Wasm calls, host calls included
    host_calls = sum(c.host_call_s for c in calls)
    per = 1e9 / max(1, n_in)
    k = sum(c.host_calls for c in calls)
    return (
        f"# {n} in, {n_out} out, {n_dead} dead letters; {batches} batches; load "
        f"{load_ms:.2f} ms; {total / max(1, batches) * 1e6:.1f} us/batch, "
        f"{total * per:.0f} ns/record; sha256 {desc['sha256'][:16]}\n"
        f"# ns/record: guest {(window - host_calls) * per:.0f}, host calls "
        f"{host_calls * per:.0f} ({k} call{'' if k == 1 else 's'}), host "
        f"{max(0.0, total - window) * per:.0f}"
    )


def _test(args: argparse.Namespace) -> int:
    import json
    import time

    from config._models import StageConfig
    from core._errors import ConfigError
    from core._model import Batch, SeriesRegistry
    from pipeline.chain._chain import Chain

    reg = SeriesRegistry()
    batch = Batch()
    src = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    with src:
        for lineno, line in enumerate(src, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                sid = reg.intern(str(d["device"]), str(d["metric"]), d.get("tags"))
                batch.append(int(d["ts"]), float(d["value"]), sid, int(d.get("flags", 0)))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"bad reading: {e!s}", path=args.input, line=lineno) from None
    stage = StageConfig(
        name="test",
        module=args.module.resolve(),
        kind=args.kind,
        config=_parse_config(args.config),
        on_error="dead_letter",
    )
    size = args.batch or max(1, len(batch))
    t0 = time.perf_counter()
    chain = Chain.build([stage], reg, base_dir=Path.cwd(), cache_dir=None)
    load_ms = (time.perf_counter() - t0) * 1000
    out, dead, times, calls = Batch(), [], [], []
    with chain:
        for rep in range(max(1, args.repeat)):
            if rep:
                chain.close()
                chain = Chain.build([stage], reg, base_dir=Path.cwd(), cache_dir=None)
            calls.append(chain.time_calls()["test"])
            out, dead = Batch(), []
            for i in range(0, len(batch), size):
                part = batch.take(range(i, min(i + size, len(batch))))
                t = time.perf_counter()
                res = chain.process(part)
                times.append((time.perf_counter() - t, len(part)))
                out.extend(res.batch)
                dead += res.dead_letters
            t = time.perf_counter()
            flushed = chain.flush()
            times.append((time.perf_counter() - t, 0))
            out.extend(flushed.batch)
            dead += flushed.dead_letters
        desc = chain.describe()[0]
    if not args.quiet:
        for r in out.readings(reg):
            print(
                json.dumps(
                    {"device": r.device, "metric": r.metric, "ts": r.ts, "value": r.value}
                    | ({"flags": r.flags} if r.flags else {})
                )
            )
    for d in dead:
        print(f"dead letter: {d.reason} ({len(d.payload) // 24} readings)", file=sys.stderr)
    print(_summary(len(batch), len(out), len(dead), times, calls, load_ms, desc), file=sys.stderr)
    return 1 if dead else 0
