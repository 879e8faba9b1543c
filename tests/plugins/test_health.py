"""The health plugin: non-finite steps stop (or are skipped) keeping the last good checkpoint; the watch
warns about unhealthy curves, each warning triggered here by a run that really has the problem."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from ft import hookimpl
from ft.engine.checkpoints import list_checkpoints, verify
from ft.kernel.errors import FtError
from ft.run import run
from ft.tools.testing import registered_plugin

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


def write_run(root: Path, model_dir: Path, rows=None, eval_rows=None, **overrides) -> Path:
    from ft.tools.tiny import make_chat_rows, write_jsonl

    data = write_jsonl(root / "chat.jsonl", rows or make_chat_rows(8, seed=3))
    config = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "chat_template"}],
        "dataset_prepared_path": str(root / "prepared"),
        "dataset_num_proc": 1,
        "output_dir": str(root / "out"),
        "sequence_len": 128,
        "micro_batch_size": 2,
        "max_steps": 8,
        "logging_steps": 1,
        "learning_rate": 1.0e-3,
        "seed": 1,
        **overrides,
    }
    if eval_rows:
        config["test_datasets"] = [{"path": str(write_jsonl(root / "eval.jsonl", eval_rows)), "type": "chat_template"}]
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def checks(result) -> dict[str, dict]:
    return {w["check"]: w for w in result.metrics["warnings"]}


def at_step(n: int, action):
    """A plugin whose callback calls ``action(model)`` when optimizer step ``n`` begins."""
    from transformers import TrainerCallback

    class AtStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == n - 1:
                action(model)

    class Plugin:
        @hookimpl
        def ft_callbacks(cfg):
            return [AtStep()]

    return Plugin


def poison_weights(model):
    """A NaN in the final norm: every later forward pass gives NaN logits."""
    import torch

    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")


# -- non-finite steps ----------------------------------------------------------------------------------


def test_a_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(ft_tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    config = write_run(tmp_path, ft_tiny_model_dir, save_steps=2)
    out = tmp_path / "out"
    with registered_plugin(at_step(5, poison_weights), "poison"), pytest.raises(FtError) as err:
        run(config)
    message = str(err.value)
    assert message.startswith("training stopped at step 5: the loss is NaN. The weights were not updated with it.")
    assert f"The last good checkpoint is {out / 'checkpoint-4'} (step 4); it is kept" in message
    assert f"resume_from_checkpoint: {out / 'checkpoint-4'}" in message
    assert "learning_rate is 0.001" in message and "on_nonfinite: skip" in message

    assert [c.step for c in list_checkpoints(out)] == [2, 4], "nothing after the bad step was saved"
    assert verify(out / "checkpoint-4") == []
    assert all(t.isfinite().all() for t in load_file(out / "checkpoint-4" / "model.safetensors").values())
    assert not (out / "model.safetensors").exists()

    resumed = run(config)  # whatever broke the run is gone: the kept checkpoint carries on
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-4") and resumed.metrics["steps"] == 8
    assert resumed.metrics["warnings"] == [], "a healthy run (here: resumed) gets no warning"


def test_skip_drops_the_bad_step_without_touching_a_weight_and_trains_on(ft_tiny_model_dir, tmp_path):
    import torch
    from transformers import TrainerCallback

    seen = {}

    class NanLossAtStep3(TrainerCallback):
        """Step 3's forward passes give NaN logits (the weights stay finite)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.active = False
            model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if self.active else out)

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.active = state.global_step == 2
            seen.setdefault(state.global_step + 1, {})["before"] = [p.detach().clone() for p in model.parameters()]

        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen[state.global_step]["after"] = [p.detach().clone() for p in model.parameters()]

    class Plugin:
        @hookimpl
        def ft_callbacks(cfg):
            return [NanLossAtStep3()]

    config = write_run(tmp_path, ft_tiny_model_dir, max_steps=5, health={"on_nonfinite": "skip"})
    with registered_plugin(Plugin, "nan_loss"):
        result = run(config)
    assert result.metrics["steps"] == 5
    nonfinite = checks(result)["nonfinite"]
    assert nonfinite["step"] == 3
    assert "1 step(s) had a non-finite loss" in nonfinite["message"]
    assert "(3; at step 3 the loss is NaN) and were skipped (no weight changed)" in nonfinite["message"]
    unchanged = all(torch.equal(a, b) for a, b in zip(seen[3]["before"], seen[3]["after"], strict=True))
    assert unchanged, "the skipped step changed no weight"
    assert not all(torch.equal(a, b) for a, b in zip(seen[4]["before"], seen[4]["after"], strict=True)), "the next one trains"
    assert all(p.isfinite().all() for p in seen[5]["after"])
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())["summary"]["warnings"]
    assert [w["check"] for w in saved] == ["nonfinite"]


