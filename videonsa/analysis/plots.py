"""Plots of an analysis (matplotlib's object API on the Agg canvas: no display, no global backend change) and the
report folder: ``gates.png``, ``budget.png``, ``selected_frames.png``, ``sinks.png`` and ``summary.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .measure import BRANCHES, PAPER_CONTEXT, SINK_COLUMNS, VideoNSAAnalysis, nominal_budget


_COLORS = {"compression": "#0072B2", "selection": "#D55E00", "window": "#009E73", "gated": "#000000",
           "dense": "#CC79A7"}


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _integer_ticks(axis, which="x"):
    from matplotlib.ticker import MaxNLocator

    (axis.xaxis if which == "x" else axis.yaxis).set_major_locator(MaxNLocator(integer=True))


def _save(figure, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return str(path)


def plot_gates(analysis: VideoNSAAnalysis, path, title: str | None = None) -> str:
    """Mean gate of each branch per layer (lines, with the range over heads) and per layer and head (maps)."""
    gates = analysis.gates.float().numpy()
    layers = analysis.layers
    figure = _figure(12, 7.5)
    grid = figure.add_gridspec(2, 3, height_ratios=[1, 1.25])
    top = figure.add_subplot(grid[0, :])
    for i, name in enumerate(BRANCHES):
        values = gates[:, :, i]
        top.plot(layers, values.mean(axis=1), marker="o", color=_COLORS[name], label=f"{name} (mean over heads)")
        top.fill_between(layers, values.min(axis=1), values.max(axis=1), color=_COLORS[name],
                         alpha=0.15, linewidth=0)
    top.set_xlabel("layer")
    _integer_ticks(top)
    top.set_ylabel("mean gate over vision queries")
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", ncols=3, fontsize=9)
    top.set_title(title or f"VideoNSA gates per layer ({len(analysis.vision_positions)} vision queries; "
                           "shaded: range over heads)")
    image = None
    for i, name in enumerate(BRANCHES):
        axis = figure.add_subplot(grid[1, i])
        image = axis.imshow(gates[:, :, i].T, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                            extent=(layers[0] - 0.5, layers[-1] + 0.5, -0.5, gates.shape[1] - 0.5))
        axis.set_title(f"{name} gate")
        axis.set_xlabel("layer")
        _integer_ticks(axis)
        if i == 0:
            axis.set_ylabel("head")
    figure.colorbar(image, ax=figure.axes[1:], shrink=0.9, label="mean gate")
    return _save(figure, path)


def plot_budget(analysis: VideoNSAAnalysis | None, path, *, block_size=None, block_count=None, window_size=None,
                lengths=None) -> str:
    """Keys read per query as a share of dense attention, vs context length (nominal, all-video pass), with this
    input's measured values; and, when an analysis is given, the keys each branch reads per query on it."""
    if analysis is not None:
        block_size, block_count, window_size = analysis.block_size, analysis.block_count, analysis.window_size
    block_size, block_count, window_size = block_size or 64, block_count or 32, window_size or 256
    measured_length = analysis.num_tokens if analysis is not None else PAPER_CONTEXT
    if lengths is None:
        low = min(10, max(5, int(math.log2(measured_length))))
        high = max(int(math.log2(PAPER_CONTEXT)), math.ceil(math.log2(measured_length)))
        lengths = [1 << p for p in range(low, high + 1)]
    nominal = [nominal_budget(n, block_size, block_count, window_size) for n in lengths]
    figure = _figure(12 if analysis is not None else 7, 4.8)
    axis = figure.add_subplot(1, 2 if analysis is not None else 1, 1)
    axis.plot(lengths, [100 * n["total_ratio"] for n in nominal], marker="o", color="#0072B2",
              label="all queries (attention work)")
    axis.plot(lengths, [100 * n["last_query_ratio"] for n in nominal], marker="s", color="#D55E00",
              label="last query (one new query)")
    if analysis is not None:
        measured = analysis.budget_summary()
        axis.scatter([analysis.num_tokens], [100 * measured["total_ratio"]], s=90, color="#0072B2",
                     edgecolor="black", zorder=5, label="this input: all vision queries")
        axis.scatter([analysis.num_tokens], [100 * measured["last_query_ratio"]], s=90, color="#D55E00",
                     edgecolor="black", marker="s", zorder=5, label="this input: last vision query")
    last = nominal[-1]
    axis.annotate(f"at {lengths[-1]:,} tokens:\nlast query {_percent(last['last_query_ratio'])}\n"
                  f"all queries {_percent(last['total_ratio'])}",
                  (lengths[-1], 100 * last["last_query_ratio"]), textcoords="offset points", xytext=(-190, 45),
                  fontsize=9, bbox=dict(boxstyle="round", fc="white", ec="0.7"),
                  arrowprops=dict(arrowstyle="->", lw=0.8))
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("context length (video tokens)")
    axis.set_ylabel("keys read, % of dense causal attention")
    axis.set_title(f"NSA attention budget (block {block_size}, {block_count} blocks, window {window_size})")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    if analysis is not None:
        budget = analysis.budget()
        pos = analysis.vision_positions.numpy()
        right = figure.add_subplot(1, 2, 2)
        right.stackplot(pos, budget["compression"].numpy(), budget["selection"].numpy(), budget["window"].numpy(),
                        colors=[_COLORS[b] for b in BRANCHES], alpha=0.75, labels=list(BRANCHES))
        right.plot(pos, budget["dense"].numpy(), color="black", linestyle="--", label="dense (t + 1)")
        right.set_xlabel("query position t (vision queries)")
        right.set_ylabel("keys read by the query")
        right.set_title("keys read per vision query on this input")
        right.grid(alpha=0.3)
        right.legend(fontsize=8, loc="upper left")
    return _save(figure, path)


