"""``acf-fast evaluate``: the --sims drop-in path, and resumable scoring of a data split."""
import json

import numpy as np
import pytest
import torch

from acf_fast import scoring
from acf_fast.chunk_cache import ChunkCache
from acf_fast.cli import main
from acf_fast.evaluate import evaluate_protocol, recall_metrics


def planted(N=30, seed=0):
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((N, 5 * N)).astype(np.float32)
    S[np.arange(5 * N) // 5, np.arange(5 * N)] += 2.0
    return S


# ------------------------------------------------------------------ --sims path
def test_sims_prints_table_and_writes_json(tmp_path, capsys):
    S = planted()
    np.save(tmp_path / "S.npy", S)
    out = tmp_path / "res" / "r.json"
    assert main(["evaluate", "--sims", str(tmp_path / "S.npy"), "--rerank", "--k-i2t", "6", "--k-t2i", "5",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for label in ("I2T R@1", "I2T R@5", "I2T R@10", "I2T medr", "I2T meanr", "T2I R@1", "T2I meanr", "rsum",
                  "plain", "re-ranked, neighbors: profile"):
        assert label in text
    rec = json.loads(out.read_text())
    want = recall_metrics(S)
    assert rec["plain"]["rsum"] == pytest.approx(want["rsum"])
    assert rec["plain"]["i2t"]["r1"] == pytest.approx(want["i2t"]["r1"])
    assert f"{want['rsum']:.2f}" in text
    assert rec["rerank"]["neighbors"] == "profile" and rec["rerank"]["oracle"] is False
    assert rec["reranked"] == evaluate_protocol(S, rerank=True, k_i2t=6, k_t2i=5)["reranked"]
    assert not list(out.parent.glob("*.tmp"))


def test_sims_siblings_is_labelled_oracle(tmp_path, capsys):
    np.save(tmp_path / "S.npy", planted())
    out = tmp_path / "r.json"
    assert main(["evaluate", "--sims", str(tmp_path / "S.npy"), "--rerank", "--neighbors", "siblings",
                 "--out", str(out)]) == 0
    assert "oracle (uses ground-truth captions)" in capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert rec["rerank"]["oracle"] is True and rec["rerank"]["label"] == "oracle (uses ground-truth captions)"


def test_sims_with_txt2img_file(tmp_path, capsys):
    rng = np.random.default_rng(1)
    txt2img = np.concatenate([np.arange(10), rng.integers(0, 10, 17)])
    S = rng.standard_normal((10, txt2img.size)).astype(np.float64)
    np.save(tmp_path / "S.npy", S)
    np.save(tmp_path / "t.npy", txt2img)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--sims", str(tmp_path / "S.npy"), "--txt2img", str(tmp_path / "t.npy"),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["plain"]["rsum"] == pytest.approx(recall_metrics(S, txt2img)["rsum"])


@pytest.mark.parametrize(
    "make,extra,match",
    [
        (lambda d: np.save(d / "x.npy", np.zeros((2, 3, 4), np.float32)), [], "2-D"),
        (lambda d: np.save(d / "x.npy", np.zeros((4, 20), np.int64)), [], "floating-point"),
        (lambda d: np.save(d / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True), [], "pickled"),
        (lambda d: (d / "x.npy").write_bytes(b"\x80\x04not numpy"), [], "pickled|not a readable"),
        (lambda d: np.save(d / "x.npy", np.zeros((4, 21), np.float32)), [], "5 per image"),
        (lambda d: np.save(d / "x.npy", np.zeros((4, 20), np.float32)), ["--protocol", "coco5k"], r"\(5000, 25000\)"),
        (lambda d: np.save(d / "x.npy", np.full((4, 20), np.nan, np.float32)), [], "NaN"),
        (lambda d: (np.save(d / "x.npy", np.zeros((4, 20), np.float32)), np.save(d / "t.npy", np.zeros(19, np.int64))),
         ["--txt2img", "{d}/t.npy"], "19 entries"),
        (lambda d: (np.save(d / "x.npy", np.zeros((4, 20), np.float32)), np.save(d / "t.npy", np.arange(20) % 5)),
         ["--txt2img", "{d}/t.npy"], "image ids in"),
        (lambda d: np.save(d / "x.npy", np.zeros((4, 20), np.float32)), ["--rerank", "--k-i2t", "21"], "k_i2t = 21 is larger than"),
        (lambda d: np.save(d / "x.npy", np.zeros((4, 20), np.float32)), ["--checkpoint", "c.safetensors"], "--data"),
    ],
)
def test_sims_bad_files_give_clear_errors(tmp_path, capsys, make, extra, match):
    make(tmp_path)
    extra = [e.replace("{d}", str(tmp_path)) for e in extra]
    assert main(["evaluate", "--sims", str(tmp_path / "x.npy"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("acf-fast evaluate: error:")
    import re

    assert re.search(match, err), err


def test_missing_sims_file(tmp_path, capsys):
    assert main(["evaluate", "--sims", str(tmp_path / "nope.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------ resumable chunks
class Interrupt(Exception):
    pass


def counting_scorer(S):
    calls = []

    def rows(a, b):
        calls.append((a, b))
        return torch.from_numpy(S[a:b].copy())

    return rows, calls


def test_interrupted_run_resumes_without_recomputing(tmp_path):
    S = planted(23)
    fp = {"checkpoint": "abc", "data": [["test_ims.npy", 1, 2]]}
    rows, calls = counting_scorer(S)

    def stop_after_second(a, b):
        if len(calls) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        ChunkCache(tmp_path, fp, (23, 115), 5).fill(rows, progress=False, on_chunk=stop_after_second)
    assert calls == [(0, 5), (5, 10)]
    assert sorted(p.name for p in next(tmp_path.glob("*/chunks")).iterdir()) == ["rows_0_5.npy", "rows_5_10.npy"]
    calls.clear()
    got, info = ChunkCache(tmp_path, fp, (23, 115), 5).fill(rows, progress=False)
    assert calls == [(10, 15), (15, 20), (20, 23)]  # the two saved chunks were not recomputed
    assert info["reused"] == 2 and info["computed"] == 3
    full, _ = ChunkCache(tmp_path / "fresh", fp, (23, 115), 5).fill(counting_scorer(S)[0], progress=False)
    assert np.array_equal(got, full) and np.array_equal(got, S)
    calls.clear()
    again, info = ChunkCache(tmp_path, fp, (23, 115), 5).fill(rows, progress=False)
    assert calls == [] and info["reused"] == 5 and np.array_equal(again, S)


def test_changed_fingerprint_or_chunking_invalidates(tmp_path):
    S = planted(12)
    rows, calls = counting_scorer(S)
    ChunkCache(tmp_path, {"checkpoint": "a"}, (12, 60), 4).fill(rows, progress=False)
    calls.clear()
    S2 = S + 1.0
    rows2, calls2 = counting_scorer(S2)
    got, info = ChunkCache(tmp_path, {"checkpoint": "b"}, (12, 60), 4).fill(rows2, progress=False)
    assert len(calls2) == 3 and info["reused"] == 0 and np.array_equal(got, S2)
    got, info = ChunkCache(tmp_path, {"checkpoint": "b"}, (12, 60), 5).fill(rows2, progress=False)
    assert info["reused"] == 0 and np.array_equal(got, S2)


def test_corrupt_chunk_is_recomputed(tmp_path):
    S = planted(10)
    rows, calls = counting_scorer(S)
    ChunkCache(tmp_path, {"x": 1}, (10, 50), 5).fill(rows, progress=False)
    next(tmp_path.glob("*/chunks/rows_5_10.npy")).write_bytes(b"truncated")
    calls.clear()
    got, _ = ChunkCache(tmp_path, {"x": 1}, (10, 50), 5).fill(rows, progress=False)
    assert calls == [(5, 10)] and np.array_equal(got, S)


def test_bad_rows_are_refused(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        ChunkCache(tmp_path, {}, (4, 8), 2).fill(lambda a, b: np.zeros((b - a, 7)), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        ChunkCache(tmp_path, {}, (4, 8), 2).fill(lambda a, b: np.full((b - a, 8), np.nan), progress=False)
    assert not list(tmp_path.glob("*/chunks/rows_*"))


# ------------------------------------------------------------------ --data path, real model and data modules
N_IMG, K, DV, DB, L = 12, 6, 16, 8, 7


def write_split(folder, seed=0):
    """A tiny SCAN-layout test split with a caption cache, as acf_fast.data reads it."""
    from safetensors.torch import save_file

    from acf_fast.data.encode import CACHE_VERSION, captions_hash

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "test_ims.npy", rng.standard_normal((N_IMG, K, DV)).astype(np.float32))
    mask = np.ones((N_IMG, K), bool)
    mask[::3, 4:] = False  # ragged regions
    np.save(folder / "test_ims_mask.npy", mask)
    np.save(folder / "test_glob.npy", rng.standard_normal((N_IMG, DV)).astype(np.float32))
    caps = [f"caption {t} of image {t // 5}" for t in range(5 * N_IMG)]
    (folder / "test_caps.txt").write_text("\n".join(caps) + "\n")
    words = torch.from_numpy(rng.standard_normal((5 * N_IMG, L, DB)).astype(np.float32))
    wmask = torch.ones(5 * N_IMG, L, dtype=torch.bool)
    wmask[::2, 5:] = False  # ragged captions
    meta = {"cache_version": CACHE_VERSION, "encoder": "test", "captions_sha256": captions_hash(caps),
            "count": str(len(caps)), "max_length": str(L), "dtype": "float32", "format": "pt"}
    save_file({"words": words, "mask": wmask}, str(folder / "test_words.safetensors"), metadata=meta)


def save_model(path, seed):
    from acf_fast.model import ACF

    torch.manual_seed(seed)
    ACF("paper", embed_dim=16, heads=2, region_dim=DV, global_dim=DV, text_dim=DB).save(path)


def direct_scores(ckpt, folder, split="test"):
    """S and text vectors of the whole split in one eager call (no chunks, no sorting)."""
    from acf_fast.data import load_encoded, load_split
    from acf_fast.model import ACF

    m = ACF.load(ckpt).eval()
    d = load_split(folder, split)
    words, wmask = load_encoded(folder, split)
    with torch.no_grad():
        rmask = None if d.region_mask is None else torch.from_numpy(np.array(d.region_mask))
        V, G = m.encode_images(torch.from_numpy(np.array(d.regions)), rmask, torch.from_numpy(np.array(d.globals)))
        W = m.encode_texts(words, wmask)
        return m.score(V, rmask, G, W, wmask, backend="eager").numpy(), m.text_vectors(W, wmask).numpy()


def test_data_path_interrupt_resume_and_changed_checkpoint(tmp_path, monkeypatch, capsys):
    data, work = tmp_path / "data", tmp_path / "work"
    write_split(data)
    ckpt = tmp_path / "best.safetensors"
    save_model(ckpt, seed=1)
    want, tv = direct_scores(ckpt, data)

    computed = []
    real_fill = ChunkCache.fill

    def interrupting(self, compute, **kw):
        def on_chunk(a, b):
            computed.append((a, b))
            if len(computed) == 2:
                raise Interrupt

        return real_fill(self, compute, **{**kw, "on_chunk": on_chunk})

    monkeypatch.setattr(ChunkCache, "fill", interrupting)
    argv = ["evaluate", "--data", str(data), "--split", "test", "--checkpoint", str(ckpt), "--backend", "eager",
            "--device", "cpu", "--work", str(work), "--chunk-images", "5", "--quiet", "--k-t2i", "8", "--rerank"]
    with pytest.raises(Interrupt):  # killed after the second chunk
        main(argv + ["--out", str(tmp_path / "r1.json")])
    assert not (tmp_path / "r1.json").exists()
    assert computed == [(0, 5), (5, 10)]
    computed.clear()
    assert main(argv + ["--out", str(tmp_path / "r1.json"), "--save-sims", str(tmp_path / "S.npy")]) == 0
    assert computed == [(10, 12)]  # only the missing chunk
    rec = json.loads((tmp_path / "r1.json").read_text())
    assert rec["scoring"]["reused"] == 2 and rec["rerank"]["neighbors"] == "embedding"
    S = np.load(tmp_path / "S.npy")
    np.testing.assert_allclose(S, want, atol=1e-5)
    # the same numbers as an uninterrupted run
    monkeypatch.setattr(ChunkCache, "fill", real_fill)
    assert main(argv[:-1] + ["--work", str(tmp_path / "w2"), "--rerank", "--out", str(tmp_path / "r2.json")]) == 0
    rec2 = json.loads((tmp_path / "r2.json").read_text())
    assert rec2["plain"] == rec["plain"] and rec2["reranked"] == rec["reranked"]
    want_tv = evaluate_protocol(torch.from_numpy(S), rerank=True, k_t2i=8, text_vectors=torch.from_numpy(tv))
    assert rec["reranked"] == want_tv["reranked"]
    # a changed checkpoint invalidates every saved chunk
    save_model(ckpt, seed=2)
    monkeypatch.setattr(ChunkCache, "fill", interrupting)
    computed.clear()
    with pytest.raises(Interrupt):
        main(argv)
    assert computed == [(0, 5), (5, 10)]
    monkeypatch.setattr(ChunkCache, "fill", real_fill)
    scored = scoring.score_split(ckpt, data, "test", work=work, backend="eager", device="cpu", chunk_images=5,
                                 progress=False)
    assert scored.info["reused"] == 2 and scored.info["computed"] == 1
    np.testing.assert_allclose(scored.S.numpy(), direct_scores(ckpt, data)[0], atol=1e-5)
    # changed data files invalidate too
    write_split(data, seed=3)
    scored = scoring.score_split(ckpt, data, "test", work=work, backend="eager", device="cpu", chunk_images=5,
                                 progress=False)
    assert scored.info["reused"] == 0
    np.testing.assert_allclose(scored.S.numpy(), direct_scores(ckpt, data)[0], atol=1e-5)


def test_data_path_needs_checkpoint(tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "no.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------ one pipeline for every command
def test_evaluate_data_and_train_eval_test_give_the_same_S(tmp_path, monkeypatch):
    """``evaluate --data`` and ``train --eval-test`` score one checkpoint through the one
    ``score_split``: bit-identical S, the same metrics and the same recorded precision."""
    from test_train_trainer import make_tiny_data

    data, bert = make_tiny_data(tmp_path / "data", train_images=10, dev_images=4)
    seen = []
    real = scoring.score_split

    def spy(*args, **kw):
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(scoring, "score_split", spy)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--encoder", bert, "--out", str(run), "--epochs", "1", "--batch-size",
                 "16", "--embed-dim", "16", "--heads", "2", "--backend", "torch", "--device", "cpu", "--quiet",
                 "--eval-test", "dev"]) == 0
    out, sims = tmp_path / "r.json", tmp_path / "S.npy"
    assert main(["evaluate", "--data", str(data), "--split", "dev", "--checkpoint", str(run / "best.safetensors"),
                 "--backend", "torch", "--device", "cpu", "--work", str(tmp_path / "w"), "--save-sims", str(sims),
                 "--out", str(out), "--quiet"]) == 0
    assert len(seen) == 2
    trained, evaluated = seen
    assert evaluated.info["reused"] == 0  # scored afresh, not read from the train command's chunks
    assert torch.equal(trained.S, evaluated.S) and np.array_equal(np.load(sims), evaluated.S.numpy())
    want, _ = direct_scores(run / "best.safetensors", data, "dev")
    np.testing.assert_allclose(evaluated.S.numpy(), want, atol=1e-5)  # and both are right
    metrics, rec = json.loads((run / "dev_metrics.json").read_text()), json.loads(out.read_text())
    assert {k: metrics[k] for k in ("i2t", "t2i", "rsum")} == rec["plain"]
    assert metrics["scoring"]["precision"] == rec["scoring"]["precision"] == rec["source"]["precision"] == "fp32"


def test_precision_is_checked_before_any_work(tmp_path, capsys):
    write_split(tmp_path / "data")
    ckpt = tmp_path / "best.safetensors"
    save_model(ckpt, seed=1)
    work = tmp_path / "work"
    assert main(["evaluate", "--data", str(tmp_path / "data"), "--checkpoint", str(ckpt), "--device", "cpu",
                 "--precision", "bf16", "--work", str(work)]) == 2
    assert "precision='bf16'" in capsys.readouterr().err and not work.exists()
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(run), "--device", "cpu", "--precision", "bf16",
                 "--eval-test", "test"]) == 2
    assert "precision='bf16'" in capsys.readouterr().err and not run.exists()
