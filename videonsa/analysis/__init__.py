"""What VideoNSA's attention does on a given video: :mod:`~videonsa.analysis.measure` (gates, attention budget,
sinks, selected frames), :mod:`~videonsa.analysis.plots` (figures and the report folder) and
:mod:`~videonsa.analysis.cli` (``videonsa-analyze``). Definitions: ``docs/analysis.md``."""

from .measure import (BRANCHES, DEFAULT_SINK_THRESHOLD, SINK_COLUMNS, VideoNSAAnalysis, VideoSpan, analyze,
                      block_to_frames, budget_from_block_indices, nominal_budget, video_spans)
from .plots import plot_budget, plot_gates, plot_selected_frames, plot_sinks, write_report

__all__ = [
    "BRANCHES", "DEFAULT_SINK_THRESHOLD", "SINK_COLUMNS", "VideoNSAAnalysis", "VideoSpan", "analyze",
    "block_to_frames", "budget_from_block_indices", "nominal_budget", "plot_budget", "plot_gates",
    "plot_selected_frames", "plot_sinks", "video_spans", "write_report",
]
