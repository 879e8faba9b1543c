"""Faults around a run's records (issue 22): non-finite metrics written as JSON null, a damaged
completions.jsonl on resume, and the training-curves plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_grpo import grpo_config

from ft import hookimpl
from ft.tools.testing import registered_plugin, write_config

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


def strict_json(path: Path):
    """Parse as JSON proper: NaN and Infinity are not JSON (jq, JavaScript and most readers refuse them)."""

    def refuse(name: str):
        raise ValueError(f"{path}: {name} is not valid JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_non_finite_metrics_are_written_as_null(ft_tiny_model_dir, chat_jsonl, tmp_path):
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

    config = write_config(tmp_path / "config.yaml", base_model=ft_tiny_model_dir, dataset=chat_jsonl, max_steps=3,
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
    from ft.engine.checkpoints import verify

    assert verify(out / "checkpoint-2") == []


def test_damaged_lines_in_completions_jsonl_are_skipped_with_a_report_on_resume(ft_tiny_model_dir, tmp_path, caplog):
    """completions.jsonl is cut back to the checkpoint's step on resume: a line that is not a JSON object (or
    whose step is not a number) is dropped, and the log says which lines, instead of an AttributeError."""
    import shutil

    from ft.run import run

    config = grpo_config(tmp_path, ft_tiny_model_dir, max_steps=2, save_steps=1)
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


# -- training_curves.png: one panel per metric group ------------------------------------------------------


def dpo_history(steps: int = 12) -> list[dict]:
    """What a DPO run logs: train rows every step, eval rows every 4 (the demo's twelve method metrics)."""
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")
    scale = {"rewards": 1.0, "logps": -20.0}
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 0.7 - step / 100, "learning_rate": 5e-6, "grad_norm": 3.0, "train_tokens": 10}
        row.update({n: scale.get(n.split("/")[0], 1.0) * step / steps for n in names})
        row["rewards/accuracies"] = min(1.0, 0.5 + step / 20)
        rows.append(row)
        if step % 4 == 0:
            rows.append({"step": step, "eval_loss": 0.7, **{f"eval_{n}": row[n] - 0.1 for n in names}})
    return rows


def test_metric_groups_follow_the_names_prefix_for_any_method():
    from ft.engine.outputs import metric_groups

    dpo = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen", "kl"]
    assert metric_groups(dpo) == {
        "rewards": ["rewards/chosen", "rewards/rejected", "rewards/margins"], "accuracies": ["rewards/accuracies"],
        "logps": ["logps/chosen", "logps/rejected"], "nll_loss": ["nll_loss"],
        "log_odds": ["log_odds_ratio", "log_odds_chosen"], "kl": ["kl"]}
    third_party = ["aux/z_loss", "aux/balance", "reward", "reward_std", "reward/fmt/mean", "clip_ratio", "my_acc"]
    assert metric_groups(third_party) == {
        "aux": ["aux/z_loss", "aux/balance"], "reward": ["reward", "reward_std", "reward/fmt/mean"],
        "clip_ratio": ["clip_ratio"], "my_acc": ["my_acc"]}


def test_training_curves_plot_a_panel_per_group_with_eval_dashed_and_legends_off_the_data(tmp_path):
    """The DPO demo's plot put twelve metrics at scales from 0-1 to -20 in one panel, under its legend."""
    from ft.engine.outputs import curves_figure, plot_curves

    fig = curves_figure(dpo_history())
    fig.canvas.draw()
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(axes) == ["loss", "gradient norm", "learning rate", "rewards", "accuracies (0-1)", "log-probs"]
    assert axes["accuracies (0-1)"].get_ylim()[0] >= -0.05 and axes["accuracies (0-1)"].get_ylim()[1] <= 1.05
    rewards = axes["rewards"]
    train = [line for line in rewards.lines if line.get_linestyle() == "-"]
    evals = [line for line in rewards.lines if line.get_linestyle() == "--"]
    assert len(train) == len(evals) == 3
    assert [line.get_color() for line in train] == [line.get_color() for line in evals], "eval in its train colour"
    assert len({line.get_color() for line in train}) == 3
    assert [t.get_text() for t in rewards.get_legend().get_texts()] == ["chosen", "rejected", "margins"]
    for ax in axes.values():
        legend = ax.get_legend()
        if legend is not None:
            box, data = legend.get_window_extent(), ax.get_window_extent()
            assert not box.overlaps(data), f"the legend of '{ax.get_title()}' covers its data"
    loss = axes["loss"]
    assert [line.get_linestyle() for line in loss.lines] == ["-", "--"]
    assert plot_curves(dpo_history(), tmp_path / "c.png") and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
