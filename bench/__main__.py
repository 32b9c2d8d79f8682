"""``python -m bench [options]`` = ``acf-fast bench [options]``."""
import os
import sys

# Before torch loads OpenMP (see bench.report.OMP_NOTE): passive waiting threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from acf_fast.cli import main  # noqa: E402

sys.exit(main(["bench", *sys.argv[1:]]))
