"""Sharded ``evaluate --data`` under torchrun: 2 gloo processes on the CPU give the
single process's results (issue 15, item 1).

The sharded runs are the real command, ``python -m torch.distributed.run --standalone
--nproc_per_node=2 -m acf_fast evaluate ...`` (torchrun), in subprocesses; the single
process is the same CLI in this process. One torch thread everywhere (torchrun sets
OMP_NUM_THREADS=1 for its workers), so both sides run the same arithmetic and S must be
equal byte for byte, not merely close.

The JSON must equal the single process's in every field but two of ``scoring``:
``work`` (the chunk folder: each run is given its own ``--work`` so that the sharded
run scores afresh instead of reading the single run's chunks; the key folder name
inside it is the same) and ``ranks`` (1 vs 2, which is the point). The evaluate
JSON has no timing or host fields.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from acf_fast.cli import main

from test_evaluate_cli import N_IMG, direct_scores, save_model, write_split

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
CHUNK = 2  # 12 images: 6 chunks, 3 per rank (round-robin: rank 0 scores 0, 2, 4; rank 1 scores 1, 3, 5)
EXCLUDED = ("work", "ranks")  # of "scoring"; see the module docstring

# The CLI under torchrun, with rank 1 SIGKILLed right after it saved its first chunk.
KILL_RANK1 = r"""
import os, signal, sys
from acf_fast.chunk_cache import ChunkCache
real_save = ChunkCache.save
def save(self, a, b, rows):
    out = real_save(self, a, b, rows)
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return out
ChunkCache.save = save
from acf_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def torchrun(args, script=None):
    """Run ``torchrun --standalone --nproc_per_node=2`` of the CLI (or of ``script``) with ``args``."""
    target = ["-m", "acf_fast"] if script is None else [str(script)]
    # torchrun leaves a torchelastic_* log folder in TMPDIR at every start: keep them out of /tmp
    with tempfile.TemporaryDirectory(prefix="acf_torchrun_") as tmp:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", TMPDIR=tmp)
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={WORLD}", *target, *args],
                              env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    data, ckpt = tmp / "data", tmp / "m.safetensors"
    write_split(data)
    save_model(ckpt, seed=1)
    return tmp, data, ckpt


def argv(setup, name, *extra):
    tmp, data, ckpt = setup
    return ["evaluate", "--data", str(data), "--split", "test", "--checkpoint", str(ckpt), "--backend", "torch",
            "--device", "cpu", "--chunk-images", str(CHUNK), "--rerank", "--k-t2i", "8", "--quiet",
            "--work", str(tmp / f"work_{name}"), "--out", str(tmp / f"{name}.json"),
            "--save-sims", str(tmp / f"{name}_S.npy"), *extra]


@pytest.fixture(scope="module")
def single(setup):
    tmp = setup[0]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv(setup, "single")) == 0
    finally:
        torch.set_num_threads(n)
    return json.loads((tmp / "single.json").read_text()), (tmp / "single_S.npy").read_bytes()


def comparable(rec):
    return dict(rec, scoring={k: v for k, v in rec["scoring"].items() if k not in EXCLUDED})


def test_two_gloo_ranks_give_the_single_process_json_and_S(setup, single):
    tmp, data, ckpt = setup
    proc = torchrun(argv(setup, "sharded"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec, S = json.loads((tmp / "sharded.json").read_text()), (tmp / "sharded_S.npy").read_bytes()
    want, want_S = single
    assert rec["scoring"]["ranks"] == WORLD and want["scoring"]["ranks"] == 1
    assert rec["scoring"]["chunks"] == 6 and rec["scoring"]["computed"] == 6 and rec["scoring"]["reused"] == 0
    assert rec["reranked"] is not None and rec["rerank"]["neighbors"] == "embedding"
    assert comparable(rec) == comparable(want)
    assert S == want_S  # --save-sims byte for byte
    # and S is right (not merely equal to a wrong single-process S)
    np.testing.assert_allclose(np.load(tmp / "sharded_S.npy"), direct_scores(ckpt, data)[0], atol=1e-5)
    # rank 0 alone printed the table and wrote: one "wrote" line, no stray outputs
    assert proc.stdout.count(f"wrote {tmp / 'sharded.json'}") == 1
    assert sorted(p.name for p in tmp.glob("sharded*")) == ["sharded.json", "sharded_S.npy"]
    # both ranks' chunks in the one key folder, named as the single process names them
    (key,) = [p.name for p in (tmp / "work_sharded").iterdir()]
    assert key == Path(want["scoring"]["work"]).name
    assert sorted(p.name for p in (tmp / "work_sharded" / key / "chunks").iterdir()) == \
        sorted(f"rows_{a}_{min(a + CHUNK, N_IMG)}.npy" for a in range(0, N_IMG, CHUNK))


def test_killed_rank_resumes_to_the_same_results(setup, single, tmp_path):
    tmp = setup[0]
    script = tmp_path / "kill_rank1.py"
    script.write_text(KILL_RANK1)
    args = argv(setup, "killed")
    proc = torchrun(args, script)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9 ", proc.stderr), proc.stderr[-3000:]  # SIGKILL
    assert not (tmp / "killed.json").exists() and not (tmp / "killed_S.npy").exists()
    chunks = next((tmp / "work_killed").glob("*/chunks"))
    saved = {p.name for p in chunks.iterdir()}
    assert f"rows_{CHUNK}_{2 * CHUNK}.npy" in saved  # rank 1's finished chunk was kept
    assert f"rows_{3 * CHUNK}_{4 * CHUNK}.npy" not in saved  # and it died before its second
    proc = torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp / "killed.json").read_text())
    assert rec["scoring"]["reused"] == len(saved) and rec["scoring"]["computed"] == 6 - len(saved)
    want, want_S = single
    assert {k: v for k, v in rec.items() if k != "scoring"} == {k: v for k, v in want.items() if k != "scoring"}
    assert (tmp / "killed_S.npy").read_bytes() == want_S


def test_train_eval_test_under_torchrun_shares_the_scoring_and_rank_0_writes(tmp_path):
    """``train --eval-test`` under torchrun: after DDP training the ranks score the split
    together (``scoring.ranks`` = 2, rank 0 holds S), rank 0 alone prints and writes, and
    the metrics are those of a single-process ``evaluate`` of the same checkpoint. (Each
    rank used to score the whole split by itself on the same device, and print it.)"""
    from test_train_trainer import make_tiny_data

    data, bert = make_tiny_data(tmp_path / "data", train_images=8, dev_images=4)
    run = tmp_path / "run"
    proc = torchrun(["train", "--data", str(data), "--encoder", bert, "--out", str(run), "--epochs", "1",
                     "--batch-size", "4", "--embed-dim", "16", "--heads", "2", "--backend", "torch", "--device", "cpu",
                     "--quiet", "--eval-test", "dev"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "dev_metrics.json").read_text())
    assert metrics["scoring"]["ranks"] == WORLD
    assert proc.stdout.count("dev (4 images x 20 captions)") == 1 and proc.stdout.count("run folder:") == 1
    out = tmp_path / "r.json"
    assert main(["evaluate", "--data", str(data), "--split", "dev", "--checkpoint", str(run / "best.safetensors"),
                 "--backend", "torch", "--device", "cpu", "--work", str(tmp_path / "w"), "--out", str(out),
                 "--quiet"]) == 0
    assert {k: metrics[k] for k in ("i2t", "t2i", "rsum")} == json.loads(out.read_text())["plain"]
