"""Kills at every point of an epoch's commit, and mid-scoring (issue 14, item 3).

Each case runs training (or an evaluation) in a child process that SIGKILLs itself
at a chosen point, injected through a hook, not a timer: the trainer's ``on_write``
(called after each of best / last / the epoch's log line / the state), a wrapper of
``checkpoint.save_state`` (the point between ``last.safetensors`` and
``last_state.pt`` the issue reproduced; it exists in the old code too), the step log,
or the chunk cache's ``on_chunk``. Then the run is resumed here, and everything it
leaves must equal the uninterrupted run bit for bit: last and best weights, the
optimizer state, and the log's step losses. One torch thread everywhere, so the
arithmetic is the same in every process.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from acf_fast.cli import main

from test_train_trainer import make_tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, KILL_EPOCH = 3, 2

CHILD = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
point, epoch, argv = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

from acf_fast.train import checkpoint, trainer
if point == "before_state":  # between last.safetensors and last_state.pt (old and new code alike)
    real = checkpoint.save_state
    def save_state(run, state):
        if state["epoch"] == epoch:
            die()
        real(run, state)
    checkpoint.save_state = save_state
elif point.startswith("step:"):  # mid-epoch, after a step's log line
    n, real_log = int(point[5:]), trainer.Trainer._write_log
    def write_log(self, record):
        real_log(self, record)
        if record.get("event") == "step" and record["step"] == n:
            die()
    trainer.Trainer._write_log = write_log
elif point.startswith("after:"):  # the trainer's own hook, after the named file of the commit
    name, real_init = point[6:], trainer.Trainer.__init__
    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.on_write = lambda what, e: die() if (what, e) == (name, epoch) else None
    trainer.Trainer.__init__ = init
elif point == "chunk":  # evaluation: after the first saved chunk
    from acf_fast import chunk_cache
    real_fill = chunk_cache.ChunkCache.fill
    def fill(self, compute, **kw):
        return real_fill(self, compute, **{**kw, "on_chunk": lambda a, b: die()})
    chunk_cache.ChunkCache.fill = fill
from acf_fast.cli import main
sys.exit(main(argv))
"""



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("kill") / "data", train_images=6, dev_images=4)


def argv(tiny, out, *extra):
    d, bert = tiny
    return ["train", "--data", str(d), "--encoder", bert, "--out", str(out), "--epochs", str(EPOCHS),
            "--batch-size", "8", "--embed-dim", "8", "--heads", "2", "--quiet", "--backend", "torch", "--device", "cpu",
            "--no-positives", "--negatives", "gaussian", "--seed", "4", "--lr", "1e-2", *extra]  # best moves at epoch 2


def killed(point, epoch, args):
    """Run the CLI in a child that SIGKILLs itself at ``point``; assert it was killed there."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, point, str(epoch), json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("whole") / "run"
    assert main(argv(tiny, run)) == 0
    torch.set_num_threads(n)
    return run


def outcome(run):
    """What a finished run leaves: weights, optimizer state, step losses, epoch lines."""
    from safetensors.torch import load_file

    state = torch.load(run / "last_state.pt", weights_only=True)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return {
        "last": load_file(str(run / "last.safetensors")), "best": load_file(str(run / "best.safetensors")),
        "optimizer": state["optimizer"]["state"], "epoch": state["epoch"], "step": state["step"],
        "steps": [(r["step"], r["loss"]) for r in log if r["event"] == "step"],
        "epochs": [(r["epoch"], r["rsum"], r["best_rsum"]) for r in log if r["event"] == "epoch"],
    }


def assert_same(a, b):
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    assert a["steps"] == b["steps"] and a["epochs"] == b["epochs"]
    for key in ("last", "best"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for i, s in a["optimizer"].items():
        assert all(torch.equal(s[k], b["optimizer"][i][k]) for k in s)


@pytest.mark.parametrize("point", ["before_state", "after:best", "after:last", "after:log", "after:state", "step:4"])
def test_killed_training_resumes_to_the_uninterrupted_run(tiny, uninterrupted, tmp_path, point):
    run = tmp_path / "run"
    killed(point, KILL_EPOCH, argv(tiny, run))
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert_same(outcome(run), outcome(uninterrupted))


def test_killed_evaluation_resumes_to_the_same_scores(tmp_path):
    from test_evaluate_cli import direct_scores, save_model, write_split

    data, ckpt = tmp_path / "data", tmp_path / "m.safetensors"
    write_split(data)
    save_model(ckpt, seed=1)
    args = ["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--backend", "eager", "--device", "cpu",
            "--quiet", "--chunk-images", "5", "--work", str(tmp_path / "w"), "--save-sims", str(tmp_path / "S.npy")]
    killed("chunk", 0, args)
    assert not (tmp_path / "S.npy").exists()
    assert main(args + ["--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["scoring"]["reused"] == 1  # resumed, not redone
    np.testing.assert_allclose(np.load(tmp_path / "S.npy"), direct_scores(ckpt, data)[0], atol=1e-5)
