"""Faults around a run's records (issue 22): non-finite metrics written as JSON null, a damaged
completions.jsonl on resume, and the training-curves plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_grpo import grpo_config

from ft import hookimpl
from ft.testing import registered_plugin, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def strict_json(path: Path):
    """Parse as JSON proper: NaN and Infinity are not JSON (jq, JavaScript and most readers refuse them)."""

    def refuse(name: str):
        raise ValueError(f"{path}: {name} is not valid JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_non_finite_metrics_are_written_as_null(tiny_model_dir, chat_jsonl, tmp_path):
    """A NaN loss kept by health.on_nonfinite: warn: metrics.json and each checkpoint's ft_state.json are valid
    JSON, with null where the value was NaN."""
    from transformers import TrainerCallback

    from ft.run import run

    class NanLossAtStep2(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.active = False
            model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if self.active else out)

        def on_step_begin(self, args, state, control, **kwargs):
            self.active = state.global_step == 1

    class Plugin:
        @hookimpl
        def ft_callbacks(cfg):
            return [NanLossAtStep2()]

    config = write_config(tmp_path / "config.yaml", base_model=tiny_model_dir, dataset=chat_jsonl, max_steps=3,
                          logging_steps=1, save_steps=2, health={"on_nonfinite": "warn"})
    with registered_plugin(Plugin, "nan_loss"):
        run(config)
    out = tmp_path / "out"
    metrics = strict_json(out / "metrics.json")
    step2 = next(r for r in metrics["history"] if r["step"] == 2)
    assert step2["grad_norm"] is None, step2  # NaN (the Trainer logs the NaN loss as the mean of the others)
    saved = strict_json(out / "checkpoint-2" / "ft_state.json")
    assert next(r for r in saved["history"] if r["step"] == 2)["grad_norm"] is None
    trainer_state = strict_json(out / "checkpoint-2" / "trainer_state.json")
    assert next(r for r in trainer_state["log_history"] if r["step"] == 2)["grad_norm"] is None
    from ft.checkpoints import verify

    assert verify(out / "checkpoint-2") == []


def test_damaged_lines_in_completions_jsonl_are_skipped_with_a_report_on_resume(tiny_model_dir, tmp_path, caplog):
    """completions.jsonl is cut back to the checkpoint's step on resume: a line that is not a JSON object (or
    whose step is not a number) is dropped, and the log says which lines, instead of an AttributeError."""
    import shutil

    from ft.run import run

    config = grpo_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=1)
    run(config)
    out = tmp_path / "out"
    for name in ("metrics.json", "model.safetensors"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoint-2")  # as if killed while step 2 was saved
    path = out / "completions.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    step1 = [x for x in lines if json.loads(x)["step"] == 1]
    path.write_text("\n".join([*step1, "[1, 2]", "3", "not json", '{"step": "x"}', '"text"']) + "\n", encoding="utf-8")

    with caplog.at_level("WARNING", logger="ft"):
        result = run(config)
    assert result.metrics["resumed_from"] == str(out / "checkpoint-1")
    kept = path.read_text(encoding="utf-8").splitlines()
    assert kept[:len(step1)] == step1 and all(json.loads(x)["step"] == 2 for x in kept[len(step1):])
    n = len(step1)
    assert f"{path}: 5 line(s) that are not a completion record were dropped (lines {', '.join(str(n + i) for i in range(1, 6))})" in caplog.text, \
        caplog.text
