"""The ``acf-fast`` command line (also ``python -m acf_fast``)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Order = order in --help. Each name is a module in acf_fast.commands.
COMMANDS = ("data", "evaluate", "train", "demo", "real", "ablation", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acf-fast",
        description="Fast, faithful ACF / ACF-R+ image-text retrieval: data, scoring, evaluation, training, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"acf_fast.commands.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    # Never reach a model hub: offline before anything imports transformers.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # which options were given (train --resume)
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"acf-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
