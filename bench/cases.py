"""The measured cases, each side by side in one run (issue 6, item 2).

(a) ``similarity_case``: eager vs torch vs torch.compile(torch) vs triton, both
    variants, an N×M sweep; FLOPs from ``bench.flops`` (spec §8), TFLOP/s, peak memory.
(b) ``rerank_case``: ``acf_fast.rerank`` vs the numpy per-query loops of ``acf_fast.reference_ranking``.
(c) ``metrics_case``: ``acf_fast.evaluate.recall_metrics`` vs a per-query argsort loop.
(d) ``train_step_case``: one training step (forward, backward, Adam) per backend.
``ceiling_case`` measures the reference matmul rate in the same run, and
``energy_case`` the joules of one full COCO-5K evaluation (GPU only).

Every function returns a list of JSON-ready row dicts. A backend that is not there
(not built yet, no GPU) gives a row with ``status`` "not timed" and a ``note`` saying
why, never a silent gap; a backend that raises gives ``status`` "error".
Sizes too large for a slow backend are "extrapolated": per-pair (or per-query) time
of the largest measured size times the size, and the row says from which size.
"""
from __future__ import annotations

import math
import time
import traceback
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from acf_fast import reference_ranking as loops

from .flops import grid_flops, matmul_flops, tflops
from .timing import RssPeak, peak_memory, time_fn
from .workloads import score_matrix, similarity_inputs

SIMILARITY_BACKENDS = ("eager", "torch", "torch.compile", "triton")


def _progress(iterable, desc, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device, *, repeats: int, budget_s: float, min_repeats: int = 1,
            single_ok: bool = True) -> dict:
    """Time ``fn`` (see ``bench.timing``) and record its peak memory.

    On a GPU the peak comes from one extra call with reset statistics (do_bench's
    own L2-flush buffer would otherwise count); on a CPU it is the RSS growth
    sampled during the untimed warm-up call (no extra call, no sampler in the timings).
    """
    device = torch.device(device)
    if device.type == "cuda":
        out = time_fn(fn, device, repeats=repeats)
        out.update(peak_memory(fn, device))
        return out
    meter = RssPeak()
    out = time_fn(fn, device, repeats=repeats, budget_s=budget_s, min_repeats=min_repeats, first_context=meter,
                  single_ok=single_ok)
    out.update({"peak_bytes": meter.growth_bytes, "memory_method": "RSS growth sampled during the warm-up call (approx.)"})
    return out


# --------------------------------------------------------------------------- ceiling


