"""The lmms-eval model ``videonsa`` (videonsa.eval): entry point, CLI runs end to end, answers against ``generate``,
model arguments, per-sample failures, and the paper's six benchmark tasks on stub records.

These tests run in the eval environment (``bash scripts/setup_eval.sh``, then
``.venv-eval/bin/python -m pytest tests/test_eval.py``; ``scripts/test_eval.sh`` does both). Without lmms-eval they
are skipped, except under CI, where a missing lmms-eval is a failure.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import lmms_eval
except ImportError as _error:  # pragma: no cover - depends on the environment
    _message = (
        "lmms-eval is not installed in this environment: run `bash scripts/setup_eval.sh`, then "
        "`.venv-eval/bin/python -m pytest tests/test_eval.py` (or `bash scripts/test_eval.sh`)"
    )
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{_message}. CI must run these tests ({_error}).", pytrace=False)
    pytest.skip(_message, allow_module_level=True)

from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model
from transformers import AutoModel, AutoProcessor

from videonsa.eval.model import VideoNSA, VideoNSASimple
from videonsa.testing import build_tiny_checkpoint, write_video

TASKS_DIR = Path(lmms_eval.__file__).parent / "tasks"
MC_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def checkpoint(workdir):
    return build_tiny_checkpoint(workdir / "tiny-videonsa")


@pytest.fixture(scope="module")
def videos(workdir):
    """112 x 112 clips (16 tokens per frame pair at the default 50,176 max pixels): two short ones and one of 20 s
    (640 video tokens at 4 fps) for the budget."""
    return {
        "a": write_video(workdir / "a.mp4", 16, 8, 112, 112, seed=1),
        "b": write_video(workdir / "b.mp4", 24, 8, 112, 112, seed=2),
        "long": write_video(workdir / "long.mp4", 160, 8, 112, 112, seed=3),
    }


@pytest.fixture(scope="module")
def reference(checkpoint):
    """``generate`` on a prompt as the README does it, independently of videonsa.eval: AutoModel / AutoProcessor,
    the processor's chat template and its defaults (4 fps, 50,176 pixels), greedy."""
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)

    def answer(video: str, text: str, max_new_tokens: int, **processor_kwargs) -> str:
        messages = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": text}]}]
        inputs = processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs=processor_kwargs,
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]

    answer.model, answer.processor = model, processor
    return answer


@pytest.fixture(scope="module")
def lm(checkpoint):
    """The registered model class, built as lmms-eval builds it (argument string + harness config)."""
    return get_model("videonsa").create_from_arg_string(
        f"pretrained={checkpoint},dtype=float32", {"batch_size": 2, "device": "cpu"}
    )


def make_lm(checkpoint, args: str = "", simple: bool = False):
    model_args = f"pretrained={checkpoint},dtype=float32" + (f",{args}" if args else "")
    return get_model("videonsa", force_simple=simple).create_from_arg_string(model_args, {"device": "cpu"})


def chat_request(doc_id, text, video, gen_kwargs, task="t", split="test", start=None):
    def doc_to_messages(doc):
        entry = {"type": "video", "url": doc["video"]}
        if start is not None:
            entry["start_time"] = start
        return [{"role": "user", "content": [entry, {"type": "text", "text": doc["text"]}]}]

    return Instance(
        request_type="generate_until",
        arguments=(text, doc_to_messages, dict(gen_kwargs), doc_id, task, split),
        idx=0,
        metadata={"task": task, "doc_id": doc_id, "repeats": 1},
    )


# ---------------------------------------------------------------------------------------------------- CLI


