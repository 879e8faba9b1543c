"""Preference learning: the ``dpo``, ``kto``, ``orpo`` and ``simpo`` training methods.

Pick one with ``method: dpo`` (``kto``, ``orpo``, ``simpo``) and configure it in the section of
the same name. Data: ``type: preference`` rows (pairs) for dpo, orpo and simpo; ``type: kto``
rows (unpaired, or pairs unpaired) for kto. See docs/preference.md for the formats, the maths
and starting hyperparameters.

- ``dpo``: ``beta``, ``loss_type`` (sigmoid, ipo, hinge, robust), ``label_smoothing``; against a
  reference policy: the base with the adapter disabled under lora/qlora (no second copy), else a
  frozen copy, or with ``precompute_ref_logps`` one pass before training whose log-probabilities
  are stored beside the prepared data (keyed by the model's weights).
- ``kto``: unpaired rows, ``desirable_weight`` / ``undesirable_weight``; the KL term is estimated
  from mismatched pairs within each micro-batch (prompt i with completion i-1).
- ``orpo``: NLL of the chosen completion plus ``beta`` x the log-odds-ratio term; no reference.
- ``simpo``: length-normalised rewards with a margin ``gamma`` (+ ``cpo_alpha`` x NLL); no reference.

The code is split by concern: ``preference_data`` (formats, collators), ``preference_losses``
(the maths, shared), ``preference_trainer`` (one forward pass per batch, metrics, the reference).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from ft_plugins.preference_data import (
    KTO_COLUMNS,
    PAIR_COLUMNS,
    KtoCollator,
    KtoOptions,
    PreferenceOptions,
    SharedPromptCollator,
    UnitCollator,
    build_pairs,
    build_unpaired,
)
from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import EVAL, PACKING, SHAPES_DATA, Method, Plugin

PLUGIN = Plugin()  # methods are chosen with `method:`; nothing to select

log = logging.getLogger("ft.preference")

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")


class _Section(BaseModel):
    """What every preference method's section has."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_len: int | None = Field(
        None, gt=0, json_schema_extra=SHAPES_DATA,
        description="Drop rows whose prompt has more tokens than this (counted and reported).")


class DpoSection(_Section):
    """The ``dpo:`` section."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference policy (higher = closer). "
                        "For ipo it is the regularisation tau.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo (IPO, per-token means), hinge (SLiC), robust (rDPO, needs "
        "label_smoothing).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Probability that a pair's preference is flipped: conservative DPO with "
        "sigmoid, robust DPO with robust.")
    precompute_ref_logps: bool = Field(
        False, description="Compute the reference log-probabilities in one pass before training and store them "
        "with the prepared data, instead of keeping a reference model (saves memory in a full fine-tune).")


class KtoSection(_Section):
    """The ``kto:`` section."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference policy.")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of desirable rows (label true).")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of undesirable rows (label false). With "
                                      "unbalanced data, keep weight x count about equal on both sides.")


class OrpoSection(_Section):
    """The ``orpo:`` section."""

    beta: float = Field(0.1, gt=0, description="Weight of the log-odds-ratio term next to the NLL (axolotl's "
                        "orpo_alpha, the paper's lambda).")


class SimpoSection(_Section):
    """The ``simpo:`` section."""

    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised rewards (the paper uses 2.0-2.5).")
    gamma: float = Field(1.0, ge=0, description="Target reward margin (the paper: gamma/beta about 0.5).")
    cpo_alpha: float = Field(0.0, ge=0, description="Weight of an NLL term on the chosen completion (CPO); 0 = "
                             "pure SimPO.")


SECTIONS = {"dpo": DpoSection, "kto": KtoSection, "orpo": OrpoSection, "simpo": SimpoSection}
WITH_REFERENCE = ("dpo", "kto")


@hookimpl
def ft_add_config(registry):
    for name, model in SECTIONS.items():
        registry.add(name, model)


@hookimpl
def ft_register_formats(register):
    register.add("preference", PreferenceOptions, build_pairs, columns=PAIR_COLUMNS)
    register.add("kto", KtoOptions, build_unpaired, columns=KTO_COLUMNS)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def shares_prompt(cfg: Any) -> bool:
    """Whether pairs can go as one ``[prompt | chosen | rejected]`` row: the attention must honour a 4D
    mask (eager, SDPA), not cut sequences at position restarts (flash attention, ``-p varlen``)."""
    hf = cfg.section("hf")
    attention = str(getattr(hf, "attn_implementation", None) or "").lower()
    return "flash" not in attention and not cfg.provides("varlen_attention")


