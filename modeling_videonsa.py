"""VideoNSA: Qwen2.5-VL whose text decoder runs the hybrid attention of the released checkpoint.

Video tokens go through Native Sparse Attention (compression, top-k block selection, sliding window, mixed per
head by a gate MLP); text tokens keep dense attention. The attention is computed by the bundled ``nsa_kernels``
package (Triton kernels on CUDA, a PyTorch reference elsewhere), which computes exactly the function the weights
were trained with (see ``nsa_kernels/reference.py``).

Everything else (vision tower, MLPs, RoPE, generation utilities) is Qwen2.5-VL's, by subclassing; the vision
tower only batches its attention segments when flash-attn is not used (:class:`VideoNSAVisionAttention`).

How ``nsa_kernels/`` is found when the model is loaded with ``trust_remote_code``: transformers copies only this
file and its single-level relative imports into its dynamic-module cache, so a package folder is never fetched
(transformers issue 29714). :func:`load_nsa_kernels` therefore resolves the folder from where the model was loaded
(the local directory, or the Hub snapshot of the very commit this file came from, through ``huggingface_hub``'s
cache, which also works offline), reads its regular ``.py`` files only, and installs them beside this file in the
dynamic-module cache as ``nsa_kernels_<hash of the files>``, imported as a subpackage: checkpoints that share this
module (same folder name, same code files) still get their own kernels. ``save_pretrained`` writes the code files
and ``nsa_kernels/`` next to the weights.

Supported transformers releases: 5.17 to the newest 5.x (importing with another is an error). The KV cache is taken
as ``cache`` (its name from 5.24 on) or ``past_key_values``; dynamic and static caches work, and decode steps can be
compiled with ``torch.compile(fullgraph=True)`` (a pass with vision tokens cannot: it runs eagerly).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

# The transformers releases this file is tested with: 5.17 (the GPU machine's) up to the newest 5.x. Checked before
# the imports below, which would otherwise fail (or worse, run) with a less helpful message on other releases.
SUPPORTED_TRANSFORMERS = (Version("5.17.0"), Version("6.0.0"))  # [oldest supported, first unsupported)


def check_transformers_version(version: str) -> None:
    """Raise ImportError unless ``version`` (a transformers release, dev builds included) is in the supported range."""
    oldest, first_unsupported = SUPPORTED_TRANSFORMERS
    if not oldest <= Version(Version(version).base_version) < first_unsupported:
        raise ImportError(
            f"VideoNSA's modeling code supports transformers >={oldest},<{first_unsupported}, but transformers "
            f"{version} is installed. Install a supported release: pip install 'transformers>={oldest},"
            f"<{first_unsupported}'."
        )


check_transformers_version(transformers.__version__)

from transformers.cache_utils import DynamicCache, StaticLayer  # noqa: E402 (after the version check)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping  # noqa: E402
from transformers.core_model_loading import WeightRenaming  # noqa: E402
from transformers.generation import GenerationMixin  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLAttention,
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMLP,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLRMSNorm,
    Qwen2_5_VLTextModel,
    Qwen2_5_VLVisionAttention,
    Qwen2_5_VisionPatchEmbed,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
    eager_attention_forward,
)
from transformers.utils import logging  # noqa: E402
from transformers.utils.generic import is_flash_attention_requested  # noqa: E402

try:  # imported by transformers' remote-code loader, as part of a package ...
    from .configuration_videonsa import KERNELS_BINDING, VideoNSAConfig, VideoNSATextConfig
except ImportError:  # ... or from a source checkout on sys.path
    from configuration_videonsa import KERNELS_BINDING, VideoNSAConfig, VideoNSATextConfig

logger = logging.get_logger(__name__)

_CODE_FILES = ("configuration_videonsa.py", "modeling_videonsa.py", "processing_videonsa.py", "video_processing_videonsa.py")
_KERNELS_DIR = "nsa_kernels"


# ----------------------------------------------------------------------------------------------------------
# The bundled kernels package
# ----------------------------------------------------------------------------------------------------------
def _checkpoint_source(name_or_path: str, revision: str) -> Path | None:
    """The folder this model's code came from: a local model directory, or the Hub snapshot of the commit."""
    if name_or_path and os.path.isdir(name_or_path):
        return Path(name_or_path)
    if not name_or_path or not re.fullmatch(r"[0-9a-f]{40}", revision):
        return None
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    try:  # the code files of the same commit as this module, downloaded if needed
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=["*.py", "nsa_kernels/*.py"]))
    except Exception as error:  # noqa: BLE001 - offline, or no network: fall back to the local cache
        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        if isinstance(cached, str):  # older huggingface_hub cannot list a snapshot offline; the cache holds it
            return Path(cached).parent
        logger.warning(f"Could not fetch the code files of {name_or_path}@{revision}: {error}")
        return None


def _hub_blobs(checkpoint: Path) -> Path | None:
    """The blob store of a huggingface_hub cache snapshot (``models--o--n/snapshots/<commit>``), whose files are
    symbolic links into it; None for any other folder."""
    if checkpoint.parent.name == "snapshots" and (checkpoint.parent.parent / "blobs").is_dir():
        return (checkpoint.parent.parent / "blobs").resolve()
    return None


def read_checkpoint_file(path: Path, checkpoint: Path) -> bytes:
    """The bytes of a code file of the checkpoint folder ``checkpoint``, which must be a regular file.

    Symbolic links are refused (they could pull any file of the machine into the module cache and into a saved,
    pushed checkpoint), except the links of a huggingface_hub cache snapshot into its own blob store. Directories,
    FIFOs and other non-files are refused too (a FIFO would block the read)."""
    if path.is_symlink():
        blobs = _hub_blobs(checkpoint)
        target = path.resolve()
        if blobs is None or not target.is_relative_to(blobs) or not target.is_file():
            raise ValueError(
                f"{path} is a symbolic link (to {os.readlink(path)}); VideoNSA loads and saves only regular files of "
                "a checkpoint folder. Replace the link with a copy of the file."
            )
        return target.read_bytes()
    if not path.is_file():
        what = "a directory" if path.is_dir() else "missing" if not path.exists() else "not a regular file"
        raise ValueError(f"{path} is {what}; VideoNSA expects a regular Python file there. Remove or replace it.")
    return path.read_bytes()


def read_kernel_files(folder: Path, checkpoint: Path) -> dict[str, bytes]:
    """``{file name: bytes}`` of the ``*.py`` files of a kernels folder (``checkpoint/nsa_kernels``), each checked by
    :func:`read_checkpoint_file`; other entries (``__pycache__``, notes) are not part of the kernels."""
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(
            f"{folder} is {'a symbolic link' if folder.is_symlink() else 'not a directory'}; VideoNSA's kernels must "
            "be a real folder of .py files in the checkpoint (save_pretrained and push_to_hub.py write one)."
        )
    files = {entry.name: read_checkpoint_file(entry, checkpoint)
             for entry in sorted(folder.iterdir()) if entry.name.endswith(".py")}
    if "__init__.py" not in files:
        raise ImportError(f"{folder} has no __init__.py: it is not VideoNSA's kernels package")
    return files


def kernels_digest(files: dict[str, bytes]) -> str:
    """The content key of a kernels package: a hash of its file names and bytes (16 hex digits)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{len(files[name])}\0".encode())
        digest.update(files[name])
    return digest.hexdigest()[:16]


def _holds_exactly(folder: Path, files: dict[str, bytes]) -> bool:
    """Whether ``folder`` is a real folder whose ``.py`` entries are exactly ``files``, as regular files."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    entries = {entry.name: entry for entry in folder.iterdir() if entry.name.endswith(".py")}
    return entries.keys() == files.keys() and all(
        not entry.is_symlink() and entry.is_file() and entry.read_bytes() == files[name]
        for name, entry in entries.items()
    )


def write_kernel_files(files: dict[str, bytes], target: Path) -> None:
    """Make ``target`` a folder holding exactly ``files`` as regular files: it is written beside and swapped in, so
    no file of an earlier content stays and no link in the way is written through."""
    if _holds_exactly(target, files):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if target.is_symlink() or target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, retired / target.name)
            shutil.rmtree(retired, ignore_errors=True)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not _holds_exactly(target, files):  # not merely another process that wrote the same content first
            raise
    importlib.invalidate_caches()


