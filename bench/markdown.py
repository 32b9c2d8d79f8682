"""Markdown tables of a results dict (``bench.report``): every backend side by side.

Only formats numbers the results hold (ratios and fractions are stored there by
``report.annotate``). Conventions: ``~`` marks an extrapolated time, ``—`` a backend
not timed (the notes below the table say why), ``error`` a backend that raised.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional

SIM_BACKENDS = ("eager", "torch", "torch.compile", "triton")


def fmt_time(s: Optional[float]) -> str:
    """Seconds in a readable unit with 3 significant digits: 0.0123 -> "12.3 ms"."""
    if s is None or not isinstance(s, (int, float)) or not math.isfinite(s):
        return "—"
    if s >= 1000:
        return f"{s:,.0f} s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale or unit == "µs":
            return f"{s / scale:.3g} {unit}"
    return "—"


def fmt_ratio(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.3g}×"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{int(b)} B"


def fmt_num(x: Optional[float], digits: int = 3) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "—"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def cell(row: Optional[dict]) -> str:
    """Time cell of one row: measured, ~extrapolated, — (not timed) or error."""
    if row is None:
        return "—"
    st = row.get("status")
    if st == "measured":
        return fmt_time(row.get("median_s"))
    if st == "extrapolated":
        return "~" + fmt_time(row.get("median_s"))
    if st == "error":
        return "error"
    return "—"


def _table(header: List[str], rows: Iterable[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else ":---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _index(rows, *keys):
    return {tuple(r.get(k) for k in keys): r for r in rows}


def flop_unit(results: dict) -> tuple:
    """("GFLOP/s", 1e3) when the run's ceiling is under 1 TFLOP/s (a CPU), else ("TFLOP/s", 1)."""
    c = [r.get("tflops") for r in results.get("ceiling") or [] if r.get("tflops")]
    return ("GFLOP/s", 1e3) if c and max(c) < 1.0 else ("TFLOP/s", 1.0)


def similarity_tables(results: dict, sizes: Optional[set] = None) -> List[str]:
    """Per variant: times of every backend side by side with speed-ups, then TFLOP/s, % ceiling, memory."""
    rows = results.get("similarity") or []
    lines: List[str] = []
    notes: List[str] = []
    for variant in results.get("variants", []):
        vr = [r for r in rows if r["variant"] == variant and (sizes is None or (r["N"], r["M"]) in sizes)]
        if not vr:
            continue
        backends = [b for b in SIM_BACKENDS if any(r["backend"] == b for r in vr)]
        idx = _index(vr, "N", "M", "backend")
        grid = sorted({(r["N"], r["M"]) for r in vr}, key=lambda s: s[0] * s[1])
        dtype = vr[0].get("dtype", "float32")
        r0 = next((r for r in vr if r.get("K")), vr[0])
        lines += [f"**Similarity, `{variant}` variant** ({dtype}; K = {r0.get('K')}, L ragged {fmt_num(r0.get('l_mean'))} on average; "
                  f"D = {r0.get('D')}, H = {r0.get('H')}). Times are medians; speed-ups are time ratios; "
                  "GFLOP = useful work by the spec §8 per-pair count.", ""]
        ratio_cols = [b for b in backends if b != "eager"]
        header = ["N × M", "pairs", "GFLOP"] + backends + [f"{b} vs eager" for b in ratio_cols]
        if "torch" in backends:
            header += [f"{b} vs torch" for b in ratio_cols if b != "torch"]
        body = []
        for N, M in grid:
            fl = next((r["flops"] for r in vr if (r["N"], r["M"]) == (N, M) and r.get("flops")), None)
            line = [f"{N} × {M}", f"{N * M:,}", fmt_num(None if fl is None else fl / 1e9)]
            line += [cell(idx.get((N, M, b))) for b in backends]
            line += [fmt_ratio((idx.get((N, M, b)) or {}).get("speedup_vs_eager")) for b in ratio_cols]
            if "torch" in backends:
                line += [fmt_ratio((idx.get((N, M, b)) or {}).get("speedup_vs_torch")) for b in ratio_cols if b != "torch"]
            body.append(line)
        lines += _table(header, body) + [""]
        timed = [b for b in backends if any(r["backend"] == b and r.get("status") == "measured" for r in vr)]
        unit, scale = flop_unit(results)
        if timed:
            header = ["N × M"] + [f"{b} {unit} (% ceiling)" for b in timed] + [f"{b} peak mem" for b in timed]
            body = []
            for N, M in grid:
                line = [f"{N} × {M}"]
                for b in timed:
                    r = idx.get((N, M, b)) or {}
                    if r.get("status") == "measured":
                        frac = r.get("frac_ceiling")
                        tf = r.get("tflops")
                        line.append(f"{fmt_num(None if tf is None else tf * scale)} ({fmt_num(None if frac is None else 100 * frac, 2)}%)")
                    else:
                        line.append("—")
                line += [fmt_bytes((idx.get((N, M, b)) or {}).get("peak_bytes")) if (idx.get((N, M, b)) or {}).get("status") == "measured" else "—"
                         for b in timed]
                body.append(line)
            lines += _table(header, body) + [""]
        for r in vr:
            if r.get("note") and r.get("status") != "measured":
                note = r["note"]
                if r.get("status") == "extrapolated":  # the per-pair figure is the same for every size
                    note = note.split(", times")[0]
                notes.append((f"{variant} / {r['backend']}", f"{r['N']} × {r['M']}", note))
            for ref in ("eager", "torch"):
                diff = r.get(f"max_abs_diff_vs_{ref}")
                if diff is not None and diff > 1e-4 and r.get("dtype") == "float32":
                    notes.append((f"{variant} / {r['backend']}", f"{r['N']} × {r['M']}",
                                  f"max |ΔS| vs {ref} = {diff:.3g} (above the float32 contract of 1e-4)"))
        if notes:
            lines += [f"Notes ({variant}):", ""] + [f"- {n}" for n in _dedupe_notes(notes, len(grid))] + [""]
        notes = []
    return lines