def run_lmms_eval(workdir: Path, args: list[str], hf_home: Path | None = None) -> subprocess.CompletedProcess:
    """The installed ``lmms-eval`` console script of this environment, offline."""
    executable = Path(sys.executable).with_name("lmms-eval")
    assert executable.exists(), f"lmms-eval's console script is missing beside {sys.executable}"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(hf_home or workdir / "hf-home"),
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
    )
    return subprocess.run([str(executable), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def read_run(out_dir: Path, process: subprocess.CompletedProcess, tasks: list[str]):
    """The results file and the per-task samples a run wrote. lmms-eval exits 0 even when the evaluation raised,
    so the files are the proof that it ran."""
    log = process.stdout + process.stderr
    assert process.returncode == 0, log[-6000:]
    results = glob.glob(str(out_dir / "*" / "*_results.json"))
    assert len(results) == 1, f"no results file was written:\n{log[-6000:]}"
    samples = {}
    for task in tasks:
        (path,) = glob.glob(str(out_dir / "*" / f"*_samples_{task}.jsonl"))
        samples[task] = {row["doc_id"]: row for row in map(json.loads, Path(path).read_text().splitlines())}
    return json.loads(Path(results[0]).read_text()), samples, log


TINY_UTILS = """
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    options = "".join(f"\\n{chr(65 + i)}. {option}" for i, option in enumerate(doc.get("options") or []))
    return kwargs.get("pre_prompt", "") + doc["question"] + options + kwargs.get("post_prompt", "")


def process_mc(doc, results):
    return {"accuracy": float(results[0].strip()[:1].upper() == doc["answer"])}


def process_open(doc, results):
    return {"answered": float(bool(results[0].strip()))}
"""


def tiny_task_yaml(name: str, data: Path, process: str, metric: str, max_new_tokens: int, post_prompt: str) -> str:
    return "\n".join(
        [
            f"task: {name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {data}",
            "test_split: test",
            "output_type: generate_until",
            "doc_to_visual: !function utils.doc_to_visual",
            "doc_to_text: !function utils.doc_to_text",
            "doc_to_target: answer",
            "generation_kwargs:",
            f"  max_new_tokens: {max_new_tokens}",
            "  temperature: 0",
            "  do_sample: false",
            f"process_results: !function utils.{process}",
            "metric_list:",
            f"  - metric: {metric}",
            "    aggregation: mean",
            "    higher_is_better: true",
            "lmms_eval_specific_kwargs:",
            "  default:",
            '    pre_prompt: ""',
            f"    post_prompt: {json.dumps(post_prompt)}",
            "",
        ]
    )


@pytest.fixture(scope="module")
def tiny_tasks(workdir, videos):
    """A multiple-choice and an open-ended task over the synthetic videos, given to lmms-eval with --include_path.
    Doc 1 of the multiple-choice task names a missing video and doc 3 a video over the run's token budget."""
    folder = workdir / "tasks"
    folder.mkdir()
    (folder / "utils.py").write_text(TINY_UTILS)
    mc = [
        {"video": videos["a"], "question": "What moves?", "options": ["a square", "a circle"], "answer": "A"},
        {"video": str(workdir / "missing.mp4"), "question": "What colour?", "options": ["red", "blue"], "answer": "B"},
        {"video": videos["b"], "question": "Where is it?", "options": ["left", "right", "up"], "answer": "C"},
        {"video": videos["long"], "question": "How long?", "options": ["short", "long"], "answer": "B"},
    ]
    open_ended = [
        {"video": videos["b"], "question": "Describe the video.", "answer": "a moving square"},
        {"video": videos["a"], "question": "What happens at the end?", "answer": "it stops"},
    ]
    for name, docs in (("mc", mc), ("open", open_ended)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / "mc.yaml").write_text(
        tiny_task_yaml("videonsa_tiny_mc", folder / "mc.jsonl", "process_mc", "accuracy", 4, MC_POST_PROMPT)
    )
    (folder / "open.yaml").write_text(
        tiny_task_yaml("videonsa_tiny_open", folder / "open.jsonl", "process_open", "answered", 6, "")
    )
    return {"folder": folder, "videonsa_tiny_mc": mc, "videonsa_tiny_open": open_ended}


def test_entry_point_is_installed_and_resolves():
    (entry,) = [ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "videonsa"]
    assert entry.value == "videonsa.eval:model_manifest"
    assert entry.dist.name == "videonsa"
    assert get_model("videonsa") is VideoNSA and VideoNSA.is_simple is False
    assert get_model("videonsa", force_simple=True) is VideoNSASimple and VideoNSASimple.is_simple is True


@pytest.mark.slow
def test_cli_end_to_end_answers_equal_generate_and_failures_are_recorded(workdir, checkpoint, tiny_tasks, reference):
    out, failure_log = workdir / "out-tiny", workdir / "failures.jsonl"
    tasks = ["videonsa_tiny_mc", "videonsa_tiny_open"]
    # a budget the short clips fit (<= 250 tokens) and the 20 s one (~800) does not; batches of 2 put each failing
    # sample beside a good one
    process = run_lmms_eval(
        workdir,
        [
            "--model",
            "videonsa",
            "--model_args",
            f"pretrained={checkpoint},dtype=float32,max_context_tokens=400,failure_log={failure_log}",
            "--tasks",
            ",".join(tasks),
            "--include_path",
            str(tiny_tasks["folder"]),
            "--batch_size",
            "2",
            "--device",
            "cpu",
            "--output_path",
            str(out),
            "--log_samples",
        ],
    )
    results, samples, log = read_run(out, process, tasks)
    assert results["config"]["model"] == "videonsa"
    assert results["config"]["model_backend"] == "videonsa.eval.model.VideoNSA (chat)"
    assert "accuracy,none" in results["results"]["videonsa_tiny_mc"]
    assert results["results"]["videonsa_tiny_open"]["answered,none"] == 1.0

    failed = {1: "FileNotFoundError", 3: "ContextBudgetExceededError"}
    for task, max_new_tokens in (("videonsa_tiny_mc", 4), ("videonsa_tiny_open", 6)):
        assert set(samples[task]) == set(range(len(tiny_tasks[task])))
        for doc_id, doc in enumerate(tiny_tasks[task]):
            row = samples[task][doc_id]
            assert row["input"].startswith(doc["question"])
            if task == "videonsa_tiny_mc" and doc_id in failed:
                assert row["filtered_resps"] == "" and row["token_counts"] == [None]
                continue
            expected = reference(doc["video"], row["input"], max_new_tokens)
            assert expected.strip(), "the reference answer is empty: the comparison would prove nothing"
            assert row["filtered_resps"] == expected, (task, doc_id)
            assert row["token_counts"][0]["output_tokens"] >= 1
    records = [json.loads(line) for line in failure_log.read_text().splitlines()]
    assert {(r["task"], r["doc_id"], r["error"]) for r in records} == {
        ("videonsa_tiny_mc", doc_id, error) for doc_id, error in failed.items()
    }
    budget = next(r for r in records if r["doc_id"] == 3)["message"]
    assert "max_context_tokens=400" in budget and "reduce_fps_to_fit=True" in budget
    assert "missing.mp4" in next(r for r in records if r["doc_id"] == 1)["message"]
    assert "2 of 6 samples failed" in log  # one generate_until call serves both tasks


# ---------------------------------------------------------------------------------------------------- in process


def test_nsa_knobs_reach_the_model_config_and_the_forward(checkpoint, videos):
    lm = make_lm(checkpoint, "nsa_enabled=False,nsa_block_count=4,nsa_window_size=64,nsa_block_size=32")
    config = lm.model.config
    assert (config.nsa_enabled, config.nsa_block_count, config.nsa_window_size, config.nsa_block_size) == (
        False,
        4,
        64,
        32,
    )
    attention = lm.model.model.language_model.layers[0].self_attn
    assert (attention.config.nsa_enabled, attention.config.nsa_block_count, attention.config.nsa_window_size) == (
        False,
        4,
        64,
    )
    assert lm.processor.nsa_block_size == 32  # the processor's alignment check follows the model

    # the dense switch changes what the forward computes on a video prompt (NSA on the same weights differs)
    messages = lm._hf_messages(
        [{"role": "user", "content": [{"type": "video", "url": videos["a"]}, {"type": "text", "text": "Hi"}]}]
    )
    inputs = lm.encode([messages])
    with torch.no_grad():
        dense = lm.model(**inputs).logits
        lm.model.config.nsa_enabled = True
        sparse = lm.model(**inputs).logits
    assert not torch.allclose(dense, sparse)
    assert make_lm(checkpoint).model.config.nsa_block_count == 32  # unset keeps the checkpoint's value


def test_video_knobs_reach_the_processor(checkpoint, videos):
    hf = [{"role": "user", "content": [{"type": "video", "video": videos["b"]}, {"type": "text", "text": "Hi"}]}]
    # 3 s at 8 fps: 4 fps -> 12 frames -> 6 temporal patches of 4x4 merged tokens (112 px)
    assert make_lm(checkpoint).encode([hf])["video_grid_thw"].tolist() == [[6, 8, 8]]
    assert make_lm(checkpoint, "fps=2").encode([hf])["video_grid_thw"].tolist() == [[3, 8, 8]]
    assert make_lm(checkpoint, "max_frames=4").encode([hf])["video_grid_thw"].tolist() == [[2, 8, 8]]
    # tokens per frame: 3,136 pixels -> 56 x 56 -> 2x2 merged tokens per temporal patch
    assert make_lm(checkpoint, "max_pixels=3136").encode([hf])["video_grid_thw"].tolist() == [[6, 4, 4]]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            "nsa_windw_size=128",
            r"Unknown videonsa model argument\(s\): 'nsa_windw_size' \(did you mean 'nsa_window_size'\?\)",
        ),
        ("nsa_block_count=0", "nsa_block_count must be an integer >= 1"),
        (
            "nsa_block_count=128",
            "nsa_block_count rounded up to a power of two must be <= nsa_block_size",
        ),  # the config's check
        ("nsa_block_size=48", "nsa_block_size must be a power of two"),
        ("nsa_backend=cuda", "nsa_backend must be one of"),
        ("fps=0", "fps must be a number > 0"),
        ("reduce_fps_to_fit=maybe", "reduce_fps_to_fit must be true or false"),
        ("max_context_tokens=-5", "max_context_tokens must be an integer >= 1"),
        ("dtype=int8", "dtype must be one of"),
    ],
)
def test_bad_arguments_give_clear_errors(checkpoint, args, message):
    with pytest.raises(ValueError, match=message):
        make_lm(checkpoint, args)


