"""Two-stage evaluation (``acf_fast.shortlist``, ``acf-fast evaluate --shortlist K``).

References: a per-line numpy loop for the shortlist (sort each row and column by
(value desc, index asc)), the full grid of the same checkpoint (``score_split`` and a
direct eager call) for the scores, and ``evaluate_protocol`` for the metrics.
"""
import json
import re

import numpy as np
import pytest
import torch

from acf_fast.cli import main
from acf_fast.evaluate import evaluate_protocol
from acf_fast.scoring import score_split
from acf_fast.shortlist import SHIFT_MARGIN, combine_scores, shortlist_pairs, shortlist_split
from test_evaluate_cli import N_IMG, direct_scores, save_model, write_split


def reference_pairs(C: np.ndarray, k: int) -> set:
    """Per-line loop: each row's first k columns and each column's first k rows by (value desc, index asc)."""
    N, M = C.shape
    out = set()
    for i in range(N):
        order = sorted(range(M), key=lambda j: (-C[i, j], j))
        out |= {(i, j) for j in order[:k]}
    for j in range(M):
        order = sorted(range(N), key=lambda i: (-C[i, j], i))
        out |= {(i, j) for i in order[:k]}
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 7, 50])
def test_shortlist_pairs_are_each_lines_top_k_union_ties_to_smaller_index(k):
    rng = np.random.default_rng(k)
    C = np.round(rng.standard_normal((9, 13)), 1).astype(np.float32)  # many ties
    pairs = shortlist_pairs(torch.from_numpy(C), k)
    got = [tuple(p) for p in pairs.tolist()]
    assert got == sorted(set(got)), "pairs sorted by (image, text), each once"
    assert set(got) == reference_pairs(C, k)
    if k >= 13:
        assert len(got) == 9 * 13


def test_shortlist_pairs_refuses_bad_k():
    for k in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="positive int"):
            shortlist_pairs(torch.zeros(3, 4), k)


def test_combined_scores_rank_every_rescored_pair_first():
    """In every row and column: re-scored entries hold their scores and beat every other
    entry; the others keep the cheap order (a constant shift: no inversions)."""
    rng = np.random.default_rng(0)
    C = torch.from_numpy(rng.uniform(-1, 1, (8, 11)).astype(np.float32))
    pairs = shortlist_pairs(C, 2)
    scores = torch.from_numpy(rng.uniform(-1, 1, pairs.shape[0]).astype(np.float32))
    S = combine_scores(C, pairs, scores)
    on = torch.zeros_like(S, dtype=torch.bool)
    on[pairs[:, 0], pairs[:, 1]] = True
    assert torch.equal(S[pairs[:, 0], pairs[:, 1]], scores)
    assert S[on].min() >= S[~on].max() + SHIFT_MARGIN * 0.999
    for i in range(8):
        row_on, row_off = S[i][on[i]], S[i][~on[i]]
        assert row_on.min() > row_off.max()
    c_off, s_off = C[~on], S[~on]
    inverted = (c_off[:, None] > c_off[None, :]) & (s_off[:, None] < s_off[None, :])
    assert not bool(inverted.any())
    assert torch.equal(combine_scores(C, pairs[:0], scores[:0]), C)


@pytest.fixture(params=["paper", "acf-code"])
def split_and_checkpoint(tmp_path, request):
    from acf_fast.model import ACF
    from test_evaluate_cli import DB, DV

    data = tmp_path / "data"
    write_split(data, seed=5)
    ckpt = tmp_path / "best.safetensors"
    if request.param == "paper":
        save_model(ckpt, seed=4)
    else:  # embeddings global score: the cheap score is part of S
        torch.manual_seed(4)
        ACF("acf-code", embed_dim=16, heads=2, region_dim=DV, global_dim=DV, text_dim=DB).save(ckpt)
    return data, ckpt