def _percent(ratio: float) -> str:
    value = 100 * ratio
    return f"{value:.2f}%" if value < 10 else f"{value:.1f}%"


def _step_labels(analysis: VideoNSAAnalysis, steps) -> list[str]:
    labels = []
    for video, step in steps:
        seconds = analysis.spans[video].step_time(step)
        prefix = f"v{video} " if len(analysis.spans) > 1 else ""
        labels.append(f"{prefix}{seconds:.1f}s" if seconds is not None else f"{prefix}#{step}")
    return labels


def plot_selected_frames(analysis: VideoNSAAnalysis, path, query: int | None = None) -> str:
    """Which moments of the video the selection branch kept: for one query, per layer (share of kv heads keeping
    each temporal patch), and over all vision queries (share of (query, kv head) pairs, mean over layers)."""
    if not analysis.spans:
        raise ValueError("the prompt has no video: no frames to show")
    steps, share = analysis.step_selection(query)
    _, frequency = analysis.step_frequency()
    info = analysis.selected_frames(query)["query"]
    labels = _step_labels(analysis, steps)
    figure = _figure(max(8, min(20, 0.18 * len(steps) + 4)), 7)
    grid = figure.add_gridspec(2, 1, height_ratios=[2.2, 1])
    top = figure.add_subplot(grid[0])
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    values = share.numpy().copy()
    column = steps.index((info["video"], info["temporal_patch"])) if "temporal_patch" in info else None
    if column is not None:
        values[:, column + 1 :] = np.nan  # after the query: selection never looks ahead
    cmap = colormaps["magma"].with_extremes(bad="0.88")
    image = top.imshow(values, aspect="auto", origin="lower", vmin=0, vmax=1, cmap=cmap, interpolation="nearest",
                       extent=(-0.5, len(steps) - 0.5, analysis.layers[0] - 0.5, analysis.layers[-1] + 0.5))
    figure.colorbar(image, ax=top, label="share of kv heads keeping it")
    when = f" at {info['time']:.1f}s" if info.get("time") is not None else ""
    if column is not None:
        top.axvline(column, color="#56B4E9", linestyle="--", linewidth=1.5, label="the query's own frames")
        handles = [top.get_legend_handles_labels()[0][0], Patch(color="0.88", label="after the query")]
        top.legend(handles=handles, loc="upper left", fontsize=8)
    top.tick_params(labelbottom=False)
    top.set_title(f"Frames kept by the selection branch for the query at position {info['position']}{when}")
    top.set_ylabel("layer")
    _integer_ticks(top, "y")
    bottom = figure.add_subplot(grid[1], sharex=top)
    bottom.bar(range(len(steps)), frequency.mean(dim=0).numpy(), color=_COLORS["selection"], width=0.9)
    bottom.set_ylabel("kept, share of the\n(query, kv head) pairs\nat or after it")
    bottom.set_xlabel("frames (temporal patch start time)")
    stride = max(1, len(steps) // 24)
    bottom.set_xticks(range(0, len(steps), stride), labels[::stride], rotation=60, fontsize=8)
    bottom.set_title("Over all vision queries (mean over layers)")
    bottom.grid(alpha=0.3, axis="y")
    return _save(figure, path)


def plot_sinks(analysis: VideoNSAAnalysis, path) -> str:
    """Sink ratio per layer for each branch and the gated output (and dense attention when measured)."""
    figure = _figure(10, 4.5)
    axis = figure.add_subplot(1, 1, 1)
    names = list(SINK_COLUMNS) + (["dense"] if analysis.dense_sink_count is not None else [])
    for name in names:
        values = [100 * v for v in analysis.sink_ratio(name, per_layer=True)]
        overall = 100 * analysis.sink_ratio(name)
        axis.plot(analysis.layers, values, marker="o", color=_COLORS[name],
                  linestyle="-" if name in ("gated", "dense") else ":", label=f"{name}: {overall:.2f}% overall")
    axis.set_xlabel("layer")
    _integer_ticks(axis)
    axis.set_ylim(0, max([1.0] + [100 * v * 1.15 for n in names for v in analysis.sink_ratio(n, per_layer=True)]))
    axis.set_ylabel("% of (vision query, head) pairs")
    what = "first token" if analysis.sink == "token" else "first block"
    axis.set_title(f"Attention sinks: weight on the {what} > {analysis.sink_threshold:g}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)


def write_report(analysis: VideoNSAAnalysis, out_dir, extra: dict | None = None) -> dict[str, str]:
    """Write the four PNGs and ``summary.json`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(
        gates=plot_gates(analysis, out_dir / "gates.png"),
        budget=plot_budget(analysis, out_dir / "budget.png"),
        sinks=plot_sinks(analysis, out_dir / "sinks.png"),
    )
    if analysis.spans:
        paths["selected_frames"] = plot_selected_frames(analysis, out_dir / "selected_frames.png")
    summary = analysis.summary()
    summary.update(extra or {})
    summary["files"] = {name: Path(p).name for name, p in paths.items()}
    with open(out_dir / "summary.json", "w") as file:
        json.dump(summary, file, indent=1)
    paths["summary"] = str(out_dir / "summary.json")
    return paths

