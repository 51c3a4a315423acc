"""Run by :func:`videonsa.hub.verify.verify_in_fresh_process` as ``python -I verify_child.py FOLDER MODE CHECKOUT``.

Loads FOLDER with ``AutoConfig`` / ``AutoModel`` / ``AutoProcessor`` and remote code, as a Hub user would, and runs
a tiny video prompt through the processor (MODE ``full``: also forward and ``generate``; ``load``: the model on the
meta device). Prints one ``VERIFY-REPORT {json}`` line. Only the folder may provide the code, so CHECKOUT must not
be on ``sys.path``; this file imports nothing of the package.
"""

import json
import sys
from pathlib import Path


def main(folder: str, mode: str, checkout: str) -> dict:
    leaked = [p for p in sys.path if p and Path(p).resolve() == Path(checkout)]
    assert not leaked, f"the package source {checkout} is on sys.path"
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor
    from transformers.video_utils import VideoMetadata

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    extra = {"device_map": "meta"} if mode == "load" else {}
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True, **extra)
    module = sys.modules[type(model).__module__]
    kernels = module.load_nsa_kernels(model.config)
    report = dict(config=type(config).__name__, model=type(model).__name__, processor=type(processor).__name__,
                  module=module.__name__, kernels=kernels.__file__,
                  loading_info={key: sorted(map(str, value)) for key, value in info.items()})
    frames = np.random.default_rng(0).integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video"},
                                             {"type": "text", "text": "What happens in this video?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], videos=[frames], return_tensors="pt",
                       video_metadata=[VideoMetadata(total_num_frames=8, fps=4.0, width=56, height=56)])
    report["video_tokens"] = int((inputs["input_ids"] == config.video_token_id).sum())
    if mode == "full":
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
            report["attention_paths"] = sorted({layer.self_attn.last_path
                                                for layer in model.model.language_model.layers})
            generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        report.update(logits_shape=list(logits.shape), finite=bool(torch.isfinite(logits.float()).all()),
                      new_tokens=int(generated.shape[1] - inputs["input_ids"].shape[1]))
    return report


if __name__ == "__main__":
    print("VERIFY-REPORT " + json.dumps(main(*sys.argv[1:4])))