def test_batch_size_auto_is_refused(checkpoint):
    with pytest.raises(ValueError, match="batch_size auto"):
        get_model("videonsa").create_from_arg_string(f"pretrained={checkpoint}", {"batch_size": "auto"})


def test_reduce_fps_to_fit_answers_the_long_video_and_spares_its_batch_neighbour(checkpoint, videos, reference):
    lm = get_model("videonsa").create_from_arg_string(
        f"pretrained={checkpoint},dtype=float32,max_context_tokens=400,reduce_fps_to_fit=True",
        {"batch_size": 2, "device": "cpu"},
    )
    lm.task_dict = {
        "t": {"test": [{"video": videos["long"], "text": "How long?"}, {"video": videos["a"], "text": "What moves?"}]}
    }
    answers = lm.generate_until(
        [
            chat_request(0, "How long?", videos["long"], {"max_new_tokens": 5}),
            chat_request(1, "What moves?", videos["a"], {"max_new_tokens": 5}),
        ]
    )
    assert answers[0].token_counts is not None and answers[0].token_counts.input_tokens <= 400
    assert answers[0].text == reference(videos["long"], "How long?", 5, max_context_tokens=400, reduce_fps_to_fit=True)
    # the short clip keeps 4 fps: the long one's lower rate does not spread to the rest of its batch
    alone = reference.processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "video", "video": videos["a"]}, {"type": "text", "text": "What moves?"}],
            }
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert answers[1].token_counts.input_tokens == alone["input_ids"].shape[1]
    assert answers[1].text == reference(videos["a"], "What moves?", 5)
    assert lm.failures == []