def test_skipping_stops_after_max_skipped_steps_in_a_row(ft_tiny_model_dir, tmp_path):
    config = write_run(tmp_path, ft_tiny_model_dir, max_steps=6, health={"on_nonfinite": "skip", "max_skipped_steps": 2})
    with registered_plugin(at_step(2, poison_weights), "poison"), pytest.raises(FtError) as err:
        run(config)
    assert str(err.value).startswith("training stopped at step 3: the loss is NaN (2 non-finite steps in a row, "
                                     "health.max_skipped_steps is 2)")
    assert "No checkpoint was saved before it" in str(err.value)


class BrokenSchedulers:
    """Schedulers that do not follow a curve: one returns NaN, one never moves."""

    @hookimpl
    def ft_register_schedulers(register):
        import torch

        register.add("nan_lr", lambda cfg, optimizer, steps: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: float("nan")))
        register.add("stuck", lambda cfg, optimizer, steps: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 1.0))


def test_a_nan_learning_rate_stops_before_the_first_update(ft_tiny_model_dir, tmp_path):
    config = write_run(tmp_path, ft_tiny_model_dir, lr_scheduler="nan_lr")
    with registered_plugin(BrokenSchedulers, "broken_schedulers"), pytest.raises(FtError) as err:
        run(config)
    assert str(err.value).startswith("training stopped at step 1: the learning rate is NaN.")


def test_health_can_be_blocked(ft_tiny_model_dir, tmp_path):
    from ft.kernel.context import load_context

    config = write_run(tmp_path, ft_tiny_model_dir)
    assert "health" in load_context(config).pm.active_names()
    assert "health" not in load_context(config, ["no:health"]).pm.active_names()


# -- the watch ------------------------------------------------------------------------------------------


def test_frozen_weights_give_a_grad_norm_of_zero_and_a_warning(ft_tiny_model_dir, tmp_path, capsys):
    import torch

    class FreezeEverything:
        """An 'adapter' that froze the model: the only trainable parameter is never used."""

        @hookimpl
        def ft_apply_adapter(cfg, model):
            model.requires_grad_(False)
            model.unused = torch.nn.Parameter(torch.zeros(1))
            model.enable_input_require_grads()
            return model

    config = write_run(tmp_path, ft_tiny_model_dir, max_steps=3)
    with registered_plugin(FreezeEverything, "freeze"):
        result = run(config)
    logged = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert [row["grad_norm"] for row in logged] == [0.0, 0.0, 0.0]
    zero = checks(result)["grad_norm_zero"]
    assert zero["step"] == 1
    assert zero["message"].startswith("grad_norm is 0.0 at step 1: no weight is being trained (frozen weights).")
    assert "target_modules" in zero["message"]
    printed = capsys.readouterr().out
    assert "warnings    1 (also in metrics.json):" in printed and "grad_norm is 0.0 at step 1" in printed


def test_a_grad_norm_spike_is_reported_with_what_to_check(ft_tiny_model_dir, tmp_path):
    import torch

    def blow_up(model):
        with torch.no_grad():
            model.model.norm.weight.mul_(1000.0)

    config = write_run(tmp_path, ft_tiny_model_dir, max_steps=4)
    with registered_plugin(at_step(3, blow_up), "blow_up"):
        result = run(config)
    spike = checks(result)["grad_norm_spike"]
    grad_norm = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"][2]["grad_norm"]
    assert grad_norm > 100 and spike["step"] == 3
    assert spike["message"].startswith(f"grad_norm {grad_norm:.4g} at step 3, above health.grad_norm_spike 100")
    assert "training is unstable" in spike["message"] and "max_grad_norm 1" in spike["message"]


