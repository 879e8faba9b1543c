"""The ``grpo`` training method: online RL with Group Relative Policy Optimization.

``method: grpo`` trains on prompts only (dataset ``type: prompt``). For every prompt the policy
samples ``num_generations`` completions (a group), the reward functions the config names score
them (``grpo.rewards``; rewards are plugins, see ``ft_register_rewards``), and each completion's
advantage is its reward relative to its group's. The loss is PPO's clipped surrogate over the
completion tokens, normalised as ``loss_type`` says, plus ``beta`` times the KL to a reference
policy (none is loaded at ``beta: 0``; with lora it is the base with the adapter disabled).

Batches: ``micro_batch_size`` counts completions, as in TRL. Each optimizer step, every device
generates for its own ``micro_batch_size * gradient_accumulation_steps / num_generations``
prompts at once (so whole groups, scored and normalised together), then trains on them in
``gradient_accumulation_steps`` micro-batches. With ``num_iterations: k`` the same completions
are trained on for k optimizer steps, with importance ratios against the policy that generated
them. Generation runs on the training model (:class:`HFGeneration`: a sampling loop that draws what
Hugging Face ``generate`` draws, with ``generate`` as its fallback); the ``vllm`` plugin replaces it
(``trainer.set_generation``).

The maths (:func:`group_advantages`, :func:`policy_loss`) is checked against TRL's GRPOTrainer
to 1e-5 (tests/plugins/test_grpo_trl.py). Logged: each reward's mean and std, the weighted reward,
completion length, clip ratio, KL and entropy; sample completions go to
``OUTPUT_DIR/completions.jsonl`` every ``log_completions_steps`` steps.

The package: ``config`` (the ``grpo:`` section, its checks, the ``prompt`` format), ``reward_calls``
(calling the rewards), ``losses`` (the maths), ``generation`` (the sampling loop), ``batches``
(prompts and micro-batches), ``trainer`` (the Trainer; imports torch), ``plots``. This module holds
the hooks and the method's registration, and re-exports the names other plugins and tests use.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ft_plugins.grpo.batches import PromptBatch, pack_rows, pad_floats, prompt_collator, step_shape
from ft_plugins.grpo.config import (
    COLUMNS,
    IS_MODES,
    RESERVED_COLUMNS,
    GRPOOptions,
    PromptOptions,
    PromptTokenize,
    RewardEntry,
    build_prompt_tokenize,
    import_reward,
    options,
    reward_errors,
    validate,
)
from ft_plugins.grpo.generation import (
    HFGeneration,
    cut_at_eos,
    filter_logits,
    full_parameters,
    gathered_state,
    left_pad,
    sample_groups,
)
from ft_plugins.grpo.losses import (
    combine_rewards,
    completion_logps,
    group_advantages,
    is_weights,
    masked_mean,
    nanstd,
    policy_loss,
)
from ft_plugins.grpo.plots import CURVES_FILE, plot_grpo
from ft_plugins.grpo.reward_calls import RewardFunction, build_rewards, describe_reward, score

from ft import hookimpl
from ft.api import Method, Plugin

PLUGIN = Plugin()  # a method: always available, chosen with `method: grpo`

log = logging.getLogger("ft.grpo")

GENERATION = "generation"  # the method feature generation backends need (Plugin(method_feature=...) of the vllm plugin)
METRICS = ("reward", "reward_std", "completion_length", "entropy", "clip_ratio", "kl", "completion_truncated",
           "frac_reward_zero_std")


def trainer_class() -> type:
    """The GRPO Trainer class (imported when training: it needs torch and transformers)."""
    from ft_plugins.grpo.trainer import GRPOTrainer

    return GRPOTrainer


def trainer_kwargs(cfg: Any, model: Any, tokenizer: Any, data: Any) -> dict[str, Any]:
    from ft_plugins.grpo.trainer import trainer_kwargs as build

    return build(cfg, model, tokenizer, data)


@hookimpl
def ft_add_config(registry):
    registry.add("grpo", GRPOOptions)


@hookimpl
def ft_validate_config(cfg):
    if cfg.method != "grpo":
        return None
    return validate(cfg)


@hookimpl
def ft_register_formats(register):
    register.add("prompt", PromptOptions, build_prompt_tokenize, columns=COLUMNS)


@hookimpl
def ft_after_train(cfg, trainer):
    """``grpo_curves.png``: the rewards, completion length, and entropy / KL / clip ratio, each on its own scale
    (``training_curves.png`` has a panel per metric group; this one is laid out for GRPO)."""
    if cfg.method != "grpo":
        return
    if hasattr(trainer, "close_generation"):
        trainer.close_generation()
    if not trainer.is_world_process_zero():
        return
    path = Path(cfg.output_dir) / "metrics.json"
    if path.is_file():
        plot_grpo(json.loads(path.read_text(encoding="utf-8")).get("history", []), Path(cfg.output_dir) / CURVES_FILE)



@hookimpl
def ft_register_methods(register):
    register.add(Method(
        name="grpo",
        columns=COLUMNS,
        collator=prompt_collator,
        trainer_class=trainer_class,
        trainer_kwargs=trainer_kwargs,
        metrics=METRICS,
        features=frozenset({GENERATION}),
        description="online RL: sample groups of completions, score them with reward plugins, clipped surrogate loss",
    ))


__all__ = ["COLUMNS", "CURVES_FILE", "GENERATION", "IS_MODES", "METRICS", "RESERVED_COLUMNS", "GRPOOptions",
           "HFGeneration", "PromptBatch", "PromptOptions", "PromptTokenize", "RewardEntry", "RewardFunction",
           "build_prompt_tokenize", "build_rewards", "combine_rewards", "completion_logps", "cut_at_eos",
           "describe_reward", "filter_logits", "full_parameters", "gathered_state", "group_advantages", "import_reward", "is_weights",
           "left_pad", "masked_mean", "nanstd", "options", "pack_rows", "pad_floats", "plot_grpo", "policy_loss",
           "prompt_collator", "reward_errors", "sample_groups", "score", "step_shape", "trainer_class",
           "trainer_kwargs"]