def _bundled_kernels_module(config) -> str:
    """Resolve, install and name the kernels package of ``config``'s checkpoint.

    From a source checkout it is the sibling ``nsa_kernels``. As a dynamic module of transformers' remote-code
    loader, the checkpoint's ``nsa_kernels/`` (its folder, or the Hub snapshot of this module's commit) is read,
    checked and installed beside this file as ``nsa_kernels_<hash of its files>``: the folder is keyed by the content,
    so checkpoints whose code files are equal (which share this module's folder) still get their own kernels, and
    it holds exactly their files."""
    if not (__package__ or "").startswith("transformers_modules"):
        return f"{__package__}.{_KERNELS_DIR}" if __package__ else _KERNELS_DIR
    here = Path(__file__).resolve().parent
    name_or_path = getattr(config, "name_or_path", "") or ""
    source = _checkpoint_source(name_or_path, here.name)
    if source is None or not ((source / _KERNELS_DIR).exists() or (source / _KERNELS_DIR).is_symlink()):
        raise ImportError(
            f"VideoNSA's attention kernels (nsa_kernels/) were not found in the model's directory or Hub repository "
            f"({name_or_path or 'config.name_or_path is empty'}). Load the model with from_pretrained from a folder "
            "or repo that contains nsa_kernels/ (save_pretrained and push_to_hub.py write it)."
        )
    files = read_kernel_files(source / _KERNELS_DIR, source)
    package = f"{_KERNELS_DIR}_{kernels_digest(files)}"
    write_kernel_files(files, here / package)
    return f"{__package__}.{package}"


def bind_nsa_kernels(config):
    """Resolve the kernels package of ``config``'s checkpoint, import it and bind ``config`` (and its text and vision
    configs) to it; returns the module. Run when a model is built, so that a config reused for another checkpoint
    follows."""
    name = _bundled_kernels_module(config)
    module = importlib.import_module(name)
    for owner in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if owner is not None:
            setattr(owner, KERNELS_BINDING, name)
    return module


def load_nsa_kernels(config=None):
    """The ``nsa_kernels`` module of the model that ``config`` (its config or text config) belongs to.

    A config is bound to its kernels when its model is built (:func:`bind_nsa_kernels`), which makes this a lookup.
    Run from a source checkout the sibling folder is used, and ``config`` may be omitted."""
    if config is None:
        if (__package__ or "").startswith("transformers_modules"):
            raise ValueError("load_nsa_kernels needs the model's config when the model came from remote code: "
                             "checkpoints loaded in one process can carry different kernels")
        return importlib.import_module(_bundled_kernels_module(None))
    name = getattr(config, KERNELS_BINDING, None)
    if name is None:
        return bind_nsa_kernels(config)
    module = sys.modules.get(name)
    return module if module is not None else importlib.import_module(name)


# ----------------------------------------------------------------------------------------------------------
# The KV cache across transformers releases
# ----------------------------------------------------------------------------------------------------------
# transformers 5.24 renamed the forwards' KV-cache argument (and the outputs' field) `past_key_values` -> `cache`,
# keeping the old name as a deprecated alias. The forwards VideoNSA overrides take either name and pass the cache on
# under the installed release's name, CACHE_ARG.
CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2_5_VLTextModel.forward).parameters else "past_key_values"


def resolve_cache(cache, kwargs: dict):
    """The KV cache given as ``cache`` or as ``past_key_values`` (which is removed from ``kwargs``), or None."""
    legacy = kwargs.pop("past_key_values", None)
    if cache is not None and legacy is not None and legacy is not cache:
        raise ValueError(
            "Two different KV caches were passed, as `cache` and as `past_key_values` (its name before transformers "
            "5.24); pass one of them."
        )
    return cache if cache is not None else legacy


def _static_capacity(cache) -> int | None:
    """The positions each layer of a static cache holds (its keys have that length however many are filled), or
    None for a cache whose keys are exactly the tokens seen so far (DynamicCache)."""
    layers = getattr(cache, "layers", None)
    if layers and all(isinstance(layer, StaticLayer) and not layer.is_sliding for layer in layers):
        return layers[0].max_cache_len
    return None


# ----------------------------------------------------------------------------------------------------------
# Token typing, computed once per forward and handed to every layer
# ----------------------------------------------------------------------------------------------------------
@dataclass
class VideoNSATokens:
    """What the layers of a hybrid pass (one with a real vision query) need to know about its tokens.

    Attributes:
        is_vision: bool ``[B, Tk]`` for every key position (cached ones first), from the M-RoPE ids.
        key_padding_mask: bool ``[B, Tk]``, True for real tokens, or None when nothing is padded.
        plan: the hybrid attention's ``HybridPlan`` for the pass's query rows (``nsa_kernels.plan_hybrid``), built
            once here so that no layer waits on the GPU to read it.
    """

    is_vision: torch.Tensor
    key_padding_mask: torch.Tensor | None
    plan: object = None