def pair_collator(cfg: Any, tokenizer: Any) -> Any:
    hf = cfg.section("hf")
    multiple = getattr(hf, "pad_to_multiple_of", None)
    if shares_prompt(cfg):
        from ft.api import resolve_precision, torch_dtype

        log.info("%s: each pair is one row, its prompt computed once for both sides", cfg.method)
        return SharedPromptCollator(_pad_id(tokenizer), torch_dtype(resolve_precision(cfg)), multiple)
    return UnitCollator(_pad_id(tokenizer), ("chosen", "rejected"), multiple)


def kto_collator(cfg: Any, tokenizer: Any) -> KtoCollator:
    hf = cfg.section("hf")
    return KtoCollator(_pad_id(tokenizer), cfg.sequence_len, getattr(hf, "pad_to_multiple_of", None))


def trainer_class() -> type:
    from ft_plugins.preference_trainer import PreferenceTrainer  # imports torch: only when training

    return PreferenceTrainer


def trainer_kwargs(cfg: Any, model: Any, tokenizer: Any, data: Any) -> dict[str, Any]:
    """The method's settings, and its reference policy (logged: the run says which plan it chose)."""
    from ft_plugins.preference_trainer import PreferenceSetup

    from ft.api import ReferenceModel

    method = cfg.method
    options = cfg.section(method)
    sequences = ("kto",) if method == "kto" else ("chosen", "rejected")
    setup = PreferenceSetup(method, options, sequences, cache_dir=getattr(data, "cache_dir", None),
                            nll_on_prompt=method == "orpo" and bool(cfg.train_on_inputs))
    if method not in WITH_REFERENCE:
        log.info("%s: no reference model (the loss needs none)", method)
    elif getattr(options, "precompute_ref_logps", False):
        setup.precompute = True
        log.info("%s: reference log-probabilities precomputed in one pass before training (%s), no reference model "
                 "kept", method, "the base with the adapter disabled" if _adapter(model) else "the initial model")
    else:
        setup.reference = ReferenceModel.for_training(model, method)
    return {"preference": setup}


def _adapter(model: Any) -> bool:
    from ft.api import has_adapter

    return has_adapter(model)


@hookimpl
def ft_register_methods(register):
    common = {"trainer_class": trainer_class, "trainer_kwargs": trainer_kwargs}
    register.add(Method(
        name="dpo", columns=PAIR_COLUMNS, collator=pair_collator, metrics=PAIR_METRICS,
        features=frozenset({PACKING, EVAL}), **common,
        description="direct preference optimisation (sigmoid, ipo, hinge, robust) on preference pairs",
    ))
    register.add(Method(
        name="kto", columns=KTO_COLUMNS, collator=kto_collator, features=frozenset({EVAL}),
        metrics=("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"),
        description="Kahneman-Tversky optimisation on desirable/undesirable completions", **common,
    ))
    register.add(Method(
        name="orpo", columns=PAIR_COLUMNS, collator=pair_collator, features=frozenset({PACKING, EVAL}),
        metrics=(*PAIR_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen"), **common,
        description="odds-ratio preference optimisation: NLL plus a log-odds-ratio term, no reference model",
    ))
    register.add(Method(
        name="simpo", columns=PAIR_COLUMNS, collator=pair_collator, features=frozenset({PACKING, EVAL}),
        metrics=(*PAIR_METRICS, "nll_loss"), **common,
        description="SimPO: length-normalised rewards with a target margin, no reference model",
    ))


@hookimpl
def ft_validate_config(cfg):
    method = cfg.method
    if method not in SECTIONS:
        return None
    options = cfg.section(method)
    problems = []
    if options.max_prompt_len is not None and options.max_prompt_len >= cfg.sequence_len:
        problems.append(f"{cfg.where(method, 'max_prompt_len')}: max_prompt_len ({options.max_prompt_len}) must be "
                        f"below sequence_len ({cfg.sequence_len}), or no completion token would fit; e.g. "
                        f"max_prompt_len: {cfg.sequence_len // 2}.")
    if method == "dpo" and options.label_smoothing and options.loss_type not in ("sigmoid", "robust"):
        problems.append(f"{cfg.where('dpo', 'label_smoothing')}: label_smoothing applies to loss_type sigmoid "
                        f"(conservative DPO) and robust, not {options.loss_type}; remove it.")
    if cfg.train_on_inputs and method != "orpo":
        problems.append(f"{cfg.where('train_on_inputs')}: {method} scores the completions of preference data "
                        "only; remove train_on_inputs (only orpo uses it: its NLL term then covers the prompt too).")
    if method == "kto":
        for key, value in (("micro_batch_size", cfg.micro_batch_size), ("eval_batch_size", cfg.eval_batch_size)):
            if value is not None and value < 2:
                problems.append(f"{cfg.where(key)}: kto estimates its KL term from mismatched pairs within each "
                                f"micro-batch, so {key} must be at least 2 (e.g. {key}: 4).")
    return problems
