"""Measuring what VideoNSA's attention does on one prompt: gates, attention budget, attention sinks, selected frames.

    from videonsa.analysis import analyze
    result = analyze(model, inputs, queries=[-1])     # inputs: the processor's output for ONE prompt
    result.gate_means()                               # [layers, heads, 3] mean gate (cmp, slc, swa)
    result.budget_summary()                           # keys attended per query vs dense
    result.sink_ratio()                               # fraction of (query, head) pairs with a sink
    result.selected_frames()                          # blocks picked for the query, as frames and seconds

Every quantity is measured with the attention function the model runs (``nsa_kernels``), the mixed path's inputs
masked by ``nsa_kernels.reference.mask_mixed_inputs``. The definitions (vision queries, mean gate, budget, sink,
selected frames) are this package's own; ``docs/analysis.md`` states them and how they relate to the paper's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nsa_kernels.reference import next_pow2
from ..long_context import DEFAULT_CHUNK_SIZE, chunked_prefill

BRANCHES = ("compression", "selection", "window")
SINK_COLUMNS = BRANCHES + ("gated",)
DEFAULT_SINK_THRESHOLD = 0.3
PAPER_CONTEXT = 131072


# ----------------------------------------------------------------------------------------------------------
# Pure helpers (no model)
# ----------------------------------------------------------------------------------------------------------
def _budget(pos: torch.Tensor, selection: torch.Tensor, num_keys: int, block_size: int, window_size: int) -> dict:
    """Keys read by each branch for queries at ``pos`` (``[N]`` long) given the selection's keys (``[N]``):
    compressed blocks from the query's own to the last, selected tokens, window keys; their total and the dense
    count ``t + 1``, all float64 ``[N]``."""
    compression = (-(-num_keys // block_size) - pos // block_size).double()
    window = torch.clamp(pos + 1, max=window_size).double()
    selection = selection.double()
    return dict(compression=compression, selection=selection, window=window, total=compression + selection + window,
                dense=(pos + 1).double())


def budget_from_block_indices(
    block_indices: torch.Tensor, positions: torch.Tensor, num_keys: int, block_size: int, window_size: int
) -> dict[str, torch.Tensor]:
    """Keys read per query by each branch (see the module docs), from the selection's block indices.

    Args:
        block_indices: int ``[N, Hkv, S]`` blocks kept for each query (-1 = empty slot), as the NSA function
            returns them (``nsa_attention(..., return_intermediates=True)["block_indices"][0, rows]``).
        positions: ``[N]`` positions of the queries in the pass.
        num_keys: length of the pass.

    Returns:
        float64 ``[N]`` tensors ``compression``, ``selection`` (mean over kv heads), ``window``, ``total`` and
        ``dense`` (``t + 1``).
    """
    pos = positions.to(torch.long)
    idx = block_indices.to(torch.long)
    start = idx * block_size
    valid = (idx >= 0) & (start <= pos[:, None, None])
    tokens = torch.clamp(pos[:, None, None] - start + 1, max=block_size)
    selection = torch.where(valid, tokens, 0).sum(dim=-1).double().mean(dim=-1)
    return _budget(pos, selection, num_keys, block_size, window_size)


def _budget_ratios(budget: dict[str, torch.Tensor]) -> dict[str, float]:
    ratio = budget["total"] / budget["dense"]
    return dict(
        total_ratio=float(budget["total"].sum() / budget["dense"].sum()),
        mean_ratio=float(ratio.mean()),
        last_query_ratio=float(ratio[-1]),
        last_query_keys=float(budget["total"][-1]),
        last_query_dense_keys=float(budget["dense"][-1]),
    )


def nominal_budget(length: int, block_size: int = 64, block_count: int = 32, window_size: int = 256) -> dict:
    """The attention budget of an all-video pass of ``length`` tokens, assuming every query keeps its own block.

    Returns the ratios of :meth:`VideoNSAAnalysis.budget_summary` (``total_ratio``, ``mean_ratio``,
    ``last_query_ratio``, ``last_query_keys``) and the per-branch keys of the last query.
    """
    pos = torch.arange(length, dtype=torch.long)
    slots = next_pow2(block_count)
    block = pos // block_size
    selection = torch.where(block < slots, pos + 1, (slots - 1) * block_size + pos % block_size + 1)
    budget = _budget(pos, selection, length, block_size, window_size)
    summary = _budget_ratios(budget)
    summary.update(length=int(length), last_query={name: float(budget[name][-1]) for name in BRANCHES})
    # The paper's prose has compression attend the query's own and EARLIER blocks: the last query would then read
    # every compressed block, all selected tokens and the window.
    num_blocks = -(-length // block_size)
    summary["paper_prose_last_query_ratio"] = (
        num_blocks + min(length, slots * block_size) + min(window_size, length)
    ) / length
    return summary


@dataclass
class VideoSpan:
    """Where one video's tokens sit in the prompt."""

    index: int
    start: int  # position of its first video token
    num_tokens: int
    grid_thw: tuple[int, int, int]
    tokens_per_step: int  # tokens of one temporal patch
    temporal_patch_size: int
    timestamps: list[float] | None = None  # seconds of each sampled frame
    source_frames: list[int] | None = None  # source-frame number of each sampled frame

    @property
    def stop(self) -> int:
        return self.start + self.num_tokens

    def step_of(self, position: int) -> int:
        """Temporal patch holding the token at ``position``."""
        return (position - self.start) // self.tokens_per_step

    def frames_of_step(self, step: int) -> list[int]:
        """Sampled-frame numbers of temporal patch ``step`` (the processor pads a short last patch by repeating
        the last frame, so numbers past the last sampled frame are dropped)."""
        frames = range(step * self.temporal_patch_size, (step + 1) * self.temporal_patch_size)
        count = len(self.timestamps) if self.timestamps is not None else None
        return [f for f in frames if count is None or f < count] or ([count - 1] if count else [])

    def step_time(self, step: int) -> float | None:
        frames = self.frames_of_step(step)
        if self.timestamps is None or not frames:
            return None
        return float(self.timestamps[frames[0]])


