"""Bad input to ``acf-fast evaluate``, the metrics API and the data checks (issue 14):
every case is refused with a clear error naming the file or argument, before any work
and before anything is written, or computed right; nothing is ever overwritten.

Items of issue 14 covered here: 1, 6, 7, 12, 13, 15, 18, 20 (messages).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from acf_fast.cli import main
from acf_fast.evaluate import kfold_metrics, recall_metrics

from test_evaluate_cli import direct_scores, planted, save_model, write_split

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def digest(path):
    return path.read_bytes() if path.is_file() else None


@pytest.fixture
def split_and_ckpt(tmp_path):
    data, ckpt = tmp_path / "data", tmp_path / "run" / "best.safetensors"
    write_split(data)
    save_model(ckpt, seed=1)
    return data, ckpt


def eval_data(data, ckpt, *extra):
    return ["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--backend", "eager", "--device", "cpu",
            "--quiet", "--chunk-images", "5", *map(str, extra)]


def refused(argv, capsys, *needles):
    """Exit code 2 and one error line holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("acf-fast "), err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


# ------------------------------------------------------------------ item 1: outputs never overwrite inputs
def test_out_equal_to_sims_is_refused_and_the_input_kept(tmp_path, capsys):
    sims = tmp_path / "v.npy"
    np.save(sims, planted())
    before = digest(sims)
    refused(["evaluate", "--sims", str(sims), "--out", str(sims)], capsys, "--out", "v.npy", "input")
    assert digest(sims) == before
    # the same file by another spelling (relative path with ..), and by a symlink
    os.symlink(sims, tmp_path / "link.npy")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        refused(["evaluate", "--sims", "v.npy", "--out", "../" + tmp_path.name + "/v.npy"], capsys, "--out")
        refused(["evaluate", "--sims", "v.npy", "--out", "link.npy"], capsys, "--out")
    finally:
        os.chdir(cwd)
    assert digest(sims) == before


