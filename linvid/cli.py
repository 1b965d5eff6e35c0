"""The `linvid` console script. Each command is a subparser whose work lives in the module
that owns it (bench/, distill/, eval/ ...); this file only wires arguments to them and turns
user errors into one line with a hint instead of a traceback."""

from __future__ import annotations

import argparse
import sys

from linvid import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linvid",
        description="Convert Transformer video LLMs into linear-time students, distill them, "
        "and run, benchmark and evaluate them on long videos.",
    )
    parser.add_argument("--version", action="version", version=f"linvid {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser("bench", help="efficiency measurements")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    from linvid.bench import ops as bench_ops

    ops = bench_commands.add_parser(
        "ops",
        help="time the sequence ops (WKV6, SSD) against same-run anchors",
        description=bench_ops.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_ops.add_arguments(ops)
    ops.set_defaults(run=bench_ops.main_from_arguments)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if not hasattr(arguments, "run"):
        parser.print_help()
        return 2
    try:
        return arguments.run(arguments)
    except (ValueError, FileNotFoundError) as error:
        print(f"linvid {arguments.command}: error: {error}", file=sys.stderr)
        print("hint: run with --help for the expected arguments", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