def ceiling_case(device, *, quick: bool = False) -> list:
    """The matmul rate the similarity TFLOP/s are compared with, measured now.

    GPU: a large bf16 matmul (8192³; the primary ceiling) and an fp32 one (4096³).
    CPU: a large fp32 matmul (2048³, 1024³ with ``quick``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        shapes = [(torch.bfloat16, 8192, True), (torch.float32, 4096, False)]
    else:
        shapes = [(torch.float32, 1024 if quick else 2048, True)]
    rows = []
    for dtype, n, primary in shapes:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        t = time_fn(lambda: a @ b, device, repeats=5, budget_s=5.0)
        f = matmul_flops(n, n, n)
        rows.append({"case": "ceiling", "what": f"{str(dtype).replace('torch.', '')} matmul {n}x{n}x{n}",
                     "dtype": str(dtype).replace("torch.", ""), "n": n, "primary": primary, "flops": f,
                     "tflops": tflops(f, t["median_s"]), **t})
        del a, b
    return rows


def primary_ceiling(rows: Sequence[dict]) -> Optional[dict]:
    for r in rows:
        if r.get("case") == "ceiling" and r.get("primary"):
            return r
    return None


# ------------------------------------------------------------------------ similarity


def _backend_callable(name: str, x, device):
    """(callable returning S, None) or (None, reason it is not timed)."""
    from acf_fast import acf_similarity

    args = (x.V, x.v_mask, x.W, x.w_mask)
    if name == "eager":
        return (lambda: acf_similarity(*args, backend="eager", **x.kwargs)), None
    if name == "triton":
        if torch.device(device).type != "cuda":
            return None, "not timed on CPU: Triton runs here only in the interpreter (a correctness tool, not a speed path)"
        return (lambda: acf_similarity(*args, backend="triton", **x.kwargs)), None
    if name == "torch":
        return (lambda: acf_similarity(*args, backend="torch", **x.kwargs)), None
    if name == "torch.compile":
        import acf_fast.fused_torch as ft

        compiled = _compiled_chunk(ft)

        def call():
            original = ft._pair_chunk
            ft._pair_chunk = compiled
            try:
                return acf_similarity(*args, backend="torch", **x.kwargs)
            finally:
                ft._pair_chunk = original

        return call, None
    raise ValueError(f"unknown similarity backend {name!r}; expected one of {SIMILARITY_BACKENDS}")


_COMPILED = {}


def _compiled_chunk(ft):
    """``torch.compile`` of the torch backend's per-pair chunk function (its hot loop).

    We compile ``fused_torch._pair_chunk``, the function every pair chunk runs through,
    and leave the per-item precompute (a few large GEMMs, no fusion to gain) eager.
    Compiling the whole ``torch_similarity`` makes Dynamo unroll its Python chunk
    loops, so the graph grows with N×M; cold, that took 530 s for one tiny shape on
    this project's 2-core CPU, against 80 s for the chunk function. ``dynamic=True``:
    with the default, the second chunk shape recompiled once more (134 s here), so we
    compile with dynamic sizes from the start. The first call of each size
    (``first_s``) holds any compile time.
    """
    if "chunk" not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED["chunk"] = torch.compile(ft._pair_chunk, dynamic=True)
    return _COMPILED["chunk"]


def default_caps(device) -> dict:
    """Largest pair count each backend is timed at (bigger sizes are extrapolated)."""
    if torch.device(device).type == "cuda":
        return {"eager": 100 * 500, "torch": 1000 * 5000, "torch.compile": 1000 * 5000, "triton": math.inf}
    return {"eager": 2000, "torch": math.inf, "torch.compile": math.inf, "triton": math.inf}


def similarity_case(sizes: Sequence[tuple], variants: Sequence[str], device, *, backends: Sequence[str] = SIMILARITY_BACKENDS,
                    caps: Optional[dict] = None, dtype=torch.float32, K: int = 36, l_min: int = 12, l_max: int = 32,
                    D: int = 1024, heads: int = 8, repeats: int = 3, budget_s: float = 6.0, seed: int = 0,
                    progress: bool = True, compiled_rows: Optional[Sequence[dict]] = None,
                    deadline: Optional[float] = None) -> list:
    """Time every backend on every (N, M) of ``sizes`` for each variant.

    Rows carry: variant, backend, N, M, pairs, flops (useful FLOPs, spec §8),
    median_s / q20_s / q80_s, tflops, peak_bytes, status, note, and where eager ran
    at the same size ``max_abs_diff_vs_eager`` (a faithfulness check, not a test).

    ``compiled_rows``: the torch.compile column measured beforehand in a child process
    (``bench.compile_worker.compile_rows``, which the report runs first under its own
    budget, so a slow Inductor compile cannot hold the whole report hostage); its rows
    are used instead of timing torch.compile here. Sizes run smallest first, variants
    interleaved; past ``deadline`` (a ``time.perf_counter()`` value) the remaining
    sizes are reported as skipped.
    """
    device = torch.device(device)
    caps = {**default_caps(device), **(caps or {})}
    rows = []
    if compiled_rows is not None:
        compiled_rows = {(r["variant"], r["N"], r["M"]): r for r in compiled_rows}
    jobs = sorted(((v, s) for v in variants for s in sizes), key=lambda j: (j[1][0] * j[1][1], list(variants).index(j[0])))
    for done, (variant, (N, M)) in enumerate(_progress(jobs, "similarity", progress)):
        if _late(deadline, done):
            rows += [{"case": "similarity", "variant": variant, "N": N, "M": M, "pairs": N * M, "backend": b,
                      "dtype": str(dtype).replace("torch.", ""), "status": "not timed", "note": SKIPPED} for b in backends]
            continue
        x = similarity_inputs(N, M, variant, K=K, l_min=l_min, l_max=l_max, D=D, heads=heads,
                              device=device, dtype=dtype, seed=seed)
        flops = grid_flops(x.k_valid.tolist(), x.l_valid.tolist(), D, heads, variant)
        base = {"case": "similarity", "variant": variant, "N": N, "M": M, "pairs": N * M, "K": K,
                "l_mean": float(x.l_valid.float().mean()), "D": D, "H": heads,
                "dtype": str(dtype).replace("torch.", ""), "flops": flops}
        outputs = {}
        for name in backends:
            row = dict(base, backend=name)
            if name == "torch.compile" and compiled_rows is not None:
                child = compiled_rows.get((variant, N, M), {"status": "not timed", "note": "no result from the compile worker"})
                rows.append(dict(row, **{k: v for k, v in child.items() if k not in row}))
                continue
            fn, reason = _backend_callable(name, x, device)
            if fn is None:
                rows.append(dict(row, status="not timed", note=reason))
                continue
            if N * M > caps.get(name, math.inf):
                rows.append(dict(row, status="extrapolated"))
                continue
            holder = {}

            def call(fn=fn, holder=holder):
                holder["S"] = fn()
                _sync(device)

            try:
                # compiled code: its first call holds the compile, so at least one more call is timed
                res = measure(call, device, repeats=repeats, budget_s=budget_s, single_ok=name != "torch.compile")
            except Exception as err:  # one broken backend must not sink the whole report
                rows.append(dict(row, status="error", note=f"{type(err).__name__}: {err}"[:500],
                                 traceback=traceback.format_exc(limit=3)))
                continue
            row.update(res, status="measured", tflops=tflops(flops, res["median_s"]))
            if name == "torch.compile":
                row["note"] = "first_s includes compilation"
            outputs[name] = holder.get("S")
            rows.append(row)
            _release(device)
        ref_name = next((b for b in ("eager", "torch") if b in outputs), None)
        if ref_name is not None:
            ref = outputs[ref_name].float()
            for r in rows[-len(backends):]:
                S = outputs.get(r["backend"])
                if S is not None and r["backend"] != ref_name:
                    r[f"max_abs_diff_vs_{ref_name}"] = float((S.float() - ref).abs().max())
        del x, outputs
        _release(device)
    _extrapolate(rows, key=("variant", "dtype"))
    return rows


SKIPPED = "not timed: skipped, the report's time budget was spent (a smaller sweep or a quieter machine fits it)"


def _late(deadline: Optional[float], done: int) -> bool:
    """Past the deadline, and at least one job of this case already ran (each case shows something)."""
    return deadline is not None and done > 0 and time.perf_counter() > deadline


def _release(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _extrapolate(rows: list, key: Sequence[str]) -> None:
    """Fill "extrapolated" rows from the same backend's largest measured size, linearly in pairs."""
    for r in rows:
        if r.get("status") != "extrapolated":
            continue
        same = [m for m in rows if m.get("status") == "measured" and m["backend"] == r["backend"]
                and all(m.get(k) == r.get(k) for k in key)]
        if not same:
            r.update(status="not timed", note="too large to time here and no smaller size measured")
            continue
        src = max(same, key=lambda m: m["pairs"])
        per_pair = src["median_s"] / src["pairs"]
        r.update(median_s=per_pair * r["pairs"], q20_s=None, q80_s=None, repeats=0, peak_bytes=None,
                 extrapolated_from={"N": src["N"], "M": src["M"]},
                 note=f"extrapolated: {per_pair * 1e3:.3g} ms/pair measured at {src['N']} × {src['M']}, times {r['pairs']:,} pairs")
        if "flops" in r:
            r["tflops"] = tflops(r["flops"], r["median_s"])