def video_spans(input_ids, video_grid_thw, *, video_token_id: int, spatial_merge_size: int = 2,
                temporal_patch_size: int = 2, second_per_grid_ts=None, plans=None) -> list[VideoSpan]:
    """The videos of a one-sample prompt: token ranges (runs of ``video_token_id``, in ``video_grid_thw`` order)
    and frame timestamps, from the processor's ``plan_videos`` when ``plans`` are given, otherwise from
    ``second_per_grid_ts`` (seconds per temporal patch), otherwise none."""
    ids = torch.as_tensor(input_ids).reshape(-1)
    is_video = (ids == video_token_id).to(torch.int8)
    edges = torch.diff(F.pad(is_video, (1, 1)))
    starts = torch.nonzero(edges == 1).flatten().tolist()
    stops = torch.nonzero(edges == -1).flatten().tolist()
    grids = [] if video_grid_thw is None else [tuple(int(x) for x in row) for row in torch.as_tensor(video_grid_thw)]
    if len(starts) != len(grids):
        raise ValueError(f"the prompt has {len(starts)} runs of video tokens but video_grid_thw has {len(grids)} rows")
    spans = []
    for index, (start, stop, grid) in enumerate(zip(starts, stops, grids)):
        per_step = grid[1] * grid[2] // spatial_merge_size**2
        if stop - start != grid[0] * per_step:
            raise ValueError(f"video {index}: {stop - start} tokens in the prompt, {grid[0] * per_step} in its grid")
        timestamps = frames = None
        if plans is not None and index < len(plans) and plans[index].timestamps is not None:
            timestamps, frames = list(plans[index].timestamps), list(plans[index].frame_indices)
        elif second_per_grid_ts is not None:
            seconds = float(torch.as_tensor(second_per_grid_ts).reshape(-1)[index]) / temporal_patch_size
            timestamps = [f * seconds for f in range(grid[0] * temporal_patch_size)]
        spans.append(VideoSpan(index, start, stop - start, grid, per_step, temporal_patch_size, timestamps, frames))
    return spans


