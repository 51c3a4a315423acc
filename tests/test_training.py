"""Fine-tuning on CPU: LLaVA-Video records -> exact assistant-only labels -> Trainer steps on a tiny random VideoNSA.

Everything is made here: a tiny checkpoint (``build_tiny_checkpoint``, the released NSA settings), a few short mp4s
(``write_video``) and JSON / JSONL datasets in the LLaVA-Video form. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import videonsa.training as vt
from videonsa import train
from modeling_videonsa import VideoNSAForConditionalGeneration
from processing_videonsa import ContextBudgetExceededError, VideoNSAProcessor
from videonsa.testing import build_tiny_checkpoint, write_video

TOKENS_PER_CLIP = 16  # 8 frames of 64x64 at 4 fps -> 4 temporal patches x (56x56 -> 2x2 merged tokens)


def conversation(question: str, answer: str, video: str | None = "clips/clip0.mp4", **extra) -> dict:
    record = {"conversations": [{"from": "human", "value": ("<video>\n" if video else "") + question},
                                {"from": "gpt", "value": answer}], **extra}
    if video:
        record["video"] = video
    return record


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core runner OpenMP threads waiting on each
    other slow every step several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    build_tiny_checkpoint(root / "ckpt")
    (root / "data" / "clips").mkdir(parents=True)
    for seed in range(3):
        write_video(root / "data" / "clips" / f"clip{seed}.mp4", 8, 4, 64, 64, seed=seed)
    write_video(root / "data" / "clips" / "long.mp4", 80, 4, 64, 64)  # 160 video tokens
    train_records = [conversation("What moves?", f"The square {i}.", f"clips/clip{i % 3}.mp4", id=f"s{i}")
                     for i in range(6)]
    with open(root / "data" / "train.jsonl", "w") as file:
        file.writelines(json.dumps(r) + "\n" for r in train_records)
    (root / "data" / "eval.json").write_text(json.dumps(train_records[:2]))  # a JSON list, LLaVA-Video's file form
    return root


@pytest.fixture(scope="module")
def processor(workspace):
    return VideoNSAProcessor.from_pretrained(workspace / "ckpt", trust_remote_code=True)


@pytest.fixture()
def model(workspace):
    torch.manual_seed(0)
    return VideoNSAForConditionalGeneration.from_pretrained(workspace / "ckpt").train()


def collate(processor, records, root, **kwargs):
    return vt.VideoNSADataCollator(processor, video_root=str(root / "data"), **kwargs)(records)


def cli(workspace, output, *extra, model: str | None = "ckpt"):
    data = workspace / "data"
    return train.main([
        *(["--model_name_or_path", str(workspace / model)] if model else []), "--train_file", str(data / "train.jsonl"),
        "--output_dir", str(output), "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no", "--seed", "0",
        "--dataset_cache_dir", str(workspace / "datasets-cache"), *extra,
    ])


# ---------------------------------------------------------------------------------------------------- records, labels


def test_llava_records_become_the_messages_of_inference():
    from_value = {"video": ["a.mp4", "/abs/b.mp4"], "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<video>\nFirst, then <video>\nsecond?"},
        {"from": "gpt", "value": "Yes."},
    ]}
    role_content = {"video": ["a.mp4", "/abs/b.mp4"], "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<video>\nFirst, then <video>\nsecond?"},
        {"role": "assistant", "content": "Yes."},
    ]}
    messages, videos = vt.record_to_messages(from_value, "/root")
    assert videos == ["/root/a.mp4", "/abs/b.mp4"]
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "video", "video": "/root/a.mp4"},
                                     {"type": "text", "text": "First, then "},
                                     {"type": "video", "video": "/abs/b.mp4"},
                                     {"type": "text", "text": "second?"}]},
        {"role": "assistant", "content": "Yes."},
    ]
    assert vt.record_to_messages(role_content, "/root") == (messages, videos)
    untagged, _ = vt.record_to_messages({"video": "a.mp4", "conversations": [
        {"from": "human", "value": "What?"}, {"from": "gpt", "value": "X."}]})
    assert untagged[0]["content"] == [{"type": "video", "video": "a.mp4"}, {"type": "text", "text": "What?"}]
    for bad, message in [
        ({"video": "a.mp4", "conversations": [{"from": "human", "value": "<video><video>"},
                                              {"from": "gpt", "value": "X"}]}, "2 '<video>' tags"),
        ({"conversations": [{"from": "human", "value": "Hi"}]}, "no assistant"),
        ({"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "X"}]}, "speaker 'robot'"),
        ({"image": "a.jpg", "conversations": [{"from": "gpt", "value": "X"}]}, "image samples"),
    ]:
        with pytest.raises(ValueError, match=message):
            vt.record_to_messages(bad)


def test_labels_are_exactly_the_assistant_turns(workspace, processor):
    """Hand-built: the prompt pieces are -100; each answer and its <|im_end|> keep their ids; the '\\n' after it not."""
    record = {"video": "clips/clip0.mp4", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<video>\nWhat moves?"},
        {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "Where to?"},
        {"from": "gpt", "value": "Right."},
    ]}
    video = "<|vision_start|>" + "<|video_pad|>" * TOKENS_PER_CLIP + "<|vision_end|>"
    pieces = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + video + "What moves?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("A square.<|im_end|>", True),
        ("\n<|im_start|>user\nWhere to?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Right.<|im_end|>", True),
        ("\n", False),
    ]
    ids, labels = [], []
    for text, supervised in pieces:
        piece = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [-100] * len(piece)
    batch = collate(processor, [record], workspace)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    assert batch["video_grid_thw"].tolist() == [[4, 4, 4]]
    supervised = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(supervised) == "A square.<|im_end|>Right.<|im_end|>"
    as_roles = {"video": record["video"], "conversations": [
        {"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
        for t in record["conversations"]]}
    again = collate(processor, [as_roles], workspace)
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["labels"], batch["labels"])


def test_special_tokens_inside_an_answer_are_an_error_not_a_wrong_mask(workspace, processor):
    with pytest.raises(ValueError, match="assistant turns"):
        collate(processor, [conversation("Q?", "A<|im_end|>B")], workspace)


def test_collator_pads_right_and_batches_videos(workspace, processor, model):
    records = [conversation("What moves, and where does it go?", "Right.", "clips/clip1.mp4"),
               conversation("Hi", "Hello there, a longer answer.", video=None),
               conversation("Q?", "A.", "clips/clip2.mp4")]
    singles = [collate(processor, [r], workspace) for r in records]
    batch = collate(processor, records, workspace)
    length = max(s["input_ids"].shape[1] for s in singles)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape == (3, length)
    pad = processor.tokenizer.pad_token_id
    for row, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100), ("mm_token_type_ids", 0)):
            assert torch.equal(batch[key][row, :n], single[key][0]), key
            assert (batch[key][row, n:] == fill).all(), key
    with_video = [s for s in singles if "pixel_values_videos" in s]
    assert torch.equal(batch["pixel_values_videos"], torch.cat([s["pixel_values_videos"] for s in with_video]))
    assert batch["video_grid_thw"].tolist() == [[4, 4, 4], [4, 4, 4]]
    assert batch["second_per_grid_ts"].tolist() == [0.5, 0.5]
    # right padding changes nothing: the batch loss is the token-weighted mean of the single losses
    with torch.no_grad():
        total = sum(model(**s).loss * (s["labels"][:, 1:] != -100).sum() for s in singles)
        count = sum((s["labels"][:, 1:] != -100).sum() for s in singles)
        torch.testing.assert_close(model(**batch).loss, total / count)


def test_loss_on_supervised_logits_only_equals_the_models_loss(workspace, processor, model):
    batch = collate(processor, [conversation("What?", "A long answer here.", "clips/clip0.mp4"),
                                conversation("Q", "B.", video=None)], workspace)
    with torch.no_grad():
        expected = model(**batch).loss
        kept = vt.supervised_positions(batch["labels"])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs = model(**inputs, logits_to_keep=kept)
        assert outputs.logits.shape[1] == len(kept) < batch["input_ids"].shape[1] // 2
        torch.testing.assert_close(vt.supervised_causal_lm_loss(outputs, batch["labels"]), expected)
        n = (batch["labels"][:, 1:] != -100).sum()
        torch.testing.assert_close(vt.supervised_causal_lm_loss(outputs, batch["labels"], num_items_in_batch=2 * n),
                                   expected / 2)


# ---------------------------------------------------------------------------------------------------- context budget


def test_too_long_samples_are_reported_and_skipped_or_rejected(workspace, processor, tmp_path):
    from datasets import Dataset

    records = [conversation("Q?", "A.", "clips/clip0.mp4", id="ok"),
               conversation("Q?", "A.", "clips/long.mp4", id="long"),
               conversation("Q?", "A.", "clips/missing.mp4", id="missing")]
    dataset = Dataset.from_list(records)
    root = workspace / "data"
    report = tmp_path / "skipped.jsonl"
    kept = vt.prepare_dataset(dataset, processor, video_root=root, max_context_tokens=150, on_too_long="skip",
                              on_invalid="skip", report_path=report)
    assert kept["id"] == ["ok"]
    batch = collate(processor, [kept[0]], workspace)
    assert kept["length"] == [batch["input_ids"].shape[1]]  # the plan is the collated length
    reported = {r["id"]: r for r in map(json.loads, report.read_text().splitlines())}
    assert reported["long"]["kind"] == "too_long" and "> max_context_tokens=150" in reported["long"]["reason"]
    assert reported["missing"]["kind"] == "invalid" and "not found" in reported["missing"]["reason"]
    with pytest.raises(ContextBudgetExceededError, match=r"1 train sample\(s\) are too long(.|\n)*id='long'"):
        vt.prepare_dataset(dataset.select([0, 1]), processor, video_root=root, max_context_tokens=150,
                           on_too_long="error")
    with pytest.raises(ValueError, match="id='missing'"):
        vt.prepare_dataset(dataset.select([0, 2]), processor, video_root=root, max_context_tokens=150)
    # the collator never truncates: a too-long sample that reaches it is an error
    with pytest.raises(ContextBudgetExceededError, match="max_context_tokens=150"):
        collate(processor, [records[1]], workspace, max_context_tokens=150)


# ---------------------------------------------------------------------------------------------------- gates


def test_gate_monitor_reports_the_mean_sigmoid_gate_over_vision_tokens(workspace, processor, model):
    batch = collate(processor, [conversation("What moves?", "Right.", "clips/clip1.mp4"),
                                conversation("A much longer question here?", "Fine.", "clips/clip2.mp4")], workspace)
    position_ids, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                                 video_grid_thw=batch["video_grid_thw"],
                                                 second_per_grid_ts=batch["second_per_grid_ts"],
                                                 attention_mask=batch["attention_mask"])
    attention = model.model.language_model.layers[0].self_attn
    from nsa_kernels import reference

    is_vision = reference.token_is_vision(position_ids) & batch["attention_mask"].bool()
    assert 0 < is_vision.sum() < 2 * TOKENS_PER_CLIP  # the first token of each video is typed text
    hidden = {}
    handles = [layer.self_attn.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: hidden.__setitem__(i, kwargs["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(model.model.language_model.layers)]
    monitor = vt.GateMonitor(model, per_layer=True)
    with torch.no_grad():
        model(**batch)
        got = monitor.pop()
        model.eval()  # evaluation passes are not recorded: neither these direct calls of the gate MLP ...
        expected = []
        for i, layer in enumerate(model.model.language_model.layers):
            gates = torch.sigmoid(layer.self_attn.gate_logits(hidden[i]))[is_vision]  # [vision tokens, heads, 3]
            expected.append(gates.mean(dim=(0, 1)))
            for b, branch in enumerate(vt.GATE_BRANCHES):
                assert got[f"gate/layer_{i}/{branch}"] == pytest.approx(float(expected[-1][b]), abs=1e-6)
        for b, branch in enumerate(vt.GATE_BRANCHES):
            assert got[f"gate/{branch}"] == pytest.approx(float(torch.stack(expected)[:, b].mean()), abs=1e-6)
        model(**batch)  # ... nor an evaluation forward
        model.train()
        model.config.nsa_enabled = False
        model(**batch)  # dense passes compute no gate
    assert monitor.pop() == {} and attention.last_path == "dense"
    monitor.remove()
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------------------------------------------- training


def test_memorises_an_example_under_gradient_checkpointing_and_logs_gates(workspace, processor, model, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    record = conversation("What moves?", "A white square moves right.", "clips/clip0.mp4")
    dataset = vt.prepare_dataset(Dataset.from_list([record] * 4), processor, video_root=workspace / "data")
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=20, per_device_train_batch_size=2,
        learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        remove_unused_columns=False, gradient_checkpointing=True, disable_tqdm=True, seed=0,
    )
    trainer = vt.VideoNSATrainer(model=model, args=args, train_dataset=dataset,
                                 data_collator=vt.VideoNSADataCollator(processor))
    trainer.train()
    assert model.model.language_model.layers[0].gradient_checkpointing
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 20
    assert logs[-1]["loss"] < 0.2 * logs[0]["loss"], [round(entry["loss"], 3) for entry in logs]
    for entry in logs:
        assert all(0 < entry[f"gate/{branch}"] < 1 for branch in vt.GATE_BRANCHES)
    assert logs[0]["gate/cmp"] != logs[-1]["gate/cmp"]  # the gates train


def test_freezing_the_llm_and_vision_leaves_only_the_gates(workspace, processor, model):
    counts = vt.freeze_modules(model, vision_tower=True, merger=True, llm=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    layers = model.config.text_config.num_hidden_layers
    assert trainable == {f"model.language_model.layers.{i}.self_attn.{m}.{w}"
                         for i in range(layers) for m in vt.GATE_MODULES for w in ("weight", "bias")}
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    model.gradient_checkpointing_enable()
    batch = collate(processor, [conversation("What moves?", "Right.")], workspace)
    model(**batch).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # the last layer's gates only shape vision rows, which no supervised logit reads: the earlier layers' gates learn
    assert {n for n in trainable if ".layers.0." in n} <= grads <= trainable


def test_cli_checkpoint_resumes_to_the_same_state_with_eval_loss(workspace, tmp_path):
    data = workspace / "data"
    args = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-3",
            "--step_stats", "--eval_file", str(data / "eval.json"), "--eval_strategy", "steps", "--eval_steps", "2"]
    whole = cli(workspace, tmp_path / "whole", *args)
    assert [e["eval_loss"] for e in whole.state.log_history if "eval_loss" in e]  # evaluation loss during training
    assert (tmp_path / "whole" / "checkpoint-2" / "modeling_videonsa.py").is_file()  # checkpoints load on their own
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = cli(workspace, tmp_path / "resumed", *args, "--resume_from_checkpoint", "auto")
    assert resumed.state.global_step == 4
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "resumed"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (whole, resumed)]
    assert losses[1] == losses[0]  # the resumed log holds the checkpoint's history, then the same steps
    stats = json.loads((tmp_path / "whole" / "step_stats.json").read_text())
    assert stats["steps"] == 4 and len(stats["step_time_s"]) == 4


def test_cli_lora_trains_the_gates_and_projections_and_merges(workspace, tmp_path):
    cli(workspace, tmp_path, "--use_lora", "--merge_lora", "--lora_r", "4", "--max_steps", "3",
        "--learning_rate", "5e-3", "--gradient_checkpointing")
    assert (tmp_path / "adapter_config.json").is_file()
    assert not (tmp_path / "step_stats.json").exists()  # step timing (GPU syncs) only with --step_stats
    trained = load_file(tmp_path / "adapter_model.safetensors")
    targets = {key.split(".lora_B")[0].rsplit(".", 1)[-1] for key in trained if "lora_B" in key}
    assert targets == set(vt.DEFAULT_LORA_TARGETS)
    assert all(".language_model.layers." in key for key in trained)  # not the vision tower's MLPs
    # B starts at 0, so a non-zero B has trained (the last layer's gates shape only vision rows, which no
    # supervised logit reads, so layer 0 is the one to look at)
    assert all(t.abs().sum() > 0 for k, t in trained.items() if "lora_B" in k and ".layers.0." in k)
    # the merged folder is a plain VideoNSA checkpoint computing what the adapted model computes
    merged = VideoNSAForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    processor = VideoNSAProcessor.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    batch = collate(processor, [conversation("What moves?", "Right.")], workspace)
    from peft import PeftModel

    original = VideoNSAForConditionalGeneration.from_pretrained(workspace / "ckpt").eval()
    adapted = PeftModel.from_pretrained(VideoNSAForConditionalGeneration.from_pretrained(workspace / "ckpt"),
                                        str(tmp_path)).eval()
    with torch.no_grad():
        merged_logits = merged(**batch).logits
        torch.testing.assert_close(merged_logits, adapted(**batch).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged_logits, original(**batch).logits, atol=1e-3)


def test_cli_random_init_bf16_frozen_tower_and_config_overrides(workspace, tmp_path):
    trainer = cli(workspace, tmp_path, "--random_init", "--random_init_preset", "tiny",
                  "--config_overrides", "nsa_window_size=64,num_hidden_layers=1", "--dtype", "bfloat16", "--bf16",
                  "--gradient_checkpointing", "--freeze_vision_tower", "--max_steps", "2", model=None)
    model = trainer.model
    assert model.config.nsa_window_size == 64 and len(model.model.language_model.layers) == 1
    assert not any(p.requires_grad for n, p in model.model.visual.named_parameters() if "merger" not in n)
    assert all(p.requires_grad for p in model.model.visual.merger.parameters())
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs) and "gate/swa" in logs[0]


def test_cli_bf16_autocast_over_float32_weights(workspace, tmp_path):
    trainer = cli(workspace, tmp_path, "--bf16", "--max_steps", "1")
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_config_overrides_and_the_7b_preset():
    config = vt.preset_config("7b")
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        3584, 28, 28, 4)
    assert (text.vocab_size, vision.depth, vision.out_hidden_size, config.video_token_id) == (152064, 32, 3584, 151656)
    assert (config.nsa_block_size, config.nsa_block_count, config.nsa_window_size) == (64, 32, 256)
    small = vt.preset_config("small")  # the 7B's widths and NSA settings, 4 text layers and 4 vision blocks
    layers = {"num_hidden_layers": 4, "layer_types": ["full_attention"] * 4}
    assert small.text_config.to_dict() == {**text.to_dict(), **layers}
    assert (small.vision_config.depth, small.vision_config.fullatt_block_indexes) == (4, [3])
    small = vt.apply_config_overrides(config, "nsa_enabled=false, num_hidden_layers=2, vision_config.depth=2")
    assert small.nsa_enabled is False and small.text_config.num_hidden_layers == 2
    assert len(small.text_config.layer_types) == 2 and small.vision_config.fullatt_block_indexes == [1]
    assert config.nsa_enabled and config.text_config.num_hidden_layers == 28  # the original is untouched
    with pytest.raises(ValueError, match="unknown config key"):
        vt.apply_config_overrides(config, "no_such_key=1")
    with pytest.raises(ValueError, match="nsa_block_size"):
        vt.apply_config_overrides(config, "nsa_block_size=48")


def test_scaling_configs_name_the_model_and_parse():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[1] / "configs"
    fsdp = load_config_from_file(str(root / "accelerate_fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.mixed_precision == "bf16"
    assert fsdp.fsdp_config["fsdp_version"] == 2
    wrapped = set(fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert wrapped == set(VideoNSAForConditionalGeneration._no_split_modules)
    zero3 = json.loads((root / "deepspeed_zero3.json").read_text())
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero3["bf16"]["enabled"] == "auto" and zero3["train_micro_batch_size_per_gpu"] == "auto"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_deepspeed_zero3_trains_like_a_plain_run(workspace, tmp_path):
    """``videonsa-train --deepspeed configs/deepspeed_zero3.json`` under ``torchrun`` (one process on the CPU) trains to the
    same losses and the same saved weights as a plain run. The config is the shipped one with the persistence
    threshold at 0, so every weight is partitioned and gathered by ZeRO-3's hooks (the tiny model's weights would
    all stay whole under the default threshold)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    config = json.loads((Path(__file__).resolve().parents[1] / "configs" / "deepspeed_zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    (tmp_path / "two.jsonl").write_text("".join(
        json.dumps(conversation("What moves?", f"The square {i}.", f"clips/clip{i}.mp4")) + "\n" for i in range(2)))
    common = ["--model_name_or_path", str(workspace / "ckpt"), "--train_file", str(tmp_path / "two.jsonl"),
              "--video_root", str(workspace / "data"), "--report_to", "none", "--disable_tqdm", "true",
              "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no", "--seed", "0",
              "--max_steps", "2", "--learning_rate", "1e-3", "--dataset_cache_dir", str(tmp_path / "cache")]
    plain = train.main([*common, "--use_cpu", "--output_dir", str(tmp_path / "plain")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()),
         "-m", "videonsa.train", *common, "--deepspeed", str(tmp_path / "zero3.json"), "--output_dir", str(tmp_path / "zero3")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads((tmp_path / "zero3" / "trainer_state.json").read_text())
    assert torch.load(tmp_path / "zero3" / "training_args.bin", weights_only=False).deepspeed == str(
        tmp_path / "zero3.json")
    histories = (plain.state.log_history, state["log_history"])
    losses = [[e["loss"] for e in history if "loss" in e] for history in histories]
    assert len(losses[0]) == 2
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=0)
    ours, expected = (load_file(tmp_path / name / "model.safetensors") for name in ("zero3", "plain"))
    assert ours.keys() == expected.keys()
    start = load_file(workspace / "ckpt" / "model.safetensors")
    key = next(k for k in expected if "g_proj_1.weight" in k)
    assert not torch.equal(expected[key], start[key])  # trained
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------- benchmark