def test_out_equal_to_txt2img_is_refused(tmp_path, capsys):
    np.save(tmp_path / "S.npy", planted(6))
    np.save(tmp_path / "t.npy", np.arange(30) // 5)
    before = digest(tmp_path / "t.npy")
    refused(["evaluate", "--sims", str(tmp_path / "S.npy"), "--txt2img", str(tmp_path / "t.npy"),
             "--out", str(tmp_path / "t.npy")], capsys, "--out", "--txt2img")
    assert digest(tmp_path / "t.npy") == before


@pytest.mark.parametrize("which", ["out_is_checkpoint", "save_sims_is_checkpoint", "out_is_save_sims",
                                   "save_sims_is_data_file"])
def test_data_outputs_never_overwrite_inputs(split_and_ckpt, tmp_path, capsys, which):
    data, ckpt = split_and_ckpt
    work = tmp_path / "work"
    target = {"out_is_checkpoint": ("--out", ckpt), "save_sims_is_checkpoint": ("--save-sims", ckpt),
              "out_is_save_sims": None, "save_sims_is_data_file": ("--save-sims", data / "test_glob.npy")}[which]
    if target is None:
        argv = eval_data(data, ckpt, "--work", work, "--out", tmp_path / "x", "--save-sims", tmp_path / "x")
        needles = ("--out", "--save-sims")
    else:
        argv = eval_data(data, ckpt, "--work", work, target[0], target[1])
        needles = (target[0],)
    files = {p: digest(p) for p in [ckpt, *data.iterdir()]}
    refused(argv, capsys, *needles)
    assert {p: digest(p) for p in files} == files
    assert not work.exists() and not (tmp_path / "x").exists()  # refused before any work


# ------------------------------------------------------------------ item 13: output paths checked first
@pytest.mark.parametrize("flag", ["--out", "--save-sims"])
def test_output_that_is_a_folder_is_refused_before_scoring(split_and_ckpt, tmp_path, capsys, flag):
    data, ckpt = split_and_ckpt
    (tmp_path / "adir").mkdir()
    work = tmp_path / "work"
    refused(eval_data(data, ckpt, "--work", work, flag, tmp_path / "adir"), capsys, flag, "adir", "folder")
    assert not work.exists()  # nothing was scored


def test_sims_out_folder_refused(tmp_path, capsys):
    np.save(tmp_path / "S.npy", planted(6))
    (tmp_path / "adir").mkdir()
    refused(["evaluate", "--sims", str(tmp_path / "S.npy"), "--out", str(tmp_path / "adir")], capsys, "--out", "folder")


# ------------------------------------------------------------------ item 12: broken .npy files
def write_header_only(path, shape, dtype="<f4"):
    """A .npy whose header claims ``shape`` but holds no data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})


@pytest.mark.parametrize("flag", ["--sims", "--txt2img"])
@pytest.mark.parametrize("case", ["empty", "huge_header", "longdouble", "text"])
def test_broken_npy_is_a_clear_error(tmp_path, capsys, flag, case):
    bad = tmp_path / "bad.npy"
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "huge_header":
        write_header_only(bad, (10**6, 10**6) if flag == "--sims" else (10**12,), "<f4" if flag == "--sims" else "<i8")
    elif case == "longdouble":
        np.save(bad, np.zeros((6, 30), dtype=np.longdouble) if flag == "--sims" else np.zeros(30, np.longdouble))
    else:
        bad.write_text("0.1 0.2\n0.3 0.4\n")
    good = tmp_path / "S.npy"
    np.save(good, planted(6))
    argv = ["evaluate", "--sims", str(bad)] if flag == "--sims" else \
        ["evaluate", "--sims", str(good), "--txt2img", str(bad)]
    err = refused(argv, capsys, flag, "bad.npy")
    if case == "text":
        assert "pickle" not in err  # item 20: a text file is not "pickled"
    if flag == "--txt2img":
        assert "--sims" not in err.split(":")[1]  # item 20: named as itself


def test_txt2img_errors_name_txt2img(tmp_path, capsys):
    """Item 20: a txt2img that does not fit S is named as --txt2img, not --sims."""
    np.save(tmp_path / "S.npy", planted(6))
    np.save(tmp_path / "t.npy", np.full(30, 9, dtype=np.int64))  # image 9 of 6
    err = refused(["evaluate", "--sims", str(tmp_path / "S.npy"), "--txt2img", str(tmp_path / "t.npy")], capsys,
                  "--txt2img", "t.npy")
    assert not err.split("error: ")[1].startswith("--sims")


@pytest.mark.parametrize("flag", ["--sims", "--txt2img", "--checkpoint"])
def test_folder_is_not_reported_missing(tmp_path, capsys, flag):
    """Item 20: an existing folder where a file is expected says so."""
    (tmp_path / "adir").mkdir()
    np.save(tmp_path / "S.npy", planted(6))
    if flag == "--checkpoint":
        write_split(tmp_path / "data")
        argv = eval_data(tmp_path / "data", tmp_path / "adir")
    elif flag == "--sims":
        argv = ["evaluate", "--sims", str(tmp_path / "adir")]
    else:
        argv = ["evaluate", "--sims", str(tmp_path / "S.npy"), "--txt2img", str(tmp_path / "adir")]
    err = refused(argv, capsys, flag, "folder")
    assert "does not exist" not in err


def test_checkpoint_that_does_not_fit_the_data_names_both(split_and_ckpt, tmp_path, capsys):
    """Item 20: a dimension mismatch names the checkpoint and the data file."""
    from acf_fast.model import ACF

    data, _ = split_and_ckpt
    other = tmp_path / "other.safetensors"
    ACF("paper", embed_dim=16, heads=2, region_dim=24, global_dim=24, text_dim=8).save(other)
    refused(eval_data(data, other, "--work", tmp_path / "w"), capsys, "other.safetensors", "test_ims.npy", "24", "16")


# ------------------------------------------------------------------ item 18: byte order
def test_big_endian_arrays_give_the_same_results(split_and_ckpt, tmp_path, capsys):
    S = planted(8)
    np.save(tmp_path / "native.npy", S)
    np.save(tmp_path / "big.npy", S.astype(">f4"))
    outs = []
    for name in ("native", "big"):
        assert main(["evaluate", "--sims", str(tmp_path / f"{name}.npy"), "--out", str(tmp_path / f"{name}.json")]) == 0
        outs.append(json.loads((tmp_path / f"{name}.json").read_text())["plain"])
    assert outs[0] == outs[1] == recall_metrics(S)
    assert recall_metrics(S.astype(">f8")) == recall_metrics(S)  # the API too
    data, ckpt = split_and_ckpt
    want, _ = direct_scores(ckpt, data)
    for name in ("test_ims.npy", "test_glob.npy"):
        arr = np.load(data / name)
        np.save(data / name, arr.astype(">f4"))
    assert main(["data", "check", str(data), "--quiet"]) == 0
    assert main(eval_data(data, ckpt, "--work", tmp_path / "w", "--save-sims", tmp_path / "S.npy")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "S.npy"), want, atol=1e-5)


# ------------------------------------------------------------------ item 15: folds
@pytest.mark.parametrize("folds", [0, -1, 2.0, True, 7])
def test_kfold_refuses_bad_fold_counts(folds):
    S = torch.from_numpy(planted(6))
    with pytest.raises(ValueError, match="folds"):
        kfold_metrics(S, folds)


# ------------------------------------------------------------------ items 6, 7: the chunk cache
def test_two_checkpoints_sharing_one_work_folder_do_not_mix(split_and_ckpt, tmp_path):
    """Item 6: two evaluations of different checkpoints in one --work folder, the second
    starting while the first is between chunks (run inside the first's chunk hook, as a
    second process would), then each again: every S is its own checkpoint's."""
    from acf_fast import scoring

    data, best = split_and_ckpt
    last = best.parent / "last.safetensors"
    save_model(last, seed=2)
    want = {c: direct_scores(c, data)[0] for c in (best, last)}
    kw = dict(work=tmp_path / "shared", backend="eager", device="cpu", chunk_images=5, progress=False)
    inner = []

    def start_other(a, b):
        if not inner:
            inner.append(scoring.score_split(last, data, "test", **kw))

    outer = scoring.score_split(best, data, "test", **kw, on_chunk=start_other)
    np.testing.assert_allclose(outer.S.numpy(), want[best], atol=1e-5)
    np.testing.assert_allclose(inner[0].S.numpy(), want[last], atol=1e-5)
    for ckpt in (last, best, last):
        got = scoring.score_split(ckpt, data, "test", **kw)
        np.testing.assert_allclose(got.S.numpy(), want[ckpt], atol=1e-5)
    # best and last of one run by default score into different folders
    for ckpt in (best, last, best):
        got = scoring.score_split(ckpt, data, "test", backend="eager", device="cpu", chunk_images=5, progress=False)
        np.testing.assert_allclose(got.S.numpy(), want[ckpt], atol=1e-5)
    assert scoring.default_work(best, "test") != scoring.default_work(last, "test")


def test_changed_content_with_the_same_size_and_mtime_starts_afresh(split_and_ckpt, tmp_path):
    """Item 7: content changed in place, size and mtime restored (as cp -p / touch -r do)."""
    from acf_fast import scoring

    data, ckpt = split_and_ckpt
    work = tmp_path / "work"
    kw = dict(work=work, backend="eager", device="cpu", chunk_images=5, progress=False)
    scoring.score_split(ckpt, data, "test", **kw)
    ims = data / "test_ims.npy"
    st = os.stat(ims)
    arr = np.load(ims)
    np.save(ims, arr[::-1].copy())  # same size, other content
    os.utime(ims, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(ims).st_size == st.st_size and os.stat(ims).st_mtime_ns == st.st_mtime_ns
    got = scoring.score_split(ckpt, data, "test", **kw)
    assert got.info["reused"] == 0
    np.testing.assert_allclose(got.S.numpy(), direct_scores(ckpt, data)[0], atol=1e-5)
    # a copy over the file with cp -p semantics (new content, old times) likewise
    shutil.copy2(tmp_path / "data" / "test_ims.npy", tmp_path / "keep.npy")
    np.save(tmp_path / "other.npy", arr)
    os.utime(tmp_path / "other.npy", ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.copy2(tmp_path / "other.npy", ims)
    got = scoring.score_split(ckpt, data, "test", **kw)
    assert got.info["reused"] == 0
    np.testing.assert_allclose(got.S.numpy(), direct_scores(ckpt, data)[0], atol=1e-5)
    # unchanged content is reused
    again = scoring.score_split(ckpt, data, "test", **kw)
    assert again.info["computed"] == 0 and torch.equal(again.S, got.S)


def test_chunks_of_the_old_single_folder_layout_are_removed(tmp_path):
    """Item 6: a work folder from before the keyed layout (work/chunks + manifest.json,
    format 1) is cleared, so its chunks cannot be taken for anyone's."""
    from acf_fast.atomic import atomic_write_json
    from acf_fast.chunk_cache import ChunkCache

    (tmp_path / "chunks").mkdir()
    np.save(tmp_path / "chunks" / "rows_0_5.npy", np.zeros((5, 25), np.float32))
    atomic_write_json(tmp_path / "manifest.json", {"fingerprint_hash": "x", "fingerprint": {"format": 1}})
    S = planted(5)
    got, info = ChunkCache(tmp_path, {"checkpoint": "a"}, S.shape, 5).fill(lambda a, b: S[a:b], progress=False)
    assert np.array_equal(got, S) and info["computed"] == 1
    assert not (tmp_path / "chunks").exists() and not (tmp_path / "manifest.json").exists()


# ------------------------------------------------------------------ issue 15: one-process modes
@pytest.mark.parametrize("flag", [["--stream"], ["--shortlist", "4"]])
def test_one_process_modes_under_torchrun_are_refused_before_any_work(split_and_ckpt, tmp_path, capsys, monkeypatch,
                                                                       flag):
    """--stream and --shortlist run in one process; under torchrun each rank would redo the whole job."""
    data, ckpt = split_and_ckpt
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "r.json"
    refused(eval_data(data, ckpt, *flag, "--out", out), capsys, flag[0], "torchrun")
    assert not out.exists()
