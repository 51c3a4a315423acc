"""Configuration of VideoNSA: Qwen2.5-VL whose text layers run Native Sparse Attention on video tokens."""

import copy

from huggingface_hub.dataclasses import strict
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)
from transformers.utils import logging

logger = logging.get_logger(__name__)

NSA_BACKENDS = ("auto", "triton", "torch")
NSA_KEYS = (
    "nsa_enabled",
    "nsa_block_size",
    "nsa_block_count",
    "nsa_window_size",
    "nsa_gate_temperature",
    "nsa_backend",
)
# Settings of how the pass is computed, not of the attention function; validated and delegated like the NSA keys.
# (Not named `prefill_chunk_size`: `GenerationConfig.from_model_config` would copy that name into generate's own
# chunked prefill, which continues the cache chunk by chunk and is not exact for VideoNSA.)
COMPUTE_KEYS = ("prefill_chunk_tokens",)
VALIDATED_KEYS = NSA_KEYS + COMPUTE_KEYS
AUTO_MAP = {
    "AutoConfig": "configuration_videonsa.VideoNSAConfig",
    "AutoModel": "modeling_videonsa.VideoNSAForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_videonsa.VideoNSAForConditionalGeneration",
    "AutoModelForVision2Seq": "modeling_videonsa.VideoNSAForConditionalGeneration",
    "AutoProcessor": "processing_videonsa.VideoNSAProcessor",
}
# The authors' release is a Qwen2.5-VL checkpoint (`model_type` "qwen2_5_vl", no `auto_map`) whose text config holds
# two NSA settings under their code's names; its block size (64) and gate temperature (0.3) were constants of that
# code, the defaults here.
RELEASE_NSA_KEYS = {"block_counts": "nsa_block_count", "window_size": "nsa_window_size"}
# Name of the attribute through which modeling_videonsa binds a config to the kernels package its model imported
# (the module's name); never serialised.
KERNELS_BINDING = "_videonsa_kernels"


@strict
class VideoNSATextConfig(Qwen2_5_VLTextConfig):
    r"""
    Qwen2.5-VL's text configuration plus the hybrid attention of VideoNSA.

    nsa_enabled (`bool`, defaults to `True`):
        Video tokens use Native Sparse Attention. `False` runs plain dense attention with the same weights (the
        gate MLPs are then unused); the paper reports the fine-tuned weights help in dense mode too.
    nsa_block_size (`int`, defaults to 64):
        Tokens per NSA block, for compression (mean pooling) and selection. A power of two >= 16. At the
        processor's default resolution one temporal patch of a video is exactly one block.
    nsa_block_count (`int`, defaults to 32):
        Blocks kept by the selection branch per query and kv head (rounded up to a power of two, as the released
        kernels do).
    nsa_window_size (`int`, defaults to 256):
        Keys seen by the sliding-window branch, the query's own included.
    nsa_gate_temperature (`float`, defaults to 0.3):
        The gate logits are divided by it before the sigmoid.
    nsa_backend (`str`, defaults to `"auto"`):
        `"triton"` (bundled kernels, CUDA), `"torch"` (the pure-PyTorch reference, any device) or `"auto"`
        (Triton on CUDA when it is importable, otherwise torch).
    prefill_chunk_tokens (`int`, *optional*):
        When set, a pass without gradients over more tokens than this (a long prefill) runs the token-wise parts of
        every decoder layer (the two RMS norms, the residual adds and the MLP) over chunks of this many tokens, in
        place; attention still runs over the whole sequence. The result is that of the unchunked pass (to float
        rounding), with the MLP's intermediate activations held for one chunk only. `None` (default) disables it;
        passes with gradients are never chunked.
    """

    model_type = "videonsa_text"

    nsa_enabled: bool = True
    nsa_block_size: int = 64
    nsa_block_count: int = 32
    nsa_window_size: int = 256
    nsa_gate_temperature: float = 0.3
    nsa_backend: str = "auto"
    prefill_chunk_tokens: int | None = None

    def __post_init__(self, **kwargs):
        validate_nsa_settings(self)
        super().__post_init__(**kwargs)

    def __setattr__(self, name, value):
        # The one validation path for NSA (and compute) keys set after construction, wherever they are set from
        # (`text_config.nsa_x = ...`, the top-level config's properties, `from_pretrained(..., nsa_x=...)`): the
        # combination is checked and a rejected value is not kept. The first assignment of each field, while the
        # dataclass is being built, is left to `__post_init__`, which sees all keys at once.
        if name not in VALIDATED_KEYS or name not in self.__dict__:
            super().__setattr__(name, value)
            return
        previous = self.__dict__[name]
        super().__setattr__(name, value)
        try:
            validate_nsa_settings(self)
        except ValueError:
            super().__setattr__(name, previous)
            raise

    def to_dict(self):
        output = super().to_dict()
        output.pop(KERNELS_BINDING, None)
        return output


def validate_nsa_settings(config) -> None:
    """Raise a `ValueError` that names the offending NSA (or compute) key, its value and what is accepted."""

    def positive_int(name):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return value

    block_size = positive_int("nsa_block_size")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"nsa_block_size must be a power of two >= 16 (e.g. 64), got {block_size}")
    block_count = positive_int("nsa_block_count")
    if (1 << (block_count - 1).bit_length()) > block_size:
        raise ValueError(
            f"nsa_block_count rounded up to a power of two must be <= nsa_block_size (the released top-k network "
            f"ranks candidates in chunks of nsa_block_size blocks); got {block_count} with block size {block_size}"
        )
    positive_int("nsa_window_size")
    temperature = config.nsa_gate_temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"nsa_gate_temperature must be a number > 0, got {temperature!r}")
    if config.nsa_backend not in NSA_BACKENDS:
        raise ValueError(f"nsa_backend must be one of {NSA_BACKENDS}, got {config.nsa_backend!r}")
    if not isinstance(config.nsa_enabled, bool):
        raise ValueError(f"nsa_enabled must be True or False, got {config.nsa_enabled!r}")
    chunk = getattr(config, "prefill_chunk_tokens", None)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"prefill_chunk_tokens must be a positive integer or None (unchunked), got {chunk!r}")