def test_training_benchmark_reports_both_rows_and_compares_losses(tmp_path):
    """``bench/bench_training.py`` on the tiny model: both rows train on synthetic video samples through the Trainer,
    the report is written, and a global batch of two split into two micro-batches (as two processes split it) gives
    the losses of one batch of two, which the ``--reference`` comparison confirms."""
    from bench import bench_training

    common = ["--preset", "tiny", "--tokens", "256", "--steps", "1", "--warmup-steps", "1", "--backend", "torch",
              "--dtype", "float32", "--no-bf16", "--output-dir", str(tmp_path / "runs")]
    first = bench_training.main([*common, "--grad-accum", "2", "--out", str(tmp_path / "accumulated.md")])
    results = first["results"]
    assert list(results) == ["videonsa", "dense"]
    for entry in results.values():
        assert "error" not in entry, entry
        assert len(entry["loss"]) == 2 and all(0 < loss < 20 for loss in entry["loss"])  # finite, about ln(vocab)
        assert entry["mean_step_s"] > 0 and entry["tokens_per_s"] > 0 and len(entry["step_time_s"]) == 2
        assert entry["samples"] == 2 and entry["tokens_per_sample"] == 256 and entry["tokens_per_step"] == 512
        t, h, w = entry["video_grid_thw"]
        assert entry["video_tokens"] == t * h * w // 4 and entry["video_tokens"] % 16 == 0  # one NSA block a patch
        assert entry["supervised_tokens"] == 16 + 1  # the answer and its <|im_end|>
    assert results["videonsa"]["attention_path"].startswith("hybrid") and results["dense"]["attention_path"] == "dense"
    assert all(0 < results["videonsa"]["gates"][f"gate/{b}"] < 1 for b in vt.GATE_BRANCHES)
    assert results["dense"]["gates"] == {}
    report = (tmp_path / "accumulated.md").read_text()
    assert "| videonsa | hybrid" in report and "| dense | dense |" in report
    saved = json.loads((tmp_path / "accumulated.json").read_text())
    assert saved["results"]["dense"]["loss"] == results["dense"]["loss"]

    second = bench_training.main([*common, "--rows", "dense", "--batch-size", "2", "--loss-rtol", "1e-4",
                                  "--reference", str(tmp_path / "accumulated.json"),
                                  "--out", str(tmp_path / "batched.md")])
    comparison = second["comparison"]["dense"]
    assert comparison["same_initial_weights"] and comparison["steps"] == 2 and comparison["within"], comparison
    assert "Loss against the reference run" in (tmp_path / "batched.md").read_text()


