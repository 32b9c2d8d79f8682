"""Atomic writes keep what a plain overwrite keeps (issue 14, item 19): the file's
mode (new files: the umask's, not mkstemp's 0600) and a symlink stays a symlink."""
import os
import stat

import numpy as np
import pytest
import torch

from acf_fast.atomic import atomic_path, atomic_save_npy, atomic_write_json, atomic_write_lines, atomic_write_text
from acf_fast.cli import main

from test_evaluate_cli import planted

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


WRITERS = {
    "text": lambda p: atomic_write_text(p, "x"),
    "json": lambda p: atomic_write_json(p, {"a": 1}),
    "lines": lambda p: atomic_write_lines(p, ["a", "b"]),
    "npy": lambda p: atomic_save_npy(p, np.zeros(3, np.float32)),
    "model": lambda p: __import__("acf_fast.model", fromlist=["ACF"]).ACF("acf-code", embed_dim=8, heads=2,
                                                                           region_dim=4, global_dim=4,
                                                                           text_dim=4).save(p),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_new_file_gets_the_umask_mode(tmp_path, umask_022, writer):
    p = tmp_path / "out.bin"
    WRITERS[writer](p)
    assert mode(p) == umask_022
    assert [x.name for x in tmp_path.iterdir()] == ["out.bin"]  # no temp left


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("old_mode", [0o640, 0o604, 0o660])
def test_existing_file_keeps_its_mode(tmp_path, umask_022, writer, old_mode):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    os.chmod(p, old_mode)
    WRITERS[writer](p)
    assert mode(p) == old_mode and p.read_bytes() != b"old"


def test_symlink_stays_a_symlink(tmp_path):
    real = tmp_path / "store" / "r.json"
    real.parent.mkdir()
    real.write_text("{}")
    os.chmod(real, 0o640)
    link = tmp_path / "r.json"
    os.symlink(real, link)
    atomic_write_json(link, {"new": True})
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == '{\n  "new": true\n}' and mode(real) == 0o640
    assert sorted(x.name for x in real.parent.iterdir()) == ["r.json"]


def test_failed_write_leaves_target_and_mode(tmp_path):
    p = tmp_path / "keep.txt"
    p.write_text("old")
    os.chmod(p, 0o640)
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old" and mode(p) == 0o640 and [x.name for x in tmp_path.iterdir()] == ["keep.txt"]


def test_evaluate_out_keeps_mode_and_symlink(tmp_path, umask_022):
    np.save(tmp_path / "S.npy", planted(6))
    out = tmp_path / "results" / "r.json"
    out.parent.mkdir()
    out.write_text("{}")
    os.chmod(out, 0o664)
    link = tmp_path / "r.json"
    os.symlink(out, link)
    assert main(["evaluate", "--sims", str(tmp_path / "S.npy"), "--out", str(link)]) == 0
    assert link.is_symlink() and mode(out) == 0o664 and "plain" in out.read_text()


def test_training_files_get_the_umask_mode(tmp_path, umask_022):
    from test_train_trainer import make_tiny_data
    from acf_fast.train.config import TrainConfig
    from acf_fast.train.trainer import train

    data, bert = make_tiny_data(tmp_path / "data", train_images=4, dev_images=2)
    run = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), encoder=bert, epochs=1, batch_size=8,
                            embed_dim=8, heads=2, progress=False, backend="torch", positives=None, negatives=None))
    files = sorted(p for p in run.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"config.json", "log.jsonl", "best.safetensors", "last.safetensors",
                                        "last_state.pt"}
    assert {p.name: mode(p) for p in files} == {p.name: 0o644 for p in files}
    torch.load(run / "last_state.pt", weights_only=True)