def test_batches_stop_strings_and_unsupported_requests(lm, videos, reference):
    docs = [
        {"video": videos["a"], "text": "First?"},
        {"video": videos["b"], "text": "Second?"},
        {"video": videos["a"], "text": "Third?"},
    ]
    lm.task_dict = {"t": {"test": docs}}
    full = reference(videos["b"], "Second?", 6)
    stop = full.strip()[1]
    requests = [
        chat_request(0, "First?", videos["a"], {"max_new_tokens": 6}),
        chat_request(1, "Second?", videos["b"], {"max_new_tokens": 6, "until": [stop]}),
        chat_request(2, "Third?", videos["a"], {"max_new_tokens": 6}, start=1.0),  # a clip: not supported
    ]
    answers = lm.generate_until(requests)
    assert answers[0].text == reference(videos["a"], "First?", 6)
    assert answers[1].text == full.split(stop)[0]
    assert answers[2].text == "" and answers[2].token_counts is None
    assert lm.failures[-1]["error"] == "UnsupportedSampleError" and "Cut the clip" in lm.failures[-1]["message"]


def test_simple_mode_gives_the_chat_answer(checkpoint, videos, reference):
    lm = make_lm(checkpoint, simple=True)
    lm.task_dict = {"t": {"test": [{"video": videos["a"]}]}}
    request = Instance(
        request_type="generate_until",
        arguments=("What moves?", {"max_new_tokens": 5}, lambda doc: [doc["video"]], 0, "t", "test"),
        idx=0,
        metadata={"task": "t", "doc_id": 0, "repeats": 1},
    )
    (answer,) = lm.generate_until([request])
    assert answer.text == reference(videos["a"], "What moves?", 5)