def _dedupe_notes(notes: List[tuple], n_sizes: int) -> List[str]:
    """One line per (variant / backend, reason) with the sizes it applies to ("all sizes" when all)."""
    groups = {}
    for who, size, reason in notes:
        groups.setdefault((who, reason), []).append(size)
    out = []
    for (who, reason), sizes in groups.items():
        where = "all sizes" if len(sizes) >= n_sizes else ", ".join(sizes)
        out.append(f"{who} ({where}): {reason}")
    return out


def pair_table(rows: List[dict], title: str, ours: str, base: str, ratio_field: str, extra: Optional[str] = None) -> List[str]:
    """A two-backend table (ours vs baseline) with the speed-up, for re-ranker and metrics rows."""
    if not rows:
        return []
    keys = sorted({(r["N"], r["M"], r.get(extra)) for r in rows}, key=lambda k: (k[0] * k[1], str(k[2])))
    idx = _index(rows, "N", "M", extra or "_none", "backend") if extra else _index(rows, "N", "M", "backend")
    header = ["N × M"] + ([extra] if extra else []) + [ours, base, "speed-up"]
    body, notes = [], []
    for N, M, e in keys:
        k = (N, M, e) if extra else (N, M)
        a, b = idx.get(k + (ours,)), idx.get(k + (base,))
        body.append([f"{N} × {M}"] + ([str(e)] if extra else []) + [cell(a), cell(b), fmt_ratio((a or {}).get(ratio_field))])
        for r in (a, b):
            if r and r.get("note"):
                notes.append(f"{r['backend']} at {N} × {M}{' ' + str(e) if extra else ''}: {r['note']}")
    out = [f"**{title}**", ""] + _table(header, body) + [""]
    if notes:
        out += [f"- {n}" for n in notes] + [""]
    return out


