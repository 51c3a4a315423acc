"""What quantizing the gate MLPs or the vision tower adds to the error of a quantized VideoNSA (README, "Quantized
weights"): a tiny random model, bitsandbytes int8 / NF4 (and FP8 on a GPU that has it), with transformers' own
loading and three lists of modules left unquantized: the default (vision tower, lm_head, gates), the default with
the gates quantized, and the default with the vision tower quantized.

Reported per row, over a few video prompts, against the unquantized model: the logit error as a fraction of the
largest logit (the largest over all positions, and the mean), and the error of the gate values (sigmoid of the gate
logit, which is divided by the temperature 0.3 first; largest and mean). A row the backend cannot run says why.

    python bench/quantization_error.py --device cpu --dtype float32
    python bench/quantization_error.py --device cuda --dtype bfloat16 --modes int8,nf4,fp8
"""

import argparse
import tempfile

import torch

from modeling_videonsa import UNQUANTIZED_MODULES, VideoNSAForConditionalGeneration
from videonsa.testing import tiny_model, video_prompt

# 28 heads of 32: widths that bitsandbytes' CPU 4-bit kernel packs (outputs in groups of 32, inputs in blocks of 64)
# and that FP8's 128 x 128 tiles divide
TEXT = dict(hidden_size=28 * 32, intermediate_size=128,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 4, 4], "rope_theta": 10000.0})
VARIANTS = {
    "default (vision, lm_head, gates kept)": list(UNQUANTIZED_MODULES),
    "gates quantized too": [m for m in UNQUANTIZED_MODULES if not m.startswith("g_proj")],
    "vision tower quantized too": [m for m in UNQUANTIZED_MODULES if m != "model.visual"],
}


def quantization_config(mode, keep, dtype):
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config

    if mode == "fp8":
        return FineGrainedFP8Config(modules_to_not_convert=keep)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=keep)


def gate_values(model, inputs):
    """Logits and every layer's gate values ``sigmoid(g_proj_2(...) / temperature)`` of one forward pass."""
    gates, hooks = [], []
    temperature = model.config.text_config.nsa_gate_temperature
    for layer in model.model.language_model.layers:
        hooks.append(layer.self_attn.g_proj_2.register_forward_hook(
            lambda module, args, out: gates.append(torch.sigmoid(out.float() / temperature))))
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    for hook in hooks:
        hook.remove()
    return logits, gates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", default="int8,nf4")
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    prompts = [{k: v.to(args.device) for k, v in video_prompt([5, (2, 8, 8), 5], seed=s).items()}
               for s in range(args.prompts)]
    with tempfile.TemporaryDirectory() as folder:
        tiny_model(**TEXT).save_pretrained(folder)
        reference = VideoNSAForConditionalGeneration.from_pretrained(folder, dtype=dtype, device_map=args.device)
        expected = [gate_values(reference, inputs) for inputs in prompts]
        print("| mode | unquantized modules | logit error: max, mean (of the largest logit) | gate value error: max, mean |")
        print("|---|---|---|---|")
        for mode in args.modes.split(","):
            for variant, keep in VARIANTS.items():
                try:
                    model = VideoNSAForConditionalGeneration.from_pretrained(
                        folder, dtype=dtype, device_map=args.device,
                        quantization_config=quantization_config(mode, keep, dtype))
                    logit_errors, gate_errors = [], []
                    for inputs, (logits, gates) in zip(prompts, expected):
                        got_logits, got_gates = gate_values(model, inputs)
                        logit_errors.append((got_logits - logits).abs() / logits.abs().max())
                        gate_errors += [(g - e).abs().flatten() for g, e in zip(got_gates, gates)]
                    logit_errors, gate_errors = torch.cat([e.flatten() for e in logit_errors]), torch.cat(gate_errors)
                    print(f"| {mode} | {variant} | {logit_errors.max():.4f}, {logit_errors.mean():.4f} "
                          f"| {gate_errors.max():.4f}, {gate_errors.mean():.5f} |")
                except Exception as error:  # a backend that cannot run this row: the table says why
                    print(f"| {mode} | {variant} | fails: {type(error).__name__}: {str(error)[:90]} | |")


if __name__ == "__main__":
    main()
