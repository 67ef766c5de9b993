from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run broker, simulated devices, their pipelines and a cloud dashboard on loopback",
        description="Everything on loopback: a broker, one edge pipeline per simulated device "
        "(each with its own config, store and key), simulated sensors replaying the UCI "
        "air-quality data set, and a cloud receiver with its dashboard and a demo operator. "
        "The header says how to sign in and which commands work on the demo's files; "
        "everything is kept in the work directory after Ctrl-C.",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="samples per second per simulated device (13 readings each; default 10)",
    )
    p.add_argument("--devices", type=int, default=3, help="simulated devices, 1 to 10 (default 3)")
    p.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this long (default: until Ctrl-C)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--dir",
        type=Path,
        help="work directory, kept afterwards and continued by the next demo "
        "(default: ./edgepipe-demo)",
    )
    where.add_argument(
        "--temp",
        action="store_true",
        help="use a temporary work directory and delete it on exit",
    )
    p.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "embedded"],
        default="auto",
        help="auto: mosquitto if installed, else the embedded broker",
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from pipeline._demo import MAX_DEVICES, Demo

    if args.rate <= 0 or args.rate > 1000 or not 1 <= args.devices <= MAX_DEVICES:
        print(f"edgepipe demo: --rate must be in (0, 1000] and --devices in 1..{MAX_DEVICES}")
        return 2
    return Demo(
        workdir=args.dir,
        temp=args.temp,
        rate=args.rate,
        devices=args.devices,
        duration=args.duration,
        broker=args.broker,
    ).run()
