"""torch.compile timings in a child process, under a wall-clock budget.

Compiling the torch backend with Inductor takes from seconds (GPU, warm cache) to
many minutes (a busy 2-core CPU, cold cache: 530 s was seen here for one shape), and
a compile cannot be interrupted from inside the process. The report therefore runs
the ``torch.compile`` column here, in a child process killed at the budget; rows are
written after every size (atomically), so whatever finished in time is kept and the
rest is reported as "not timed: compile budget exhausted".

    python -m bench.compile_worker ARGS.json OUT.json
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def run_child(args_path: str, out_path: str) -> None:
    from . import cases
    from acf_fast.atomic import atomic_write_json

    a = json.loads(Path(args_path).read_text())
    torch.set_num_threads(a["threads"])
    device = torch.device(a["device"])
    rows = []
    # smallest sizes first, variants interleaved: when the budget runs out, both variants have something
    jobs = sorted(((v, tuple(sz)) for v in a["variants"] for sz in a["sizes"]),
                  key=lambda j: (j[1][0] * j[1][1], a["variants"].index(j[0])))
    for variant, (N, M) in jobs:
        if N * M > a["cap"]:
            rows.append({"variant": variant, "N": N, "M": M, "backend": "torch.compile", "status": "extrapolated"})
        else:
            # torch.compile alone: no untimed torch call for a diff, the budget is for compiling
            rows += cases.similarity_case([(N, M)], [variant], device, backends=("torch.compile",),
                                          dtype=getattr(torch, a["dtype"]), repeats=a["repeats"], budget_s=a["budget_s"],
                                          progress=False, caps={"torch.compile": float("inf")})
        atomic_write_json(out_path, rows)  # NaN stays NaN: the parent reads it back with json.loads


def compile_rows(sizes, variants, device, *, budget_total_s: float, cap: float, repeats: int, budget_s: float,
                 dtype=torch.float32, log=print) -> list:
    """Run the torch.compile column in a child process; returns its rows (see module doc).

    Sizes the child did not reach within ``budget_total_s`` come back as "not timed".
    """
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        args_path, out_path = Path(tmp) / "args.json", Path(tmp) / "rows.json"
        args_path.write_text(json.dumps({"sizes": [list(s) for s in sizes], "variants": list(variants),
                                         "device": str(device), "cap": cap if cap != float("inf") else 1e300,
                                         "repeats": repeats, "budget_s": budget_s, "threads": torch.get_num_threads(),
                                         "dtype": str(dtype).replace("torch.", "")}))
        env = dict(os.environ)
        env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # Compile in the child itself: Inductor's worker pool would outlive a killed child and keep
        # compiling on the CPU while the next columns are timed.
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        timed_out, err = False, ""
        proc = subprocess.Popen([sys.executable, "-m", "bench.compile_worker", str(args_path), str(out_path)],
                                cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group, ended as a whole below
        try:
            _, stderr = proc.communicate(timeout=budget_total_s)
            if proc.returncode != 0:
                err = ((stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"])[0][:300]
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
        rows = json.loads(out_path.read_text()) if out_path.exists() else []
    done = {(r["variant"], r["N"], r["M"]) for r in rows}
    for variant in variants:
        for N, M in sizes:
            if (variant, N, M) not in done:
                why = (f"not timed: torch.compile did not finish within its {budget_total_s:.0f} s budget on this machine "
                       "(Inductor compile time)") if timed_out else f"not timed: compile worker failed: {err or 'no result'}"
                rows.append({"variant": variant, "N": N, "M": M, "backend": "torch.compile", "status": "not timed", "note": why})
    if timed_out:
        log(f"  torch.compile: budget of {budget_total_s:.0f} s reached; kept {len(done)} size(s)")
    return rows


if __name__ == "__main__":
    run_child(sys.argv[1], sys.argv[2])
