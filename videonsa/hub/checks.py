"""Checks of what ships beside the weights: the processor and tokenizer against the config, the generation
config, and the model card (metadata, images, unfinished sections)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from .layout import CARD_IMAGES, MODEL_CARD, PushError, few, regular_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
VISION_TOKENS = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
                 "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}


def load_processor(folder: Path, config):
    """A VideoNSAProcessor with the source's tokenizer (and image processor settings), checked against the config.

    A VideoNSA folder's processor loads as it is; otherwise the tokenizer (and ``preprocessor_config.json``, when
    present) of the folder are wrapped into VideoNSAProcessor, whose save_pretrained writes our
    ``processor_config.json`` (with ``auto_map``), the video processor settings of the release and the chat
    template."""
    processor_config = folder / "processor_config.json"
    try:
        with _quiet_transformers():
            processor = _load_processor_files(folder, processor_config, config)
    except PushError:
        raise
    except Exception as error:  # noqa: BLE001 - any loading failure is reported with the folder
        raise PushError(f"could not load the tokenizer / processor files of {folder}: {error}") from error
    tokenizer = processor.tokenizer
    wrong = []
    for token, key in VISION_TOKENS.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != getattr(config, key):
            wrong.append(f"{token} is {token_id} in the tokenizer but {key} = {getattr(config, key)}")
    if len(tokenizer) > config.text_config.vocab_size:
        wrong.append(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary "
                     f"{config.text_config.vocab_size}")
    if wrong:
        raise PushError(f"the tokenizer of {folder} does not belong to this model: " + "; ".join(wrong))
    processor.nsa_block_size = config.nsa_block_size
    return processor


def _load_processor_files(folder: Path, processor_config: Path, config):
    from processing_videonsa import VideoNSAProcessor

    if processor_config.is_file() and "VideoNSAProcessor" in processor_config.read_text():
        return VideoNSAProcessor.from_pretrained(folder, trust_remote_code=False)
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer, Qwen2VLImageProcessor

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        image_processor = None
        if (folder / "preprocessor_config.json").is_file():
            image_processor = Qwen2VLImageProcessor.from_pretrained(folder)
        return VideoNSAProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 nsa_block_size=config.nsa_block_size)
    raise PushError(
        f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass --processor-source with a folder or "
        "repo id that has them (e.g. Qwen/Qwen2.5-VL-7B-Instruct)"
    )


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings off for a moment: AutoTokenizer reads config.json without remote code and warns that
    it does not know the model type "videonsa", which is expected here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_generation_config(folder: Path, config):
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_model_config(config)


def read_card(path: Path = MODEL_CARD) -> str:
    if not path.is_file():
        raise PushError(f"{path} is missing; it becomes the repository's README.md")
    return regular_file(path).read_text(encoding="utf-8")


def card_problems(text: str) -> list[str]:
    """What keeps the card from being published: unparsable metadata, missing keys, unfinished sections."""
    from huggingface_hub import ModelCard

    problems = []
    try:
        data = ModelCard(text).data.to_dict()
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises several types for bad metadata
        return [f"its metadata does not parse: {error}"]
    for key in ("license", "library_name", "pipeline_tag", "base_model"):
        if not data.get(key):
            problems.append(f"metadata key {key!r} is missing")
    for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text):
        if "://" not in link and link not in CARD_IMAGES:
            problems.append(f"image {link!r} is not shipped with the card (CARD_IMAGES: {sorted(CARD_IMAGES)})")
    unfinished = [line.strip() for line in text.splitlines() if "TODO" in line]
    if unfinished:
        problems.append(f"unfinished sections (lines with TODO): {few(unfinished, 3)}")
    return problems