def test_a_flat_loss_and_a_learning_rate_that_never_moves(ft_tiny_model_dir, tmp_path):
    config = write_run(tmp_path, ft_tiny_model_dir, learning_rate=1.0e-9, lr_scheduler="stuck")
    with registered_plugin(BrokenSchedulers, "broken_schedulers"):
        result = run(config)
    found = checks(result)
    assert set(found) == {"loss_flat", "learning_rate_flat"}
    assert found["loss_flat"]["message"].startswith("the loss did not fall over the first 8 steps")
    assert "learning_rate is 1e-09; too low keeps the loss flat" in found["loss_flat"]["message"]
    assert found["learning_rate_flat"]["message"].startswith(
        "the learning rate stayed at 1e-09 for all 8 logged steps although lr_scheduler is 'stuck'")


def test_a_rising_loss_points_at_the_learning_rate(ft_tiny_model_dir, tmp_path):
    config = write_run(tmp_path, ft_tiny_model_dir, learning_rate=0.5)
    result = run(config)
    rising = checks(result)["loss_rising"]
    assert rising["message"].startswith("the loss rose over the first 8 steps")
    assert "the learning rate is likely too high" in rising["message"]


def test_memorising_one_conversation_collapses_the_loss_while_the_eval_loss_rises(ft_tiny_model_dir, tmp_path):
    from ft.tools.tiny import make_chat_rows

    one = make_chat_rows(1) * 8
    config = write_run(tmp_path, ft_tiny_model_dir, rows=one, eval_rows=make_chat_rows(8), max_steps=240,
                       micro_batch_size=4, learning_rate=0.02, lr_scheduler="constant", eval_steps=10)
    result = run(config)
    found = checks(result)
    collapse, overfit = found["loss_collapse"], found["eval_loss_rising"]
    assert collapse["step"] <= 240 * 0.25 and collapse["message"].startswith("the loss fell to ")
    assert "the model is memorising the data (overfitting)" in collapse["message"]
    assert "while the train loss fell from" in overfit["message"] and "overfitting" in overfit["message"]
    logged = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    evals = [row for row in logged if "eval_loss" in row]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert f"(step {best['step']})" in overfit["message"] and overfit["step"] > best["step"]


# -- the watch's rules, without training -----------------------------------------------------------------


def watch(**options):
    from ft_plugins.health import HealthOptions, Watch

    from ft.kernel.context import load_context

    cfg = load_context({"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "chat_template"}],
                        "lr_scheduler": options.pop("lr_scheduler", "cosine")}).cfg
    w = Watch(HealthOptions(**options), cfg)
    w.begin(max_steps=100, warmup=0, history=[])
    return w


def test_a_constant_schedule_may_keep_the_learning_rate_flat():
    for scheduler, warns in (("constant", False), ("cosine", True)):
        w = watch(lr_scheduler=scheduler)
        for step in range(1, 6):
            w.observe(step, {"loss": 3.0 - 0.2 * step, "learning_rate": 1e-4, "grad_norm": 1.0})
        assert any(f["check"] == "learning_rate_flat" for f in w.end()) is warns, scheduler


def test_eval_loss_rising_with_the_train_loss_is_not_called_overfitting():
    w = watch()
    for step, (train, evaluation) in enumerate([(3.0, 2.0), (3.1, 2.5), (3.2, 2.8), (3.3, 3.0)], start=1):
        assert w.observe(step, {"loss": train}) == []
        assert w.observe(step, {"eval_loss": evaluation}) == []


def test_every_spike_is_counted_in_one_warning():
    w = watch()
    assert [f["check"] for f in w.observe(1, {"grad_norm": 150.0, "loss": 2.0})] == ["grad_norm_spike"]
    assert w.observe(2, {"grad_norm": 5.0, "loss": 1.9}) == []
    assert w.observe(3, {"grad_norm": 300.0, "loss": 1.8}) == []
    w.end()
    assert "(above it at 2 logged steps: 1, 3)" in w.findings[0]["message"]


def test_a_resumed_run_replays_its_history_without_warning_twice():
    w = watch()
    w.begin(max_steps=100, warmup=0, history=[{"step": 1, "loss": 2.0, "grad_norm": 0.0}])
    assert [f["check"] for f in w.findings] == ["grad_norm_zero"], "known, not returned as new"
    assert w.observe(2, {"grad_norm": 0.0, "loss": 1.9}) == []
    assert math.isclose(w.losses[0][1], 2.0)