def test_shortlist_covering_everything_is_the_full_grid(split_and_checkpoint, tmp_path):
    """K >= max(N, M): every pair is re-scored, S and the metrics equal the full grid's."""
    data, ckpt = split_and_checkpoint
    M = 5 * N_IMG
    short = shortlist_split(ckpt, data, "test", k=M, backend="torch", device="cpu", progress=False)
    full = score_split(ckpt, data, "test", work=tmp_path / "work", backend="torch", device="cpu", progress=False)
    assert short.info["pairs"] == N_IMG * M and short.info["fraction"] == 1.0
    np.testing.assert_allclose(short.S.numpy(), full.S.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(short.S.numpy(), direct_scores(ckpt, data)[0], atol=1e-5, rtol=0)
    assert evaluate_protocol(short.S, "any", short.txt2img) == evaluate_protocol(full.S, "any", full.txt2img)
    torch.testing.assert_close(short.text_vectors, full.text_vectors)


@pytest.mark.parametrize("k,per_call", [(1, 256), (4, 256), (4, 2)])
def test_small_shortlist_rescored_entries_are_the_grids_and_rank_first(split_and_checkpoint, k, per_call, monkeypatch):
    """per_call 2: several acf_similarity_pairs calls, each given only the images and texts it names."""
    from acf_fast import shortlist

    monkeypatch.setattr(shortlist, "_IMAGES_PER_CALL", per_call)
    data, ckpt = split_and_checkpoint
    grid, tv = direct_scores(ckpt, data)
    short = shortlist_split(ckpt, data, "test", k=k, backend="eager", device="cpu", progress=False)
    C = direct_cheap(ckpt, data)
    pairs = reference_pairs(C, k)
    assert short.info["pairs"] == len(pairs) < grid.size
    S = short.S.numpy()
    on = np.zeros_like(S, dtype=bool)
    for i, j in pairs:
        on[i, j] = True
    np.testing.assert_allclose(S[on], grid[on], atol=1e-5, rtol=0)
    assert S[on].min() > S[~on].max()
    # off the list, the cheap score's order (shifted by one constant)
    shift = S[~on] - C[~on]
    np.testing.assert_allclose(shift, shift[0], atol=1e-5)


def direct_cheap(ckpt, folder):
    """The cheap score G · text_vectorsᵀ in one eager call."""
    from acf_fast.data import load_encoded, load_split
    from acf_fast.model import ACF

    m = ACF.load(ckpt).eval()
    d = load_split(folder, "test")
    words, wmask = load_encoded(folder, "test")
    with torch.no_grad():
        rmask = torch.from_numpy(np.array(d.region_mask))
        _, G = m.encode_images(torch.from_numpy(np.array(d.regions)), rmask, torch.from_numpy(np.array(d.globals)))
        return (G @ m.text_vectors(m.encode_texts(words, wmask), wmask).T).numpy()


def test_cli_shortlist_records_k_and_scores_what_it_says(split_and_checkpoint, tmp_path, capsys):
    data, ckpt = split_and_checkpoint
    out, sims = tmp_path / "r.json", tmp_path / "S.npy"
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--device", "cpu", "--backend", "torch",
                 "--shortlist", "3", "--rerank", "--k-t2i", "8", "--quiet", "--out", str(out),
                 "--save-sims", str(sims)]) == 0
    assert "rsum" in capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert rec["shortlist"] == 3 and rec["scoring"]["shortlist"] == 3
    assert rec["scoring"]["pairs"] == len(reference_pairs(direct_cheap(ckpt, data), 3))
    S = np.load(sims)
    short = shortlist_split(ckpt, data, "test", k=3, backend="torch", device="cpu", progress=False)
    np.testing.assert_array_equal(S, short.S.numpy())
    want = evaluate_protocol(torch.from_numpy(S), "any", short.txt2img, rerank=True, k_t2i=8,
                             text_vectors=short.text_vectors)
    assert rec["plain"] == want["plain"] and rec["reranked"] == want["reranked"]
    # without --shortlist: no shortlist entry
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--device", "cpu", "--backend", "torch",
                 "--quiet", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "full.json")]) == 0
    assert "shortlist" not in json.loads((tmp_path / "full.json").read_text())


def test_cli_shortlist_encodes_images_chunk_images_at_a_time(split_and_checkpoint, tmp_path, monkeypatch):
    """--chunk-images reached the shortlist's image encoding (it was silently dropped)."""
    from acf_fast import scoring

    data, ckpt = split_and_checkpoint
    seen = []
    real = scoring.image_tensors
    monkeypatch.setattr(scoring, "image_tensors", lambda d, sl, dev: seen.append(sl.stop - sl.start) or real(d, sl, dev))
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--device", "cpu", "--backend", "torch",
                 "--shortlist", "3", "--chunk-images", "5", "--quiet", "--out", str(tmp_path / "r.json")]) == 0
    assert seen == [5, 5, N_IMG - 10]


@pytest.mark.parametrize("bad", [0, -3, True, 2.0])
def test_every_split_scorer_refuses_a_bad_chunk_images(split_and_checkpoint, tmp_path, bad):
    from acf_fast.stream import stream_split

    data, ckpt = split_and_checkpoint
    calls = [lambda: shortlist_split(ckpt, data, "test", k=2, device="cpu", chunk_images=bad, progress=False),
             lambda: score_split(ckpt, data, "test", work=tmp_path / "w", device="cpu", chunk_images=bad,
                                 progress=False),
             lambda: stream_split(ckpt, data, "test", "any", device="cpu", chunk_images=bad, progress=False)]
    for call in calls:
        with pytest.raises(ValueError, match="chunk_images must be a positive int"):
            call()
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("extra,match", [
    (["--work", "{d}/w"], r"--work goes with the full grid"),
    (["--stream"], r"--stream and --shortlist do not go together"),
    (["--shortlist", "0"], r"expected a positive integer"),
    (["--shortlist", "two"], r"expected a positive integer"),
])
def test_cli_refuses_options_that_do_not_go_with_shortlist(split_and_checkpoint, tmp_path, capsys, extra, match):
    data, ckpt = split_and_checkpoint
    extra = [e.replace("{d}", str(tmp_path)) for e in extra]
    if "--shortlist" not in extra:
        extra += ["--shortlist", "2"]
    out = tmp_path / "r.json"
    try:
        rc = main(["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--device", "cpu", "--quiet",
                   "--out", str(out), *extra])
    except SystemExit as stop:  # argparse's own refusals
        rc = stop.code
    assert rc == 2
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "w").exists()


def test_cli_refuses_shortlist_with_sims(tmp_path, capsys):
    np.save(tmp_path / "S.npy", np.zeros((4, 20), np.float32))
    assert main(["evaluate", "--sims", str(tmp_path / "S.npy"), "--shortlist", "5"]) == 2
    assert "--shortlist goes with --data, not --sims" in capsys.readouterr().err