# --------------------------------------------------------------------------- re-ranker


def _text_neighbors_for(S, device, k=5, seed=0):
    """Nb(t) for the T2I re-ranker: ``embedding`` mode on random unit text vectors (cost as for ACF)."""
    from acf_fast.rerank import text_neighbors

    M = S.shape[1]
    g = torch.Generator().manual_seed(seed)
    tv = torch.nn.functional.normalize(torch.randn(M, 1024, generator=g), dim=1).to(device)
    return text_neighbors("embedding", k=k, text_vectors=tv)


def _as_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def rerank_case(sizes: Sequence[tuple], device, *, baseline_queries: int = 500, repeats: int = 3, budget_s: float = 6.0,
                seed: int = 0, progress: bool = True, deadline: Optional[float] = None) -> list:
    """``rerank_i2t`` (k̂=15) and ``rerank_t2i`` (k̂=20, k′=5) vs the numpy per-query loops.

    The numpy loop runs on the first ``baseline_queries`` queries of each direction and
    is extrapolated per query to all of them (stated in the row's note).
    """
    device = torch.device(device)
    from acf_fast.rerank import rerank_i2t, rerank_t2i

    rows = []
    for done, (N, M) in enumerate(_progress(sizes, "rerank", progress)):
        if _late(deadline, done):
            rows += [{"case": "rerank", "direction": d, "N": N, "M": M, "backend": b, "status": "not timed", "note": SKIPPED}
                     for d in ("i2t", "t2i") for b in ("acf_fast", "numpy loop")]
            continue
        S, _ = score_matrix(N, M, device=device, seed=seed)
        nb = _text_neighbors_for(S, device)
        S_np, nb_np = _as_numpy(S), _as_numpy(nb)
        for direction, ours, loop, nq in (
            ("i2t", lambda: rerank_i2t(S, k=15), lambda q: loops.rerank_i2t_loop(S_np, 15, queries=q), N),
            ("t2i", lambda: rerank_t2i(S, nb, k=20), lambda q: loops.rerank_t2i_loop(S_np, nb_np, 20, queries=q), M),
        ):
            base = {"case": "rerank", "direction": direction, "N": N, "M": M, "queries": nq}

            def call(ours=ours):
                ours()
                _sync(device)

            try:
                res = measure(call, device, repeats=repeats, budget_s=budget_s)
                rows.append(dict(base, backend="acf_fast", status="measured", **res))
            except Exception as err:
                rows.append(dict(base, backend="acf_fast", status="error", note=f"{type(err).__name__}: {err}"[:500]))
            q = list(range(min(nq, baseline_queries)))
            res = time_fn(lambda: loop(q), "cpu", repeats=1, warmup=0, budget_s=budget_s)
            scale = nq / len(q)
            row = dict(base, backend="numpy loop", status="measured" if scale == 1 else "extrapolated", **res)
            row["median_s"] = res["median_s"] * scale
            if scale != 1:
                row.update(q20_s=None, q80_s=None,
                           note=f"numpy loop on the first {len(q)} of {nq} queries, times {scale:.3g}")
            rows.append(row)
        del S, nb
        _release(device)
    return rows


