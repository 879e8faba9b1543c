"""The fine-tuning pipeline, top to bottom, as a sequence of hook calls.

Read with ``ft/hookspecs.py``: every step below is a hook (answered by whichever active
plugin handles it) or a small core function that calls hooks itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ft.kernel.context import Context, load_context

log = logging.getLogger("ft")


@dataclass
class RunResult:
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    patches: list[Any] = field(default_factory=list)


def run(
    config: str | os.PathLike | dict[str, Any],
    plugin_args: Sequence[str] = (),
    overrides: Sequence[str] = (),
    *,
    fresh: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """``ft run``: validate the config with the selected plugins, then train."""
    return train(load_context(config, plugin_args, overrides), fresh=fresh, overwrite=overwrite)


def train(ctx: Context, *, fresh: bool = False, overwrite: bool = False) -> RunResult:
    from ft.engine.arguments import seed_everything
    from ft.engine.data import prepare_datasets
    from ft.engine.outputs import final_outputs, lock_output_dir, write_run_files
    from ft.engine.patch_watch import PatchWatch
    from ft.engine.resume import plan_resume
    from ft.engine.train import build_trainer, patch_check_callback, run_training

    cfg, pm = ctx.cfg, ctx.pm
    with contextlib.ExitStack() as scope:  # the lock is held, and global patches undone, until the run ends
        scope.enter_context(lock_output_dir(cfg))  # one run per output_dir; the ranks of this launch share it
        resume = plan_resume(ctx, fresh=fresh, overwrite=overwrite)  # where training starts, decided before loading
        tokenizer = pm.call("ft_load_tokenizer", cfg=cfg)
        data = prepare_datasets(ctx, tokenizer)  # the method's columns, cached by content, maybe packed

        seed_everything(cfg)  # the model's and the adapter's random init follow `seed`
        model = pm.call("ft_load_model", cfg=cfg, kwargs=pm.call("ft_model_kwargs", cfg=cfg), tokenizer=tokenizer)
        patches, watch = [], PatchWatch(model)  # what each plugin changed, checked after the first step
        scope.callback(watch.close)
        for plugin, records in pm.each("ft_patch_model", cfg=cfg, model=model):  # each undo is registered before the next plugin runs
            for record in records or []:
                log.info("patched %s", record)
                patches.append(record)
                if record.undo:
                    scope.callback(record.undo)
            watch.add(plugin, list(records or []))
        model = pm.call("ft_apply_adapter", cfg=cfg, model=model) or model  # None: full fine-tuning

        trainer = build_trainer(ctx, model, tokenizer, data)  # the method's Trainer, collator and metrics
        trainer.add_callback(patch_check_callback(watch))  # a patch undone or never run stops the run
        pm.call("ft_before_train", cfg=cfg, trainer=trainer, model=model)
        metrics = run_training(ctx, trainer, data, resume)

        with final_outputs(ctx, trainer, metrics) as final:  # written aside, moved into output_dir when complete
            final.files += [str(f) for f in pm.call("ft_save_weights", cfg=cfg, trainer=trainer, model=trainer.model,
                                                          output_dir=str(final.dir)) or []]
            final.files += write_run_files(ctx, trainer, tokenizer, metrics, patches, final.dir)
        pm.call("ft_after_train", cfg=cfg, trainer=trainer, metrics=metrics)
        return RunResult(cfg.output_dir, metrics, final.published, patches)


def preprocess(ctx: Context) -> Any:
    """``ft preprocess``: tokenize (and pack) the datasets into the cache; load no model."""
    from ft.engine.data import prepare_datasets

    tokenizer = ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg)
    return prepare_datasets(ctx, tokenizer), tokenizer
