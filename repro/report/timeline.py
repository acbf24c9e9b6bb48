"""activity.svg: one lane per rank with CPU%, GPU utilisation and progress over time.

The picture of a spin deadlock: one lane pinned at 100% whose progress line goes flat, the others at 0%.
matplotlib is imported inside `render_activity` (it is slow to import and only this picture needs it),
and the Agg canvas is used directly, so no pyplot state or display is involved.

Lanes are downsampled to a number of points that keeps the SVG small (about 300 KB at most for
64 ranks), text stays text (`svg.fonttype: none`), and the output is deterministic.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

from repro.records import ActivitySample

#: Points per series across all lanes; each lane gets its share, between the two bounds below.
_POINT_BUDGET = 4_000
_MIN_POINTS = 24
_MAX_POINTS = 400

#: Fraction of a lane's height that 100% fills.
_LANE_FILL = 0.85
#: Progress tops out a little lower, so that it does not hide a CPU line pinned at 100%.
_PROGRESS_FILL = 0.72

_CPU_COLOR = "#1f77b4"
_GPU_COLOR = "#ff7f0e"
_PROGRESS_COLOR = "#2ca02c"
_STALL_COLOR = "#d62728"
_VERDICT_COLOR = "#7f0000"


def _empty_svg(out: Path, message: str) -> Path:
    text = html.escape(message)
    out.write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<svg xmlns="http://www.w3.org/2000/svg" width="360" height="60" viewBox="0 0 360 60">\n'
        '  <rect width="360" height="60" fill="#ffffff" stroke="#cccccc"/>\n'
        f'  <text x="180" y="35" font-family="sans-serif" font-size="16" text-anchor="middle" fill="#555555">'
        f"{text}</text>\n"
        "</svg>\n",
        encoding="utf-8",
    )
    return out


def _downsample(
    ts: Sequence[float], values: Sequence[float], n: int, *, last: bool = False
) -> tuple[list[float], list[float]]:
    """At most n points: the mean of each time bucket (or its last value, for counters)."""
    if len(ts) <= n:
        return list(ts), list(values)
    lo, hi = ts[0], ts[-1]
    width = (hi - lo) / n or 1.0
    out_t: list[float] = []
    out_v: list[float] = []
    bucket_t: list[float] = []
    bucket_v: list[float] = []
    current = 0
    for t, v in zip(ts, values, strict=True):
        b = min(int((t - lo) / width), n - 1)
        if b != current and bucket_t:
            out_t.append(bucket_t[-1] if last else sum(bucket_t) / len(bucket_t))
            out_v.append(bucket_v[-1] if last else sum(bucket_v) / len(bucket_v))
            bucket_t, bucket_v = [], []
        current = b
        bucket_t.append(t)
        bucket_v.append(v)
    if bucket_t:
        out_t.append(bucket_t[-1] if last else sum(bucket_t) / len(bucket_t))
        out_v.append(bucket_v[-1] if last else sum(bucket_v) / len(bucket_v))
    return out_t, out_v


def _append(
    series: tuple[list[float], list[float]],
    ts: list[float],
    values: list[float],
    base: float,
    step: float,
    fill: float = _LANE_FILL,
) -> None:
    """Add one lane's values (0..1) to a series drawn as one path, lanes separated by NaN."""
    series[0].extend(ts)
    series[0].append(math.nan)
    series[1].extend(base + fill * round(v / step) * step for v in values)
    series[1].append(math.nan)


