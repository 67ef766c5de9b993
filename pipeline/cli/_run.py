from __future__ import annotations

import argparse

from . import add_config_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the pipeline (SIGTERM/SIGINT: finish the batch, exit 0)")
    add_config_arg(p)
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override log_level from the config",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    _one_malloc_arena()  # before any thread starts
    import signal

    # A stop request may come while the process is still starting (Kubernetes sends
    # SIGTERM whenever it likes): note it now, honour it once the loop runs.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early.append(signum))

    import os

    # pydantic looks for plugins by scanning every installed distribution's entry points on
    # first use: tens of milliseconds of start-up that the edge process does not need.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    _no_pydantic_plugin_loader()

    import asyncio

    from config._loader import load_config
    from config._secrets import check_secrets
    from core._errors import FilterLoadError
    from pipeline._compose import build_pipeline
    from pipeline._runtime import configure_logging

    cfg = load_config(args.config)
    # every secret and file the config names, before anything is opened: what `edgepipe
    # validate` refuses, refused the same way (located, exit 2)
    check_secrets(cfg)
    configure_logging(args.log_level or cfg.log_level)

    async def main() -> int:
        try:
            pipeline = await build_pipeline(cfg)
        except FilterLoadError as e:
            # a stage refused at start-up is a configuration error (exit 2), reported at
            # its stage's node like `edgepipe validate` reports it
            from pipeline._compose import chain_spec
            from pipeline.chain._deploy import locate_stage_error

            raise locate_stage_error(e, chain_spec(cfg)) from None
        _freeze_start_objects()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, pipeline.stop)
        if early:
            pipeline.stop()
        return await pipeline.run()

    return asyncio.run(main())


def _freeze_start_objects() -> None:
    """Keep what the start built out of the cyclic collector's way: move every object
    alive now (modules, functions, the config, the chain) to the permanent generation
    (``gc.freeze``), so the collections that the readings' allocations trigger no longer
    traverse them (under callgrind the traversal was ~8 % of the instructions per message
    of a drain).  No collection first: a full one costs 13-15 ms of start-up here and finds
    a few dozen unreachable objects, which stay frozen."""
    import gc

    gc.freeze()


#: glibc's mallopt parameters: the number of malloc arenas, the size from which a block
#: is mapped on its own (and unmapped when freed), the free top of the heap kept
_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
#: a batch's transient buffers (the joined messages, the packed records, the sealed blob:
#: 50-150 KB at 500 messages) are mapped and given back when freed, instead of raising
#: glibc's dynamic threshold to their size and staying in the heap after the peak
_MMAP_FROM = 64 * 1024
_TRIM_FROM = 256 * 1024


def _one_malloc_arena() -> bool:
    """Have glibc's malloc serve every thread from one arena (``mallopt(M_ARENA_MAX, 1)``).
    By default each thread that allocates (aiosqlite's worker, the executor's, the Wasm
    epoch ticker) gets an arena of its own, whose pages stay resident after the peak; the
    threads here allocate little and seldom contend.  Also fixes the mmap and trim
    thresholds (``_MMAP_FROM``, ``_TRIM_FROM``).  Called before any thread starts, so no
    second arena exists; False where the C library has no ``mallopt`` (musl)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        ok = bool(libc.mallopt(_M_ARENA_MAX, 1))
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_FROM)
        return ok
    except (OSError, AttributeError):
        return False


def _no_pydantic_plugin_loader() -> None:
    """pydantic's plugin loader imports ``importlib.metadata`` (and with it email, zipfile,
    csv, tempfile, importlib.resources: ~0.7 MB and ~9 ms of a start here) when the first
    model is built, only to find the plugins that ``edgepipe run`` disables
    (``PYDANTIC_DISABLE_PLUGINS``).  Stand in for it with a loader that finds none; not
    when plugins were enabled in the environment or the loader is imported already."""
    import os
    import sys
    import types

    name = "pydantic.plugin._loader"
    if os.environ.get("PYDANTIC_DISABLE_PLUGINS") != "__all__" or name in sys.modules:
        return
    loader = types.ModuleType(name, "no pydantic plugins (edgepipe run)")
    loader.get_plugins = tuple  # type: ignore[attr-defined]
    sys.modules[name] = loader
