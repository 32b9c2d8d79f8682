"""PNG plots of a results dict (matplotlib, Agg backend: no display needed).

``<stem>-time.png``    time vs pairs, log-log, one line per backend, one panel per variant;
``<stem>-speedup.png`` speed-up over eager (and over torch) vs pairs;
``<stem>-tflops.png``  achieved TFLOP/s vs pairs with the measured ceiling as a line.
Extrapolated times are drawn dashed with hollow markers so they never pass for measurements.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from acf_fast.atomic import atomic_write  # noqa: E402

from .markdown import SIM_BACKENDS, flop_unit  # noqa: E402

COLORS = {"eager": "tab:gray", "torch": "tab:blue", "torch.compile": "tab:green", "triton": "tab:red"}
MARKERS = {"eager": "o", "torch": "s", "torch.compile": "^", "triton": "D"}


def _save(fig, path: Path) -> Path:
    """Atomic PNG write."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)
    return path


def _series(rows, variant, backend, field):
    pts = [r for r in rows if r["variant"] == variant and r["backend"] == backend and r.get(field) is not None
           and r.get("status") in ("measured", "extrapolated")]
    pts.sort(key=lambda r: r["pairs"])
    meas = [(r["pairs"], r[field]) for r in pts if r["status"] == "measured"]
    extr = [(r["pairs"], r[field]) for r in pts if r["status"] == "extrapolated"]
    return meas, extr


def _plot_series(ax, rows, variant, backend, field, label):
    meas, extr = _series(rows, variant, backend, field)
    c, m = COLORS.get(backend), MARKERS.get(backend, "o")
    if meas:
        ax.plot(*zip(*meas), color=c, marker=m, label=label)
    if extr:
        joined = meas[-1:] + extr  # continue the measured line into the extrapolation
        ax.plot(*zip(*joined), color=c, linestyle="--", marker=m, markerfacecolor="none",
                label=None if meas else f"{label} (extrapolated)")
    return bool(meas or extr)


_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def _minor_label(v, _):
    """Label the 2 and 5 minor ticks, so a plot spanning less than a decade still reads."""
    if v <= 0:
        return ""
    lead = round(v / 10 ** math.floor(math.log10(v)), 6)
    return f"{v:g}" if lead in (2.0, 5.0) else ""


def _axes(ax, xlabel, ylabel, title):
    """Log-log axes with plain tick labels (0.5, 20, 1e+04) instead of 5×10⁻¹."""
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(_PLAIN)
        axis.set_minor_formatter(FuncFormatter(_minor_label))
    ax.grid(True, which="both", alpha=0.3)


def _title(results):
    d = results["device"]
    return f"{d['name']} ({d['kind']}), {d['date'][:10]}"


def write_plots(results: dict, out_dir: Path, stem: str) -> List[Path]:
    """Write the three PNGs for ``results`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = results.get("similarity") or []
    variants = [v for v in results.get("variants", []) if any(r["variant"] == v for r in rows)]
    if not variants:
        return []
    paths = []
    n = len(variants)

    fig, axes = plt.subplots(1, n, figsize=(5.6 * n, 4.4), squeeze=False, constrained_layout=True)
    for ax, v in zip(axes[0], variants):
        for b in SIM_BACKENDS:
            _plot_series(ax, rows, v, b, "median_s", b)
        _axes(ax, "pairs N × M", "time for the whole N × M grid (s)", f"similarity, {v}")
        ax.legend(fontsize=8)
    fig.suptitle(f"Time vs pairs (dashed = extrapolated) — {_title(results)}", fontsize=10)
    paths.append(_save(fig, out_dir / f"{stem}-time.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11.2, 4.4), squeeze=False, constrained_layout=True)
    for ax, base in zip(axes[0], ("eager", "torch")):
        drew = False
        for v, ls in zip(variants, ("-", ":", "-.")):
            for b in SIM_BACKENDS:
                if b == base or b == "eager":
                    continue
                pts = sorted((r["pairs"], r[f"speedup_vs_{base}"]) for r in rows
                             if r["variant"] == v and r["backend"] == b and r.get(f"speedup_vs_{base}"))
                if pts:
                    ax.plot(*zip(*pts), color=COLORS[b], marker=MARKERS[b], linestyle=ls, label=f"{b}, {v}")
                    drew = True
        ax.axhline(1.0, color="black", linewidth=0.8)
        _axes(ax, "pairs N × M", f"speed-up over {base} (×, higher is better)", f"vs {base}")
        if drew:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "nothing to compare at these sizes", transform=ax.transAxes, ha="center", color="gray")
    fig.suptitle(f"Speed-up vs size (time ratios; extrapolated baselines included) — {_title(results)}", fontsize=10)
    paths.append(_save(fig, out_dir / f"{stem}-speedup.png"))

    fig, axes = plt.subplots(1, n, figsize=(5.6 * n, 4.4), squeeze=False, constrained_layout=True)
    ceilings = results.get("ceiling") or []
    unit, scale = flop_unit(results)
    for ax, v in zip(axes[0], variants):
        for b in SIM_BACKENDS:
            meas, _ = _series(rows, v, b, "tflops")
            if meas:
                ax.plot([p for p, _ in meas], [t * scale for _, t in meas], color=COLORS[b], marker=MARKERS[b], label=b)
        for c, ls in zip(ceilings, ("--", ":")):
            if c.get("tflops"):
                ax.axhline(c["tflops"] * scale, color="black", linestyle=ls, linewidth=1, label=f"ceiling: {c['what']}")
        _axes(ax, "pairs N × M", f"achieved {unit} (spec §8 pair count)", f"similarity, {v}")
        ax.legend(fontsize=8)
    fig.suptitle(f"Achieved {unit} against the ceiling measured in the same run — {_title(results)}", fontsize=10)
    paths.append(_save(fig, out_dir / f"{stem}-tflops.png"))
    return paths