def render_activity(
    samples: list[ActivitySample],
    out: Path,
    *,
    ranks_meta: dict[int, str] | None = None,
    stall_t: float | None = None,
    verdict_t: float | None = None,
) -> Path:
    """Draw the activity picture to `out` (SVG) and return `out`.

    `stall_t` (the suspected stall) and `verdict_t` (the watchdog's verdict) are on the samples' clock,
    like `WatchdogVerdict.last_progress_t` and `.verdict_t`; the x axis shows seconds since the first
    sample. `ranks_meta` gives lane labels by rank (e.g. {0: "r0 pp0 tp0"}); the default is "rank N".
    Without samples, a small SVG says "no samples".
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if not samples:
        return _empty_svg(out, "no samples")

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    by_rank: dict[int, list[ActivitySample]] = {}
    for s in sorted(samples, key=lambda s: (s.rank, s.t)):
        by_rank.setdefault(s.rank, []).append(s)
    ranks = sorted(by_rank)
    n = len(ranks)
    t0 = min(s.t for s in samples)
    t_end = max(s.t for s in samples) - t0
    points = max(_MIN_POINTS, min(_MAX_POINTS, _POINT_BUDGET // n))

    lane_h = max(0.09, min(0.6, 9.0 / n))  # inches per lane
    label_size = max(5.0, min(9.0, lane_h * 45))
    height = n * lane_h + 1.4
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "vdiag", "path.simplify": True}):
        fig = Figure(figsize=(11, height), dpi=72)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.14, 0.9 / height, 0.84, 1 - 1.4 / height))
        lw = 0.6 if n > 16 else 1.0
        # Values are rounded to about one pixel of lane height: invisible, but it lets matplotlib's path
        # simplification drop the flat stretches, which keeps the SVG small at many ranks.
        step = 1.0 / max(4.0, _LANE_FILL * lane_h * 72)
        grid_x: list[float] = []
        grid_y: list[float] = []
        series: dict[str, tuple[list[float], list[float]]] = {
            "cpu": ([], []),
            "gpu": ([], []),
            "progress": ([], []),
        }
        last_steps: tuple[list[float], list[float]] = ([], [])
        single: tuple[list[float], list[float]] = ([], [])
        for lane, rank in enumerate(reversed(ranks)):
            rows = by_rank[rank]
            ts = [s.t - t0 for s in rows]
            base = float(lane)
            grid_x += [0.0, t_end, math.nan]
            grid_y += [base, base, math.nan]
            cpu_t, cpu = _downsample(ts, [min(max(s.cpu_pct, 0.0), 100.0) / 100 for s in rows], points)
            _append(series["cpu"], cpu_t, cpu, base, step)
            if len(cpu_t) == 1:
                single[0].append(cpu_t[0])
                single[1].append(base + _LANE_FILL * cpu[0])
            gpu_rows = [(s.t - t0, s.gpu_util) for s in rows if s.gpu_util is not None]
            if gpu_rows:
                g_t, g_v = _downsample(
                    [t for t, _ in gpu_rows],
                    [min(max(v or 0.0, 0.0), 100.0) / 100 for _, v in gpu_rows],
                    points,
                )
                _append(series["gpu"], g_t, g_v, base, step)
            p_lo = min(s.progress for s in rows)
            p_span = max(s.progress for s in rows) - p_lo
            if p_span > 0:
                p_t, p_v = _downsample(ts, [(s.progress - p_lo) / p_span for s in rows], points, last=True)
                _append(series["progress"], p_t, p_v, base, step, _PROGRESS_FILL)
                for i in range(len(rows) - 1, 0, -1):
                    if rows[i].progress > rows[i - 1].progress:
                        last_steps[0].append(rows[i].t - t0)
                        last_steps[1].append(base + _PROGRESS_FILL)
                        break
        ax.plot(grid_x, grid_y, color="#dddddd", lw=0.4)
        ax.plot(*series["cpu"], color=_CPU_COLOR, lw=lw)
        if single[0]:
            ax.plot(*single, color=_CPU_COLOR, lw=0, marker="o", ms=2)
        any_gpu = bool(series["gpu"][0])
        if any_gpu:
            ax.plot(*series["gpu"], color=_GPU_COLOR, lw=lw, ls="--")
        ax.plot(*series["progress"], color=_PROGRESS_COLOR, lw=lw, drawstyle="steps-post")
        if last_steps[0]:
            ax.plot(*last_steps, color=_PROGRESS_COLOR, lw=0, marker="|", ms=5)
        for t, color, style in ((stall_t, _STALL_COLOR, "--"), (verdict_t, _VERDICT_COLOR, "-")):
            if t is not None:
                ax.axvline(t - t0, color=color, linestyle=style, linewidth=1.0)

        labels = []
        for rank in reversed(ranks):
            labels.append((ranks_meta or {}).get(rank) or f"rank {rank}")
        ax.set_yticks([lane + 0.42 for lane in range(n)])
        ax.set_yticklabels(labels, fontsize=label_size)
        ax.tick_params(axis="y", length=0)
        ax.set_ylim(-0.1, n)
        right = max([t_end] + [t - t0 for t in (stall_t, verdict_t) if t is not None])
        ax.set_xlim(0, right * 1.02 if right > 0 else 1.0)
        ax.set_xlabel("seconds since first sample", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)

        handles = [Line2D([], [], color=_CPU_COLOR, label="CPU % (0-100)")]
        if any_gpu:
            handles.append(Line2D([], [], color=_GPU_COLOR, ls="--", label="GPU util %"))
        handles.append(Line2D([], [], color=_PROGRESS_COLOR, label="progress (steps; | = last step)"))
        if stall_t is not None:
            handles.append(Line2D([], [], color=_STALL_COLOR, ls="--", label="suspected stall"))
        if verdict_t is not None:
            handles.append(Line2D([], [], color=_VERDICT_COLOR, label="verdict"))
        fig.legend(
            handles=handles,
            loc="upper center",
            ncol=len(handles),
            fontsize=8,
            frameon=False,
            bbox_to_anchor=(0.56, 1.0),
        )
        fig.savefig(out, format="svg", metadata={"Date": None})
    return out