def test_in_tree_classes_when_asked(checkpoint, videos, reference):
    lm = make_lm(checkpoint, "in_tree=True")
    assert type(lm.model).__module__ == "modeling_videonsa" and type(lm.processor).__module__ == "processing_videonsa"
    lm.task_dict = {"t": {"test": [{"video": videos["b"], "text": "What moves?"}]}}
    (answer,) = lm.generate_until([chat_request(0, "What moves?", videos["b"], {"max_new_tokens": 5})])
    assert answer.text == reference(videos["b"], "What moves?", 5)
    remote = make_lm(checkpoint)
    assert type(remote.model).__module__.startswith("transformers_modules.")  # the checkpoint's own code


def test_the_authors_release_loads_as_videonsa(workdir, checkpoint, videos):
    """A checkpoint in the authors' layout (Qwen2.5-VL config.json, gates in the weights, no code files), which
    AutoModel would load as plain Qwen2.5-VL: the model argument loads it as VideoNSA with its gates and NSA settings,
    and it answers as the VideoNSA checkpoint with the same settings."""
    from safetensors.torch import load_file

    from hub_utils import write_authors_checkpoint
    from modeling_videonsa import model_key

    authors = write_authors_checkpoint(checkpoint, workdir / "authors", block_counts=2, window_size=32)
    lm = make_lm(authors)
    assert type(lm.model).__module__ == "modeling_videonsa"
    assert (lm.model.config.nsa_block_count, lm.model.config.nsa_window_size) == (2, 32)
    state = lm.model.state_dict()
    written = load_file(authors / "model.safetensors")
    assert any("g_proj" in name for name in written) and len(written) == len(state)
    assert all(torch.equal(state[model_key(name)], tensor) for name, tensor in written.items())
    same = make_lm(checkpoint, "in_tree=True,nsa_block_count=2,nsa_window_size=32")
    answers = []
    for model in (lm, same):
        model.task_dict = {"t": {"test": [{"video": videos["b"], "text": "What moves?"}]}}
        (answer,) = model.generate_until([chat_request(0, "What moves?", videos["b"], {"max_new_tokens": 5})])
        answers.append(answer.text)
    assert answers[0] == answers[1]


def test_system_prompt_and_loglikelihood(checkpoint, videos):
    lm = make_lm(checkpoint, "system_prompt=Be brief.")
    messages = lm._hf_messages(
        [{"role": "user", "content": [{"type": "video", "url": videos["a"]}, {"type": "text", "text": "Hi"}]}]
    )
    text = lm.processor.batch_decode(lm.encode([messages])["input_ids"])[0]
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    request = Instance(
        request_type="loglikelihood",
        arguments=("ctx", " A", lambda doc: [], 0, "some_mc_task", "test"),
        idx=0,
        metadata={"task": "some_mc_task", "doc_id": 0, "repeats": 1},
    )
    with pytest.raises(NotImplementedError, match="some_mc_task"):
        lm.loglikelihood([request])


# ------------------------------------------------------------------------------------------------- the six benchmarks

# The paper's six benchmarks as lmms-eval 0.7 names them. Their datasets come from the Hub, so each runs here on one
# stub record: a task YAML that includes the real one (its prompt functions, generation settings and post-prompts)
# and only swaps the dataset for a local JSON file; the video lies where the task's own code looks for it under
# HF_HOME. --predict_only: the scoring needs the full datasets, and is the tasks' code, not ours.
BENCHMARKS = {
    "longvideobench_val_v": ("longvideobench/longvideobench_val_v.yaml", "validation"),
    "mlvu_test": ("mlvu/mlvu_test.yaml", "test"),
    "timescope": ("timescope/timescope.yaml", "test"),
    "longtimescope": ("longtimescope/longtimescope.yaml", "test"),
    "tomato": ("tomato/tomato.yaml", "test"),
    "vsibench": ("vsibench/vsibench.yaml", "test"),
}