def block_to_frames(block: int, spans: list[VideoSpan], block_size: int) -> list[dict]:
    """The video frames whose tokens lie in NSA block ``block`` (tokens ``block*block_size ...``): one entry per
    overlapped (video, temporal patch), with sampled-frame numbers, source-frame numbers and seconds."""
    first, last = block * block_size, (block + 1) * block_size - 1
    found = []
    for span in spans:
        lo, hi = max(first, span.start), min(last, span.stop - 1)
        for step in range(span.step_of(lo), span.step_of(hi) + 1) if lo <= hi else ():
            frames = span.frames_of_step(step)
            found.append(dict(
                video=span.index,
                temporal_patch=step,
                frames=frames,
                source_frames=[span.source_frames[f] for f in frames] if span.source_frames else None,
                timestamps=[round(float(span.timestamps[f]), 4) for f in frames] if span.timestamps else None,
            ))
    return found


# ----------------------------------------------------------------------------------------------------------
# The analysis pass
# ----------------------------------------------------------------------------------------------------------
@dataclass
class VideoNSAAnalysis:
    """Everything measured in one analysis pass (one prompt). Tensors are on the CPU.

    ``layers`` lists the text layers where the hybrid attention ran; the first axis of every per-layer tensor
    follows it. ``H`` is the number of query heads, ``N`` the number of vision queries.
    """

    num_tokens: int
    block_size: int
    block_count: int
    window_size: int
    vision_positions: torch.Tensor  # [N]
    layers: list[int]
    gates: torch.Tensor  # [L, H, 3] mean gate (cmp, slc, swa) over vision queries
    budget_selection: torch.Tensor  # [L, N] tokens read by the selection branch (mean over kv heads)
    sink: str
    sink_threshold: float
    sink_weight_mean: torch.Tensor  # [L, H, 4] mean weight on the sink (cmp, slc, swa, gated)
    sink_count: torch.Tensor  # [L, H, 4] vision queries whose weight exceeds the threshold
    block_frequency: torch.Tensor  # [L, num_blocks] share of the (vision query, kv head) pairs at or after a block
    # that kept it
    query_positions: list[int]
    default_query: int
    query_blocks: dict[int, torch.Tensor]  # position -> int [L, Hkv, S] blocks kept (score order, -1 empty)
    spans: list[VideoSpan] = field(default_factory=list)
    dense_sink_weight_mean: torch.Tensor | None = None  # [L, H]
    dense_sink_count: torch.Tensor | None = None  # [L, H]
    sink_weights: torch.Tensor | None = None  # [L, N, H, 4] per query (keep_per_query=True)
    dense_sink_weights: torch.Tensor | None = None  # [L, N, H] (keep_per_query and compare_dense)

    # -- gates
    def gate_means(self) -> torch.Tensor:
        """``[layers, heads, 3]`` mean gate of (compression, selection, window) over the vision queries."""
        return self.gates

    # -- budget
    def budget(self) -> dict[str, torch.Tensor]:
        """Per vision query (``[N]``, selection averaged over layers): keys read by each branch, total, dense."""
        return _budget(self.vision_positions, self.budget_selection.mean(dim=0), self.num_tokens, self.block_size,
                       self.window_size)

    def budget_summary(self) -> dict:
        """Budget ratios vs dense (see the module docs) on this input, and the nominal ones at this length and at
        128K tokens."""
        budget = self.budget()
        summary = _budget_ratios(budget)
        fixed = budget["compression"] + budget["window"]  # the same in every layer; selection is per layer
        summary["per_layer_total_ratio"] = [
            float((fixed + self.budget_selection[i]).sum() / budget["dense"].sum()) for i in range(len(self.layers))
        ]
        config = (self.block_size, self.block_count, self.window_size)
        summary["nominal_this_length"] = nominal_budget(self.num_tokens, *config)
        summary[f"nominal_{PAPER_CONTEXT}"] = nominal_budget(PAPER_CONTEXT, *config)
        return summary

    # -- sinks
    def sink_ratio(self, branch: str = "gated", per_layer: bool = False):
        """Fraction of (vision query, head) pairs whose weight on the sink exceeds ``sink_threshold``, for one
        of ``"compression"``, ``"selection"``, ``"window"``, ``"gated"`` (the gate-mixed NSA output) or
        ``"dense"`` (needs ``compare_dense=True``). ``per_layer=True`` gives one value per analysed layer."""
        if branch == "dense":
            if self.dense_sink_count is None:
                raise ValueError("run analyze(..., compare_dense=True) to measure dense attention's sinks")
            counts = self.dense_sink_count
        else:
            counts = self.sink_count[..., SINK_COLUMNS.index(branch)]
        pairs = len(self.vision_positions) * counts.shape[1]
        if per_layer:
            return [float(c) / pairs for c in counts.sum(dim=1)]
        return float(counts.sum()) / (pairs * counts.shape[0])

    # -- selection
    def selected_frames(self, query: int | None = None) -> dict:
        """The blocks the selection branch kept for ``query`` (a position given to ``analyze``; default the
        first one given, else the last vision token), per layer and kv head, in score order, each with its frames
        and timestamps."""
        query = self.default_query if query is None else self._query(query)
        blocks = self.query_blocks[query]
        layers = []
        for li, layer in enumerate(self.layers):
            heads = []
            for head in range(blocks.shape[1]):
                kept = [int(b) for b in blocks[li, head] if b >= 0]
                heads.append([dict(block=b, frames=block_to_frames(b, self.spans, self.block_size)) for b in kept])
            layers.append(dict(layer=layer, kv_heads=heads))
        where = [s for s in self.spans if s.start <= query < s.stop]
        info = dict(position=query)
        if where:
            step = where[0].step_of(query)
            info.update(video=where[0].index, temporal_patch=step, time=where[0].step_time(step))
        return dict(query=info, layers=layers)

    def _query(self, query: int) -> int:
        if query < 0:
            query += self.num_tokens
        if query not in self.query_blocks:
            raise KeyError(f"position {query} was not among analyze(queries=...): {self.query_positions}")
        return query

    def step_selection(self, query: int | None = None) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """``(steps, share)``: every (video, temporal patch) of the prompt and, per analysed layer, the share of
        kv heads whose kept blocks overlap it, for ``query`` (``[L, steps]``)."""
        query = self.default_query if query is None else self._query(query)
        steps = [(s.index, t) for s in self.spans for t in range(s.grid_thw[0])]
        share = torch.zeros(len(self.layers), len(steps))
        column = {key: i for i, key in enumerate(steps)}
        blocks = self.query_blocks[query]
        for li in range(len(self.layers)):
            for head in range(blocks.shape[1]):
                hit = set()
                for b in blocks[li, head].tolist():
                    if b >= 0:
                        frames = block_to_frames(b, self.spans, self.block_size)
                        hit.update((f["video"], f["temporal_patch"]) for f in frames)
                for key in hit:
                    share[li, column[key]] += 1.0 / blocks.shape[1]
        return steps, share

    def step_frequency(self) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """``(steps, frequency)``: per (video, temporal patch), the mean over its blocks of the share of the (vision
        query, kv head) pairs at or after the block that kept it, per analysed layer (``[L, steps]``)."""
        steps = [(s.index, t) for s in self.spans for t in range(s.grid_thw[0])]
        frequency = torch.zeros(len(self.layers), len(steps))
        for i, (video, step) in enumerate(steps):
            span = self.spans[video]
            first = span.start + step * span.tokens_per_step
            last = first + span.tokens_per_step - 1
            blocks = list(range(first // self.block_size, last // self.block_size + 1))
            frequency[:, i] = self.block_frequency[:, blocks].mean(dim=1)
        return steps, frequency

    # -- report
    def summary(self) -> dict:
        """A JSON-serialisable summary of everything above."""
        gates = self.gates
        out = dict(
            num_tokens=self.num_tokens,
            num_vision_queries=len(self.vision_positions),
            nsa=dict(block_size=self.block_size, block_count=self.block_count, window_size=self.window_size),
            layers=self.layers,
            gates=dict(
                branches=list(BRANCHES),
                mean=dict(zip(BRANCHES, gates.mean(dim=(0, 1)).tolist())),
                per_layer=dict(zip(BRANCHES, gates.mean(dim=1).T.tolist())),
                per_layer_head=gates.tolist(),
            ),
            budget=self.budget_summary(),
            sinks=dict(
                sink=self.sink,
                threshold=self.sink_threshold,
                ratio={b: self.sink_ratio(b) for b in SINK_COLUMNS},
                per_layer={b: self.sink_ratio(b, per_layer=True) for b in SINK_COLUMNS},
                mean_weight={b: float(self.sink_weight_mean[..., i].mean()) for i, b in enumerate(SINK_COLUMNS)},
            ),
            videos=[dict(index=s.index, start=s.start, num_tokens=s.num_tokens, grid_thw=list(s.grid_thw),
                         seconds=[s.timestamps[0], s.timestamps[-1]] if s.timestamps else None) for s in self.spans],
            selection={str(q): self.selected_frames(q) for q in self.query_positions},
        )
        if self.dense_sink_count is not None:
            out["sinks"]["ratio"]["dense"] = self.sink_ratio("dense")
            out["sinks"]["per_layer"]["dense"] = self.sink_ratio("dense", per_layer=True)
            out["sinks"]["mean_weight"]["dense"] = float(self.dense_sink_weight_mean.mean())
        return out


class _Recorder:
    """Forward hooks on every ``VideoNSAAttention``: recompute the layer's NSA inputs from the hook's arguments
    (the layer's own projections, RoPE and gate MLP) and measure them with the model's own NSA function."""

    def __init__(self, *, queries, sink, sink_threshold, compare_dense, keep_per_query):
        self.queries = queries
        self.sink = sink
        self.threshold = float(sink_threshold)
        self.compare_dense = compare_dense
        self.keep = keep_per_query
        self.layers: dict[int, dict] = {}
        self.vision_positions = None
        self.num_tokens = None
        self.default_query = None

    def __call__(self, module, args, kwargs, output):
        if not str(module.last_path).startswith("hybrid"):
            return
        with torch.no_grad():
            self.layers[module.layer_idx] = self._measure(module, kwargs)

    def _measure(self, attn, kwargs) -> dict:
        modeling = sys.modules[type(attn).__module__]
        kernels = modeling.load_nsa_kernels(attn.config)
        config = attn.config
        hidden = kwargs["hidden_states"]
        tokens = kwargs["videonsa_tokens"]
        batch, length, _ = hidden.shape
        if batch != 1 or tokens.key_padding_mask is not None or tokens.is_vision.shape[1] != length:
            raise ValueError("analyze takes one prompt (batch 1, no padding) prefilled in one pass")
        # the layer's q/k/v and gate logits, as VideoNSAAttention.forward computes them
        q, k, _ = attn.project_qkv(hidden, kwargs["position_embeddings"])
        logits = attn.gate_logits(hidden)
        vision = tokens.is_vision[0]
        num_heads, kv_heads = q.shape[1], k.shape[1]
        q_nsa, k_nsa = q.transpose(1, 2), k.transpose(1, 2)
        if not bool(vision.all()):  # the mixed path's NSA inputs, masked as the attention masks them
            q_nsa, k_nsa, _, logits = kernels.reference.mask_mixed_inputs(q_nsa, k_nsa, None, logits, vision, vision)
        gates = torch.sigmoid(logits)
        # the indicator of the sink as values: each branch's output is then its weight on the sink
        indicator = torch.zeros(1, length, kv_heads, attn.head_dim, dtype=q.dtype, device=q.device)
        indicator[:, : (1 if self.sink == "token" else config.nsa_block_size)] = 1
        padded, _ = kernels.nsa_head_layout(num_heads, kv_heads)
        ops = kernels.resolve_backend(config.nsa_backend, q.device)
        out, extra = ops.nsa_attention(
            kernels.reference.pad_heads(q_nsa, padded), k_nsa, indicator, kernels.reference.pad_heads(gates, padded),
            block_count=config.nsa_block_count, block_size=config.nsa_block_size,
            window_size=config.nsa_window_size, scale=attn.scaling, return_intermediates=True,
        )
        rows = torch.nonzero(vision).flatten()
        fold = kernels.reference.fold_heads
        branch = [fold(extra[name], num_heads)[0, rows, :, 0].float() for name in ("o_cmp", "o_slc", "o_swd")]
        gate_rows = gates[0, rows].float()  # [N, H, 3]
        gated = fold(out, num_heads)[0, rows, :, 0].float() / gate_rows.sum(dim=-1)
        weights = torch.stack(branch + [gated], dim=-1)  # [N, H, 4]
        block_indices = extra["block_indices"][0]  # [T, Hkv, S]
        budget = budget_from_block_indices(block_indices[rows], rows, length, config.nsa_block_size,
                                           config.nsa_window_size)
        num_blocks = -(-length // config.nsa_block_size)
        kept = block_indices[rows].long()
        counts = torch.bincount(kept[kept >= 0].flatten(), minlength=num_blocks).double()
        # candidates: (query, kv head) pairs at or after the block (selection only looks back)
        candidates = torch.bincount(rows // config.nsa_block_size, minlength=num_blocks).flip(0).cumsum(0).flip(0)
        candidates = candidates.double() * kv_heads
        result = dict(
            gates=gate_rows.mean(dim=0).cpu(),
            budget_selection=budget["selection"].cpu(),
            sink_weight_mean=weights.mean(dim=0).cpu(),
            sink_count=(weights > self.threshold).sum(dim=0).cpu(),
            block_frequency=(counts / candidates.clamp_min(1)).cpu(),
            query_blocks={p: block_indices[p].cpu() for p in self.queries(length, rows)},
        )
        if self.keep:
            result["sink_weights"] = weights.cpu()
        if self.compare_dense:
            dense = F.scaled_dot_product_attention(
                q, k, indicator.transpose(1, 2), is_causal=True, scale=attn.scaling, enable_gqa=True
            )[0, :, rows, 0].float().T  # [N, H]
            result.update(dense_sink_weight_mean=dense.mean(dim=0).cpu(),
                          dense_sink_count=(dense > self.threshold).sum(dim=0).cpu())
            if self.keep:
                result["dense_sink_weights"] = dense.cpu()
        self.vision_positions, self.num_tokens = rows.cpu(), length
        return result


def analyze(
    model,
    inputs: dict,
    *,
    queries=None,
    query_times=None,
    sink: str = "token",
    sink_threshold: float = DEFAULT_SINK_THRESHOLD,
    compare_dense: bool = False,
    plans=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep_per_query: bool = False,
) -> VideoNSAAnalysis:
    """Run one prefill of ``inputs`` (one prompt, as the processor returns it) and measure the attention.

    Args:
        queries: positions whose selected blocks are kept (negative counts from the end), besides the last
            vision token, which is always kept; the first one given is the default of ``selected_frames`` and of
            the plot (else the last vision token). Positions of text tokens are allowed (their NSA queries are
            zero in the released function, so their selection is decided by ties).
        query_times: seconds into the first video; each adds the last vision token of the temporal patch that
            covers it (needs timestamps: ``plans`` or ``second_per_grid_ts`` in ``inputs``).
        sink: ``"token"`` (the first key of the sequence) or ``"block"`` (the first NSA block).
        sink_threshold: a (query, head) pair has a sink when its weight on the sink exceeds this.
        compare_dense: also measure dense causal attention's weight on the sink on the same layer inputs.
        plans: ``processor.plan_videos(videos)``, for source-frame numbers and exact timestamps.
        chunk_size: piece size of the prefill (:func:`videonsa.long_context.chunked_prefill`).
        keep_per_query: keep every vision query's sink weights (``[L, N, H, 4]``; large for long videos).
    """
    if sink not in ("token", "block"):
        raise ValueError(f"sink must be 'token' or 'block', got {sink!r}")
    if not 0 < float(sink_threshold) < 1:
        raise ValueError(f"sink_threshold must be in (0, 1), got {sink_threshold}")
    input_ids = inputs.get("input_ids")
    if input_ids is None or input_ids.shape[0] != 1:
        raise ValueError("analyze takes the processor's output for one prompt (input_ids of batch 1)")
    config = model.config
    vision_config = config.vision_config
    spans = video_spans(
        input_ids[0], inputs.get("video_grid_thw"), video_token_id=config.video_token_id,
        spatial_merge_size=vision_config.spatial_merge_size, temporal_patch_size=vision_config.temporal_patch_size,
        second_per_grid_ts=inputs.get("second_per_grid_ts"), plans=plans,
    ) if inputs.get("video_grid_thw") is not None else []
    wanted = [int(q) for q in (queries or [])]
    for seconds in query_times or []:
        if not spans or spans[0].timestamps is None:
            raise ValueError("query_times needs frame timestamps: pass plans= or inputs with second_per_grid_ts")
        span = spans[0]
        steps = [t for t in range(span.grid_thw[0]) if (span.step_time(t) or 0.0) <= float(seconds)] or [0]
        wanted.append(span.start + (steps[-1] + 1) * span.tokens_per_step - 1)

    def choose(length, vision_rows):
        requested = [q + length if q < 0 else q for q in wanted]
        for q in requested:
            if not 0 <= q < length:
                raise ValueError(f"query position {q} is outside the prompt of {length} tokens")
        recorder.default_query = requested[0] if requested else int(vision_rows[-1])
        return sorted(set(requested + [int(vision_rows[-1])]))

    recorder = _Recorder(queries=choose, sink=sink, sink_threshold=sink_threshold,
                         compare_dense=compare_dense, keep_per_query=keep_per_query)
    handles = [layer.self_attn.register_forward_hook(recorder, with_kwargs=True)
               for layer in model.model.language_model.layers]
    try:
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")
        chunked_prefill(model, chunk_size=chunk_size, **{k: inputs[k] for k in keys if inputs.get(k) is not None})
    finally:
        for handle in handles:
            handle.remove()
    if not recorder.layers:
        raise ValueError(
            "no layer ran the hybrid attention on this input (no vision token, or nsa_enabled=False): nothing to "
            "analyse"
        )
    layers = sorted(recorder.layers)
    per = [recorder.layers[i] for i in layers]

    def stack(name):
        return torch.stack([p[name] for p in per]) if name in per[0] else None

    text = config.text_config
    query_positions = sorted(per[0]["query_blocks"])
    return VideoNSAAnalysis(
        num_tokens=recorder.num_tokens,
        block_size=text.nsa_block_size,
        block_count=text.nsa_block_count,
        window_size=text.nsa_window_size,
        vision_positions=recorder.vision_positions,
        layers=layers,
        gates=stack("gates"),
        budget_selection=stack("budget_selection"),
        sink=sink,
        sink_threshold=float(sink_threshold),
        sink_weight_mean=stack("sink_weight_mean"),
        sink_count=stack("sink_count"),
        block_frequency=stack("block_frequency"),
        query_positions=query_positions,
        default_query=recorder.default_query,
        query_blocks={q: torch.stack([p["query_blocks"][q] for p in per]) for q in query_positions},
        spans=spans,
        dense_sink_weight_mean=stack("dense_sink_weight_mean"),
        dense_sink_count=stack("dense_sink_count"),
        sink_weights=stack("sink_weights"),
        dense_sink_weights=stack("dense_sink_weights"),
    )