# ---------------------------------------------------------------------------------------------------- undecodable videos


def cut_video(path):
    """A video whose header reads (the planning pass accepts it) but whose frames are cut off at the end: an .avi
    (header first) truncated to half its size."""
    write_video(path, 8, 4, 64, 64, seed=5)
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.truncate(size // 2)
    return path


@pytest.fixture()
def cut_data(workspace, tmp_path):
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    for name in ("clip0.mp4", "clip1.mp4"):
        shutil.copyfile(workspace / "data" / "clips" / name, data / "clips" / name)
    cut_video(data / "clips" / "cut.avi")
    records = [conversation("What moves?", f"The square {i}.", f"clips/clip{i % 2}.mp4", id=f"s{i}") for i in range(5)]
    records.insert(1, conversation("What moves?", "Nothing.", "clips/cut.avi", id="cut"))
    with open(data / "train.jsonl", "w") as file:
        file.writelines(json.dumps(r) + "\n" for r in records)
    return data, records


def test_a_video_cut_at_the_end_is_skipped_with_a_log_line_or_stops_naming_it(cut_data, processor, model, tmp_path,
                                                                              caplog):
    from datasets import Dataset

    data, records = cut_data
    planned = vt.prepare_dataset(Dataset.from_list(records), processor, video_root=data)
    assert "cut" in planned["id"]  # its header reads: the planning pass keeps it
    good, cut = planned[0], planned[planned["id"].index("cut")]
    failures = tmp_path / "failures.jsonl"
    skipping = vt.VideoNSADataCollator(processor, on_invalid="skip", failures_path=failures)
    with caplog.at_level("WARNING"):
        batch = skipping([good, cut])
    assert batch["input_ids"].shape[0] == 1 and torch.equal(batch["input_ids"], skipping([good])["input_ids"])
    lines = [r.getMessage() for r in caplog.records if "id='cut'" in r.getMessage()]
    assert len(lines) == 1 and "could not be decoded" in lines[0] and "cut.avi" in lines[0], caplog.text
    [entry] = map(json.loads, failures.read_text().splitlines())
    assert entry["id"] == "cut" and entry["index"] == cut["index"] and entry["videos"][0].endswith("cut.avi")
    # a batch left empty trains nothing: one padding token, no label, a zero loss with a gradient of zero
    empty = vt.VideoNSADataCollator(processor, on_invalid="skip")([cut])
    assert empty["input_ids"].shape == (1, 1) and bool((empty["labels"] == vt.IGNORE_INDEX).all())
    keep = vt.supervised_positions(empty["labels"])
    loss = vt.supervised_causal_lm_loss(model(**{k: v for k, v in empty.items() if k != "labels"},
                                              logits_to_keep=keep), empty["labels"])
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # on_invalid="error": the error names the sample, before any step computes on it
    stopping = vt.VideoNSADataCollator(processor, failures_path=tmp_path / "stop.jsonl")
    with pytest.raises(vt.SampleDecodingError, match=r"sample #1 \(id='cut'.*cut\.avi.*--resume_from_checkpoint"):
        stopping([good, cut])
    assert read_ids(tmp_path / "stop.jsonl") == ["cut"]
    # a sample recorded as undecodable is skipped without decoding it again, whatever the policy
    resumed = vt.VideoNSADataCollator(processor, known_invalid=vt.read_failures(tmp_path / "stop.jsonl"))
    assert torch.equal(resumed([good, cut])["input_ids"], batch["input_ids"])


def read_ids(path):
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_cli_stops_on_an_undecodable_video_and_a_resumed_run_gets_past_it(workspace, cut_data, tmp_path):
    data, records = cut_data
    args = ["--train_file", str(data / "train.jsonl"), "--video_root", str(data), "--max_steps", "3",
            "--save_strategy", "steps", "--save_steps", "1", "--learning_rate", "1e-3"]
    with pytest.raises(vt.SampleDecodingError, match="id='cut'"):
        cli(workspace, tmp_path / "run", *args)
    assert read_ids(tmp_path / "run" / "undecodable_samples.jsonl") == ["cut"]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]  # stopped in step 2
    resumed = cli(workspace, tmp_path / "run", *args, "--resume_from_checkpoint", "auto")
    assert resumed.state.global_step == 3
    skipped = cli(workspace, tmp_path / "skip", *args, "--on_invalid", "skip")  # the same data, skipped and logged
    assert skipped.state.global_step == 3 and read_ids(tmp_path / "skip" / "undecodable_samples.jsonl") == ["cut"]
