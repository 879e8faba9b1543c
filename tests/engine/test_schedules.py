"""Schedulers, optimizers and the evaluation/checkpoint cadence, as a user configures them.

Every registered scheduler either builds and steps in a real Trainer or is refused by validation
with the fix; evals_per_epoch / saves_per_epoch land on the steps a user expects; early stopping
stops; the best checkpoint is the one kept at the end.
"""

from __future__ import annotations

import json
import math

import pytest
from test_train import load
from test_train import make_ctx as train_context

from ft import hookimpl
from ft.engine.train import build_trainer, run_training
from ft.kernel.context import load_context
from ft.kernel.errors import ConfigError, FtError

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


def make_ctx(ft_tiny_model_dir, tmp_path, **overrides):
    """test_train's context (its hand-tokenized dataset type), 10 steps unless overridden."""
    return train_context(ft_tiny_model_dir, tmp_path, **{"max_steps": 10, **overrides})


def trainer_for(ctx, n_rows=8, eval_rows=0):
    tok, model, data, _ = load(ctx, n_rows=n_rows, eval_rows=eval_rows)
    return build_trainer(ctx, model, tok, data), data


def lr_curve(trainer, steps):
    """The learning rates the Trainer's own scheduler gives at steps 0..``steps`` of a ``steps``-step run."""
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return [*lrs, trainer.lr_scheduler.get_last_lr()[0]]


# -- schedulers ----------------------------------------------------------------------------------

# What each scheduler needs beyond its name (the minimum that makes it train).
NEEDS = {
    "cosine_with_min_lr": {"cosine_min_lr_ratio": 0.1},
    "warmup_stable_decay": {"lr_scheduler_kwargs": {"num_decay_steps": 4}},
}


def registered_schedulers(ft_tiny_model_dir, tmp_path):
    ctx = make_ctx(ft_tiny_model_dir, tmp_path)
    return sorted(e.name for e in ctx.registries.schedulers if e.plugin == "optimizers")


def test_every_registered_scheduler_trains_or_is_refused_at_validation(ft_tiny_model_dir, tmp_path):
    names = registered_schedulers(ft_tiny_model_dir, tmp_path)
    assert {"cosine", "cosine_with_min_lr", "warmup_stable_decay", "polynomial"} <= set(names)
    for name in names:
        if name in NEEDS:  # without its settings: refused before any model loads, with the fix
            with pytest.raises(ConfigError) as err:
                make_ctx(ft_tiny_model_dir, tmp_path, lr_scheduler=name)
            assert "lr_scheduler" in str(err.value) and ("cosine_min_lr_ratio" in str(err.value)
                                                          or "num_decay_steps" in str(err.value))
        ctx = make_ctx(ft_tiny_model_dir, tmp_path, lr_scheduler=name, warmup_steps=2, **NEEDS.get(name, {}))
        trainer, _ = trainer_for(ctx)
        lrs = lr_curve(trainer, 10)
        assert all(math.isfinite(x) and x >= 0 for x in lrs), (name, lrs)
        assert lrs[0] == 0 and max(lrs) == pytest.approx(1e-3), (name, lrs)  # linear warmup from 0 to the peak


def test_cosine_min_lr_ratio_is_the_floor_of_the_decay(ft_tiny_model_dir, tmp_path):
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, lr_scheduler="cosine", cosine_min_lr_ratio=0.1)
    trainer, _ = trainer_for(ctx)
    assert trainer.args.lr_scheduler_type == "cosine_with_min_lr"
    lrs = lr_curve(trainer, 10)
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert min(lrs) >= 1e-4 - 1e-12
    plain = lr_curve(trainer_for(make_ctx(ft_tiny_model_dir, tmp_path, lr_scheduler="cosine"))[0], 10)
    assert plain[-1] < 0.05 * 1e-3  # without the ratio the cosine goes (almost) to 0


