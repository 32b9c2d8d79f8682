"""Streaming evaluation (acf_fast.stream): metrics and ACF-R+ heads from a block scorer,
never holding S, equal EXACTLY to the in-memory evaluator on the same S (ties included)."""
import json

import pytest
import torch

from acf_fast.evaluate import PROTOCOLS, evaluate_protocol
from acf_fast.rerank import rerank, text_neighbors
from acf_fast.stream import stream_evaluate, stream_ranks

from test_evaluate_cli import save_model, write_split


def tied_scores(N, M, seed, dtype=torch.float32):
    """S (N, M) of few distinct values (every line ties many times), with +-0.0, a fully
    tied row and column, and a column duplicating another."""
    gen = torch.Generator().manual_seed(seed)
    S = (torch.randint(-6, 7, (N, M), generator=gen).to(torch.float64) / 4).to(dtype)
    S[S == 0] = torch.where(torch.rand(int((S == 0).sum()), generator=gen) < 0.5, -0.0, 0.0).to(dtype)
    S[1] = 0.5
    S[:, 2] = -0.25
    S[:, M - 1] = S[:, 3]
    return S


def scattered_txt2img(N, M, seed):
    """(M,) image per caption, every image used at least once, in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.cat([torch.arange(N), torch.randint(0, N, (M - N,), generator=gen)])
    return g[torch.randperm(M, generator=gen)]


class TileScorer:
    """Reads blocks of a held S (for the test only), refuses any block larger than a tile
    and counts the calls: the stream path asks for tiles, never for the grid."""

    def __init__(self, S, max_rows, max_cols):
        self.S, self.max_rows, self.max_cols = S, max_rows, max_cols
        self.calls = 0

    def __call__(self, rows, cols):
        assert rows.dtype == cols.dtype == torch.long and rows.device.type == "cpu"
        if rows.numel() > self.max_rows or cols.numel() > self.max_cols:
            raise AssertionError(f"asked for a {rows.numel()} x {cols.numel()} block")
        self.calls += 1
        return self.S[rows[:, None], cols]


def check_equal(S, g, tiles, **opts):
    """stream_evaluate == evaluate_protocol, and its heads == rerank()'s, exactly."""
    N, M = S.shape
    tr, tc = tiles
    scorer = TileScorer(S, tr, tc)
    got, runs = stream_evaluate(scorer, N, M, "any", g, tile_rows=tr, tile_cols=tc, details=True, **opts)
    want = evaluate_protocol(S, "any", g, **opts)
    assert got == want
    if opts.get("rerank"):
        mode = opts.get("neighbors") or "embedding"
        nb = text_neighbors(mode, opts["kprime"], text_vectors=opts.get("text_vectors"), txt2img=torch.arange(M) // 5 if g is None else g)
        hi, ht = rerank(S, nb, opts["k_i2t"], opts["k_t2i"], opts.get("n"), backend="torch")
        assert torch.equal(runs[0].i2t_heads.cpu(), hi) and torch.equal(runs[0].t2i_heads.cpu(), ht)
    return scorer, runs[0]


@pytest.mark.parametrize("N, M, tiles, scattered", [
    (23, 115, (5, 17), False),  # tiles dividing neither N nor M
    (17, 61, (4, 9), True),  # scattered txt2img: the ground-truth pass reads every tile
    (9, 45, (9, 45), False),  # one tile
    (13, 65, (1, 7), False),  # one image per tile
])
@pytest.mark.parametrize("n", [None, 3])
def test_stream_equals_in_memory_with_ties(N, M, tiles, scattered, n):
    S = tied_scores(N, M, seed=N + M)
    g = scattered_txt2img(N, M, seed=N) if scattered else None
    tv = torch.randn(M, 6, generator=torch.Generator().manual_seed(1))
    tv[5] = tv[4]  # tied neighbours
    check_equal(S, g, tiles, rerank=True, k_i2t=7, k_t2i=min(6, N), kprime=3, n=n, text_vectors=tv)


@pytest.mark.parametrize("survivors", [0.0, 1.0])  # never / always (within the tile) the survivor path
def test_both_counting_paths(survivors, monkeypatch):
    from acf_fast import stream

    monkeypatch.setattr(stream, "SURVIVOR_MAX_FRACTION", survivors)
    S = tied_scores(21, 105, seed=7)
    S[:, 5:40] += torch.randn(21, 35, generator=torch.Generator().manual_seed(8))
    tv = torch.randn(105, 6, generator=torch.Generator().manual_seed(9))
    check_equal(S, None, (8, 30), rerank=True, k_i2t=9, k_t2i=7, kprime=4, text_vectors=tv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_stream_other_dtypes_and_siblings(dtype):
    S = tied_scores(19, 95, seed=3, dtype=dtype)
    S[:, ::3] += torch.randn(19, 32, generator=torch.Generator().manual_seed(2)).to(dtype)  # near-ties too
    check_equal(S, None, (6, 20), rerank=True, k_i2t=5, k_t2i=8, kprime=5, neighbors="siblings")


def test_plain_metrics_need_one_pass_and_no_topk():
    S = torch.randn(21, 105, generator=torch.Generator().manual_seed(4))
    scorer, run = check_equal(S, None, (4, 25), rerank=False)
    nR, nC = 6, 5
    assert run.i2t_heads is None
    assert run.info["passes"]["ranks"]["tiles"] == nR * nC
    gt = run.info["passes"]["ground_truth"]["tiles"]
    assert gt < nR * nC and scorer.calls == nR * nC + gt  # only the band of tiles holding (t // 5, t)


def test_random_scores_and_model_chunks_as_tiles():
    """Continuous scores, and explicit tiles whose ids are neither contiguous nor sorted
    (as a model's length-sorted text chunks)."""
    gen = torch.Generator().manual_seed(5)
    N, M = 22, 110
    S = torch.randn(N, M, generator=gen)
    tv = torch.randn(M, 4, generator=gen)
    perm = torch.randperm(M, generator=gen)
    col_tiles = [perm[a : a + 13] for a in range(0, M, 13)]
    row_tiles = [torch.tensor([5, 0, 9]), torch.arange(10, 22).flip(0), torch.tensor([1, 2, 3, 4, 6, 7, 8])]
    opts = dict(rerank=True, k_i2t=6, k_t2i=5, kprime=4, text_vectors=tv)
    got, runs = stream_evaluate(TileScorer(S, 12, 13), N, M, row_tiles=row_tiles, col_tiles=col_tiles, details=True,
                                **opts)
    assert got == evaluate_protocol(S, **opts)
    hi, ht = rerank(S, text_neighbors("embedding", 4, text_vectors=tv), 6, 5, backend="torch")
    assert torch.equal(runs[0].i2t_heads, hi) and torch.equal(runs[0].t2i_heads, ht)


def test_folds_like_coco1k(monkeypatch):
    monkeypatch.setitem(PROTOCOLS, "coco1k", {"shape": (25, 125), "folds": 5})
    S = tied_scores(25, 125, seed=6)
    tv = torch.randn(125, 5, generator=torch.Generator().manual_seed(6))
    opts = dict(rerank=True, k_i2t=4, k_t2i=3, kprime=3, text_vectors=tv)
    got = stream_evaluate(TileScorer(S, 3, 7), 25, 125, "coco1k", tile_rows=3, tile_cols=7, **opts)
    assert got == evaluate_protocol(S, "coco1k", **opts)
    assert len(got["fold_results"]) == 5


def test_refusals():
    S = torch.randn(6, 30)
    ok = TileScorer(S, 6, 30)
    with pytest.raises(ValueError, match="profile"):
        stream_evaluate(ok, 6, 30, rerank=True, neighbors="profile")
    with pytest.raises(ValueError, match="text_vectors"):
        stream_evaluate(ok, 6, 30, rerank=True)
    with pytest.raises(ValueError, match="exactly once"):
        stream_ranks(ok, 6, 30, row_tiles=[torch.arange(4), torch.arange(3, 6)])
    with pytest.raises(ValueError, match="exactly once"):
        stream_ranks(ok, 6, 30, col_tiles=[torch.arange(29)])
    with pytest.raises(ValueError, match=r"\(6, 30\)"):
        stream_ranks(lambda r, c: torch.zeros(len(r), len(c) + 1), 6, 30, tile_rows=6, tile_cols=30)
    with pytest.raises(ValueError, match="NaN"):
        stream_ranks(lambda r, c: torch.full((len(r), len(c)), float("nan")), 6, 30)
    calls = []

    def drifting(r, c):  # a different value every time a tile is scored again
        calls.append(1)
        return S[r][:, c] + len(calls)

    with pytest.raises(ValueError, match="deterministic"):
        stream_ranks(drifting, 6, 30, tile_rows=2, tile_cols=30)


# ------------------------------------------------------------------ resuming a killed stream (work=)
class Killed(Exception):
    pass


class DyingScorer(TileScorer):
    """A TileScorer that dies (raises Killed) at its call number ``die_at``."""

    def __init__(self, S, max_rows, max_cols, die_at):
        super().__init__(S, max_rows, max_cols)
        self.die_at = die_at

    def __call__(self, rows, cols):
        if self.calls + 1 == self.die_at:
            raise Killed
        return super().__call__(rows, cols)


@pytest.mark.parametrize("protocol, rerank", [("any", True), ("any", False), ("coco1k", True)])
def test_a_killed_stream_resumes_to_the_same_result(tmp_path, monkeypatch, protocol, rerank):
    """Killed at tiles spread over every pass (and folds), then killed again early in the
    resumed run, a rerun with the same work and fingerprint resumes (scores fewer tiles
    than a whole run) and returns exactly the uninterrupted result and heads; a finished
    run is read back with one tile per fold."""
    monkeypatch.setitem(PROTOCOLS, "coco1k", {"shape": (25, 125), "folds": 5})
    N, M, tr, tc = 25, 125, 4, 30
    S = tied_scores(N, M, seed=5)
    tv = torch.randn(M, 6, generator=torch.Generator().manual_seed(5))
    opts = dict(rerank=True, k_i2t=6, k_t2i=4, kprime=3, text_vectors=tv, n=5) if rerank else {}
    run = dict(tile_rows=tr, tile_cols=tc, details=True, **opts)
    whole = TileScorer(S, tr, tc)
    want, want_runs = stream_evaluate(whole, N, M, protocol, **run)
    total, folds = whole.calls, want["folds"]
    gt = want_runs[0].info["passes"]["ground_truth"]["tiles"]  # the first fold's pass 1 (nothing saved before its end)
    for die_at in sorted({gt + 2, total // 4, total // 2, 3 * total // 4, total - 1}):
        work = tmp_path / f"w{die_at}"
        dying = DyingScorer(S, tr, tc, die_at)
        with pytest.raises(Killed):
            stream_evaluate(dying, N, M, protocol, work=work, fingerprint={"S": "tied 5"}, save_every_s=0, **run)
        with pytest.raises(Killed):  # and killed again, at the second tile of the resumed run
            stream_evaluate(DyingScorer(S, tr, tc, 2), N, M, protocol, work=work, fingerprint={"S": "tied 5"},
                            save_every_s=0, **run)
        again = TileScorer(S, tr, tc)
        got, runs = stream_evaluate(again, N, M, protocol, work=work, fingerprint={"S": "tied 5"}, save_every_s=0,
                                    **run)
        assert got == want, die_at
        assert again.calls < total and any(r.info.get("resumed") for r in runs), (die_at, again.calls, total)
        for r, w in zip(runs, want_runs):
            for name in ("i2t", "t2i", "i2t_heads", "t2i_heads", "i2t_reranked", "t2i_reranked"):
                a, b = getattr(r, name), getattr(w, name)
                assert (a is None and b is None) or torch.equal(a, b), (die_at, name)
    done = TileScorer(S, tr, tc)
    assert stream_evaluate(done, N, M, protocol, work=work, fingerprint={"S": "tied 5"}, **run)[0] == want
    assert done.calls == folds  # every fold finished: one ground-truth tile each, to check the saved scores


def test_a_resumed_stream_checks_its_saved_state(tmp_path):
    """Another fingerprint starts afresh (and the stale key folder goes); the same
    fingerprint over a scorer whose scores changed is refused, not mixed in."""
    N, M, tr, tc = 12, 60, 3, 20
    S = tied_scores(N, M, seed=8)
    run = dict(tile_rows=tr, tile_cols=tc, rerank=True, k_i2t=4, k_t2i=3, kprime=2, neighbors="siblings")
    with pytest.raises(Killed):
        stream_evaluate(DyingScorer(S, tr, tc, 9), N, M, work=tmp_path, fingerprint={"m": 1}, save_every_s=0, **run)
    (old,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    fresh = TileScorer(S, tr, tc)
    got, runs = stream_evaluate(fresh, N, M, work=tmp_path, fingerprint={"m": 2}, details=True, **run)
    assert "resumed" not in runs[0].info and got == evaluate_protocol(S, **run_opts(run))
    assert not old.exists()
    with pytest.raises(Killed):
        stream_evaluate(DyingScorer(S, tr, tc, 9), N, M, work=tmp_path, fingerprint={"m": 3}, save_every_s=0, **run)
    with pytest.raises(ValueError, match="saved by the run this one resumes"):
        stream_evaluate(TileScorer(S + 0.125, tr, tc), N, M, work=tmp_path, fingerprint={"m": 3}, **run)
    with pytest.raises(ValueError, match="fingerprint"):
        stream_evaluate(TileScorer(S, tr, tc), N, M, work=tmp_path, **run)
    # a damaged state file (not the atomic writer's doing: a disk, a user) costs its progress, no more
    (saved,) = tmp_path.glob("*/fold0.safetensors")
    saved.write_bytes(b"not a safetensors file")
    again = TileScorer(S, tr, tc)
    got, runs = stream_evaluate(again, N, M, work=tmp_path, fingerprint={"m": 3}, details=True, **run)
    assert "resumed" not in runs[0].info and got == evaluate_protocol(S, **run_opts(run))


def run_opts(run):
    return {k: v for k, v in run.items() if k not in ("tile_rows", "tile_cols")}


# ------------------------------------------------------------------ the CLI: --data --stream, the model as scorer
def test_cli_stream_equals_in_memory(tmp_path, capsys):
    from acf_fast.cli import main

    data = tmp_path / "data"
    write_split(data)
    ckpt = tmp_path / "best.safetensors"
    save_model(ckpt, seed=1)
    base = ["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--backend", "eager", "--device", "cpu",
            "--chunk-images", "5", "--quiet", "--rerank", "--k-t2i", "8"]
    assert main(base + ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "mem.json")]) == 0
    assert main(base + ["--stream", "--out", str(tmp_path / "stream.json")]) == 0
    mem, got = (json.loads((tmp_path / f).read_text()) for f in ("mem.json", "stream.json"))
    for key in ("plain", "reranked", "rerank", "protocol", "images", "texts"):
        assert got[key] == mem[key]
    assert got["scoring"]["stream"] is True and got["rerank"]["neighbors"] == "embedding"
    capsys.readouterr()
    assert main(base + ["--stream", "--save-sims", str(tmp_path / "S.npy")]) == 2
    err = capsys.readouterr().err
    assert "--save-sims" in err and "--stream" in err and not (tmp_path / "S.npy").exists()
    assert main(base + ["--stream", "--neighbors", "profile"]) == 2
    assert "profile" in capsys.readouterr().err


def test_cli_stream_resumes_after_a_kill(tmp_path, monkeypatch):
    """``evaluate --stream --work W`` killed late in its passes: the rerun resumes from the
    saved pass (scores fewer tiles) and writes the uninterrupted JSON's results."""
    from acf_fast import stream as st
    from acf_fast.cli import main

    data, ckpt = tmp_path / "data", tmp_path / "best.safetensors"
    write_split(data)
    save_model(ckpt, seed=2)
    base = ["evaluate", "--data", str(data), "--checkpoint", str(ckpt), "--backend", "torch", "--device", "cpu",
            "--chunk-images", "4", "--quiet", "--rerank", "--k-t2i", "6", "--stream"]
    real, calls = st.ACFBlockScorer.__call__, []

    def counted(self, rows, cols):
        calls.append(1)
        if len(calls) == die_at[0]:
            raise Killed
        return real(self, rows, cols)

    die_at = [None]
    monkeypatch.setattr(st.ACFBlockScorer, "__call__", counted)
    assert main(base + ["--work", str(tmp_path / "w0"), "--out", str(tmp_path / "whole.json")]) == 0
    total = len(calls)
    calls.clear()
    die_at[0] = total - 1
    with pytest.raises(Killed):
        main(base + ["--work", str(tmp_path / "w1"), "--out", str(tmp_path / "resumed.json")])
    assert not (tmp_path / "resumed.json").exists()
    calls.clear()
    die_at[0] = None
    assert main(base + ["--work", str(tmp_path / "w1"), "--out", str(tmp_path / "resumed.json")]) == 0
    assert len(calls) < total
    whole, got = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "resumed.json"))
    assert got["scoring"]["passes"][0]["resumed"]["stage"] in ("ranks", "reverse_i2t", "reverse_t2i")
    assert "resumed" not in whole["scoring"]["passes"][0]
    for key in ("plain", "reranked", "rerank", "protocol", "images", "texts"):
        assert got[key] == whole[key]


def test_no_tensor_as_large_as_the_grid():
    """Every tensor any op creates during a re-ranked stream stays well below N x M
    elements (siblings neighbours: the embedding ones compare texts with texts, not S)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    N, M = 40, 200
    S = tied_scores(N, M, seed=11)
    largest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    largest.append(t.numel())
            return out

    scorer = TileScorer(S, 8, 30)
    with Watch():
        got = stream_evaluate(scorer, N, M, rerank=True, k_i2t=7, k_t2i=6, kprime=3, neighbors="siblings",
                              tile_rows=8, tile_cols=30)
    assert got == evaluate_protocol(S, rerank=True, k_i2t=7, k_t2i=6, kprime=3, neighbors="siblings")
    # O((N + M) k) state (here the (M, k_t2i) lists) and one tile; S has N * M = 8,000
    assert len(largest) > 1000 and max(largest) <= max(8 * 30, (N + M) * 6) < N * M // 5, max(largest)