def _mrope_rows(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The ``[3, B, T]`` (temporal, height, width) rows of Qwen2.5-VL's position ids, or None for text positions
    (1-D ids, or the ``[1, B, T]`` text ids + rope deltas that ``generate`` passes when it continues a cache)."""
    if position_ids is None or position_ids.dim() != 3 or position_ids.shape[0] == 1:
        return None
    return position_ids[1:] if position_ids.shape[0] == 4 else position_ids


def _key_padding_mask(attention_mask, batch: int, num_keys: int, capacity: int | None = None) -> torch.Tensor | None:
    """A bool ``[B, Tk]`` padding mask from a 2-D mask, or from a prepared 4-D causal mask (its last query row sees
    every real key). With a static cache (``capacity`` positions), masks sized to the capacity are accepted: generate
    builds them so, and the positions past the ``num_keys`` filled ones are dropped."""
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention")
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        mask = attention_mask.bool()
    elif attention_mask.dim() == 4:
        last_row = attention_mask[:, 0, -1, :]
        mask = last_row if last_row.dtype == torch.bool else last_row == 0
    else:
        raise ValueError(f"attention_mask must be 2-D [batch, seq_len] or 4-D, got {tuple(attention_mask.shape)}")
    if capacity is not None and mask.shape == (batch, capacity) and capacity >= num_keys:
        mask = mask[:, :num_keys]
    if mask.shape != (batch, num_keys):
        sizes = f"{num_keys}" + ("" if capacity is None else f" (or the static cache's {capacity})")
        raise ValueError(
            f"attention_mask covers {tuple(mask.shape)} positions but the pass has batch {batch} and "
            f"{sizes} key positions (cache + new tokens); pass a mask over the whole sequence"
        )
    return mask if not mask.all() else None


def _remember_token_types(cache, new: torch.Tensor) -> None:
    """Record the vision flags ``new`` (bool ``[B, T]``) of the tokens this pass adds to ``cache``.

    They go to ``cache.videonsa_token_is_vision`` (bool ``[B, positions]``), where later passes read the types of
    the cached keys; it is None when the cache holds tokens VideoNSA did not type (filled by another model). A static
    cache keeps flags for its whole capacity, written in place at the positions its keys go to, without a host sync
    (so a compiled decode step records them too); their first write must be eager.
    """
    flags = getattr(cache, "videonsa_token_is_vision", None)
    past = cache.get_seq_length()  # an int, or a 0-d tensor for static layers
    capacity = _static_capacity(cache)
    if capacity is None:
        if past == 0:
            flags = new
        elif flags is not None and flags.shape[0] == new.shape[0] and flags.shape[1] >= past:
            flags = torch.cat([flags[:, :past], new.to(flags.device)], dim=1)  # (longer after a crop)
        else:
            flags = None
        cache.videonsa_token_is_vision = flags
        return
    if flags is None or flags.shape != (new.shape[0], capacity):
        if torch.compiler.is_compiling() or int(past) > 0:
            cache.videonsa_token_is_vision = None
            return
        flags = torch.zeros(new.shape[0], capacity, dtype=torch.bool, device=new.device)
        cache.videonsa_token_is_vision = flags
    positions = torch.arange(new.shape[1], device=flags.device) + past
    flags.index_copy_(1, positions, new.to(flags.device))


# ----------------------------------------------------------------------------------------------------------
# Attention, decoder layer, text model
# ----------------------------------------------------------------------------------------------------------
def rows_per_piece(config: VideoNSATextConfig, length: int) -> int | None:
    """Rows per piece of a pass of ``length`` tokens: ``config.prefill_chunk_tokens`` when the pass runs in pieces (the
    key is set, no gradients are recorded, and the pass is longer than one piece), else None (one piece)."""
    chunk = config.prefill_chunk_tokens
    if chunk is None or length <= chunk or torch.is_grad_enabled():
        return None
    return chunk


class VideoNSAAttention(Qwen2_5_VLAttention):
    """Qwen2.5-VL's attention plus the gate MLP of VideoNSA.

    ``g_proj_1``: hidden -> hidden (bias), ``g_proj_2``: hidden -> 3 * num_heads (bias); the logits, divided by
    ``nsa_gate_temperature`` and viewed ``[B, T, num_heads, 3]``, gate (compression, selection, window). Passes
    without a vision query (text-only prompts, decode steps) are Qwen2.5-VL's dense attention unchanged.

    Attention weights (``output_attentions``): a dense pass returns Qwen2.5-VL's. A hybrid pass mixes three NSA
    branches per vision query, which have no single weight matrix; it returns the weights of its dense part
    (``[B, heads, Tq, Tk]``: text queries over every key, the zeroed vision queries spread evenly over their causal
    keys), as the model's attention implementation computes them (eager gives them, SDPA gives None, as for
    Qwen2.5-VL). The Triton backend computes that part in its own kernel and has no weights to return: requesting
    them there is an error.
    """

    def __init__(self, config: VideoNSATextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.last_path = None  # "dense" or "hybrid (...)": which attention the last call ran, for inspection
        self.g_proj_1 = nn.Linear(self.hidden_size, self.hidden_size, bias=True)
        self.g_proj_2 = nn.Linear(self.hidden_size, 3 * self.num_heads, bias=True)

    def gate_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, T, hidden]`` -> ``[B, T, num_heads, 3]`` gate logits (before vision masking and sigmoid)."""
        logits = self.g_proj_2(F.gelu(self.g_proj_1(hidden_states)))
        return logits.view(*hidden_states.shape[:2], self.num_heads, 3) / self.config.nsa_gate_temperature

    def project_qkv(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
        """``[B, T, hidden]`` -> query ``[B, Hq, T, D]``, key and value ``[B, Hkv, T, D]``, RoPE applied."""
        shape = (*hidden_states.shape[:2], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if torch.is_autocast_enabled(query.device.type):
            # autocast runs the projections in its low dtype, but RoPE's float32 cos/sin promote query and key
            # back to float32 while value stays low: attend in the autocast dtype, as SDPA does under autocast
            dtype = torch.get_autocast_dtype(query.device.type)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        return query, key, value

    def _project_in_pieces(self, hidden_states, position_embeddings, chunk: int, input_norm=None):
        """:meth:`project_qkv` and :meth:`gate_logits` over row pieces of ``chunk`` tokens written into whole-sequence
        outputs, so that their temporaries (float32 RoPE, the gate MLP's hidden-wide layer) exist for one piece at a
        time; ``input_norm`` (the layer's input norm, when ``hidden_states`` come before it) runs piece by piece too.
        Returns query ``[B, Hq, T, D]``, key, value ``[B, Hkv, T, D]`` and gate logits ``[B, T, Hq, 3]``."""
        batch, length = hidden_states.shape[:2]
        cos, sin = position_embeddings
        outputs = None
        for start in range(0, length, chunk):
            rows = slice(start, start + chunk)
            piece = hidden_states[:, rows] if input_norm is None else input_norm(hidden_states[:, rows])
            q_rows, k_rows, v_rows = self.project_qkv(piece, (cos[:, rows], sin[:, rows]))  # [B, H, rows, D]
            gates = self.gate_logits(piece)
            if outputs is None:
                outputs = [x.new_empty(batch, length, x.shape[1], x.shape[3]).transpose(1, 2)
                           for x in (q_rows, k_rows, v_rows)]
                outputs.append(gates.new_empty(batch, length, *gates.shape[2:]))
            for whole, part in zip(outputs, (q_rows, k_rows, v_rows)):
                whole[:, :, rows] = part
            outputs[3][:, rows] = gates
        return tuple(outputs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        videonsa_tokens: VideoNSATokens | None = None,
        input_norm: nn.Module | None = None,
        **kwargs,
    ):
        """``hidden_states`` ``[B, T, hidden]`` -> (``[B, T, hidden]``, attention weights or None). The KV cache comes
        as ``cache`` or ``past_key_values``; ``videonsa_tokens`` is None for a dense pass. With ``input_norm``,
        ``hidden_states`` are the layer's input before that norm, which a pass in pieces applies piece by piece (no
        normed copy of the whole sequence)."""
        cache = resolve_cache(cache, kwargs)
        if videonsa_tokens is None or not self.config.nsa_enabled:
            self.last_path = "dense"
            if input_norm is not None:
                hidden_states = input_norm(hidden_states)
            return super().forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **{CACHE_ARG: cache},
                **kwargs,
            )
        batch, length, _ = hidden_states.shape
        chunk = rows_per_piece(self.config, length)
        if chunk is not None:
            query, key, value, gate_logits = self._project_in_pieces(hidden_states, position_embeddings, chunk,
                                                                     input_norm)
        else:
            if input_norm is not None:
                hidden_states = input_norm(hidden_states)
            query, key, value = self.project_qkv(hidden_states, position_embeddings)
            gate_logits = self.gate_logits(hidden_states)
        num_keys = videonsa_tokens.is_vision.shape[1]
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            if key.shape[2] != num_keys:
                if _static_capacity(cache) != key.shape[2] or key.shape[2] < num_keys:
                    raise ValueError(
                        f"The {type(cache).__name__} returned {key.shape[2]} key positions for a sequence of "
                        f"{num_keys} tokens; VideoNSA's hybrid attention needs the keys of every position (a "
                        "DynamicCache, or a StaticCache without sliding-window layers)."
                    )
                # a static cache returns its whole buffer: the filled positions come first
                key, value = key[:, :, :num_keys], value[:, :, :num_keys]
                if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
                    attention_mask = attention_mask[..., :num_keys]
        backend = load_nsa_kernels(self.config).resolve_backend(self.config.nsa_backend, query.device)
        dense_kwargs = {}
        weights = {}
        if backend.takes_dense_fn:
            # The dense part goes through the model's attn_implementation (sdpa / eager / flash_attention_2).
            # The Triton backend runs it in its own kernel instead: text rows only, and the zero-query vision
            # rows as running means of the values, which is what attention with a zero query returns.
            dense_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )

            def dense_fn(query_all, zero_rows):
                output, weights["dense"] = dense_interface(
                    self,
                    query_all * ~zero_rows[:, None, :, None],
                    key,
                    value,
                    attention_mask,
                    dropout=0.0 if not self.training else self.attention_dropout,
                    scaling=self.scaling,
                    sliding_window=self.sliding_window,
                    position_ids=position_ids,
                    **kwargs,
                )
                return output

            dense_kwargs["dense_fn"] = dense_fn
        elif kwargs.get("output_attentions") or getattr(self.config, "output_attentions", False):
            raise ValueError(
                "output_attentions was requested on a pass with video, but the Triton backend computes the dense part "
                "of the hybrid attention in its own kernel and returns no weights. Set nsa_backend='torch' and "
                "attn_implementation='eager' to get the dense part's weights."
            )
        dense_name = self.config._attn_implementation if backend.takes_dense_fn else backend.name
        self.last_path = f"hybrid ({backend.name} NSA + {dense_name} dense)"
        output = backend.hybrid_attention(
            query,
            key,
            value,
            gate_logits,
            videonsa_tokens.is_vision,
            videonsa_tokens.key_padding_mask,
            block_size=self.config.nsa_block_size,
            block_count=self.config.nsa_block_count,
            window_size=self.config.nsa_window_size,
            scale=self.scaling,
            query_chunk=self.config.prefill_chunk_tokens,
            plan=videonsa_tokens.plan,
            **dense_kwargs,
        )
        output = output.reshape(batch, length, -1)
        if chunk is None or output.shape[-1] != self.o_proj.out_features or not output.is_contiguous():
            return self.o_proj(output), weights.get("dense")
        for start in range(0, length, chunk):  # in place, a piece at a time: no second tensor of this size
            output[:, start : start + chunk] = self.o_proj(output[:, start : start + chunk])
        return output, weights.get("dense")