def test_scheduler_kwargs_reach_the_scheduler(ft_tiny_model_dir, tmp_path):
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, lr_scheduler="warmup_stable_decay",
                   lr_scheduler_kwargs={"num_decay_steps": 4, "decay_type": "linear"})
    lrs = lr_curve(trainer_for(ctx)[0], 10)
    assert lrs[:6] == [pytest.approx(1e-3)] * 6  # stable, then 4 decay steps
    assert lrs[6] > lrs[7] > lrs[8] > lrs[9] > lrs[10]
    restarts = make_ctx(ft_tiny_model_dir, tmp_path, lr_scheduler="cosine_with_restarts",
                        lr_scheduler_kwargs={"num_cycles": 2})
    lrs = lr_curve(trainer_for(restarts)[0], 10)
    assert lrs[5] == pytest.approx(1e-3)  # the second cycle starts again at the peak


@pytest.mark.parametrize(("settings", "fragments"), [
    ({"lr_scheduler": "cosine", "lr_scheduler_kwargs": {"num_cyles": 2}},
     ["'num_cyles' is not an argument of the cosine scheduler", "num_cycles"]),
    ({"lr_scheduler": "linear", "cosine_min_lr_ratio": 0.1}, ["applies to lr_scheduler: cosine only"]),
    ({"lr_scheduler": "cosine_with_min_lr", "cosine_min_lr_ratio": 0.1, "lr_scheduler_kwargs": {"min_lr": 1e-5}},
     ["keep one"]),
    ({"lr_scheduler": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": 20}},
     ["more than max_steps"]),
    ({"lr_scheduler": "polynomial", "lr_scheduler_kwargs": {"lr_end": 0.1}}, ["lr_end must be below learning_rate"]),
])
def test_scheduler_settings_that_cannot_work_are_config_errors(ft_tiny_model_dir, tmp_path, settings, fragments):
    with pytest.raises(ConfigError) as err:
        make_ctx(ft_tiny_model_dir, tmp_path, **settings)
    for fragment in fragments:
        assert fragment in str(err.value)


# -- optimizers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["paged_adamw_32bit", "paged_adamw_8bit", "lion", "lion_8bit"])
def test_bitsandbytes_optimizers_train(ft_tiny_model_dir, tmp_path, name):
    pytest.importorskip("bitsandbytes")
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, optimizer=name, max_steps=2, lr_scheduler="constant")
    trainer, data = trainer_for(ctx)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = run_training(ctx, trainer, data)
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"])
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
                ).__module__.startswith("bitsandbytes")
    assert any(not p.detach().equal(before[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("name", ["adamw_torch_8bit", "ao_adamw_4bit"])
def test_torchao_low_bit_adamw(ft_tiny_model_dir, tmp_path, name, monkeypatch):
    import ft.kernel.errors

    if ft.kernel.errors.is_installed("torchao"):
        ctx = make_ctx(ft_tiny_model_dir, tmp_path, optimizer=name, max_steps=2, lr_scheduler="constant")
        trainer, data = trainer_for(ctx)
        metrics = run_training(ctx, trainer, data)
        assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"])
        assert type(trainer.optimizer.optimizer).__module__.startswith("torchao")
        return
    with pytest.raises(ConfigError, match=rf"optimizer: optimizer '{name.replace('ao_adamw', 'adamw_torch')}' needs "
                                          r"torchao, which is not installed: pip install 'ft\[torchao\]'"):
        make_ctx(ft_tiny_model_dir, tmp_path, optimizer=name)


# -- cadence -------------------------------------------------------------------------------------


def test_evals_and_saves_per_epoch_become_steps(ft_tiny_model_dir, tmp_path):
    # 16 rows / micro_batch 2 = 8 steps per epoch; 4 evaluations and 2 checkpoints per epoch
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, max_steps=None, num_epochs=2, evals_per_epoch=4, saves_per_epoch=2,
                   val_set_size=0.1)
    trainer, _ = trainer_for(ctx, n_rows=16, eval_rows=2)
    assert (trainer.args.eval_strategy, trainer.args.eval_steps) == ("steps", 2)
    assert (trainer.args.save_strategy, trainer.args.save_steps) == ("steps", 4)
    no_eval = make_ctx(ft_tiny_model_dir, tmp_path, evals_per_epoch=4)  # no eval data: nothing to evaluate
    assert trainer_for(no_eval)[0].args.eval_strategy == "no"
    epochs = make_ctx(ft_tiny_model_dir, tmp_path, eval_strategy="epoch", save_strategy="epoch", val_set_size=0.1)
    args = trainer_for(epochs, eval_rows=2)[0].args
    assert (args.eval_strategy, args.save_strategy) == ("epoch", "epoch")


def test_evaluations_and_checkpoints_happen_where_configured(ft_tiny_model_dir, tmp_path):
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, max_steps=None, num_epochs=2, evals_per_epoch=2, saves_per_epoch=1,
                   val_set_size=0.1, save_total_limit=5)
    trainer, data = trainer_for(ctx, n_rows=8, eval_rows=2)  # 4 steps per epoch
    run_training(ctx, trainer, data)
    evals = [r["step"] for r in trainer.state.log_history if "eval_loss" in r]
    assert evals == [2, 4, 6, 8]
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))
    assert saved == [4, 8]


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"eval_steps": 5, "evals_per_epoch": 2, "val_set_size": 0.1}, "eval_steps and evals_per_epoch both set"),
    ({"save_strategy": "epoch", "save_steps": 5}, "save_strategy: epoch ignores save_steps"),
    ({"save_strategy": "steps"}, "save_strategy: steps needs save_steps or saves_per_epoch"),
    ({"early_stopping_patience": 2}, "early_stopping_patience: needs evaluation data"),
    ({"early_stopping_patience": 2, "val_set_size": 0.1}, "needs evaluations during training; set evals_per_epoch"),
    ({"load_best_model_at_end": True, "val_set_size": 0.1, "evals_per_epoch": 2},
     "load_best_model_at_end: needs checkpoints to choose from"),
    ({"load_best_model_at_end": True, "val_set_size": 0.1, "eval_steps": 2, "save_steps": 3},
     "save_steps (3) must be a multiple of eval_steps (2)"),
    ({"metric_for_best_model": "eval_loss"}, "metric_for_best_model: has no effect without early_stopping_patience"),
])
def test_cadence_settings_that_contradict_are_config_errors(ft_tiny_model_dir, tmp_path, settings, fragment):
    with pytest.raises(ConfigError) as err:
        make_ctx(ft_tiny_model_dir, tmp_path, **settings)
    assert fragment in str(err.value)


