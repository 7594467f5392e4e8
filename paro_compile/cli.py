"""`paro` console script."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paro", description="paro_compile command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the built-in demo (python -m paro_compile.demo)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from paro_compile.demo import main as demo_main

        return demo_main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