@strict
class VideoNSAConfig(Qwen2_5_VLConfig):
    r"""
    Configuration of [`VideoNSAForConditionalGeneration`]: a Qwen2.5-VL configuration whose text part is a
    [`VideoNSATextConfig`]. The NSA keys (`nsa_enabled`, `nsa_block_size`, `nsa_block_count`, `nsa_window_size`,
    `nsa_gate_temperature`, `nsa_backend`) live in `text_config`, next to the other attention settings, and are
    readable and settable on this object too (`config.nsa_window_size = 128`). They may be passed flat, as
    Qwen2.5-VL's Hub configs pass their text keys.

    ```python
    >>> config = VideoNSAConfig(nsa_block_count=16)
    >>> config.text_config.nsa_block_count, config.nsa_block_count
    (16, 16)
    ```
    """

    model_type = "videonsa"
    # transformers >= 5.18 reads `sub_configs_defaults`, earlier 5.x `sub_configs`
    sub_configs_defaults = {"vision_config": Qwen2_5_VLVisionConfig, "text_config": VideoNSATextConfig}
    sub_configs = {"vision_config": Qwen2_5_VLVisionConfig, "text_config": VideoNSATextConfig}

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As transformers reads it, with a Qwen2.5-VL `config.json` (the authors' release) converted by
        [`videonsa_config_dict`], so that `from_pretrained` builds VideoNSA from it."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "qwen2_5_vl":
            logger.info(f"{pretrained_model_name_or_path} holds a Qwen2.5-VL config (the authors' release layout): "
                        "read as a VideoNSA config")
            config_dict = videonsa_config_dict(config_dict)
        return config_dict, kwargs

    def to_dict(self):
        output = super().to_dict()
        output.pop(KERNELS_BINDING, None)
        # the vision config is transformers' class: its binding (the tower's kernels) is dropped here
        if isinstance(output.get("vision_config"), dict):
            output["vision_config"].pop(KERNELS_BINDING, None)
        return output

    def __post_init__(self, **kwargs):
        # A text config given as a dict (or flat keys) must become a VideoNSATextConfig, whatever the version.
        if isinstance(self.text_config, Qwen2_5_VLTextConfig) and not isinstance(
            self.text_config, VideoNSATextConfig
        ):
            self.text_config = VideoNSATextConfig(**self.text_config.to_dict())
        super().__post_init__(**kwargs)
        if not getattr(self, "auto_map", None):
            self.auto_map = dict(AUTO_MAP)


def _delegate_to_text_config(name):
    def getter(self):
        return getattr(self.text_config, name)

    def setter(self, value):
        setattr(self.text_config, name, value)  # validated (and rolled back) by VideoNSATextConfig.__setattr__

    return property(getter, setter, doc=f"`text_config.{name}`")


for _key in VALIDATED_KEYS:
    setattr(VideoNSAConfig, _key, _delegate_to_text_config(_key))


def videonsa_config_dict(config_dict: dict) -> dict:
    """A Qwen2.5-VL `config.json` dict as the `config.json` dict of VideoNSA (a new dict; the input is not changed).

    For the authors' release and for plain Qwen2.5-VL, in the transformers 4.x layout (text keys at the top level) or
    the 5.x one (nested `text_config`): the release's NSA keys (`block_counts`, `window_size` of the text config) become
    `nsa_block_count` and `nsa_window_size`, the other NSA keys keep their defaults (the release's constants), and
    `model_type`, `architectures` and `auto_map` become VideoNSA's. A VideoNSA dict is returned as a copy.

    ```python
    >>> videonsa_config_dict({"model_type": "qwen2_5_vl", "hidden_size": 3584, "block_counts": 16})["nsa_block_count"]
    16
    ```
    """
    model_type = config_dict.get("model_type")
    if model_type == VideoNSAConfig.model_type:
        return copy.deepcopy(config_dict)
    if model_type != Qwen2_5_VLConfig.model_type:
        raise ValueError(
            f"model_type {model_type!r} is neither 'videonsa' nor 'qwen2_5_vl' (the authors' release of VideoNSA): "
            "this is not a VideoNSA or Qwen2.5-VL checkpoint"
        )
    values = copy.deepcopy(config_dict)
    for key in ("model_type", "architectures", "auto_map", "_name_or_path"):
        values.pop(key, None)
    text = values.get("text_config")
    if isinstance(text, dict):
        text.pop("model_type", None)  # "qwen2_5_vl_text": the text config becomes VideoNSATextConfig
    target = text if isinstance(text, dict) else values  # where the text keys live in this layout
    for old, new in RELEASE_NSA_KEYS.items():
        found = {holder[old] for holder in (values, target) if old in holder}
        for holder in (values, target):
            holder.pop(old, None)
        if len(found) > 1 or (found and new in target and target[new] not in found):
            raise ValueError(f"the config gives {old} = {sorted(found)} and {new} = {target.get(new)}; keep one")
        if found:
            target[new] = found.pop()
    return dict(values, model_type=VideoNSAConfig.model_type, architectures=["VideoNSAForConditionalGeneration"],
                auto_map=dict(AUTO_MAP))

__all__ = ["VideoNSAConfig", "VideoNSATextConfig", "videonsa_config_dict"]
