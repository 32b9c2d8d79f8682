"""Sub-commands of the ``acf-fast`` CLI, one module each.

Each module defines ``register(subparsers)`` that adds its parser and sets
``func`` (called with the parsed namespace, returns an exit code or None).
"""


def add_precision_arg(parser, what: str) -> None:
    """``--precision``: the one scoring-precision option (see :mod:`acf_fast.scoring`)."""
    from ..scoring import DEFAULT_PRECISION, PRECISIONS

    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help=f"{what}: fp32 (float32 throughout, |dS| <= 1e-4; default) or bf16 (bf16 autocast on "
                             "CUDA, <= 5e-3); recorded in the results JSON")
