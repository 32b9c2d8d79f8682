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


def entry() -> None:
    """``acf-fast`` and ``python -m acf_fast``: :func:`main`, then exit with its code.

    Under torchrun (WORLD_SIZE > 1) the process ends with ``os._exit`` once its output is
    flushed, without Python's finalisation. After a DDP step the gloo group's worker threads
    outlive destroy_process_group (torch's C++ side keeps the group; without DDP they end), and a
    worker still releasing a finished collective's Python-owned tensors when finalisation
    began was ended inside a noexcept C++ frame: "terminate called without an active
    exception", SIGABRT, after the rank had done and written everything. A core dump showed
    ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> decref_pyobject -> take_gil ->
    pthread_exit while the main thread was in Py_FinalizeEx (2-core VM beside a CPU hog:
    4 of 53 torchrun runs of ``train --eval-test`` aborted so, none of 70 with this exit).
    Everything a command writes is closed before it returns."""
    from .train.distributed import env_world_size

    code = main()
    if env_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