def _task_utils(name: str):
    path = TASKS_DIR / Path(BENCHMARKS[name][0]).parent / "utils.py"
    spec = importlib.util.spec_from_file_location(f"_stub_{name}_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # reads HF_HOME at import, as the harness's own import does
    return module


def _stub(name: str) -> tuple[dict, str]:
    """(record, video path relative to the folder the task's code reads videos from)"""
    if name == "longvideobench_val_v":
        doc = {
            "id": "lvb-0",
            "video_path": "lvb.mp4",
            "question": "What does the square do?",
            "correct_choice": 1,
            "duration_group": 15,
            "question_category": "TOS",
        }
        doc.update({f"option{i}": option for i, option in enumerate(["stays", "moves", "N/A", "N/A", "N/A"])})
        return doc, "lvb.mp4"
    if name == "mlvu_test":
        return {
            "video_name": "mlvu.mp4",
            "question": "What moves?\n(A) a square\n(B) a circle",
            "answer": "A",
            "task_type": "count",
        }, "mlvu.mp4"
    if name in ("timescope", "longtimescope"):
        return {
            "id": f"{name}-0",
            "video": f"{name}.mp4",
            "input": "Which shape moves?\nA. square\nB. circle",
            "answer": "A",
            "type": "motion",
            "length": 3,
        }, f"{name}.mp4"
    if name == "tomato":
        return {
            "id": "tomato-0",
            "video_path": "tomato.mp4",
            "question": "Which way does the square move?",
            "options": ["left", "right"],
            "answer": 1,
            "reason_type": "direction",
            "demonstration_type": "object",
        }, "tomato.mp4"
    return {
        "dataset": "arkitscenes",
        "scene_name": "scene0",
        "question": "Which object appears first?",
        "question_type": "obj_appearance_order",
        "options": ["A. square", "B. circle"],
        "ground_truth": "A",
    }, "arkitscenes/scene0.mp4"


def _video_folder(name: str, utils) -> Path:
    if name == "longvideobench_val_v":
        return Path(utils._resolve_dataset_dir("longvideobench_val_v.yaml", "video_subdir", "videos/")[0])
    if name == "mlvu_test":
        return Path(utils.cache_dir_test)
    if name in ("timescope", "longtimescope"):
        return Path(utils.base_cache_dir) / utils.cache_name
    if name == "tomato":
        return Path(utils.cache_dir)
    return Path(utils.base_cache_dir) / utils.cache_name


@pytest.mark.slow
def test_the_six_benchmark_tasks_on_stub_records(workdir, checkpoint, videos, reference, monkeypatch):
    hf_home = workdir / "hf-benchmarks"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    folder = workdir / "benchmark-stubs"
    folder.mkdir()
    expected_video = {}
    for name, (yaml_path, split) in BENCHMARKS.items():
        utils = _task_utils(name)
        doc, relative = _stub(name)
        video = _video_folder(name, utils) / relative
        video.parent.mkdir(parents=True, exist_ok=True)
        video.write_bytes(Path(videos["a"]).read_bytes())
        expected_video[name] = str(video)
        (folder / f"{name}.jsonl").write_text(json.dumps(doc) + "\n")
        lines = [
            f"include: {TASKS_DIR / yaml_path}",
            f"task: stub_{name}",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    {split}: {folder / (name + '.jsonl')}",
        ]
        (folder / f"stub_{name}.yaml").write_text("\n".join(lines) + "\n")
    tasks = [f"stub_{name}" for name in BENCHMARKS]
    out = workdir / "out-benchmarks"
    process = run_lmms_eval(
        workdir,
        [
            "--model",
            "videonsa",
            # tomato asks for 1,024 new tokens: the override keeps the random model's answers short
            "--model_args",
            f"pretrained={checkpoint},dtype=float32,max_new_tokens=8",
            "--tasks",
            ",".join(tasks),
            "--include_path",
            str(folder),
            "--device",
            "cpu",
            "--output_path",
            str(out),
            "--log_samples",
            "--predict_only",
        ],
        hf_home=hf_home,
    )
    _, samples, _ = read_run(out, process, tasks)
    for name in BENCHMARKS:
        doc, _ = _stub(name)
        (row,) = samples[f"stub_{name}"].values()
        prompt = row["input"]
        question = doc.get("question") or doc["input"].split("\n")[0]
        assert question in prompt, (name, prompt)
        assert row["filtered_resps"] == reference(expected_video[name], prompt, 8), name
    # the tasks' own prompt formats reached the model
    assert samples["stub_longvideobench_val_v"][0]["input"].endswith(
        "Answer with the option's letter from the given choices directly.\n"
    )
    assert "A. stays\nB. moves" in samples["stub_longvideobench_val_v"][0]["input"]
    assert "<options>" in samples["stub_tomato"][0]["input"]
    assert samples["stub_vsibench"][0]["input"].startswith("These are frames of a video.")
    # lmms-eval 0.7.3's TimeScope tasks send the record's `input` as it is (their post-prompt is never applied)
    for name in ("timescope", "longtimescope"):
        assert samples[f"stub_{name}"][0]["input"] == _stub(name)[0]["input"]