class RisingEvalLoss:
    """Makes every evaluation after the first report a worse eval loss (so early stopping must fire)."""

    @hookimpl
    def ft_callbacks(cfg):
        from transformers import TrainerCallback

        class Worse(TrainerCallback):
            n = 0

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                Worse.n += 1
                metrics["eval_loss"] = float(Worse.n)

        return [Worse()]


def test_early_stopping_stops_and_the_best_checkpoint_is_loaded_at_the_end(ft_tiny_model_dir, tmp_path):
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, plugins=[("rising", RisingEvalLoss)], max_steps=20, val_set_size=0.1,
                   eval_steps=2, save_steps=2, save_total_limit=2, early_stopping_patience=2,
                   load_best_model_at_end=True)
    trainer, data = trainer_for(ctx, eval_rows=2)
    assert trainer.args.metric_for_best_model == "eval_loss" and trainer.args.load_best_model_at_end
    run_training(ctx, trainer, data)
    # eval losses 1, 2, 3 at steps 2, 4, 6: two evaluations without improvement stop the run at step 6
    assert trainer.state.global_step == 6
    assert trainer.state.best_metric == 1.0
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert best["best_global_step"] == 2
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "checkpoint-2" / "model.safetensors"))
    name, value = next(iter(saved.items()))
    assert trainer.model.state_dict()[name].equal(value.to(trainer.model.state_dict()[name].dtype))


def test_cadence_errors_name_the_file_and_line(ft_tiny_model_dir, write_yaml):
    path = write_yaml({"base_model": str(ft_tiny_model_dir), "datasets": [{"path": "x.jsonl", "type": "chat_template"}],
                       "evals_per_epoch": 2, "eval_steps": 4, "val_set_size": 0.1})
    with pytest.raises(FtError, match=rf"{path.name}:\d+: evals_per_epoch: eval_steps and evals_per_epoch"):
        load_context(str(path))
