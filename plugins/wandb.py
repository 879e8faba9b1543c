"""Weights & Biases settings as config keys: the ``wandb:`` section (project, entity, run name, tags ...).

Reporting itself is transformers' W&B integration, turned on by ``report_to: wandb``; this plugin hands
it the section's settings (the ``WANDB_*`` environment variables it reads, and the run name) while
the run trains, and puts the environment back afterwards. A ``wandb:`` section without
``report_to: wandb`` is a config error (it would silently do nothing). Not a feature: always loaded,
blockable with ``-p no:wandb``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import Plugin

PLUGIN = Plugin()


class WandbSection(BaseModel):
    """The ``wandb:`` section."""

    model_config = ConfigDict(extra="forbid")

    project: str | None = Field(None, description="W&B project (default: W&B's, 'huggingface').")
    entity: str | None = Field(None, description="W&B team or user that owns the project.")
    name: str | None = Field(None, description="Run name shown in W&B (default: W&B picks one).")
    tags: list[str] = Field(default_factory=list, description="Tags of the run.")
    group: str | None = Field(None, description="Group runs together (e.g. the processes of one experiment).")
    notes: str | None = Field(None, description="A longer description of the run.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="online, offline (sync later with `wandb sync`) or disabled; default: W&B's own setting."
    )
    log_model: Literal["false", "end", "checkpoint"] = Field(
        "false", description="Upload the model to W&B: at the end, at every checkpoint, or not at all."
    )
    watch: Literal["false", "gradients", "parameters", "all"] = Field(
        "false", description="Log gradient / parameter histograms (slows training)."
    )


@hookimpl
def ft_add_config(registry):
    registry.add("wandb", WandbSection)


def environment(section: WandbSection) -> dict[str, str]:
    """The ``WANDB_*`` variables that carry the section to W&B (transformers' callback and wandb.init read them)."""
    env = {"WANDB_PROJECT": section.project, "WANDB_ENTITY": section.entity, "WANDB_RUN_GROUP": section.group,
           "WANDB_NOTES": section.notes, "WANDB_MODE": section.mode, "WANDB_NAME": section.name,
           "WANDB_TAGS": ",".join(section.tags) if section.tags else None,
           "WANDB_LOG_MODEL": section.log_model, "WANDB_WATCH": section.watch}
    return {k: v for k, v in env.items() if v is not None}


@hookimpl
def ft_validate_config(cfg):
    from ft.api import reporter_names

    if cfg.wandb is not None and "wandb" not in reporter_names(cfg) and "all" not in reporter_names(cfg):
        return [f"{cfg.where('wandb')}: the wandb section has no effect unless the run reports to W&B; add "
                "`report_to: wandb` (or remove the section)."]
    return None


@hookimpl
def ft_trainer_args(cfg):
    section = cfg.section("wandb")
    if cfg.wandb is not None and section.name:
        return {"run_name": section.name}
    return None


_saved: list[dict[str, Any]] = []


@hookimpl
def ft_before_train(cfg):
    restore()  # what an earlier run in this process left, if it failed before ft_after_train
    if cfg.wandb is None:
        return
    env = environment(cfg.section("wandb"))
    _saved.append({k: os.environ.get(k) for k in env})
    os.environ.update(env)


@hookimpl
def ft_after_train(cfg):
    restore()


def restore() -> None:
    """Put back the environment ft_before_train changed (also after a failed run, by the next run)."""
    while _saved:
        for key, value in _saved.pop().items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
