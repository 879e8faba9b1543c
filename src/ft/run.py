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

from ft.context import Context, load_context
from ft.errors import FtError

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
    from ft.data import prepare_datasets
    from ft.outputs import final_outputs, lock_output_dir, write_run_files
    from ft.resume import plan_resume
    from ft.train import build_trainer, run_training

    cfg, hook = ctx.cfg, ctx.pm.hook
    with contextlib.ExitStack() as scope:  # the lock is held, and global patches undone, until the run ends
        scope.enter_context(lock_output_dir(cfg))  # one run per output_dir; the ranks of this launch share it
        resume = plan_resume(ctx, fresh=fresh, overwrite=overwrite)  # where training starts, decided before loading
        tokenizer = _required(hook.ft_load_tokenizer(cfg=cfg), "ft_load_tokenizer", "a tokenizer")
        data = prepare_datasets(ctx, tokenizer)

        kwargs = ctx.pm.merge_dicts("ft_model_kwargs", "model keyword argument", cfg=cfg)
        model = _required(hook.ft_load_model(cfg=cfg, kwargs=kwargs, tokenizer=tokenizer), "ft_load_model", "a model")

        patches = []  # each plugin's undo is registered before the next plugin runs
        for _plugin, records in ctx.pm.iter_each("ft_patch_model", cfg=cfg, model=model):
            for record in records or []:
                log.info("patched %s", record)
                patches.append(record)
                if getattr(record, "undo", None):
                    scope.callback(record.undo)

        model = hook.ft_apply_adapter(cfg=cfg, model=model) or model

        trainer = build_trainer(ctx, model, tokenizer, data)
        hook.ft_before_train(cfg=cfg, trainer=trainer, model=model)
        metrics = run_training(ctx, trainer, data, resume)

        with final_outputs(ctx, trainer, metrics) as final:  # written aside, moved into output_dir when complete
            final.files += hook.ft_save_weights(cfg=cfg, trainer=trainer, model=trainer.model,
                                                output_dir=str(final.dir)) or []
            final.files += write_run_files(ctx, trainer, tokenizer, metrics, patches, final.dir)
        hook.ft_after_train(cfg=cfg, trainer=trainer, metrics=metrics)
        return RunResult(cfg.output_dir, metrics, final.published, patches)


def preprocess(ctx: Context) -> Any:
    """``ft preprocess``: tokenize (and pack) the datasets into the cache; load no model."""
    from ft.data import prepare_datasets

    tokenizer = _required(ctx.pm.hook.ft_load_tokenizer(cfg=ctx.cfg), "ft_load_tokenizer", "a tokenizer")
    return prepare_datasets(ctx, tokenizer), tokenizer


def _required(value: Any, hook: str, what: str) -> Any:
    if value is None:
        raise FtError(f"no active plugin returned {what} from {hook}. Is the 'hf' plugin blocked? See `ft plugins`.")
    return value