# ----------------------------------------------------------------------------- metrics


def metrics_case(sizes: Sequence[tuple], device, *, baseline_queries: int = 1000, repeats: int = 3, budget_s: float = 6.0,
                 seed: int = 0, progress: bool = True, deadline: Optional[float] = None) -> list:
    """``recall_metrics(S, txt2img)`` vs the per-query argsort loop (SCAN's ``i2t``/``t2i``).

    The loop is timed on slices of at most ``baseline_queries`` queries per direction
    and scaled per query when the slice is smaller than the size.
    """
    device = torch.device(device)
    from acf_fast.evaluate import recall_metrics

    rows = []
    for done, (N, M) in enumerate(_progress(sizes, "metrics", progress)):
        if _late(deadline, done):
            rows += [{"case": "metrics", "N": N, "M": M, "backend": b, "status": "not timed", "note": SKIPPED}
                     for b in ("acf_fast", "numpy loop")]
            continue
        S, t2i = score_matrix(N, M, device=device, seed=seed)
        base = {"case": "metrics", "N": N, "M": M}

        def call():
            recall_metrics(S, t2i)
            _sync(device)

        try:
            rows.append(dict(base, backend="acf_fast", status="measured", **measure(call, device, repeats=repeats, budget_s=budget_s)))
        except Exception as err:
            rows.append(dict(base, backend="acf_fast", status="error", note=f"{type(err).__name__}: {err}"[:500]))
        S_np, t_np = _as_numpy(S), _as_numpy(t2i)
        n, m = min(N, baseline_queries), min(M, 5 * baseline_queries)
        ti = time_fn(lambda: loops.i2t_ranks(S_np, t_np, queries=range(n)), "cpu", repeats=1, warmup=0)["median_s"]
        tt = time_fn(lambda: loops.t2i_ranks(S_np, t_np, queries=range(m)), "cpu", repeats=1, warmup=0)["median_s"]
        row = dict(base, backend="numpy loop", median_s=ti * N / n + tt * M / m, q20_s=None, q80_s=None, repeats=1,
                   method="wall-clock", status="measured" if (n, m) == (N, M) else "extrapolated")
        if (n, m) != (N, M):
            row["note"] = f"argsort loop on {n} images and {m} texts, scaled per query"
        rows.append(row)
        del S
        _release(device)
    return rows


