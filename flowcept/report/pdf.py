"""The provenance report: a multi-page PDF with the card's content and the plots people look at.

Pages: the card (text), a per-rank timeline, activity durations, per-node CPU and memory over
time, per-GPU utilisation, memory and power over time. Plots stay readable on big jobs: with more
than ``MAX_BARS`` tasks the timeline becomes an image of time bins per rank coloured by the
activity that kept the rank busiest (brightness = busy fraction); with more than ``MAX_LINES``
nodes or GPUs the curves become a heatmap. matplotlib is imported here only (Agg backend).
"""

from __future__ import annotations

import logging
from typing import Any, List

from flowcept.report.summary import Summary

logger = logging.getLogger(__name__)

MAX_BARS = 3000
MAX_LANES = 64
MAX_LINES = 12
TIME_BINS = 400
TOP_ACTIVITIES = 10
PAGE = (11.0, 8.5)
LINES_PER_PAGE = 58


def render_pdf(summary: Summary, path: str) -> int:
    """Write the PDF report of a Summary to ``path``; returns the number of pages."""
    # Figures are built directly (no pyplot): no global backend state, no GUI, Agg rendering.
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    from flowcept.report.card import render_card

    pages = 0
    with PdfPages(path, metadata={"Title": "Flowcept provenance report", "Creator": "flowcept"}) as pdf:
        for fig in _text_pages(Figure, render_card((), summary=summary)):
            pdf.savefig(fig)
            pages += 1
        for builder in (_timeline_page, _durations_page, _node_page, _gpu_page):
            try:
                fig = builder(Figure, summary)
            except Exception:  # one plot failing must not cost the whole report
                logger.exception("report page %s failed", builder.__name__)
                continue
            if fig is not None:
                pdf.savefig(fig)
                pages += 1
    return pages


# -- text ---------------------------------------------------------------------------------------------

def _text_pages(figure_cls: Any, markdown: str) -> List[Any]:
    lines: List[str] = []
    for raw in markdown.splitlines():
        if set(raw.replace("|", "").strip()) <= {"-"} and raw.startswith("|"):
            continue  # markdown table rule
        line = raw.strip("|").replace(" | ", "  │ ").strip() if raw.startswith("|") else raw
        while len(line) > 150:
            lines.append(line[:150])
            line = "    " + line[150:]
        lines.append(line)
    figs = []
    for start in range(0, len(lines), LINES_PER_PAGE):
        fig = figure_cls(figsize=PAGE)
        y = 0.97
        for line in lines[start:start + LINES_PER_PAGE]:
            if line.startswith("#"):
                fig.text(0.04, y, line.lstrip("# "), fontsize=12 if line.startswith("# ") else 10,
                         weight="bold", family="DejaVu Sans", va="top")
            else:
                fig.text(0.04, y, line, fontsize=6.5, family="monospace", va="top")
            y -= 0.94 / LINES_PER_PAGE
        figs.append(fig)
    return figs


# -- timeline ------------------------------------------------------------------------------------------

def _activity_colors(summary: Summary) -> Any:
    """Indices of the top activities (by total time) and a colour per index; the rest share grey."""
    import numpy as np

    order = sorted(range(len(summary.activity_names)),
                   key=lambda i: -summary.activities[summary.activity_names[i]].total)
    top = order[:TOP_ACTIVITIES]
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    remap = np.full(max(1, len(summary.activity_names)), len(top), dtype=np.int64)
    for slot, index in enumerate(top):
        remap[index] = slot
    colors = [cmap(i % 10) for i in range(len(top))] + [(0.6, 0.6, 0.6, 1.0)]
    labels = [summary.activity_names[i] for i in top] + (["other"] if len(order) > len(top) else [])
    return remap, colors, labels