class VideoNSADecoderLayer(Qwen2_5_VLDecoderLayer):
    """Qwen2.5-VL's decoder layer with :class:`VideoNSAAttention`; a long pass without gradients can run its
    token-wise parts in chunks (``config.prefill_chunk_tokens``)."""

    def __init__(self, config: VideoNSATextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = VideoNSAAttention(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``hidden_states`` ``[B, T, hidden]`` -> ``[B, T, hidden]``, as Qwen2.5-VL's layer; the KV cache comes as
        ``cache`` or ``past_key_values``.

        With ``config.prefill_chunk_tokens`` set, no gradients and ``T`` above it, the two RMS norms, the residual
        adds and the MLP run over chunks of that many rows (the MLP's ``intermediate_size``-wide activations exist
        for one chunk at a time), while attention sees the whole sequence. With gradients every activation is kept
        for the backward pass whatever the chunking, so the layer then runs unchunked.
        """
        cache = resolve_cache(cache, kwargs)
        chunk = rows_per_piece(self.self_attn.config, hidden_states.shape[1])
        if chunk is None:
            return super().forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **{CACHE_ARG: cache},
                **kwargs,
            )
        length = hidden_states.shape[1]
        # the input norm runs piece by piece inside the attention, with the projections
        output, _ = self.self_attn(
            hidden_states=hidden_states,
            input_norm=self.input_layernorm,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **{CACHE_ARG: cache},
            **kwargs,
        )
        # The attention output is this layer's own tensor: the residual goes into it, leaving the input (which the
        # caller may still hold, e.g. as a recorded hidden state) unchanged.
        output.add_(hidden_states)
        for start in range(0, length, chunk):
            piece = output[:, start : start + chunk]
            piece.add_(self.mlp(self.post_attention_layernorm(piece)))
        return output


class VideoNSAFinalNorm(Qwen2_5_VLRMSNorm):
    """The text decoder's final RMS norm; in a pass in pieces (``config.prefill_chunk_tokens``, no gradients) it runs
    piece by piece, so that its float32 temporaries exist for one piece, not the whole sequence."""

    def __init__(self, config: VideoNSATextConfig):
        super().__init__(config.hidden_size, eps=config.rms_norm_eps)
        self.config = config

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, T, hidden]`` -> ``[B, T, hidden]``."""
        length = hidden_states.shape[1]
        chunk = rows_per_piece(self.config, length)
        if chunk is None:
            return super().forward(hidden_states)
        output = None
        for start in range(0, length, chunk):
            piece = super().forward(hidden_states[:, start : start + chunk])
            if output is None:
                output = piece.new_empty(*hidden_states.shape[:2], piece.shape[2])
            output[:, start : start + chunk] = piece
        return output


class VideoNSATextModel(Qwen2_5_VLTextModel):
    """Qwen2.5-VL's text decoder with :class:`VideoNSADecoderLayer` s; types the tokens once per forward."""

    config_class = VideoNSATextConfig
    config: VideoNSATextConfig

    def __init__(self, config: VideoNSATextConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(
            [VideoNSADecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = VideoNSAFinalNorm(config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        """Qwen2.5-VL's text decoder forward; the KV cache comes as ``cache`` or ``past_key_values``."""
        cache = resolve_cache(cache, kwargs)
        reference_tensor = inputs_embeds if inputs_embeds is not None else input_ids
        if reference_tensor is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        batch, length = reference_tensor.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not torch.jit.is_tracing():
            cache = DynamicCache(config=self.config)
        tokens = self._type_tokens(position_ids, attention_mask, cache, batch, length)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            videonsa_tokens=tokens,
            **{CACHE_ARG: cache},
            **kwargs,
        )

    def _type_tokens(self, position_ids, attention_mask, cache, batch, length) -> VideoNSATokens | None:
        """Type the pass's ``length`` new tokens, remember their types in ``cache``, and return what the hybrid path
        needs, or None when the pass is dense (no real vision token among the new ones).

        Traced by torch.compile, the pass is dense with no host sync: the hybrid attention cannot be traced (it
        compacts each sample's real tokens, a data-dependent shape), so a compiled pass must hold no vision query,
        which is checked on the device. Compile the decode steps (``generate`` runs the prefill eagerly).
        """
        device = self.embed_tokens.weight.device
        rows = _mrope_rows(position_ids)
        new = None if rows is None else load_nsa_kernels(self.config).token_is_vision(rows.to(device))
        if cache is not None:
            _remember_token_types(
                cache, new if new is not None else torch.zeros(batch, length, dtype=torch.bool, device=device)
            )
        if new is None or not self.config.nsa_enabled:
            return None
        if torch.compiler.is_compiling():
            torch._assert_async(
                ~new.any(),
                "A compiled VideoNSA pass got vision tokens: their hybrid attention cannot run in a traced graph. "
                "Run passes with images or videos (the prefill) eagerly and compile only the decode steps.",
            )
            return None
        if not bool(new.any()):  # no vision token at all (every decode step): dense, with one host sync
            return None
        past = int(cache.get_seq_length()) if cache is not None else 0
        padding = _key_padding_mask(attention_mask, batch, past + length, _static_capacity(cache))
        if cache is None:
            is_vision = new
        else:
            is_vision = cache.videonsa_token_is_vision
            if is_vision is None:
                raise ValueError(
                    "This pass adds vision tokens to a cache whose earlier tokens VideoNSA did not type (the cache "
                    "was not filled by this model). Prefill the whole prompt with this model."
                )
            is_vision = is_vision[:, : past + length]
        plan = load_nsa_kernels(self.config).plan_hybrid(is_vision, padding, length)
        if not any(plan.nsa_samples):  # the new vision tokens are all padding: dense
            return None
        return VideoNSATokens(is_vision, padding, plan)


# ----------------------------------------------------------------------------------------------------------
# Vision tower: Qwen2.5-VL's, with its attention segments batched when flash-attn is not used
# ----------------------------------------------------------------------------------------------------------
# Bounds on one batched vision attention call: attention scores (segments x heads x length^2; 2^28 are 1 GiB in
# float32, what the eager path materialises at most) and segments (SDPA's CUDA kernels put the batch on a grid
# axis of at most 65,535 blocks).
_VISION_SCORES_PER_CALL = 2**28
_VISION_SEGMENTS_PER_CALL = 2**15


def _equal_length_segments(cu_seqlens: torch.Tensor, num_heads: int, device: torch.device):
    """Yield ``(rows, length)``: the segments of ``cu_seqlens`` grouped by length (in order within a group), each group
    split so that one call's attention scores stay bounded. ``rows`` selects a call's ``segments * length`` rows of
    the packed sequence: a slice where its segments lie end to end (a view, nothing gathered: every segment of a
    video whose frames tile into whole windows), else ``[segments, length]`` indices."""
    bounds = cu_seqlens.tolist()  # one host read (transformers' per-segment loop reads them too)
    groups: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        groups.setdefault(end - start, []).append(start)
    for length in sorted(groups):
        if length == 0:
            continue
        per_call = max(1, min(_VISION_SEGMENTS_PER_CALL, _VISION_SCORES_PER_CALL // (num_heads * length * length)))
        starts = groups[length]
        for first in range(0, len(starts), per_call):
            call = starts[first : first + per_call]
            if call[-1] - call[0] == (len(call) - 1) * length:  # ascending, disjoint: end to end
                yield slice(call[0], call[-1] + length), length
            else:
                yield torch.tensor(call, device=device)[:, None] + torch.arange(length, device=device), length


# The segment plan of each cu_seqlens tensor while it lives: the tower hands the same tensor to every block of a kind
# (windowed or full), so its boundaries are read from the GPU once per pass rather than once per block.
_SEGMENT_PLANS = WeakIdKeyDictionary()


def _segment_plan(cu_seqlens: torch.Tensor, num_heads: int, device: torch.device) -> list:
    """:func:`_equal_length_segments` as a list, remembered for ``cu_seqlens`` (until it changes or is freed; tensors
    made under ``torch.inference_mode`` have no version counter, and the tower never changes them)."""
    key = (None if cu_seqlens.is_inference() else cu_seqlens._version, num_heads, device)
    cached = _SEGMENT_PLANS.get(cu_seqlens)
    if cached is None or cached[0] != key:
        cached = _SEGMENT_PLANS[cu_seqlens] = (key, list(_equal_length_segments(cu_seqlens, num_heads, device)))
    return cached[1]


class _FastVisionPath:
    """Switch of the vision tower's modules between their fast path and transformers' operations (same function).

    On CUDA, in a pass that records no gradient for the tensors given, :meth:`_vision_kernels` hands out
    ``nsa_kernels.vision`` (one Triton pass each for the rotary embedding, RMSNorm and ``silu(gate) * up``, in place
    of transformers' chains of float32 passes). ``use_fast_path = False`` (on a module or the class) keeps
    transformers' operations: the benchmark's comparison."""

    use_fast_path = True

    def _vision_kernels(self, *tensors: torch.Tensor):
        """``nsa_kernels.vision`` of this model's kernels where its passes may run on ``tensors``, else None."""
        if not self.use_fast_path or not tensors[0].is_cuda:
            return None
        if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
            return None
        return importlib.import_module(f"{load_nsa_kernels(self.config).__name__}.vision")


class VideoNSAVisionPatchEmbed(_FastVisionPath, Qwen2_5_VisionPatchEmbed):
    """Qwen2.5-VL's patch embedding, on CUDA as the matrix product it is: its 3-D convolution has stride = kernel size
    and no bias, so each patch's output is its ``channels x 2 x 14 x 14`` pixels times the flattened kernel. cuDNN runs
    the convolution as an implicit GEMM far below cuBLAS's rate (``docs/benchmarks.md``). On CPU, with
    ``use_fast_path = False`` and for a wrapped ``proj``, Qwen2.5-VL's convolution."""

    def __init__(self, config, embed: Qwen2_5_VisionPatchEmbed):
        with torch.device("meta"):  # the tower's own convolution is taken over: none is drawn (or allocated) anew
            super().__init__(embed.patch_size, embed.temporal_patch_size, embed.in_channels, embed.embed_dim)
        self.proj = embed.proj
        self.config = config

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[patches, channels * 2 * 14 * 14]`` pixels -> ``[patches, embed_dim]``."""
        if (not self.use_fast_path or not hidden_states.is_cuda or type(self.proj) is not nn.Conv3d
                or self.proj.bias is not None):
            return super().forward(hidden_states)
        weight = self.proj.weight  # [embed_dim, channels, 2, 14, 14]
        return F.linear(hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype), weight.flatten(1))


class VideoNSAVisionRMSNorm(_FastVisionPath, Qwen2_5_VLRMSNorm):
    """Qwen2.5-VL's RMS norm of the vision tower, in one pass where :class:`_FastVisionPath` allows."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps)
        self.config = config

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> ``[..., hidden]``."""
        kernels = self._vision_kernels(hidden_states, self.weight)
        if kernels is None:
            return super().forward(hidden_states)
        return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


class VideoNSAVisionAttention(_FastVisionPath, Qwen2_5_VLVisionAttention):
    """Qwen2.5-VL's vision attention, with its non-flash path computed in a few batched calls per layer.

    The vision tower packs every patch into one sequence cut into segments by ``cu_seqlens`` (one per temporal patch
    in the full-attention layers, one per window of at most 8 x 8 patches in the others); each segment attends only
    within itself. With flash-attn, transformers runs all segments in one varlen call (kept as it is here). Without
    it, transformers runs one attention call per segment, whose launch overhead dominates for long videos
    (``docs/benchmarks.md``). Here the segments of equal length, nearly all of them (only windows cut by a frame's
    right or bottom edge are shorter), are batched as ``[segments, heads, length, head_dim]`` (views of the qkv product
    where they lie end to end, else gathered) for the configured attention interface (sdpa, eager, ...) without a
    mask: the same function, one call per distinct segment length (more only when a batch's scores would exceed
    ``_VISION_SCORES_PER_CALL``). The rotary embedding runs in one pass where :class:`_FastVisionPath` allows
    (transformers' function bit for bit).
    """

    def _rotary(self, query, key, cos, sin):
        """``apply_rotary_pos_emb_vision`` of ``query``, ``key`` ``[tokens, heads, head_dim]``."""
        kernels = self._vision_kernels(query, key)
        if kernels is None:
            return apply_rotary_pos_emb_vision(query, key, cos, sin)
        return kernels.apply_rotary_pos_emb_vision(query, key, cos, sin)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if is_flash_attention_requested(self.config):
            return super().forward(
                hidden_states, cu_seqlens, position_embeddings=position_embeddings, max_seqlen=max_seqlen, **kwargs
            )
        seq_length = hidden_states.shape[0]
        query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).unbind(1)
        query, key = self._rotary(query, key, *position_embeddings)  # [tokens, heads, head_dim]
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output = None
        for rows, length in _segment_plan(cu_seqlens, self.num_heads, value.device):
            attended = attention_interface(  # [segments, length, heads, head_dim]
                self,
                *(x[rows].reshape(-1, length, *x.shape[1:]).transpose(1, 2) for x in (query, key, value)),
                attention_mask=None,  # q, k, v above: [segments, heads, length, head_dim]
                scaling=self.scaling,
                dropout=0.0 if not self.training else self.attention_dropout,
                is_causal=False,
                **kwargs,
            )[0]
            if isinstance(rows, slice) and rows == slice(0, seq_length):  # one call: its output is the layer's
                output = attended
                break
            if output is None:
                output = value.new_empty(value.shape)
            # indices index [segments, length] rows; a slice, segments * length rows
            output[rows] = attended.flatten(0, 1) if isinstance(rows, slice) else attended
        if output is None:  # no segment: an empty sequence
            output = value.new_empty(value.shape)
        return self.proj(output.reshape(seq_length, -1))


# Row strides of a matrix product's operands and output must be multiples of 16 bytes for cuBLAS's Hopper kernels
# (TMA); 8 elements covers bf16, fp16 and fp32.
_ROW_ALIGNMENT = 8


class VideoNSAVisionMLP(_FastVisionPath, Qwen2_5_VLMLP):
    """Qwen2.5-VL's vision MLP (same parameters, same function) with its inner width padded for fast matmuls.

    The released vision tower's inner width is 3,420, a row of 6,840 bytes in bf16: not a multiple of 16 bytes, so
    cuBLAS cannot use its Hopper kernels for the three products and falls back to slower ones
    (``docs/benchmarks.md``). Here the gate and up
    weights are stacked into one ``[2 * padded, hidden]`` matrix whose extra rows are zeros (with zero bias), and
    the down weight gets the matching zero columns: the padded inner units are ``silu(0) * 0 = 0`` and add
    nothing, so the output is the plain MLP's. The padded weights are rebuilt on every call (a few MB, a copy
    each), so training updates and gradients go to the original parameters. Wrapped projections take Qwen2.5-VL's
    own path. ``silu(gate) * up`` runs in one pass where :class:`_FastVisionPath` allows (torch's bits).
    """

    def __init__(self, config, bias: bool = False):
        super().__init__(config, bias=bias)
        self.config = config

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """``hidden_state`` ``[..., hidden]`` -> ``[..., hidden]``."""
        pad = -self.intermediate_size % _ROW_ALIGNMENT
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        # The weights are used directly only when the three are plain Linears: a wrapped one (a PEFT adapter, a
        # quantized Linear) computes more than its weight. (DeepSpeed ZeRO-3 gathers a partitioned weight when it is
        # read as an attribute, so reading it here is fine.)
        if pad == 0 or any(type(layer) is not nn.Linear for layer in layers):
            return super().forward(hidden_state)
        gate_up_weight = torch.cat([F.pad(self.gate_proj.weight, (0, 0, 0, pad)),
                                    F.pad(self.up_proj.weight, (0, 0, 0, pad))])  # [2 * padded, hidden]
        gate_up_bias = None
        if self.gate_proj.bias is not None:
            gate_up_bias = torch.cat([F.pad(self.gate_proj.bias, (0, pad)), F.pad(self.up_proj.bias, (0, pad))])
        gate_up = F.linear(hidden_state, gate_up_weight, gate_up_bias)  # [..., 2 * padded]
        kernels = self._vision_kernels(gate_up) if self.config.hidden_act == "silu" else None
        if kernels is None:
            gate, up = gate_up.chunk(2, dim=-1)
            inner = self.act_fn(gate) * up
        else:
            inner = kernels.silu_and_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], -1)
        return F.linear(inner, F.pad(self.down_proj.weight, (0, pad)), self.down_proj.bias)


class VideoNSAVisionTransformer(Qwen2_5_VisionTransformerPretrainedModel):
    """Qwen2.5-VL's vision tower whose blocks attend with :class:`VideoNSAVisionAttention` and run
    :class:`VideoNSAVisionMLP`, normalised by :class:`VideoNSAVisionRMSNorm` and embedded by
    :class:`VideoNSAVisionPatchEmbed` (same parameters, same function)."""

    def __init__(self, config, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        self.patch_embed = VideoNSAVisionPatchEmbed(config, self.patch_embed)
        for block in self.blocks:
            block.attn = VideoNSAVisionAttention(config)
            block.mlp = VideoNSAVisionMLP(config, bias=True)
            block.norm1, block.norm2 = (VideoNSAVisionRMSNorm(config, config.hidden_size) for _ in range(2))
        self.merger.ln_q = VideoNSAVisionRMSNorm(config, config.hidden_size)  # the merger's context width
        self.post_init()

    def set_fast_path(self, enabled: bool) -> None:
        """Switch every module's :class:`_FastVisionPath` (False: transformers' operations, the same function)."""
        for module in self.modules():
            if isinstance(module, _FastVisionPath):
                module.use_fast_path = enabled


class VideoNSAModel(Qwen2_5_VLModel):
    config_class = VideoNSAConfig
    config: VideoNSAConfig
    _no_split_modules = ["VideoNSADecoderLayer", "Qwen2_5_VLVisionBlock"]

    def __init__(self, config: VideoNSAConfig):
        # Qwen2_5_VLModel.__init__ would build a Qwen2.5-VL text decoder only to have it replaced (8B parameters
        # for the 7B), so its three assignments are made here with the VideoNSA decoder instead.
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = VideoNSAVisionTransformer._from_config(config.vision_config)
        self.language_model = VideoNSATextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()

    def forward(self, input_ids=None, *, cache=None, pixel_values=None, pixel_values_videos=None, **kwargs):
        """Qwen2.5-VL's forward; the KV cache comes as ``cache`` or ``past_key_values``, and image or video
        placeholder tokens without their pixels are an error (Qwen2.5-VL would embed them as text)."""
        cache = resolve_cache(cache, kwargs)
        if input_ids is not None and not torch.compiler.is_compiling():
            self._check_placeholders_have_pixels(input_ids, cache, pixel_values, pixel_values_videos, kwargs)
            self._check_grids_match_inputs(input_ids, pixel_values, pixel_values_videos, kwargs)
        mask = kwargs.get("attention_mask")
        new_tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        # checked on prompt passes only: a decode step (one new token) extends a mask the prompt already passed
        if (isinstance(mask, torch.Tensor) and mask.dim() == 2 and new_tokens is not None and new_tokens.shape[1] > 1
                and not torch.compiler.is_compiling()):
            empty = torch.nonzero(~mask.bool().any(dim=1)).flatten().tolist()
            if empty:
                raise ValueError(
                    f"attention_mask marks no real token in sample(s) {empty} of the batch (all zeros): such a sample "
                    "has nothing to attend to. Drop it from the batch, or pass the processor's attention_mask."
                )
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            **{CACHE_ARG: cache},
            **kwargs,
        )

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None,
                           **kwargs):
        """Qwen2.5-VL's; in a pass without gradients and with ``text_config.prefill_chunk_tokens`` set, the tower runs
        over pieces of at most that many merged tokens (:meth:`video_features_in_pieces`), whose pooled outputs are
        returned (``last_hidden_state`` is then None: it would be the tower's whole unmerged sequence)."""
        merged_tokens = pixel_values_videos.shape[0] // self.visual.spatial_merge_size**2
        chunk = rows_per_piece(self.config.text_config, merged_tokens)
        if chunk is None or video_grid_thw is None or kwargs.get("output_hidden_states"):
            return super().get_video_features(pixel_values_videos, video_grid_thw, **kwargs)
        pooled = self.video_features_in_pieces(pixel_values_videos, video_grid_thw, chunk)
        sizes = (video_grid_thw.prod(-1) // self.visual.spatial_merge_size**2).tolist()
        output = BaseModelOutputWithPooling(pooler_output=torch.split(pooled, sizes))
        return output if kwargs.get("return_dict", True) else output.to_tuple()

    def video_features_in_pieces(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor,
                                 max_tokens: int | None) -> torch.Tensor:
        """The vision tower's merged tokens ``[total video tokens, hidden]`` for every video (in the order of
        ``video_grid_thw`` ``[videos, 3]``), computed over pieces of at most ``max_tokens`` merged tokens (at least one
        temporal patch; ``None``: each video in one call).

        Pieces are cut between temporal patches: Qwen2.5-VL's vision attention (full and windowed) never crosses a
        temporal patch, and its patch embedding, rotary embedding and merger are per patch, so a piece's tokens are
        those of the whole video. ``pixel_values_videos`` may stay on the CPU: each piece is moved to the tower's
        device when its turn comes."""
        merge = self.visual.spatial_merge_size
        outputs, row = [], 0
        for t, h, w in video_grid_thw.tolist():
            patches_per_step = h * w
            step = t if not max_tokens else max(1, int(max_tokens) // (patches_per_step // merge**2))
            for first in range(0, t, step):
                count = min(step, t - first)
                piece = pixel_values_videos[row + first * patches_per_step : row + (first + count) * patches_per_step]
                piece = piece.to(self.visual.device, non_blocking=True)  # the pixels may wait on the CPU
                grid = torch.tensor([[count, h, w]], dtype=video_grid_thw.dtype, device=video_grid_thw.device)
                features = super().get_video_features(piece, grid, return_dict=True).pooler_output
                outputs.append(torch.cat(list(features)) if isinstance(features, (tuple, list)) else features)
            row += t * patches_per_step
        if row != pixel_values_videos.shape[0]:
            raise ValueError(
                f"video_grid_thw describes {row} patches but pixel_values_videos has "
                f"{pixel_values_videos.shape[0]} rows"
            )
        return torch.cat(outputs, dim=0)

    def _check_grids_match_inputs(self, input_ids, pixel_values, pixel_values_videos, kwargs) -> None:
        """Reject ``image_grid_thw`` / ``video_grid_thw`` that do not describe the pixel rows passed, or whose merged
        tokens differ in number from the placeholders in ``input_ids``, naming the grid and both counts."""
        merge = self.config.vision_config.spatial_merge_size ** 2
        for kind, token_id, pixels, grid_name in (
            ("image", self.config.image_token_id, pixel_values, "image_grid_thw"),
            ("video", self.config.video_token_id, pixel_values_videos, "video_grid_thw"),
        ):
            grid = kwargs.get(grid_name)
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{kind} pixels were passed without {grid_name}: pass the processor's {grid_name}.")
            grid_list = [tuple(int(x) for x in row) for row in grid.tolist()]
            patches = sum(t * h * w for t, h, w in grid_list)
            if patches != pixels.shape[0]:
                raise ValueError(
                    f"{grid_name} {grid_list} describes {patches} patches but pixel_values{'_videos' * (kind == 'video')} "
                    f"holds {pixels.shape[0]} rows: pass the grid that the processor returned with these pixels."
                )
            tokens = patches // merge
            placeholders = int((input_ids == token_id).sum()) if token_id is not None else tokens
            if placeholders != tokens:
                raise ValueError(
                    f"{kind.capitalize()} features and {kind} tokens do not match: "
                    f"{grid_name} {grid_list} gives {tokens} {kind} tokens ({patches} patches / {merge} per token) but "
                    f"input_ids hold {placeholders} {kind} placeholder tokens (id {token_id}): the prompt and the "
                    f"{kind}s do not belong together. Process text and {kind}s in one processor call."
                )

    def _check_placeholders_have_pixels(self, input_ids, cache, pixel_values, pixel_values_videos, kwargs) -> None:
        """Reject a prompt pass whose image or video placeholders come without pixels (or encoded features) and
        would therefore be typed text and attended densely.

        Not checked: decode steps (a non-empty cache: a sampled token may be a placeholder id, and it is text), and
        placeholders that the given position ids lay out as vision (generate's assistant model gets the prompt's
        positions without its pixels, as Qwen2.5-VL's does).
        """
        if cache is not None and int(cache.get_seq_length()) > 0:
            return
        encoded = kwargs.get("mm_encoder_outputs") or {}
        rows = _mrope_rows(kwargs.get("position_ids"))
        for kind, token_id, pixels, names in (
            ("image", self.config.image_token_id, pixel_values, "pixel_values and image_grid_thw"),
            ("video", self.config.video_token_id, pixel_values_videos, "pixel_values_videos and video_grid_thw"),
        ):
            if pixels is not None or encoded.get(kind) is not None or token_id is None:
                continue
            placeholders = input_ids == token_id
            count = int(placeholders.sum())
            if not count:
                continue
            if rows is not None:
                typed = load_nsa_kernels(self.config).token_is_vision(rows.to(input_ids.device))
                if bool((typed & placeholders).any()):
                    continue
            raise ValueError(
                f"input_ids hold {count} {kind} placeholder tokens (id {token_id}) but no {kind} was passed: they "
                f"would be embedded and attended as text. Pass the processor's {names} with the input_ids "
                f"(processor(text=..., {kind}s=...)), or remove the placeholders."
            )


# The released checkpoint's key layout (transformers 4.x, the authors' release, what save_pretrained writes) against
# the model's: (pattern in the checkpoint, prefix in the model), as transformers maps Qwen2.5-VL checkpoints.
_RELEASED_TO_MODEL = ((r"^visual", "model.visual"), (r"^model(?!\.(language_model|visual))", "model.language_model"))


def _released_layout() -> list[WeightRenaming]:
    """The renamings from the released checkpoint's key layout to the model's: checkpoints saved by transformers 4.x
    (and the authors' release) keep the text decoder at ``model.layers.N...``, the vision tower at ``visual.*`` and
    ``lm_head`` at the top. Loading applies them; saving reverts them, so saved folders have the released layout."""
    return [WeightRenaming(source_patterns=source, target_patterns=target) for source, target in _RELEASED_TO_MODEL]


def _rename(key: str, renamings) -> str:
    # transformers' own matching (name boundaries, chained renamings), so these functions name keys exactly as
    # loading and save_pretrained do, edge cases included
    for renaming in renamings:
        key, _ = renaming.rename_source_key(key)
    return key


def model_key(checkpoint_key: str) -> str:
    """A checkpoint key in either layout (4.x / release, or 5.x) -> the model's state-dict key, as loading maps it:
    ``model.layers.0.self_attn.g_proj_1.weight`` -> ``model.language_model.layers.0.self_attn.g_proj_1.weight``."""
    return _rename(checkpoint_key, _released_layout())


def released_key(key: str) -> str:
    """A state-dict key -> the key of the released layout, as save_pretrained writes it (transformers reverts the
    loading renamings, last first): ``model.visual.merger.mlp.0.weight`` -> ``visual.merger.mlp.0.weight``."""
    return _rename(key, [renaming.reverse_transform() for renaming in reversed(_released_layout())])


def is_gate_key(key: str) -> bool:
    """Whether a checkpoint or state-dict key belongs to a gate MLP (``g_proj_1`` / ``g_proj_2``)."""
    return re.search(r"(^|\.)g_proj_[12]\.", key) is not None


def checkpoint_layout(config_dict: dict, tensor_names) -> str:
    """What a checkpoint holds, from its ``config.json`` dict and its tensor names: ``"videonsa"`` (saved by this
    code), ``"release"`` (the authors' release: Qwen2.5-VL with gate MLPs) or ``"qwen2_5_vl"`` (plain Qwen2.5-VL,
    no gates). Each loads with ``VideoNSAForConditionalGeneration.from_pretrained``; another model type raises."""
    model_type = config_dict.get("model_type")
    if model_type == VideoNSAConfig.model_type:
        return "videonsa"
    if model_type != "qwen2_5_vl":
        raise ValueError(f"model_type {model_type!r}: not a VideoNSA or Qwen2.5-VL checkpoint")
    return "release" if any(is_gate_key(name) for name in tensor_names) else "qwen2_5_vl"


def _write_file(path: Path, data: bytes) -> None:
    """Write ``path`` as a new regular file (a link or file already there is replaced, never written through)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_bytes(data)
    os.replace(staging, path)


# ----------------------------------------------------------------------------------------------------------
# Quantized loading (bitsandbytes, FineGrainedFP8)
# ----------------------------------------------------------------------------------------------------------
# Modules left unquantized (in the checkpoint dtype) when a quantization config does not name its own list: the
# vision tower (feeds every video token; 8% of the weights), lm_head (as transformers keeps it) and the gate
# MLPs, whose logits are divided by nsa_gate_temperature (0.3), amplifying their error. Patterns as transformers
# matches them: a prefix of the module name at a name boundary, or a suffix. Why and measurements: model_card.md.
UNQUANTIZED_MODULES = ("model.visual", "lm_head", "g_proj_1", "g_proj_2")

# FP8 matrix products need compute capability 8.9 (Ada) or newer; transformers quietly dequantizes to bf16 below.
_FP8_CAPABILITY = (8, 9)


# Where each quantization method whose matching of module names UNQUANTIZED_MODULES is written for keeps its list
# (bitsandbytes calls it llm_int8_skip_modules, for 4-bit too); other methods' configs are passed on as given.
_SKIP_FIELDS = {"bitsandbytes": "llm_int8_skip_modules", "fp8": "modules_to_not_convert"}


def with_unquantized_defaults(quantization_config):
    """``quantization_config`` (a ``QuantizationConfigMixin`` or its dict) with :data:`UNQUANTIZED_MODULES` as its
    list of modules to keep unquantized when it is a bitsandbytes or FP8 config that names none; a config that names
    one (even ``[]``) is returned as given: the user's list wins. Also raises ValueError for FP8 without an
    FP8-capable CUDA GPU."""
    from transformers.quantizers.auto import AutoQuantizationConfig

    if isinstance(quantization_config, dict):
        quantization_config = AutoQuantizationConfig.from_dict(dict(quantization_config))
    check_quantization(quantization_config)
    field = _SKIP_FIELDS.get(quantization_config.quant_method)
    if field is None or getattr(quantization_config, field, None) is not None:
        return quantization_config
    quantization_config = copy.deepcopy(quantization_config)  # the caller's object may be reused for other models
    setattr(quantization_config, field, list(UNQUANTIZED_MODULES))
    return quantization_config


def check_quantization(quantization_config) -> None:
    """Raise ValueError for a quantization this machine cannot run: FP8 (``FineGrainedFP8Config``, unless it only
    dequantizes) needs a CUDA GPU of compute capability 8.9 or newer, or an Intel XPU, as transformers' FP8 kernels
    do. transformers would fail without a GPU and silently load bf16 weights on an older one."""
    if quantization_config.quant_method != "fp8" or getattr(quantization_config, "dequantize", False):
        return
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        if capability >= _FP8_CAPABILITY:
            _check_fp8_kernel_available()
            return
        found = f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}"
    elif hasattr(torch, "xpu") and torch.xpu.is_available():
        return
    else:
        found = "this machine has no CUDA GPU"
    raise ValueError(
        f"FineGrainedFP8Config quantizes the weights to FP8, which needs a CUDA GPU of compute capability "
        f"{_FP8_CAPABILITY[0]}.{_FP8_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell: L4, H100, H200, ...), but "
        f"{found}. Use bitsandbytes instead, which also runs on CPU and older GPUs: "
        "quantization_config=BitsAndBytesConfig(load_in_4bit=True) or BitsAndBytesConfig(load_in_8bit=True)."
    )


def _check_fp8_kernel_available() -> None:
    """transformers runs FP8 matrix products with the Hub kernel ``kernels-community/finegrained-fp8`` through the
    ``kernels`` package; without it the first forward fails deep inside generate. Say so at load time."""
    from transformers.integrations.hub_kernels import _MISSING_KERNELS_MESSAGE
    from transformers.utils.import_utils import is_kernels_available

    if not is_kernels_available():
        raise ValueError(
            "FineGrainedFP8Config runs its matrix products with the Hub kernel kernels-community/finegrained-fp8, "
            f"which transformers loads through the `kernels` package: {_MISSING_KERNELS_MESSAGE}, on a machine that "
            "can reach the Hub (or has the kernel in its Hugging Face cache). Without it use bitsandbytes: "
            "quantization_config=BitsAndBytesConfig(load_in_8bit=True) or BitsAndBytesConfig(load_in_4bit=True)."
        )


def check_cpu_4bit_layers(model) -> None:
    """Raise ValueError, naming the layers, where bitsandbytes' CPU kernel cannot run a 4-bit layer of ``model``.

    On CPUs with AVX512-BF16, bitsandbytes repacks each 4-bit weight for its kernel on the first call, which needs
    out_features a multiple of 32 and in_features a multiple of the quantization block (64); other layers fail
    there with a bare assertion or reshape error. The gates' second layer (3 x 28 = 84 outputs in the 7B) and the
    vision MLP (3,420 inner units) are such layers: the default keeps them unquantized."""
    try:
        from bitsandbytes.functional import has_avx512bf16
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # an older bitsandbytes without that kernel
        return
    bad = [
        f"{name} ({module.out_features} x {module.in_features})"
        for name, module in model.named_modules()
        if isinstance(module, Linear4bit)
        and module.weight.device.type == "cpu"
        and (module.out_features % 32 or module.in_features % module.weight.blocksize)
    ]
    if bad and has_avx512bf16():
        raise ValueError(
            f"bitsandbytes' 4-bit CPU kernel cannot run {len(bad)} layers of this model: {', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}. It needs out_features a multiple of 32 and in_features a multiple "
            "of the quantization block (64). Keep them unquantized (llm_int8_skip_modules; left unset, it keeps "
            f"{list(UNQUANTIZED_MODULES)}), load in 8-bit, or load on a CUDA GPU."
        )


def check_4bit_weights_saveable(model) -> None:
    """Raise ValueError where saving would write corrupt 4-bit weights: bitsandbytes' AVX512-BF16 CPU kernel repacks
    a 4-bit weight on its first call and rounds its block scales to bf16, and converting that back for saving is not
    exact in bitsandbytes 0.50.2 (README, "Quantized weights")."""
    packed = [
        name
        for name, module in model.named_modules()
        if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
    ]
    if packed:
        raise ValueError(
            f"The 4-bit weights of {len(packed)} layers (e.g. {packed[0]}) were repacked for bitsandbytes' CPU kernel "
            "when the model ran on CPU; that layout does not convert back exactly, so saving would write corrupt "
            "weights. Save the quantized model before running it on CPU (or load it again and save it then)."
        )


class VideoNSAForConditionalGeneration(Qwen2_5_VLForConditionalGeneration, GenerationMixin):
    """VideoNSA for video/image + text to text generation; ``generate`` and training work as for Qwen2.5-VL.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("Enxin/VideoNSA", trust_remote_code=True, dtype="bfloat16")
    >>> processor = AutoProcessor.from_pretrained("Enxin/VideoNSA", trust_remote_code=True)
    >>> messages = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
    ...                                          {"type": "text", "text": "What happens?"}]}]
    >>> inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
    ...                                        return_dict=True, return_tensors="pt").to(model.device)
    >>> out = model.generate(**inputs, max_new_tokens=64)
    ```
    """

    config_class = VideoNSAConfig
    config: VideoNSAConfig
    _no_split_modules = ["VideoNSADecoderLayer", "Qwen2_5_VLVisionBlock"]

    def __init__(self, config: VideoNSAConfig):
        bind_nsa_kernels(config)  # this checkpoint's kernels, resolved anew: a reused config follows the new model
        # as in Qwen2_5_VLForConditionalGeneration.__init__, without building a Qwen2.5-VL model to replace
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = VideoNSAModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (in the released checkpoint's key layout) and config as usual, plus the code files and
        ``nsa_kernels/`` so the folder loads alone. 4-bit weights repacked for bitsandbytes' CPU kernel (after a
        run on CPU) cannot be saved exactly: that is a ValueError (:func:`check_4bit_weights_saveable`)."""
        check_4bit_weights_saveable(self)
        # transformers reverts the renamings it recorded when loading. Under DeepSpeed ZeRO-3 it records every known
        # renaming, used or not, and reverting its unused legacy ones writes `model.model.*` keys that no loader
        # maps back (transformers 5.23): the text decoder would load as random weights. Ours are the whole story.
        self._weight_conversions = _released_layout()
        for name in _CODE_FILES:  # transformers copies code files onto these paths and would write through a link
            if Path(save_directory, name).is_symlink():
                Path(save_directory, name).unlink()
        super().save_pretrained(save_directory, *args, **kwargs)
        here = Path(__file__).resolve().parent
        save_directory = Path(save_directory)
        # transformers' dynamic-module cache keeps each code file in a folder of its own hash, so files other than
        # this one are looked up where the model came from; only regular files are copied (read_checkpoint_file).
        origin = _checkpoint_source(self.config.name_or_path or "", here.name)
        for name in _CODE_FILES:
            for folder in (here, origin):
                if folder is not None and ((folder / name).exists() or (folder / name).is_symlink()):
                    _write_file(save_directory / name, read_checkpoint_file(folder / name, folder))
                    break
        kernels_dir = Path(load_nsa_kernels(self.config).__file__).parent
        target = save_directory / _KERNELS_DIR
        if target.is_symlink() or target.resolve() != kernels_dir.resolve():  # not the kernels folder itself
            files = read_kernel_files(kernels_dir, kernels_dir.parent)
            if kernels_dir.name != _KERNELS_DIR and kernels_dir.name != f"{_KERNELS_DIR}_{kernels_digest(files)}":
                raise RuntimeError(f"{kernels_dir} was changed after it was imported; load the model again")
            write_kernel_files(files, target)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``, which also reads the authors' release: a Qwen2.5-VL ``config.json``
        (``model_type`` "qwen2_5_vl") is converted by ``videonsa_config_dict`` and the weights' 4.x key layout is
        mapped, so the gate MLPs and NSA settings load. A Qwen2.5-VL checkpoint without gate MLPs loads with the
        gates initialised as transformers initialises linear layers (normal weights, zero biases: every gate near
        0.5), as the authors started training; a warning says so.

        A ``quantization_config`` (bitsandbytes 4-/8-bit, ``FineGrainedFP8Config``) that names no modules to keep
        unquantized keeps :data:`UNQUANTIZED_MODULES` (vision tower, lm_head, gate MLPs) in the checkpoint dtype and
        quantizes the text decoder's projections; FP8 without an FP8-capable GPU, and 4-bit layers that
        bitsandbytes' CPU kernel cannot run, are ValueErrors."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = with_unquantized_defaults(kwargs["quantization_config"])
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        if getattr(model, "is_loaded_in_4bit", False):
            check_cpu_4bit_layers(model)
        gates = sorted(key for key in info["missing_keys"] if is_gate_key(key))
        if gates:
            logger.warning(
                f"{pretrained_model_name_or_path} has no NSA gate MLPs for {len(gates)} tensors (e.g. {gates[0]}): "
                "they are initialised, untrained. That is the start of fine-tuning from Qwen2.5-VL, not the released "
                "VideoNSA; load Enxin/VideoNSA or a checkpoint saved by this model for the trained gates."
            )
        return (model, info) if output_loading_info else model


register_checkpoint_conversion_mapping("VideoNSAForConditionalGeneration", _released_layout(), overwrite=True)

VideoNSAConfig.register_for_auto_class()
VideoNSAForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "CACHE_ARG",
    "VideoNSAAttention",
    "VideoNSADecoderLayer",
    "VideoNSAForConditionalGeneration",
    "VideoNSAModel",
    "VideoNSATextModel",
    "VideoNSAVisionAttention",
    "VideoNSAVisionTransformer",
]