# ------------------------------------------------------------------------ train step


def train_step_case(device, *, batch: int = 16, variants: Sequence[str] = ("paper",), backends: Sequence[str] = ("eager", "torch", "triton"),
                    repeats: int = 3, budget_s: float = 20.0, seed: int = 0, progress: bool = True,
                    deadline: Optional[float] = None) -> list:
    """One training step, forward and backward, per similarity backend (see ``bench.train_step``)."""
    from .train_step import make_train_step

    device = torch.device(device)
    rows = []
    for done, (variant, name) in enumerate(_progress([(v, b) for v in variants for b in backends], "train step", progress)):
        row = {"case": "train_step", "variant": variant, "backend": name, "batch": batch}
        if _late(deadline, done):
            rows.append(dict(row, status="not timed", note=SKIPPED))
            continue
        if name == "triton" and device.type != "cuda":
            rows.append(dict(row, status="not timed", note="not timed on CPU: Triton runs here only in the interpreter"))
            continue
        step, info = make_train_step(variant, name, batch=batch, device=device, seed=seed)

        def call(step=step):
            step()
            _sync(device)

        try:
            res = measure(call, device, repeats=repeats, budget_s=budget_s)
        except Exception as err:
            rows.append(dict(row, status="error", note=f"{type(err).__name__}: {err}"[:500],
                             traceback=traceback.format_exc(limit=3)))
            continue
        rows.append(dict(row, **info, **res, status="measured"))
        _release(device)
    return rows


# -------------------------------------------------------------------------- energy


def energy_case(device, *, N: int = 5000, M: int = 25000, variant: str = "paper", dtype=torch.bfloat16, seed: int = 0) -> list:
    """Joules of one full COCO-5K evaluation on a GPU: scoring 5K×25K (backend "auto"),
    the spec §4 metrics and both re-rankings. Empty on a CPU (no energy counter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    from acf_fast import acf_similarity
    from acf_fast.evaluate import recall_metrics
    from acf_fast.rerank import rerank_i2t, rerank_t2i

    from .device import EnergyMeter

    x = similarity_inputs(N, M, variant, device=device, dtype=dtype, seed=seed)
    txt2img = torch.arange(M, device=device) // 5

    def evaluate():
        S = acf_similarity(x.V, x.v_mask, x.W, x.w_mask, backend="auto", **x.kwargs)
        out = {"metrics": recall_metrics(S, txt2img)}
        rerank_i2t(S, k=15)
        rerank_t2i(S, _text_neighbors_for(S, device), k=20)
        torch.cuda.synchronize()
        return out

    evaluate()  # warm-up: kernels compiled, caches allocated
    meter = EnergyMeter(device.index or 0).start()
    t0 = time.perf_counter()
    evaluate()
    wall = time.perf_counter() - t0
    e = meter.stop()
    return [{"case": "energy", "what": f"one COCO-5K evaluation ({variant}, {str(dtype).replace('torch.', '')}: score {N}x{M}, metrics, re-rank both ways)",
             "variant": variant, "N": N, "M": M, "wall_s": wall, **e, "status": "measured"}]