def _timeline_page(figure_cls: Any, summary: Summary) -> Any:
    import numpy as np

    n = len(summary.tl_start)
    if not n:
        return None
    start = np.frombuffer(summary.tl_start, dtype=np.float64)
    end = np.frombuffer(summary.tl_end, dtype=np.float64)
    lane = np.frombuffer(summary.tl_lane, dtype=np.int32)
    act = np.frombuffer(summary.tl_activity, dtype=np.int32)
    remap, colors, labels = _activity_colors(summary)
    slot = remap[act]
    t0 = float(start.min())
    lanes, lane_labels = _lane_groups(summary, lane)
    n_lanes = len(lane_labels)
    fig = figure_cls(figsize=PAGE)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib.patches import Patch

    if n <= MAX_BARS and n_lanes <= MAX_LANES:
        for s_index in range(len(colors)):
            mask = slot == s_index
            if not mask.any():
                continue
            ax.barh(lanes[mask], end[mask] - start[mask], left=start[mask] - t0, height=0.8,
                    color=colors[s_index], edgecolor="none")
        ax.set_title(f"Timeline: {n} tasks on {n_lanes} ranks/processes")
        ax.set_ylim(-0.5, n_lanes - 0.5)
        ax.invert_yaxis()
    else:
        span = max(float(end.max()) - t0, 1e-9)
        bins = TIME_BINS
        width = span / bins
        busy = np.zeros((n_lanes, len(colors), bins), dtype=np.float64)
        # Each task's time is spread over the bins it covers (tasks longer than a bin are split).
        first = np.minimum(((start - t0) / width).astype(np.int64), bins - 1)
        last = np.minimum(((end - t0) / width).astype(np.int64), bins - 1)
        single = first == last
        np.add.at(busy, (lanes[single], slot[single], first[single]), (end - start)[single])
        for i in np.nonzero(~single)[0]:
            for b in range(first[i], last[i] + 1):
                lo = max(start[i], t0 + b * width)
                hi = min(end[i], t0 + (b + 1) * width)
                if hi > lo:
                    busy[lanes[i], slot[i], b] += hi - lo
        capacity = width * np.maximum(_lane_sizes(summary, n_lanes), 1.0)
        total = busy.sum(axis=1)
        dominant = busy.argmax(axis=1)
        fraction = np.clip(total / capacity[:, None], 0.0, 1.0)
        rgb = np.array([c[:3] for c in colors])[dominant]
        image = 1.0 - fraction[..., None] * (1.0 - rgb)  # white = idle, full colour = busy
        image[total == 0] = 1.0
        ax.imshow(image, aspect="auto", interpolation="nearest", extent=(0, span, n_lanes - 0.5, -0.5))
        grouped = len(summary.lane_names)
        rows_text = f"{grouped} lanes" if grouped == n_lanes else f"{grouped} lanes in {n_lanes} rows"
        ax.set_title(f"Timeline: {n} tasks on {rows_text}, {bins} time bins "
                     f"(colour: busiest activity, shade: busy fraction)", fontsize=10)
    ax.set_xlabel("seconds since first task")
    step = max(1, n_lanes // 32)
    ax.set_yticks(range(0, n_lanes, step))
    ax.set_yticklabels([lane_labels[i] for i in range(0, n_lanes, step)], fontsize=7)
    ax.legend(handles=[Patch(color=c, label=label[:40]) for c, label in zip(colors, labels)],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.subplots_adjust(left=0.1, right=0.8)
    return fig


def _lane_groups(summary: Summary, lane: Any) -> Any:
    """Map task lanes to display rows: one per rank, or blocks of ranks when there are many."""
    import numpy as np

    names = summary.lane_names
    order = sorted(range(len(names)), key=lambda i: _lane_sort_key(names[i]))
    position = np.empty(len(names), dtype=np.int64)
    position[order] = np.arange(len(names))
    rows = position[lane]
    if len(names) <= MAX_LANES:
        return rows, [names[i] for i in order]
    per_row = -(-len(names) // MAX_LANES)
    n_rows = -(-len(names) // per_row)
    labels = [f"{names[order[r * per_row]]}…" for r in range(n_rows)]
    return rows // per_row, labels


def _lane_sizes(summary: Summary, n_rows: int) -> Any:
    import numpy as np

    per_row = 1 if len(summary.lane_names) <= MAX_LANES else -(-len(summary.lane_names) // MAX_LANES)
    sizes = np.full(n_rows, float(per_row))
    remainder = len(summary.lane_names) - per_row * (n_rows - 1)
    if n_rows:
        sizes[-1] = float(remainder)
    return sizes


def natural_key(text: Any) -> Any:
    """Sort key that puts node2 before node10."""
    import re

    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(text))]


def _lane_sort_key(name: str) -> Any:
    if name.startswith("rank "):
        try:
            return (0, int(name[5:]), "")
        except ValueError:
            pass
    return (1, 0, natural_key(name))


# -- durations ------------------------------------------------------------------------------------------

def _durations_page(figure_cls: Any, summary: Summary) -> Any:
    import numpy as np

    timed = [(name, a) for name, a in summary.activities.items() if len(a.durations)]
    if not timed:
        return None
    timed.sort(key=lambda kv: -kv[1].total)
    top = timed[:12]
    fig = figure_cls(figsize=PAGE)
    ax_box = fig.add_subplot(1, 2, 1)
    data = [np.maximum(np.frombuffer(a.durations, dtype=np.float64), 1e-7) for _, a in top]
    try:
        ax_box.boxplot(data, orientation="horizontal", showfliers=False, whis=(1, 99))
    except TypeError:  # matplotlib < 3.10
        ax_box.boxplot(data, vert=False, showfliers=False, whis=(1, 99))
    ax_box.set_yticks(range(1, len(top) + 1))
    ax_box.set_yticklabels([name[:28] for name, _ in top], fontsize=7)
    ax_box.set_xscale("log")
    ax_box.invert_yaxis()
    ax_box.set_xlabel("task duration (s), whiskers p1–p99")
    ax_box.set_title("Duration distribution per activity")
    ax_bar = fig.add_subplot(1, 2, 2)
    ax_bar.barh(range(len(top)), [a.total for _, a in top], color="tab:blue")
    for i, (_, a) in enumerate(top):
        ax_bar.text(a.total, i, f" {a.count} tasks" + (f", {a.errors} failed" if a.errors else ""),
                    va="center", fontsize=7)
    ax_bar.set_yticks(range(len(top)))
    ax_bar.set_yticklabels([])
    ax_bar.invert_yaxis()
    ax_bar.set_xlabel("total time (s)")
    ax_bar.set_title("Total time and count per activity")
    fig.subplots_adjust(left=0.18, wspace=0.05, right=0.92)
    return fig


# -- telemetry ------------------------------------------------------------------------------------------

def _series_panel(ax: Any, series_by_name: Any, field: str, t0: float, scale: float, ylabel: str) -> bool:
    """Lines (few series) or a heatmap (many) of one field over time; False when no data."""
    import numpy as np

    items = [(name, s) for name, s in series_by_name if field in s.values and len(s.t)]
    if not items:
        ax.set_axis_off()
        return False
    if len(items) <= MAX_LINES:
        for name, s in items:
            t = np.frombuffer(s.t, dtype=np.float64) - t0
            v = np.frombuffer(s.values[field], dtype=np.float64) * scale
            ax.plot(t, v, linewidth=1.0, label=str(name)[:30])
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_ylabel(ylabel)
        return True
    t_max = max(float(np.frombuffer(s.t, dtype=np.float64).max()) for _, s in items) - t0
    # No more bins than samples per series, so a 1 Hz series over a minute has no empty columns.
    bins = max(1, min(200, max(len(s.t) for _, s in items)))
    grid = np.full((len(items), bins), np.nan)
    for row, (_, s) in enumerate(items):
        t = np.frombuffer(s.t, dtype=np.float64) - t0
        v = np.frombuffer(s.values[field], dtype=np.float64) * scale
        idx = np.clip((t / max(t_max, 1e-9) * bins).astype(np.int64), 0, bins - 1)
        sums = np.bincount(idx, weights=np.nan_to_num(v), minlength=bins)
        counts = np.bincount(idx, weights=(~np.isnan(v)).astype(float), minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            grid[row] = np.where(counts > 0, sums / counts, np.nan)
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", extent=(0, t_max, len(items) - 0.5, -0.5))
    step = max(1, len(items) // 24)
    ax.set_yticks(range(0, len(items), step))
    ax.set_yticklabels([str(items[i][0])[:20] for i in range(0, len(items), step)], fontsize=6)
    ax.figure.colorbar(image, ax=ax, label=ylabel)
    return True


def _node_page(figure_cls: Any, summary: Summary) -> Any:
    if not summary.node_series:
        return None
    fig = figure_cls(figsize=PAGE)
    named = sorted(summary.node_series.items(), key=lambda kv: natural_key(kv[0]))
    t0 = summary.t_min
    ax_cpu = fig.add_subplot(2, 1, 1)
    got_cpu = _series_panel(ax_cpu, named, "cpu_percent", t0, 1.0, "CPU %")
    ax_cpu.set_title(f"Per-node CPU and memory ({len(named)} nodes)")
    ax_mem = fig.add_subplot(2, 1, 2, sharex=ax_cpu if got_cpu else None)
    got_mem = _series_panel(ax_mem, named, "memory_used_bytes", t0, 1.0 / 2**30, "memory used (GiB)")
    if not got_mem:
        ax_mem.set_axis_on()
        got_mem = _series_panel(ax_mem, named, "memory_percent", t0, 1.0, "memory %")
    ax_mem.set_xlabel("seconds since start")
    if not (got_cpu or got_mem):
        return None
    fig.subplots_adjust(right=0.82, hspace=0.25)
    return fig


def _gpu_page(figure_cls: Any, summary: Summary) -> Any:
    if not summary.gpu_series:
        return None
    fig = figure_cls(figsize=PAGE)
    keys = sorted(summary.gpu_names(), key=lambda hg: (natural_key(hg[0]), natural_key(hg[1])))
    named = [(f"{host}/gpu{gpu}", summary.gpu_series[(host, gpu)]) for host, gpu in keys]
    t0 = summary.t_min
    panels = (("gpu_utilization_percent", 1.0, "utilisation %"),
              ("gpu_memory_used_bytes", 1.0 / 2**30, "memory used (GiB)"),
              ("gpu_power_watts", 1.0, "power (W)"))
    drawn = 0
    first = None
    for i, (field, scale, label) in enumerate(panels):
        ax = fig.add_subplot(3, 1, i + 1, sharex=first)
        if _series_panel(ax, named, field, t0, scale, label):
            drawn += 1
            first = first or ax
        if i == 0:
            ax.set_title(f"Per-GPU utilisation, memory and power ({len(named)} GPUs)")
    if not drawn:
        return None
    fig.axes[-1].set_xlabel("seconds since start")
    fig.subplots_adjust(right=0.82, hspace=0.3)
    return fig
