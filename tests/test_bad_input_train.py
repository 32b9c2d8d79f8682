"""Bad input and surprises around ``acf-fast train`` and ``data synth`` (issue 14):
refused before anything is written, with an error naming the option or file; a run
folder never mixes two runs; a resumed run trains on the data it started with, with
the settings it started with, or refuses.

Items covered: 2, 4, 5, 10, 11, 16, 17, 20 (config.json), 21. Item 3 (kills) is in
test_kill_resume.py. Single torch thread: a 2-thread tiny step stalls ~30x on a busy
2-core machine (every op waits on a barrier).
"""
import json
import os
import shutil

import pytest
import torch

from acf_fast.cli import main

from test_bad_input_evaluate import refused
from test_train_trainer import make_tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiny") / "data", train_images=6, dev_images=2)


def base(tiny, out, *extra, data=None):
    d, bert = tiny
    return ["train", "--data", str(data or d), "--encoder", bert, "--out", str(out), "--epochs", "2", "--batch-size",
            "8", "--embed-dim", "8", "--heads", "2", "--quiet", "--backend", "torch", "--device", "cpu",
            "--no-positives", "--no-negatives", *map(str, extra)]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def reverse_rows(path):
    """New content, same size and mtime (as cp -p or touch -r leave it)."""
    import numpy as np

    st = os.stat(path)
    np.save(path, np.load(path)[::-1].copy())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def weights(run, name="last"):
    from safetensors.torch import load_file

    return load_file(str(run / f"{name}.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def done_run(tiny, tmp_path_factory):
    """A finished 2-epoch run (the reference for resumes)."""
    run = tmp_path_factory.mktemp("done") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (conftest.one_thread)
    assert main(base(tiny, run)) == 0
    torch.set_num_threads(n)
    return run


# ------------------------------------------------------------------ item 2
@pytest.mark.parametrize("extra", [["--batch-size", "100000"], []])
def test_existing_run_folder_is_never_clobbered(tiny, done_run, tmp_path, capsys, extra):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    before = snapshot(run)
    refused(base(tiny, run, *extra), capsys, "--out", "run")
    assert snapshot(run) == before
    assert main(base(tiny, run, "--resume")) == 0  # the old run still resumes (nothing to do: 2 of 2 epochs)


def test_invalid_new_run_writes_nothing(tiny, tmp_path, capsys):
    run = tmp_path / "new"
    refused(base(tiny, run, "--batch-size", "100000"), capsys, "batch_size", "100000")
    assert not run.exists()


def test_overwrite_starts_a_clean_run(tiny, done_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    (run / "notes.txt").write_text("mine")
    assert main(base(tiny, run, "--overwrite", "--epochs", "1", "--seed", "7")) == 0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [0]  # the old run's lines are gone
    assert json.loads((run / "config.json").read_text())["seed"] == 7
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert not same_weights(weights(run), weights(done_run))


def test_data_synth_refuses_an_existing_data_folder(tmp_path, capsys):
    out = tmp_path / "d"
    small = ["--images", "6", "--quiet", "--knob", "regions=8", "--knob", "region_dim=8", "--knob", "global_dim=8",
             "--knob", "objects_per_image=(1,2)", "--knob", "regions_per_object=(1,2)", "--knob", "min_valid_regions=2"]
    assert main(["data", "synth", "--out", str(out), "--seed", "1", *small]) == 0
    before = snapshot(out)
    refused(["data", "synth", "--out", str(out), "--seed", "2", *small], capsys, "--out", "--overwrite")
    assert snapshot(out) == before
    assert main(["data", "synth", "--out", str(out), "--seed", "2", "--overwrite", *small]) == 0
    assert snapshot(out) != before


# ------------------------------------------------------------------ items 5, 10, 16, 17: options checked first
@pytest.mark.parametrize("extra, name", [
    (["--epochs", "0"], "epochs"), (["--heads", "0"], "heads"), (["--embed-dim", "0"], "embed_dim"),
    (["--heads", "-2"], "heads"), (["--batch-size", "0"], "batch_size"), (["--step-epochs", "0"], "step_epochs"),
    (["--dev-images", "0"], "dev_images"), (["--train-images", "0"], "train_images"),
    (["--lr", "inf"], "lr"), (["--lr", "nan"], "lr"), (["--cosine-floor", "nan"], "cosine_floor"),
    (["--tau", "inf"], "tau"), (["--lam", "nan"], "lam"), (["--u1", "nan"], "u1"), (["--u2", "inf"], "u2"),
    (["--eval-test", "nosuchsplit"], "nosuchsplit"),
])
def test_bad_options_are_refused_before_anything(tiny, tmp_path, capsys, extra, name):
    run = tmp_path / "run"
    refused(base(tiny, run, *extra), capsys, name)
    assert not run.exists()


def test_non_finite_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    """Item 17: a NaN loss in epoch 2 (injected) stops training with an error that says
    so; epoch 1's checkpoint and state stay, and resume continues from there."""
    from acf_fast.train import objective

    run = tmp_path / "run"
    real = objective.Objective.forward
    calls = []

    def poisoned(self, batch, gen):
        calls.append(1)
        loss, blocks = real(self, batch, gen)
        return (loss * float("nan") if len(calls) == 5 else loss), blocks  # epoch 2, step 2 (3 steps an epoch)

    monkeypatch.setattr(objective.Objective, "forward", poisoned)
    err = refused(base(tiny, run), capsys, "not finite", "epoch 2")
    assert "input" not in err.lower()
    state = torch.load(run / "last_state.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in weights(run).values())
    monkeypatch.setattr(objective.Objective, "forward", real)
    assert main(base(tiny, run, "--resume")) == 0


# ------------------------------------------------------------------ item 4: resume from anywhere, on the same data
def test_resume_from_another_folder_uses_the_stored_data(tiny, done_run, tmp_path, capsys):
    d, bert = tiny
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copytree(d, a / "data")
    shutil.copytree(d, b / "data")  # b holds a different data set at the same relative path
    reverse_rows(b / "data" / "train_ims.npy")
    cwd = os.getcwd()
    try:
        os.chdir(a)
        argv = base(tiny, "run", "--epochs", "1", data="data")
        assert main(argv) == 0
        os.chdir(b)
        assert main(["train", "--out", str(a / "run"), "--resume", "--epochs", "2", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    assert same_weights(weights(a / "run"), weights(done_run))  # as if never interrupted, on a's data


def test_resume_refuses_changed_data(tiny, tmp_path, capsys):
    d, _ = tiny
    data = tmp_path / "data"
    shutil.copytree(d, data)
    run = tmp_path / "run"
    assert main(base(tiny, run, "--epochs", "1", data=data)) == 0
    reverse_rows(data / "train_ims.npy")
    before = snapshot(run)
    refused(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"], capsys, "train_ims.npy", "changed")
    assert snapshot(run) == before


# ------------------------------------------------------------------ item 11: files of different runs
def test_resume_refuses_files_from_another_configuration(tiny, done_run, tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    assert main(base(tiny, other, "--embed-dim", "4", "--epochs", "1")) == 0
    shutil.copytree(done_run, run)
    for name in ("last.safetensors", "last_state.pt"):
        shutil.copy(other / name, run / name)
    refused(["train", "--out", str(run), "--resume", "--epochs", "3", "--quiet"], capsys, "last_state.pt",
            "config.json")


# ------------------------------------------------------------------ item 20: config.json errors name the file
@pytest.mark.parametrize("text", ["{not json", '{"data": "x", "out": "y", "nosuchkey": 1}', "[1, 2]"])
def test_broken_config_json_is_named(tiny, done_run, tmp_path, capsys, text):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    (run / "config.json").write_text(text)
    refused(["train", "--out", str(run), "--resume", "--quiet"], capsys, "config.json")


# ------------------------------------------------------------------ item 21: explicit options on resume
@pytest.mark.parametrize("extra, flag", [(["--lr", "1e-3"], "--lr"), (["--seed", "5"], "--seed"),
                                         (["--no-cmf"], "--no-cmf"), (["--data", "OTHER"], "--data"),
                                         (["--lr", "5e-4", "--batch-size", "4"], "--batch-size")])
def test_resume_refuses_explicit_settings_that_differ(tiny, done_run, tmp_path, capsys, extra, flag):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    extra = [str(tmp_path) if x == "OTHER" else x for x in extra]
    before = snapshot(run)
    refused(["train", "--out", str(run), "--resume", "--quiet", *extra], capsys, flag, "stored")
    assert snapshot(run) == before


def test_resume_accepts_explicit_settings_that_agree(tiny, done_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    d, bert = tiny
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--lr", "5e-4", "--data", str(d), "--encoder",
                 bert, "--epochs", "3", "--device", "cpu"]) == 0
    assert json.loads((run / "config.json").read_text())["epochs"] == 2  # the stored config is not rewritten
