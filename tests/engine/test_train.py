"""Training: arguments from the config, optimizer/scheduler by name, metrics, outputs, OOM message."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from ft import hookimpl
from ft.engine.outputs import final_outputs, write_run_files
from ft.engine.resume import plan_resume
from ft.engine.train import build_trainer, out_of_memory_message, run_training
from ft.kernel.context import load_context
from ft.kernel.errors import FtError
from ft.kernel.formats import DatasetOptions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


class HandFormat:
    """A dataset type for these tests, so they do not depend on the format plugins."""

    @hookimpl
    def ft_register_formats(register):
        register.add("hand", DatasetOptions, lambda cfg, entry, tokenizer: None)


def make_ctx(ft_tiny_model_dir, tmp_path, plugins=(), **overrides):
    config = {
        "base_model": str(ft_tiny_model_dir),
        "datasets": [{"path": "rows.jsonl", "type": "hand"}],
        "output_dir": str(tmp_path / "out"),
        "micro_batch_size": 2,
        "max_steps": 4,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        **overrides,
    }
    return load_context(config, extra_plugins=[("hand_format", HandFormat), *plugins])


def hand_rows(tokenizer, n=8):
    """Conversations tokenized by hand: prompt masked, answer + <|im_end|> trained; lengths differ."""
    rows = []
    for i in range(n):
        prompt = tokenizer(f"<|im_start|>user\nWhat is {i} plus {i}?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        answer = tokenizer(f"The result is {2 * i}." + " Yes." * (i % 3) + "<|im_end|>")["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def load(ctx, n_rows=8, eval_rows=0):
    import datasets

    tok = ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg)
    rows = hand_rows(tok, n_rows + eval_rows)
    data = types.SimpleNamespace(
        train=datasets.Dataset.from_list(rows[:n_rows]),
        eval=datasets.Dataset.from_list(rows[n_rows:]) if eval_rows else None,
        packed=False,
    )
    kwargs = ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg)
    model = ctx.pm.call("ft_load_model", cfg=ctx.cfg, kwargs=kwargs, tokenizer=tok)
    return tok, model, data, rows


def train(ctx, **load_kw):
    tok, model, data, rows = load(ctx, **load_kw)
    trainer = build_trainer(ctx, model, tok, data)
    return trainer, run_training(ctx, trainer, data), tok, rows


# -- arguments ---------------------------------------------------------------------------------


def test_core_config_becomes_training_arguments(ft_tiny_model_dir, tmp_path):
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, warmup_ratio=0.25, weight_decay=0.1, max_grad_norm=0.5, eval_batch_size=5,
                   gradient_accumulation_steps=3, seed=7, gradient_checkpointing=True,
                   gradient_checkpointing_kwargs={"use_reentrant": False})
    tok, model, data, _ = load(ctx)
    args = build_trainer(ctx, model, tok, data).args
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_steps) == (2, 3, 4)
    assert args.per_device_eval_batch_size == 5
    assert args.learning_rate == 1e-3 and args.weight_decay == 0.1 and args.max_grad_norm == 0.5
    assert args.get_warmup_steps(100) == 25
    assert args.bf16 is False and args.fp16 is False  # bf16: auto on a CPU
    assert args.seed == 7 and args.remove_unused_columns is False
    assert args.save_strategy == "no"
    assert args.report_to in ([], "none", ["none"])
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    assert kwargs == {"use_reentrant": False}


def test_plugin_trainer_args_are_merged_and_unknown_fields_name_the_plugin(ft_tiny_model_dir, tmp_path):
    class Good:
        @hookimpl
        def ft_trainer_args(cfg):
            return {"adam_beta2": 0.95}

    class Bad:
        @hookimpl
        def ft_trainer_args(cfg):
            return {"no_such_field": 1}

    ctx = make_ctx(ft_tiny_model_dir, tmp_path, plugins=[("good", Good)])
    tok, model, data, _ = load(ctx)
    assert build_trainer(ctx, model, tok, data).args.adam_beta2 == 0.95
    bad = make_ctx(ft_tiny_model_dir, tmp_path, plugins=[("bad", Bad)])
    with pytest.raises(FtError, match="plugin 'bad' sets TrainingArguments field 'no_such_field'"):
        build_trainer(bad, model, tok, data)


def test_missing_reporting_backend_says_how_to_install(ft_tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    missing = {"wandb", "mlflow"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    # refused at validation, before any model loads (mlflow used to crash the Trainer with a traceback)
    with pytest.raises(FtError, match=r"report_to: reporting to wandb needs the 'wandb' package.*pip install wandb"):
        make_ctx(ft_tiny_model_dir, tmp_path, report_to="wandb")
    with pytest.raises(FtError, match=r"reporting to mlflow needs the 'mlflow' package.*pip install mlflow"):
        make_ctx(ft_tiny_model_dir, tmp_path, report_to=["tensorboard", "mlflow"])
    with pytest.raises(FtError, match=r"unknown reporter 'tensorbord'. Did you mean 'tensorboard'\?"):
        make_ctx(ft_tiny_model_dir, tmp_path, report_to="tensorbord")
    # and when the package disappears between validation and training, the Trainer is not built either
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, report_to="tensorboard", max_steps=1)
    tok, model, data, _ = load(ctx)
    missing.update({"tensorboard", "tensorboardX"})
    with pytest.raises(FtError, match=r"reporting to tensorboard needs the 'tensorboard' package"):
        build_trainer(ctx, model, tok, data)


def test_report_to_tensorboard_writes_event_files(ft_tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, report_to="tensorboard", max_steps=2)
    train(ctx)
    events = list((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


# -- optimizer and scheduler by name ----------------------------------------------------------------


def test_sgd_with_constant_schedule_is_what_trains(ft_tiny_model_dir, tmp_path):
    import torch

    ctx = make_ctx(ft_tiny_model_dir, tmp_path, optimizer="sgd", lr_scheduler="constant", learning_rate=0.05)
    trainer, metrics, _, _ = train(ctx)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert type(optimizer) is torch.optim.SGD
    lrs = [row["learning_rate"] for row in trainer.ft_state.history if "learning_rate" in row]
    assert len(lrs) == 4 and all(lr == pytest.approx(0.05) for lr in lrs)
    assert metrics["steps"] == 4


def test_cosine_schedule_decays_after_warmup(ft_tiny_model_dir, tmp_path):
    import torch

    ctx = make_ctx(ft_tiny_model_dir, tmp_path, optimizer="adamw_torch", lr_scheduler="cosine", warmup_steps=2,
                   max_steps=6)
    trainer, _, _, _ = train(ctx)
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), torch.optim.AdamW)
    lrs = [row["learning_rate"] for row in trainer.ft_state.history if "learning_rate" in row]
    assert lrs[0] < lrs[1] < lrs[2]  # warming up (the lr logged at a step is the one it used)
    assert lrs[2] == pytest.approx(1e-3)  # the peak, after 2 warmup steps
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


def test_factory_optimizer_and_scheduler_registered_by_a_plugin(ft_tiny_model_dir, tmp_path):
    import torch

    seen = {}

    def make_optimizer(cfg, model):
        return torch.optim.Adagrad(model.parameters(), lr=cfg.learning_rate)

    def make_scheduler(cfg, optimizer, num_training_steps):
        seen["steps"] = num_training_steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)

    class Extra:
        @hookimpl
        def ft_register_optimizers(register):
            register.add("my_adagrad", make_optimizer)

        @hookimpl
        def ft_register_schedulers(register):
            register.add("half", make_scheduler)

    ctx = make_ctx(ft_tiny_model_dir, tmp_path, plugins=[("extra", Extra)], optimizer="my_adagrad", lr_scheduler="half")
    trainer, _, _, _ = train(ctx)
    assert type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)) is torch.optim.Adagrad
    assert seen["steps"] == 4
    lrs = [row["learning_rate"] for row in trainer.ft_state.history if "learning_rate" in row]
    assert all(lr == pytest.approx(5e-4) for lr in lrs)


def test_trainer_class_of_a_plugin_method_still_counts_tokens(ft_tiny_model_dir, tmp_path):
    from ft_plugins.sft import padding_collator
    from transformers import Trainer

    from ft.api import SFT_COLUMNS, Method

    class MyTrainer(Trainer):
        pass

    class MyMethod:
        @hookimpl
        def ft_register_methods(register):
            register.add(Method("mine", SFT_COLUMNS, padding_collator, lambda: MyTrainer))

    ctx = make_ctx(ft_tiny_model_dir, tmp_path, plugins=[("mymethod", MyMethod)], max_steps=1, method="mine")
    trainer, metrics, _, _ = train(ctx)
    assert isinstance(trainer, MyTrainer)
    assert metrics["train_tokens"] > 0 and metrics["method"] == "mine"


# -- metrics and outputs ---------------------------------------------------------------------------


def test_metrics_count_real_tokens_and_eval_loss(ft_tiny_model_dir, tmp_path):
    # one epoch over 8 rows of different lengths: the counts are those of the rows, not of the padding
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, max_steps=None, num_epochs=1, micro_batch_size=3, logging_steps=2)
    trainer, metrics, _, rows = train(ctx, n_rows=8, eval_rows=2)
    assert metrics["steps"] == 3 and metrics["epochs"] == pytest.approx(1.0)
    assert metrics["train_tokens"] == sum(len(r["input_ids"]) for r in rows[:8])
    assert metrics["trained_tokens"] == sum(sum(lab != -100 for lab in r["labels"]) for r in rows[:8])
    assert metrics["tokens_per_second"] > 0 and metrics["seconds"] > 0
    assert metrics["eval_loss"] is not None and metrics["eval_loss"] > 0
    history = trainer.ft_state.history
    assert history[-1]["step"] == 3 and "loss" in history[-1]  # the last step is logged, not just step 2
    assert metrics["final_loss"] == history[-1]["loss"]
    assert any("eval_loss" in row for row in history)


def test_run_files_summary_png_and_metrics_json(ft_tiny_model_dir, tmp_path, capsys):
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, max_steps=3)
    plan_resume(ctx)
    trainer, metrics, tok, _ = train(ctx)
    out = tmp_path / "out"
    with final_outputs(ctx, trainer, metrics) as final:
        final.files += ctx.pm.call("ft_save_weights", cfg=ctx.cfg, trainer=trainer, model=trainer.model,
                                                   output_dir=str(final.dir))
        final.files += write_run_files(ctx, trainer, tok, metrics, ["[demo] a patch (instance)"], final.dir)
        assert not (out / "metrics.json").exists(), "nothing is in the output dir before every file is written"
    assert all(p.startswith(str(out) + "/") and Path(p).is_file() for p in final.published), final.published
    assert not (out / ".ft-tmp-final").exists()
    names = {p.rsplit("/", 1)[-1] for p in final.published}
    assert {"model.safetensors", "config.json", "tokenizer.json", "ft_config.yaml", "ft_plugins.json",
            "metrics.json", "training_curves.png"} <= names

    printed = capsys.readouterr().out
    assert "training finished" in printed
    assert "steps       3" in printed
    assert f"{metrics['train_tokens']:,}" in printed and "tokens/s" in printed
    assert f"final loss  {metrics['final_loss']:.4f}" in printed
    assert str(out) in printed

    png = (out / "training_curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000
    from matplotlib.image import imread

    assert imread(out / "training_curves.png").shape[:2] == (360, 1500)  # loss, gradient norm, learning rate

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["summary"]["steps"] == 3 and saved["summary"]["final_loss"] == metrics["final_loss"]
    assert [r["step"] for r in saved["history"]] == [1, 2, 3]
    assert all({"loss", "learning_rate", "grad_norm"} <= set(r) for r in saved["history"])

    manifest = json.loads((out / "ft_plugins.json").read_text())
    assert {p["name"] for p in manifest["plugins"]} >= {"hf", "optimizers"}
    assert manifest["patches"] == ["[demo] a patch (instance)"]
    assert "transformers" in manifest["libraries"]

    import yaml

    saved_cfg = yaml.safe_load((out / "ft_config.yaml").read_text())
    assert saved_cfg["max_steps"] == 3 and saved_cfg["optimizer"] == "adamw_torch_fused"  # the default, resolved


def test_finished_run_is_not_overwritten_without_the_flag(ft_tiny_model_dir, tmp_path):
    ctx = make_ctx(ft_tiny_model_dir, tmp_path)
    assert plan_resume(ctx).checkpoint is None
    out = tmp_path / "out"
    assert out.is_dir()
    (out / "model.safetensors").write_bytes(b"weights of a run whose final save did not finish")
    with pytest.raises(FtError, match=r"final save of that run did not finish, and no checkpoint.*--overwrite"):
        plan_resume(ctx)
    (out / "metrics.json").write_text("{}")
    with pytest.raises(FtError, match=r"already holds a finished run \(metrics.json, model.safetensors\).*--overwrite"):
        plan_resume(ctx)
    assert plan_resume(ctx, overwrite=True).checkpoint is None
    assert not (out / "metrics.json").exists(), "the old run no longer counts as finished once this one started"
    aside = out / ".ft-set-aside"
    assert (aside / "model.safetensors").is_file() and (aside / "metrics.json").is_file(), \
        "the old run is set aside until this one saves (put back if it stops before)"


# -- out of memory ----------------------------------------------------------------------------------


def test_out_of_memory_ends_with_the_remedies(ft_tiny_model_dir, tmp_path):
    import torch
    from transformers import TrainerCallback

    class Explode(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    class Oom:
        @hookimpl
        def ft_callbacks(cfg):
            return [Explode()]

    ctx = make_ctx(ft_tiny_model_dir, tmp_path, plugins=[("oom", Oom)], micro_batch_size=4, sequence_len=1024)
    with pytest.raises(FtError) as err:
        train(ctx)
    text = str(err.value)
    assert "ran out of memory" in text
    assert "micro_batch_size: 2 with gradient_accumulation_steps: 2" in text
    assert "gradient_checkpointing: true" in text
    assert "sequence_len: 512" in text
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_out_of_memory_message_skips_what_is_already_done(ft_tiny_model_dir, tmp_path):
    ctx = make_ctx(ft_tiny_model_dir, tmp_path, micro_batch_size=1, gradient_checkpointing=True)
    text = out_of_memory_message(ctx.cfg)
    assert "micro_batch_size is already 1" in text
    assert "set gradient_checkpointing" not in text
    assert "shorter sequence_len" in text
