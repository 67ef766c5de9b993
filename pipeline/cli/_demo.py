from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run broker, simulated sensors, the pipeline and a cloud receiver on loopback",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="samples per second per simulated device (13 readings each; default 10)",
    )
    p.add_argument("--devices", type=int, default=3, help="simulated devices (default 3)")
    p.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this long (default: until Ctrl-C)",
    )
    p.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    p.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "embedded"],
        default="auto",
        help="auto: mosquitto if installed, else the embedded broker",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from pipeline._demo import Demo

    if args.rate <= 0 or args.devices < 1:
        print("edgepipe demo: --rate must be > 0 and --devices >= 1")
        return 2
    return Demo(
        workdir=args.dir,
        rate=args.rate,
        devices=args.devices,
        duration=args.duration,
        keep=args.keep,
        broker=args.broker,
    ).run()
