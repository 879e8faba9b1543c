"""`ft run` end to end on CPU: the README demo, overfitting a tiny model, reloading, what users see."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ft import hookimpl
from ft.tools.testing import FtRunner, registered_plugin

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TALKS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("What is the capital of Italy?", "Rome is the capital of Italy."),
    ("Please write a list of three numbers.", "One, two, three."),
    ("Hello, who are you?", "I am a little model."),
]


pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


def overfit_config(ft_tiny_model_dir, tmp_path, write_yaml, **overrides):
    rows = [{"messages": [{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in TALKS]
    data = tmp_path / "talks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "base_model": str(ft_tiny_model_dir),
        "datasets": [{"path": str(data), "type": "chat_template", "train_on_eos": "turn"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 128,
        "micro_batch_size": 4,
        "max_steps": 50,
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",
        "warmup_steps": 5,
        "logging_steps": 10,
        "seed": 0,
        **overrides,
    }
    return write_yaml(config)


@pytest.fixture(scope="module")
def overfit_run(ft_tiny_model_dir, tmp_path_factory):
    """One overfitting run shared by the tests that inspect its output."""
    import yaml

    tmp_path = tmp_path_factory.mktemp("overfit")

    def write_yaml(config):
        p = tmp_path / "config.yaml"
        p.write_text(yaml.safe_dump(config, sort_keys=False))
        return p

    config = overfit_config(ft_tiny_model_dir, tmp_path, write_yaml)
    result = FtRunner().run(config).assert_ok()
    return config, result, tmp_path / "out"


def test_overfit_model_reproduces_its_answers_and_stops_at_end_of_turn(overfit_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out = overfit_run
    model = AutoModelForCausalLM.from_pretrained(out)  # (d) the output directory loads as a model
    tok = AutoTokenizer.from_pretrained(out)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    for question, answer in TALKS:
        messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
        assert generated[-1] == end_of_turn, f"did not stop: {tok.decode(generated)!r}"
        assert len(generated) < 40
        assert tok.decode(generated[:-1]) == answer


def test_run_output_directory_holds_everything_a_user_reads(overfit_run):
    import yaml

    _, result, out = overfit_run
    for name in ("model.safetensors", "config.json", "tokenizer.json", "ft_config.yaml", "ft_plugins.json",
                 "metrics.json", "training_curves.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")), "only safetensors and JSON are written"
    assert (out / "training_curves.png").read_bytes().startswith(PNG_SIGNATURE)

    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    assert summary["steps"] == 50
    assert summary["final_loss"] < 0.1 < metrics["history"][0]["loss"]
    assert summary["train_tokens"] > summary["trained_tokens"] > 0

    assert "training finished" in result.output
    assert f"final loss  {summary['final_loss']:.4f}" in result.output
    assert f"done: {out}" in result.output

    saved = yaml.safe_load((out / "ft_config.yaml").read_text())
    assert saved["max_steps"] == 50 and saved["datasets"][0]["type"] == "chat_template"
    manifest = json.loads((out / "ft_plugins.json").read_text())
    assert {"hf", "chat_template", "optimizers"} <= {p["name"] for p in manifest["plugins"] if p["status"] == "essential"}


def test_a_finished_run_is_kept_unless_overwrite_is_passed(overfit_run):
    config, _, out = overfit_run
    before = (out / "model.safetensors").stat().st_mtime_ns
    refused = FtRunner().run(config)
    assert refused.exit_code == 2
    assert "already holds a finished run" in refused.output and "--overwrite" in refused.output
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_out_of_memory_is_a_message_not_a_traceback(ft_tiny_model_dir, tmp_path, write_yaml):
    import torch
    from transformers import TrainerCallback

    class Explode(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    class OomPlugin:
        @hookimpl
        def ft_callbacks(cfg):
            return [Explode()]

    config = overfit_config(ft_tiny_model_dir, tmp_path, write_yaml, micro_batch_size=2)
    with registered_plugin(OomPlugin, "oom_test"):
        result = FtRunner().run(config)
    assert result.exit_code == 2
    assert "ran out of memory" in result.output
    assert "gradient_checkpointing: true" in result.output and "micro_batch_size" in result.output
    assert "sequence_len" in result.output
    assert "Traceback" not in result.output


def test_readme_demo_trains_the_shipped_tiny_model(tmp_path):
    """`ft run examples/tiny.yaml`, with the outputs redirected into a temporary directory."""
    config = REPO / "examples" / "tiny.yaml"
    assert sum(p.stat().st_size for p in (REPO / "examples" / "tiny" / "model").iterdir()) < 2_000_000
    result = FtRunner().run(
        config, "--set", f"output_dir={tmp_path / 'out'}", "--set", f"dataset_prepared_path={tmp_path / 'prepared'}"
    ).assert_ok()
    assert "training finished" in result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["summary"]
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert metrics["final_loss"] < history[0]["loss"] / 5
    assert metrics["eval_loss"] is not None


def test_a_run_into_a_pipe_prints_clean_lines_and_nothing_from_unselected_features(tmp_path):
    """Output to a file or pipe: one line per logged step, no progress-bar frames, and no warnings from
    libraries of features that are not selected (bitsandbytes, DeepSpeed are installed here)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("FT_NO_PROGRESS", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    result = subprocess.run(
        [sys.executable, "-m", "ft.cli", "run", str(REPO / "examples" / "tiny.yaml"), "--set", "max_steps=4",
         "--set", "logging_steps=2", "--set", f"output_dir={tmp_path / 'out'}",
         "--set", f"dataset_prepared_path={tmp_path / 'prepared'}"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "\r" not in output and "it/s]" not in output and "%|" not in output  # no bar frames
    assert "gemm_4bit" not in output and "Setting accelerator" not in output  # bitsandbytes, DeepSpeed: quiet
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/4", "2/4", "4/4", "4/4"]  # the last is the eval line
    assert "{'loss'" not in output  # no raw log dicts