def train_table(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    backends = [b for b in ("eager", "torch", "triton") if any(r["backend"] == b for r in rows)]
    idx = _index(rows, "variant", "backend")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    batch = rows[0].get("batch")
    model = next((r.get("model") for r in rows if r.get("model")), None)
    header = ["variant", "batch"] + backends + [f"{b} vs eager" for b in backends if b != "eager"]
    body = []
    for v in variants:
        body.append([v, str(batch)] + [cell(idx.get((v, b))) for b in backends]
                    + [fmt_ratio((idx.get((v, b)) or {}).get("speedup_vs_eager")) for b in backends if b != "eager"])
    out = [f"**One training step** (4 score blocks B × B, spec §6 loss, backward, clip, Adam; {model or '?'})", ""]
    out += _table(header, body) + [""]
    notes = [f"- {r['variant']} / {r['backend']}: {r['note']}" for r in rows if r.get("note") and r.get("status") != "measured"]
    return out + (notes + [""] if notes else [])


def device_lines(results: dict) -> List[str]:
    d = results["device"]
    v = d.get("versions", {})
    line = f"Device: **{d['name']}** ({d['kind']}), measured {d['date']}; "
    line += f"{d.get('cpu_model')}, {d.get('cpu_count')} CPUs, torch threads {d.get('torch_threads')}; "
    line += ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "triton", "numpy") if k in v) + "."
    out = [line]
    la = results.get("load_average") or {}
    if la.get("start"):
        peak = max(la["start"][0], (la.get("end") or [0])[0] or 0)
        busy = " (above the CPU count: other work shared the machine)" if la.get("cpus") and peak > la["cpus"] else ""
        out.append(f"Load average (1 min) at start / end of the run: {fmt_num(la['start'][0])} / "
                   f"{fmt_num((la.get('end') or [None])[0])} on {la.get('cpus')} CPUs{busy}.")
    g = d.get("gpu")
    if g:
        out.append(f"GPU: {g.get('name')} (UUID {g.get('uuid')}, driver {g.get('driver')}), SM clock {g.get('sm_clock_mhz')}"
                   f"/{g.get('sm_clock_max_mhz')} MHz, memory clock {g.get('mem_clock_mhz')}/{g.get('mem_clock_max_mhz')} MHz, "
                   f"memory used {fmt_bytes(g.get('memory_used_bytes'))}, power {g.get('power_w')} W.")
    unit, scale = flop_unit(results)
    for c in results.get("ceiling", []):
        tf = c.get("tflops")
        out.append(f"Ceiling{' (primary)' if c.get('primary') else ''}: {c['what']}: {fmt_num(None if tf is None else tf * scale)} {unit}, measured in this run.")
    return out


def energy_lines(results: dict) -> List[str]:
    out = []
    for e in results.get("energy") or []:
        out.append(f"Energy: {e['what']}: **{fmt_num(e.get('joules'))} J** in {fmt_time(e.get('seconds'))} "
                   f"(mean {fmt_num(e.get('mean_power_w'))} W; {e.get('method')}).")
    return out


def render_tables(results: dict, sizes: Optional[set] = None) -> List[str]:
    """All case tables (similarity, re-ranker, metrics, training step) and energy, as lines."""
    lines = similarity_tables(results, sizes)
    lines += pair_table(results.get("rerank") or [], "Re-ranker (ACF-R+, spec §5: I2T k̂ = 15, T2I k̂ = 20, k′ = 5)",
                        "acf_fast", "numpy loop", "speedup_vs_numpy", extra="direction")
    lines += pair_table(results.get("metrics") or [], "Metrics (spec §4: R@1/5/10, medr, meanr both ways)",
                        "acf_fast", "numpy loop", "speedup_vs_numpy")
    lines += train_table(results.get("train") or [])
    lines += energy_lines(results)
    return lines


def render(results: dict) -> str:
    """The full markdown report of one results dict."""
    d = results["device"]
    lines = [f"# acf-fast benchmarks: {d['name']}, {d['date'][:10]}{' (quick)' if results.get('quick') else ''}", ""]
    lines += device_lines(results) + [""]
    lines += render_tables(results)
    if results.get("notes"):
        lines += [f"- {n}" for n in results["notes"]] + [""]
    if results.get("wall_s") is not None:
        lines.append(f"Whole report: {fmt_time(results['wall_s'])}.")
    return "\n".join(lines).rstrip() + "\n"
