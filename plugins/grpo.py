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
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from ft import hookimpl
from ft.api import (
    NOT_TRAINING,
    DatasetOptions,
    Dropped,
    FtError,
    Method,
    ReferenceModel,
    TextEncoder,
    defined_at,
    entry_where,
    resolve_path,
)

FT_FEATURE = False  # a method: always available, chosen with `method: grpo`

log = logging.getLogger("ft.grpo")

GENERATION = "generation"  # the method feature generation backends need (FT_METHOD_FEATURE of the vllm plugin)
COLUMNS = ("input_ids", "prompt")
COMPLETIONS_FILE = "completions.jsonl"
NO_SIGNAL_STEPS = 5  # generations in a row without any reward difference inside a group: warn
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")  # the reward functions' own arguments
METRICS = ("reward", "reward_std", "completion_length", "entropy", "clip_ratio", "kl", "completion_truncated",
           "frac_reward_zero_std")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


# -- config -------------------------------------------------------------------------------------


class RewardEntry(BaseModel):
    """One reward of ``grpo.rewards``: a registered reward's name, its weight and its own options."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="A registered reward (see `ft plugins`): exact_match, regex_match, json_schema, "
                      "length_penalty, reward_model, or a plugin's; or a function by import path, TRL's signature: "
                      "package.module:function or file.py:function.")
    weight: float = Field(1.0, description="Weight of this reward in the sum that is normalised per group.")

    @model_validator(mode="after")
    def _registered_with_valid_options(self, info: ValidationInfo) -> RewardEntry:
        """The name and options are checked while the config is validated (``context["registries"]``), so a
        reward's problems are reported in the same pass as every other key's."""
        registries = (info.context or {}).get("registries")
        if registries is not None:
            errors = reward_errors(registries.rewards, self)
            if errors:
                raise ValidationError.from_exception_data("RewardEntry", [
                    {"type": PydanticCustomError("reward", "{message}", {"message": message}), "loc": loc,
                     "input": shown} for loc, message, shown in errors])
        return self


class GRPOOptions(BaseModel):
    """The ``grpo:`` section (``method: grpo``)."""

    model_config = ConfigDict(extra="forbid")

    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group size).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the log-probabilities of the loss use it too).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0 = all).")
    max_completion_len: int = Field(256, ge=1, description="Most tokens per completion (sequence_len bounds the prompt).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the std of the group's rewards, of the whole batch's, or not at all.")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="Normalisation of the token losses: grpo = mean per completion then over completions; "
        "bnpo = mean over the micro-batch's tokens; dr_grpo = sum / (completions x max_completion_len); dapo = sum / "
        "tokens of the whole step (all devices).")
    epsilon: float = Field(0.2, gt=0, description="Clipping range of the importance ratio: [1 - epsilon, 1 + epsilon_high].")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping range (DAPO's clip-higher); default: epsilon.")
    num_iterations: int = Field(1, ge=1, description="Optimizer steps on each batch of completions (ratios against "
                                "the policy that generated them).")
    beta: float = Field(0.0, ge=0, description="Weight of the KL to the reference policy; 0 loads no reference.")
    rewards: list[RewardEntry] = Field(default_factory=list, description="Reward functions and their weights, e.g. "
                                       "[{name: exact_match, weight: 1.0, field: answer}]; an entry's other keys are "
                                       "the reward's options (docs/rl.md), checked at validation.")
    reward_timeout: float | None = Field(
        600.0, gt=0, json_schema_extra=NOT_TRAINING,
        description="Seconds one call of a reward function may take (it scores one step's completions); over it "
        "the run stops with an error naming the reward. null: no limit.")
    log_completions_steps: int | None = Field(
        None, ge=0, description="Write sample completions to OUTPUT_DIR/completions.jsonl every N steps "
        "(default: logging_steps; 0 = never).")
    min_p: float | None = Field(None, ge=0, le=1, description="Sample only tokens with at least min_p times the "
                                "most likely token's probability (default: off).")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalise tokens already in the prompt or completion "
                                      "(> 1 repeats less; 1 = off).")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion (kept in it).")
    stop_token_ids: list[int] = Field(default_factory=list, description="Token ids that end a completion, besides "
                                      "the end-of-sequence ones.")
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_len out of the loss (they still count in their "
        "group's reward statistics).")
    async_generation: bool = Field(
        False, description="Generate the next step's completions while this step trains (needs a generation backend "
        "apart from the training model: -p vllm; one process). The generating weights trail by up to max_lag steps.")
    max_lag: int = Field(1, ge=0, description="async_generation: optimizer steps the generating weights may trail the "
                         "trained ones (0 = synchronous).")
    is_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "token_truncate", description="Importance-sampling correction of the gap between the generator's per-token "
        "log-probabilities (vLLM's) and the trainer's, as TRL's vllm_importance_sampling_mode: token_truncate caps each "
        "token's ratio at is_cap; token_mask drops tokens whose ratio leaves [is_min, is_cap]; sequence_* do the same "
        "with one ratio per completion; none. Applies only when generation returns log-probabilities (-p vllm).")
    is_cap: float = Field(3.0, gt=0, description="Upper bound of the importance-sampling ratio (is_correction).")
    is_min: float | None = Field(None, ge=0, description="Lower bound of the importance-sampling ratio (default: none).")


def options(cfg: Any) -> GRPOOptions:
    """The run's GRPO settings: the ``grpo:`` section, or the section of a method built on this machinery
    whose settings extend :class:`GRPOOptions` (``ebft:``)."""
    section = cfg.section(cfg.method) if cfg.method != "grpo" else None
    return section if isinstance(section, GRPOOptions) else cfg.section("grpo")


@hookimpl
def ft_add_config(registry):
    registry.add("grpo", GRPOOptions)


@hookimpl
def ft_validate_config(cfg):
    if cfg.method != "grpo":
        return None
    opts, problems = options(cfg), []
    if not opts.rewards:
        problems.append(f"{cfg.where('grpo', 'rewards') if cfg.line_of('grpo', 'rewards') else cfg.where('grpo')}: "
                        "method grpo needs at least one reward, e.g. `rewards: [{name: exact_match, field: answer}]`; "
                        f"registered rewards: {', '.join(sorted(_registry(cfg).names())) or 'none'}.")
    for i, entry in enumerate(opts.rewards):  # checked during validation already when the registries were given
        errors = reward_errors(_registry(cfg), entry)
        problems += [f"{cfg.where('grpo', 'rewards', i, *loc)}: {message}." for loc, message, _ in errors]
        if ":" in entry.name and not errors:  # a function by import path: it must import from here
            try:
                import_reward(cfg, entry.name, cfg.where("grpo", "rewards", i, "name"))
            except FtError as exc:
                problems.append(str(exc))
    per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    if per_step % opts.num_generations:
        g = opts.num_generations
        problems.append(
            f"{cfg.where('micro_batch_size')}: micro_batch_size x gradient_accumulation_steps ({cfg.micro_batch_size} x "
            f"{cfg.gradient_accumulation_steps} = {per_step} completions per device and step) must be a multiple of "
            f"grpo.num_generations ({g}): each device generates whole groups. Set micro_batch_size: {g} (or a multiple), "
            f"or gradient_accumulation_steps so that the product is one.")
    if opts.async_generation and opts.max_lag and not cfg.provides("separate_generation"):
        problems.append(f"{cfg.where('grpo', 'async_generation')}: asynchronous generation needs a generator apart from "
                        "the training model: add -p vllm (plugins: [vllm]), or set async_generation: false.")
    if opts.is_min is not None and opts.is_min >= opts.is_cap:
        problems.append(f"{cfg.where('grpo', 'is_min')}: is_min ({opts.is_min:g}) must be below is_cap ({opts.is_cap:g}).")
    if opts.epsilon >= 1:
        problems.append(f"{cfg.where('grpo', 'epsilon')}: epsilon {opts.epsilon:g} would let the ratio's lower bound "
                        "reach 0 or below; use a value below 1 (0.2 is usual).")
    return problems


def _registry(cfg: Any) -> Any:
    return cfg.registries.rewards


def import_reward(cfg: Any, path: str, where: str) -> Callable[..., Any]:
    """A reward function by import path, as TRL takes them: ``package.module:function`` (importable here) or
    ``file.py:function`` (next to the config or in the working directory)."""
    import importlib
    import importlib.util
    import sys

    module_name, _, attr = path.rpartition(":")
    try:
        if module_name.endswith(".py"):
            file = Path(resolve_path(cfg, module_name))
            if not file.is_file():
                raise FileNotFoundError(f"no file {file}")
            import hashlib

            # one module per file, executed once: validation and the trainer ask for it, and two files may share a stem
            name = f"ft_reward_{file.stem}_{hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:8]}"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]  # a failed import is not kept half-made
                    raise
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the import raised, said with where it was asked for
        raise FtError(f"{where}: reward '{path}': could not import '{module_name}' ({type(exc).__name__}: {exc}). "
                      "Give module:function with the module importable (installed, or on PYTHONPATH), or "
                      "file.py:function.") from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise FtError(f"{where}: reward '{path}': '{module_name}' has no function '{attr}'.")
    return fn


def reward_errors(registry: Any, entry: RewardEntry) -> list[tuple[tuple[Any, ...], str, Any]]:
    """``(key path inside the entry, message, value shown or None)`` of each problem of a ``grpo.rewards`` entry:
    an unknown name, options a reward does not take, option values its options model refuses."""
    if ":" in entry.name:  # a function by import path: imported by ft_validate_config, which knows the config's folder
        extra = dict(entry.model_extra or {})
        if extra:
            return [((next(iter(extra)),), f"reward '{entry.name}' is a function by import path and takes no options "
                                           f"(got {', '.join(extra)}); remove them", None)]
        return []
    if entry.name not in registry:
        return [(("name",), f"{registry.unknown_message(entry.name).rstrip('.')}. Rewards come from plugins; "
                            "see `ft plugins`", None)]
    reward = registry.get(entry.name).value
    extra = dict(entry.model_extra or {})
    if reward.options is None:
        if extra:
            return [((next(iter(extra)),), f"reward '{entry.name}' takes no options (got {', '.join(extra)}); "
                                           "remove them", None)]
        return []
    try:
        reward.options(**extra)
    except ValidationError as exc:
        out: list[tuple[tuple[Any, ...], str, Any]] = []
        for err in exc.errors():
            loc = tuple(err["loc"]) or ("name",)
            if err["type"] == "extra_forbidden":
                known = ", ".join(reward.options.model_fields)
                out.append((loc, f"reward '{entry.name}' has no option '{loc[-1]}'; its options: {known}, weight", None))
            else:
                shown = err.get("input") if not isinstance(err.get("input"), (dict, list)) else None
                out.append((loc, f"{err['msg'].rstrip('.')} (reward '{entry.name}')", shown))
        return out
    return []


# -- the prompt dataset format --------------------------------------------------------------------


class PromptOptions(DatasetOptions):
    """Dataset-entry options of ``type: prompt`` (prompts for online RL; every other column goes to the rewards)."""

    field_prompt: str = Field("prompt", description="Row field with the prompt: a list of chat messages (rendered "
                              "with the chat template and its generation prompt) or a plain string (used as it is).")
    chat_template: str | None = Field(
        None, description="Template for chat prompts: null = the tokenizer's own; a shipped name (chatml, llama3, "
        "mistral, qwen); a .jinja file; or inline jinja.")
    system_prompt: str | None = Field(None, description="A system message put first in every chat prompt that has "
                                      "none (and in string prompts with apply_chat_template).")
    apply_chat_template: bool = Field(False, description="String prompts become a user message rendered with the chat "
                                      "template and its generation prompt (and system_prompt); the rewards then see "
                                      "the messages. Off: a string prompt is used as it is.")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="More variables for the chat "
                                                 "template, e.g. {enable_thinking: false}.")


class PromptTokenize:
    """Rows -> ``input_ids`` of the prompt (ready for generation), the prompt itself and the row's other columns."""

    def __init__(self, tokenizer: Any, options: PromptOptions, template: str | None, where: str):
        self.tokenizer = tokenizer
        self.encoder = TextEncoder(tokenizer)
        self.field = options.field_prompt
        self.template = template
        self.where = where
        self.system = options.system_prompt
        self.template_strings = options.apply_chat_template
        self.template_kwargs = dict(options.chat_template_kwargs)

    def _render(self, messages: list[dict[str, Any]]) -> str:
        if self.template is None:
            raise FtError(f"{self.where}: chat prompts need a chat template, and none could be resolved.")
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True, **self.template_kwargs)

    def _messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.system is not None and messages[0].get("role") != "system":
            return [{"role": "system", "content": self.system}, *messages]
        return messages

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(rows)
        chats: list[tuple[int, str]] = []
        texts: list[tuple[int, str]] = []
        rendered: dict[int, list[dict[str, Any]]] = {}  # the messages a chat prompt was rendered from
        for r, row in enumerate(rows):
            prompt = row.get(self.field)
            for name in row:
                if name != self.field and (name in RESERVED_COLUMNS or name == "prompt" or name.endswith("input_ids")
                                           or name == "labels" or name.endswith("_labels")):
                    raise FtError(f"column '{name}' has a name ft uses itself (the prompt, token ids or a reward "
                                  "argument); rename it in the data.")
            if prompt is None:
                keys = ", ".join(sorted(map(str, row))) or "none"
                out[r] = Dropped(f"missing field '{self.field}'", f"row has fields: {keys}; set datasets[].field_prompt")
            elif isinstance(prompt, str) and not prompt.strip():
                out[r] = Dropped("empty", f"'{self.field}' has no text")
            elif isinstance(prompt, str) and not self.template_strings:
                texts.append((r, prompt))
            elif isinstance(prompt, (str, list)):
                if isinstance(prompt, str):
                    prompt = [{"role": "user", "content": prompt}]
                bad = _bad_messages(prompt)
                if bad:
                    out[r] = Dropped("malformed messages", bad)
                    continue
                prompt = self._messages(prompt)
                rendered[r] = prompt
                try:
                    chats.append((r, self._render(prompt)))
                except FtError:
                    raise
                except Exception as exc:  # jinja raise_exception (roles must alternate ...)
                    out[r] = Dropped("template error", f"{type(exc).__name__}: {exc}")
            else:
                out[r] = Dropped("malformed row", f"'{self.field}' is a {type(prompt).__name__}; give a string or a "
                                                  "list of messages")
        ids: dict[int, list[int]] = {}
        if chats:  # the rendered template carries its own special tokens
            ids.update(zip([r for r, _ in chats], self.encoder.ids([t for _, t in chats]), strict=True))
        if texts:  # plain text is tokenized as the tokenizer does by default (BOS where it adds one)
            encoded = self.tokenizer([t for _, t in texts], add_special_tokens=True)["input_ids"]
            ids.update(zip([r for r, _ in texts], encoded, strict=True))
        for r, token_ids in ids.items():
            row = rows[r]
            # the prompt is kept as JSON text: chat and plain prompts can then share a column, and messages
            # reach the rewards exactly as written (a table column would add every key of every message to all)
            out[r] = {"input_ids": list(token_ids), "prompt": json.dumps(rendered.get(r, row[self.field]),
                                                                         ensure_ascii=False),
                      **{k: v for k, v in row.items() if k != self.field}}
        return out


def _bad_messages(messages: list[Any]) -> str | None:
    if not messages:
        return "the prompt has no messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is a {type(m).__name__}, not a mapping"
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} needs string fields 'role' and 'content'"
    return None


def build_prompt_tokenize(cfg: Any, entry: PromptOptions, tokenizer: Any) -> PromptTokenize:
    from ft_plugins.chat_template import resolve_chat_template

    where = entry_where(cfg, entry, "chat_template")
    try:
        template = resolve_chat_template(entry.chat_template, tokenizer, where, cfg)
    except FtError:
        if entry.chat_template is not None:
            raise
        template = None  # plain-text prompts need none; a chat prompt then says so
    return PromptTokenize(tokenizer, entry, template, where)


@hookimpl
def ft_register_formats(register):
    register.add("prompt", PromptOptions, build_prompt_tokenize, columns=COLUMNS)


# -- rewards ------------------------------------------------------------------------------------


@dataclass
class RewardFunction:
    """A reward of this run: its name, weight, function and the plugin that registered it."""

    name: str
    weight: float
    fn: Callable[..., Any]
    plugin: str


def build_rewards(cfg: Any, opts: GRPOOptions) -> list[RewardFunction]:
    out = []
    for i, entry in enumerate(opts.rewards):
        if ":" in entry.name:
            out.append(RewardFunction(entry.name, entry.weight,
                                      import_reward(cfg, entry.name, cfg.where("grpo", "rewards", i, "name")),
                                      "import path"))
            continue
        registered = _registry(cfg).get(entry.name, cfg.where("grpo", "rewards", i, "name"))
        reward = registered.value
        fn = reward.fn
        if reward.options is not None:
            fn = reward.fn(reward.options(**dict(entry.model_extra or {})), cfg)
            if not callable(fn):
                raise FtError(f"reward '{entry.name}' (plugin '{registered.plugin}'): its factory returned {fn!r}, "
                              "not a reward function; fix the plugin.")
        out.append(RewardFunction(entry.name, entry.weight, fn, registered.plugin))
    return out


def score(rewards: Sequence[RewardFunction], prompts: list[Any], completions: list[Any],
          completion_ids: list[list[int]], columns: dict[str, list[Any]], *, timeout: float | None = None,
          check_stop: Callable[[str], None] | None = None) -> tuple[list[list[float]], list[list[bool]]]:
    """Each reward's value per completion (NaN where a reward said None) and where it said None.

    A reward returns one number or None (it does not apply to that completion) per completion, as a list, a
    tuple, a 1-D numpy array or torch tensor. Each call may take ``timeout`` seconds; ``check_stop(doing)`` is
    called while a reward runs and may raise to abandon the step (a stop signal). When every reward said None
    to every completion, nothing could be learned: that is an error naming the rewards."""
    values, unset = [], []
    n = len(completions)
    for reward in rewards:
        got = _call_reward(reward, prompts, completions, completion_ids, columns, timeout, check_stop)
        row, none = [], []
        for k, v in enumerate(_one_per_completion(reward, got, n)):
            if v is None:
                row.append(math.nan)
                none.append(True)
                continue
            try:
                row.append(float(v))
            except (TypeError, ValueError):
                raise FtError(f"{describe_reward(reward)} returned {_short(repr(v), 80)} for completion {k}; a reward "
                              "is a number or None.") from None
            none.append(False)
        values.append(row)
        unset.append(none)
    if rewards and n and all(all(none) for none in unset):
        named = "; ".join(describe_reward(r) for r in rewards)
        raise FtError(f"every reward returned None for all {n} completions of this step ({named}). None means "
                      "\"this reward does not apply to that completion\", so nothing would be learned (every loss and "
                      "gradient 0). Make the reward return a number for the completions it scores (None is fine for "
                      "some of them), or check the row columns it reads.")
    return values, unset


def describe_reward(reward: RewardFunction) -> str:
    """``reward 'NAME' (plugin 'P', function F at FILE:LINE)``: where a reward's problem is to be fixed."""
    return f"reward '{reward.name}' (plugin '{reward.plugin}', {defined_at(reward.fn)})"


def _one_per_completion(reward: RewardFunction, got: Any, n: int) -> list[Any]:
    """What a reward returned, as a list of n values (numpy arrays and torch tensors converted)."""
    if not isinstance(got, (list, tuple)) and hasattr(got, "tolist") and hasattr(got, "shape"):
        shape = tuple(got.shape)
        if len(shape) != 1:
            raise FtError(f"{describe_reward(reward)} returned an array of shape {shape} for {n} completions; a "
                          f"reward function returns one value per completion (a list, or an array of shape ({n},)).")
        got = got.tolist()
    if not isinstance(got, Sequence) or isinstance(got, (str, bytes)):
        raise FtError(f"{describe_reward(reward)} returned {type(got).__name__} {_short(repr(got), 80)} for {n} "
                      "completions; a reward function returns a list with one number (or None) per completion.")
    if len(got) != n:
        raise FtError(f"{describe_reward(reward)} returned {len(got)} values for {n} completions; a reward function "
                      "returns one number (or None) per completion, in the order of the completions.")
    return list(got)


POLL_SECONDS = 0.1  # how often a wait on a reward looks at its time limit and at a stop request


def _call_reward(reward: RewardFunction, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 columns: dict[str, list[Any]], timeout: float | None = None,
                 check_stop: Callable[[str], None] | None = None) -> Any:
    def call(**kwargs: Any) -> Any:
        return _call_with_limit(reward, kwargs, timeout, check_stop)

    try:
        return call(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except _RewardRaised as batch_error:  # find the row it fails on, to name it
        error, culprit = batch_error.error, None
        for k in range(len(completions)):
            try:
                call(prompts=[prompts[k]], completions=[completions[k]], completion_ids=[completion_ids[k]],
                     **{c: [v[k]] for c, v in columns.items()})
            except _RewardRaised as row_error:
                error, culprit = row_error.error, k
                break
        frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
        at = f" (at {frame.filename}:{frame.lineno} in {frame.name})" if frame else ""
        if culprit is None:
            row = "on a batch of completions (each alone it scores fine)"
        else:
            shown = {"prompt": prompts[culprit], "completion": completions[culprit],
                     **{c: v[culprit] for c, v in columns.items()}}
            row = "on this row: " + _short(json.dumps(shown, ensure_ascii=False, default=str), 600)
        raise FtError(f"reward '{reward.name}' (plugin '{reward.plugin}') raised {type(error).__name__}: {error}{at} "
                      f"{row}. Fix the reward (or the row), or remove it from grpo.rewards.") from error


def _call_with_limit(reward: RewardFunction, kwargs: dict[str, Any], timeout: float | None,
                     check_stop: Callable[[str], None] | None) -> Any:
    """``reward.fn(**kwargs)`` on a worker thread, so that the wait can end: at the time limit (an error naming
    the reward and the line it was running) or when ``check_stop`` raises (Ctrl-C). The thread is a daemon: a
    reward stuck for good does not keep the process alive once the run has stopped."""
    outcome: dict[str, Any] = {}
    device = _cuda_device()

    def work() -> None:
        try:
            if device is not None:  # the current CUDA device is per thread: keep this rank's
                import torch

                torch.cuda.set_device(device)
            outcome["value"] = reward.fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=work, name=f"ft-reward-{reward.name}", daemon=True)
    started = time.monotonic()
    thread.start()
    while True:
        thread.join(POLL_SECONDS if timeout is None else min(POLL_SECONDS, timeout))
        if not thread.is_alive():
            break
        if check_stop is not None:
            check_stop(f"waiting for reward '{reward.name}'")
        if timeout is not None and time.monotonic() - started >= timeout:
            frame = sys._current_frames().get(thread.ident or -1)
            at = ""
            if frame is not None:
                last = traceback.extract_stack(frame)[-1]
                at = f"; it was running {last.filename}:{last.lineno} in {last.name}"
            raise FtError(f"{describe_reward(reward)} did not return within grpo.reward_timeout ({timeout:g} s) "
                          f"for {len(kwargs.get('completions') or ())} completions{at}. Make the reward faster, "
                          "or raise grpo.reward_timeout (null: no limit).")
    error = outcome.get("error")
    if isinstance(error, FtError) or not isinstance(error, Exception):  # FtError says it all; None: it returned
        if error is not None:
            raise error
        return outcome["value"]
    raise _RewardRaised(error)


class _RewardRaised(Exception):
    """What a reward function raised (and not the time limit or a stop request, which end the step as they are)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _cuda_device() -> int | None:
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the maths (checked against TRL) --------------------------------------------------------------


def nanstd(x: Any, dim: int | None = None, keepdim: bool = False) -> Any:
    """Unbiased standard deviation ignoring NaN (as TRL computes it)."""
    import torch

    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    std = var.sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


def combine_rewards(per_func: Any, none: Any, weights: Sequence[float]) -> tuple[Any, Any]:
    """``(rewards, bad)``: the weighted sum of each completion's rewards (``per_func`` ``[N, K]``; rewards that
    said None, ``none``, count 0; a completion every reward said None to is NaN, unscorable) and where a reward
    returned a non-finite value (NaN/inf: the loss then is NaN, and the health policy decides)."""
    import torch

    w = torch.as_tensor(list(weights), dtype=per_func.dtype, device=per_func.device)
    bad = ~torch.isfinite(per_func) & ~none
    rewards = torch.where(none, torch.zeros_like(per_func), per_func * w).sum(1)
    rewards[none.all(1)] = math.nan
    return rewards, bad


def group_advantages(rewards: Any, num_generations: int, scale: str, batch_std: Any = None) -> tuple[Any, Any]:
    """``(advantages, std)``: each completion's reward minus its group's mean, divided by the std of the group
    (``scale="group"``), of ``batch_std`` or the whole batch (``"batch"``), or not (``"none"``).

    ``rewards`` is ``[N]`` (N = groups x num_generations, groups consecutive); NaN marks an unscorable completion
    (every reward returned None): it is left out of its group's statistics and gets advantage 0.
    """
    import torch

    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale == "batch":
        std = (batch_std if batch_std is not None else nanstd(rewards)).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), std


def is_weights(old_logps: Any, sampling_logps: Any, mask: Any, mode: str, cap: float | None,
               floor: float | None) -> tuple[Any, dict[str, Any]]:
    """Importance-sampling weights that correct for completions sampled by another engine (or older weights):
    the ratio of the trainer's probability of each token (``old_logps``, no gradient) to the generator's
    (``sampling_logps``, NaN where it gave none: ratio 1), as TRL's ``vllm_importance_sampling_mode``:
    ``token_truncate`` clamps each token's ratio to ``[floor, cap]``; ``token_mask`` zeroes tokens outside it;
    ``sequence_*`` do the same with one ratio per completion (the product over its tokens), shape ``[B, 1]``.

    Returns the weights (multiplying each token's loss) and the statistics logged: ``is/mean``, ``is/min``,
    ``is/max`` of the weights over the completion tokens (over completions for sequence modes) and
    ``is/clipped``, the share of them truncated or masked.
    """
    import torch

    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    sequence = mode.startswith("sequence")
    raw = torch.exp(diff.sum(dim=-1, keepdim=True) if sequence else diff)
    low = floor if floor is not None else -math.inf
    high = cap if cap is not None else math.inf
    outside = (raw < low) | (raw > high)
    if mode.endswith("truncate"):
        weights = torch.clamp(raw, min=floor, max=cap)
    elif mode.endswith("mask"):
        weights = raw.masked_fill(outside, 0.0)
    else:
        raise FtError(f"unknown grpo.is_correction '{mode}'")
    with torch.no_grad():
        keep = torch.ones_like(weights, dtype=torch.bool) if sequence else mask.bool()
        flat, hit = weights[keep], outside[keep]
        empty = flat.new_zeros(())
        stats = {"is/mean": flat.mean() if flat.numel() else empty, "is/min": flat.min() if flat.numel() else empty,
                 "is/max": flat.max() if flat.numel() else empty,
                 "is/clipped": hit.float().mean() if hit.numel() else empty}
    return weights, stats


def policy_loss(logps: Any, old_logps: Any, ref_logps: Any, advantages: Any, mask: Any, *, loss_type: str,
                epsilon_low: float, epsilon_high: float, beta: float, max_completion_len: int,
                step_tokens: Any = None, importance: Any = None) -> tuple[Any, dict[str, Any]]:
    """The clipped-surrogate loss of one micro-batch, and its per-token statistics.

    ``logps``/``old_logps``/``ref_logps``/``mask`` are ``[B, C]`` (completion tokens), ``advantages`` ``[B]``.
    ``old_logps`` None means on-policy (ratio 1, gradient still flows); ``ref_logps`` is needed when ``beta > 0``.
    The loss is what one micro-batch contributes before the Trainer divides by the accumulation steps, so that
    the step's gradient is that of the objective over the whole step: ``step_tokens`` (dapo) is the number of
    completion tokens of the step over all devices, divided by the device count, times 1 / accumulation steps.
    ``importance`` (:func:`is_weights`) multiplies each token's surrogate loss, before the KL term, as in TRL.
    """
    import torch

    old = logps.detach() if old_logps is None else old_logps
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if importance is not None:
        per_token = per_token * importance
    stats: dict[str, Any] = {}
    if beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        stats["kl"] = kl.detach()
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_len)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / torch.as_tensor(step_tokens, dtype=per_token.dtype).clamp(min=1.0)
    else:
        raise FtError(f"unknown grpo.loss_type '{loss_type}'")
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        stats["clip_ratio"] = (low | high).to(per_token.dtype)
    return loss, stats


def masked_mean(values: Any, mask: Any) -> Any:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def completion_logps(logits: Any, completion_ids: Any, temperature: float, *, entropy: bool = False) -> tuple[Any, Any]:
    """Log-probabilities of the completion tokens under ``logits`` / temperature, and (optionally, without
    gradient) the entropy of each position's distribution. ``logits`` holds the positions that predict
    ``completion_ids`` (``[B, C, V]``)."""
    import torch

    logits = logits.float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - lse
    ent = None
    if entropy:
        with torch.no_grad():
            ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logps, ent


# -- batches --------------------------------------------------------------------------------------


class PromptBatch:
    """The prompts of one micro-batch, as the dataloader hands them over (kept out of device moves)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)


def prompt_collator(cfg: Any, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"prompts": PromptBatch([{**r, "prompt": json.loads(r["prompt"])} for r in rows])}

    return collate


def step_shape(cfg: Any, world_size: int) -> tuple[int, int]:
    """``(prompts per device and step, completions per device and step)``."""
    completions = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    return completions // options(cfg).num_generations, completions


@functools.cache
def _sampler_class() -> type:
    import torch

    class StepSampler(torch.utils.data.Sampler):
        """Prompt indices in the order GRPO consumes them.

        Each optimizer step needs ``per_rank`` prompts on each of ``world`` devices. The dataloader hands every
        micro-batch the prompts of its device's whole step (batch size ``per_rank``), ``repeats`` times in a row
        (accumulation steps x num_iterations), and the distributed sampler deals batches to devices round-robin, so
        the stream is: for each step, ``repeats`` times, each device's part in device order. The order of prompts
        is shuffled per epoch with the seed (``set_epoch``), so a resumed run sees the same prompts.
        """

        def __init__(self, size: int, per_rank: int, world: int, repeats: int, seed: int, shuffle: bool):
            self.size, self.per_rank, self.world, self.repeats = size, per_rank, world, repeats
            self.seed, self.shuffle, self.epoch = seed, shuffle, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def steps(self) -> int:
            return self.size // (self.per_rank * self.world)

        def __len__(self) -> int:
            return self.steps() * self.per_rank * self.world * self.repeats

        def order(self, epoch: int) -> list[int]:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                return torch.randperm(self.size, generator=generator).tolist()
            return list(range(self.size))

        def step_indices(self, step: int, rank: int = 0) -> list[int]:
            """The prompts of the ``step``-th generation of the run (counted over epochs) on device ``rank``."""
            epoch, s = divmod(step, self.steps())
            start = s * self.per_rank * self.world + rank * self.per_rank
            return self.order(epoch)[start:start + self.per_rank]

        def __iter__(self):
            order = self.order(self.epoch)
            width = self.per_rank * self.world
            for s in range(self.steps()):
                chunk = order[s * width:(s + 1) * width]
                for _ in range(self.repeats):
                    yield from chunk

    return StepSampler


# -- generation -----------------------------------------------------------------------------------


class HFGeneration:
    """Colocated generation on the training model (Hugging Face transformers), all of a step's groups at once.

    By default a lean sampling loop over the model's forward and KV cache: each prompt is prefilled once
    and its cache shared by the group's completions, finished completions leave the batch, and tokens are
    drawn with an exponential race (exact categorical sampling, cheaper than ``torch.multinomial``),
    after temperature, top-k and top-p in Hugging Face's order. Models it does not fit (an exception on
    the first step, encoder-decoders) use ``model.generate`` instead, said once in the log.
    """

    name = "hf"

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.use_generate = False

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: dict[str, Any]) -> list[list[int]]:
        import torch

        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        ids, mask = left_pad(prompt_ids, trainer.pad_token_id, trainer.args.device)
        was_training = model.training
        model.eval()  # no dropout, and the KV cache even with gradient checkpointing on
        gathered = full_parameters(trainer.model, trainer.accelerator)
        try:
            # inference_mode is cheaper than no_grad (only the token ids leave it, as Python lists); sharded
            # parameters, gathered outside it, must not be touched inside it
            with gathered, (torch.no_grad() if gathered.sharded else torch.inference_mode()):
                stops = trainer.eos_token_ids | frozenset(sampling.get("stop_token_ids") or ())
                loop_fits = not (sampling.get("min_p") or sampling.get("stop")
                                 or sampling.get("repetition_penalty", 1.0) != 1.0)  # what only generate does
                if loop_fits and not self.use_generate and not getattr(model.config, "is_encoder_decoder", False):
                    try:
                        return sample_groups(model, ids, mask, n, sampling, stops,
                                             logits_to_keep=trainer._logits_to_keep,
                                             check_stop=getattr(trainer, "ft_check_stop", None))
                    except FtError:  # a stop signal abandons the step
                        raise
                    except Exception as exc:  # noqa: BLE001 - a model the loop does not fit: generate instead
                        log.info("grpo: sampling with model.generate (the sampling loop does not fit this model: "
                                 "%s: %s)", type(exc).__name__, exc)
                        self.use_generate = True
                extra = {"stop_strings": list(sampling["stop"]), "tokenizer": trainer.processing_class} \
                    if sampling.get("stop") else {}
                out = model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=sampling["temperature"],
                    top_p=sampling["top_p"], top_k=sampling["top_k"], min_p=sampling.get("min_p"),
                    repetition_penalty=sampling.get("repetition_penalty", 1.0),
                    max_new_tokens=sampling["max_tokens"], num_return_sequences=n, pad_token_id=trainer.pad_token_id,
                    eos_token_id=sorted(stops), use_cache=True, disable_compile=True, **extra)
                completions = cut_at_eos(out[:, ids.shape[1]:].tolist(), stops)
                if extra and trainer.pad_token_id not in stops:  # stopped at a string: padded after it
                    completions = [_strip_trailing(c, trainer.pad_token_id) for c in completions]
                return completions
        finally:
            model.train(was_training)

    def sync_weights(self, model: Any) -> None:
        """Nothing to do: generation uses the training model itself."""


class full_parameters:  # noqa: N801 - used as a context manager
    """The full parameters on every process while it generates, then sharded again: FSDP2 units are unsharded
    and kept so between forwards (processes sample different numbers of tokens, so no collective may run
    inside); DeepSpeed ZeRO-3 parameters are gathered and its hooks lifted meanwhile (as TRL does). Nothing
    for an unsharded model (``sharded`` False)."""

    def __init__(self, model: Any, accelerator: Any):
        self.model = model
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # pragma: no cover - old torch
            FSDPModule = ()  # noqa: N806
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)] if FSDPModule else []
        self.zero3 = (getattr(accelerator, "state", None) is not None
                      and getattr(accelerator.state, "deepspeed_plugin", None) is not None
                      and accelerator.state.deepspeed_plugin.zero_stage == 3)
        self.sharded = bool(self.units) or self.zero3
        self._gather: Any = None

    def __enter__(self) -> full_parameters:
        if self.units:
            self._reshard = [m._get_fsdp_state()._fsdp_param_group is not None
                             and m._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
                             for m in self.units]
            for m in self.units:
                m.unshard()
                m.set_reshard_after_forward(False, recurse=False)
        elif self.zero3:
            import deepspeed

            self._gather = deepspeed.zero.GatheredParameters(list(self.model.parameters()))
            self._gather.__enter__()
            _zero3_hooks(self.model, remove=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.units:
            for m, reshard in zip(self.units, self._reshard, strict=True):
                m.set_reshard_after_forward(reshard, recurse=False)
                m.reshard()
        elif self._gather is not None:
            _zero3_hooks(self.model, remove=False)
            self._gather.__exit__(*exc)
            self._gather = None


def _zero3_hooks(engine: Any, remove: bool) -> None:
    """Lift (``remove``) or put back DeepSpeed ZeRO-3's parameter hooks (TRL's remove_hooks / add_hooks)."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return
    offload = getattr(optimizer, "parameter_offload", optimizer)
    if remove:
        for p in offload.module.parameters(recurse=True):
            getattr(p, "ds_active_sub_modules", set()).clear()
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
    else:
        coordinator = getattr(offload, "param_coordinator", None)
        if coordinator is not None and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        offload._register_deepspeed_module(offload.module)


def left_pad(prompt_ids: list[list[int]], pad: int, device: Any) -> tuple[Any, Any]:
    import torch

    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # left padding: every row continues at the same column
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: Any, temperature: float, top_k: int, top_p: float) -> Any:
    """Temperature, then top-k, then top-p (nucleus), as Hugging Face's sampling warpers do; removed
    tokens get -inf. ``logits`` is ``[B, V]`` float."""
    import torch

    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def sample_groups(model: Any, ids: Any, mask: Any, n: int, sampling: dict[str, Any], eos: frozenset[int],
                  logits_to_keep: bool = True, check_stop: Callable[[str], None] | None = None) -> list[list[int]]:
    """``n`` sampled completions per row of ``ids`` (left-padded prompts), prompt by prompt, each up to and
    including its first end token. Call under ``torch.inference_mode()``. ``check_stop(doing)`` is called
    before each token and may raise to abandon the step (a stop signal)."""
    import torch
    from transformers import DynamicCache

    rows = ids.shape[0] * n
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    keep = {"logits_to_keep": 1} if logits_to_keep else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                **keep)
    cache.batch_repeat_interleave(n)  # the prompt's cache, shared by its group: prefilled once
    logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
    mask = mask.repeat_interleave(n, dim=0)
    position = positions[:, -1].repeat_interleave(n, dim=0)
    alive = torch.arange(rows, device=ids.device)
    stops = torch.tensor(sorted(eos), device=ids.device)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    for step in range(sampling["max_tokens"]):
        if check_stop is not None:
            check_stop("generating completions")
        scores = filter_logits(logits, sampling["temperature"], sampling["top_k"], sampling["top_p"])
        probs = torch.softmax(scores, dim=-1)
        chosen = (probs / torch.empty_like(probs).exponential_()).argmax(-1)  # exact sampling from probs
        for row, token in zip(alive.tolist(), chosen.tolist(), strict=True):
            tokens[row].append(token)
        if step == sampling["max_tokens"] - 1:
            break
        going = ~torch.isin(chosen, stops)
        if not bool(going.all()):
            if not bool(going.any()):
                break
            index = going.nonzero().squeeze(1)
            cache.batch_select_indices(index)  # finished completions leave the batch
            alive, mask, position, chosen = alive[index], mask[index], position[index], chosen[index]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        position = position + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position[:, None],
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
    return tokens


def _strip_trailing(seq: list[int], pad: int) -> list[int]:
    end = len(seq)
    while end > 1 and seq[end - 1] == pad:
        end -= 1
    return seq[:end]


def cut_at_eos(sequences: list[list[int]], eos: frozenset[int]) -> list[list[int]]:
    """Each sequence up to and including its first end token (all of it when it has none)."""
    out = []
    for seq in sequences:
        end = next((i for i, t in enumerate(seq) if t in eos), None)
        out.append(seq if end is None else seq[: end + 1])
    return out


# -- the trainer ----------------------------------------------------------------------------------


def trainer_kwargs(cfg: Any, model: Any, tokenizer: Any, data: Any) -> dict[str, Any]:
    opts = options(cfg)
    reference = ReferenceModel.for_training(model, "grpo") if opts.beta > 0 else None
    if reference is None:
        log.info("grpo: beta is 0, so no reference model is loaded (no KL term)")
    return {"grpo": opts, "rewards": build_rewards(cfg, opts), "reference": reference, "ft_cfg": cfg}


@functools.cache
def trainer_class() -> type:
    import torch
    from transformers import Trainer

    class GRPOTrainer(Trainer):
        """Generate, score, compute advantages, then the clipped-surrogate loss (see the module docstring)."""

        def __init__(self, *args: Any, grpo: GRPOOptions, rewards: list[RewardFunction], reference: Any = None,
                     ft_cfg: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.grpo, self.rewards, self.reference, self.ft_cfg = grpo, rewards, reference, ft_cfg
            self.model_accepts_loss_kwargs = False  # the Trainer divides each micro-batch loss by the accumulation steps
            tok = self.processing_class
            self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            eos = getattr(self.model.generation_config, "eos_token_id", None) if hasattr(self.model, "generation_config") else None
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            if tok.eos_token_id is not None:
                eos.append(tok.eos_token_id)
            if not eos:
                raise FtError("the tokenizer has no eos_token, so completions could not end; set special_tokens: "
                              "{eos_token: ...}.")
            self.eos_token_ids = frozenset(eos)
            self.generation = HFGeneration(self)
            self._synced_step = -1
            self._pending: list[tuple[list[list[int]], Any]] = []  # async: (prompt ids, future), oldest first
            self._executor: Any = None
            self._step_sampler: Any = None
            self.async_misses = 0  # async generations whose prompts were not the step's (generated again)
            self._buffer: list[dict[str, Any]] | None = None
            self._micro = 0
            self._flat_steps = 0
            self._log_ready = False
            self._said_none: set[str] = set()
            base = self.accelerator.unwrap_model(self.model)
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
            if self.reference is not None:
                self.reference.to(self.args.device)
            log_every = grpo.log_completions_steps
            self._log_every = self.args.logging_steps if log_every is None else log_every

        # the generation backend (the vllm plugin replaces it in ft_before_train)

        def set_generation(self, generation: Any) -> None:
            """Use ``generation`` (``generate(prompt_ids, n, sampling) -> completion ids``, ``sync_weights(model)``,
            ``name``) instead of Hugging Face generate on the training model."""
            self.generation = generation
            self._synced_step = -1

        # data: each micro-batch carries the prompts of its device's whole step

        def get_train_dataloader(self):
            per_rank, _ = step_shape(self.ft_cfg, self.args.world_size)
            saved = self._train_batch_size
            self._train_batch_size = per_rank
            try:
                return super().get_train_dataloader()
            finally:
                self._train_batch_size = saved

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            per_rank, _ = step_shape(self.ft_cfg, self.args.world_size)
            world = self.args.world_size
            repeats = self.args.gradient_accumulation_steps * self.grpo.num_iterations
            if len(dataset) < per_rank * world:
                raise FtError(f"the dataset has {len(dataset)} prompts, fewer than one optimizer step takes "
                              f"({per_rank} per device x {world} device(s): micro_batch_size x gradient_accumulation_steps "
                              f"/ num_generations); add prompts or lower micro_batch_size.")
            self._step_sampler = _sampler_class()(len(dataset), per_rank, world, repeats, self.args.seed,
                                                  bool(self.ft_cfg.shuffle))
            return self._step_sampler

        # one micro-batch

        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()  # as the Trainer does, but before generating: metrics are recorded as training ones
            accumulation = self.args.gradient_accumulation_steps
            k = self._micro % accumulation
            fresh = k == 0 and self.state.global_step % self.grpo.num_iterations == 0
            if self._buffer is None or fresh:
                if k != 0:  # pragma: no cover - a session always starts at an optimizer-step boundary
                    raise FtError("grpo: lost its place in the gradient-accumulation window; resume from a checkpoint.")
                self._buffer = self._generate_step(inputs["prompts"].rows)
            batch = self._buffer[k]
            self._micro += 1
            state = getattr(self, "ft_state", None)
            if state is not None:  # count what is trained: the prompt and completion tokens of this micro-batch
                state.counter.add({"attention_mask": batch["attention_mask"], "labels": batch["labels"]})
            return super().training_step(model, {k_: v for k_, v in batch.items() if k_ != "labels"},
                                         num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            opts = self.grpo
            logps, entropy = self._logps(model, inputs, entropy=True)
            mask = inputs["completion_mask"]
            loss, stats = policy_loss(
                logps, inputs.get("old_logps"), inputs.get("ref_logps"), inputs["advantages"], mask,
                loss_type=opts.loss_type, epsilon_low=opts.epsilon,
                epsilon_high=opts.epsilon_high if opts.epsilon_high is not None else opts.epsilon, beta=opts.beta,
                max_completion_len=opts.max_completion_len, step_tokens=inputs["step_tokens"],
                importance=inputs.get("importance"))
            record = {"entropy": masked_mean(entropy, mask), "clip_ratio": masked_mean(stats["clip_ratio"], mask)}
            if "kl" in stats:
                record["kl"] = masked_mean(stats["kl"], mask)
            self._record(record)
            return (loss, None) if return_outputs else loss

        def _logps(self, model, batch, entropy=False):
            completion_ids = batch["completion_ids"]
            width = completion_ids.shape[1]
            extra = {"logits_to_keep": width + 1} if self._logits_to_keep else {}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], use_cache=False, **extra).logits
            return completion_logps(logits[:, -(width + 1):-1], completion_ids, self.grpo.temperature, entropy=entropy)

        def _record(self, values: dict[str, Any]) -> None:
            record = getattr(self, "ft_record", None)
            if record is not None:
                record(values)

        # one optimizer step's completions: generate, score, advantages, micro-batches

        def _sampling(self) -> dict[str, Any]:
            opts = self.grpo
            sampling = {"temperature": opts.temperature, "top_p": opts.top_p, "top_k": opts.top_k,
                        "max_tokens": opts.max_completion_len}
            if opts.min_p is not None:
                sampling["min_p"] = opts.min_p
            if opts.repetition_penalty != 1.0:
                sampling["repetition_penalty"] = opts.repetition_penalty
            if opts.stop:
                sampling["stop"] = list(opts.stop)
            if opts.stop_token_ids:
                sampling["stop_token_ids"] = list(opts.stop_token_ids)
            return sampling

        def _generate(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], Any]:
            """``(completion ids, the generator's per-token log-probabilities or None)``."""
            g = self.grpo.num_generations
            out = self.generation.generate(prompt_ids, g, self._sampling())
            completion_ids, logps = out if isinstance(out, tuple) else (out, None)
            if len(completion_ids) != len(prompt_ids) * g:
                raise FtError(f"generation ({self.generation.name}) returned {len(completion_ids)} completions for "
                              f"{len(prompt_ids)} prompts x {g}.")
            return completion_ids, logps

        def _sync_now(self) -> None:
            if self.state.global_step != self._synced_step:  # the generator gets the weights of this step
                metrics = self.generation.sync_weights(self.model)
                self._synced_step = self.state.global_step
                if metrics:
                    self._record(metrics)

        def _async_lag(self) -> int:
            if not (self.grpo.async_generation and self.grpo.max_lag):
                return 0
            if not getattr(self.generation, "supports_async", False):
                raise FtError(f"grpo.async_generation needs a generator apart from the training model; "
                              f"{self.generation.name} generation is the training model itself. Add -p vllm.")
            if self.args.world_size > 1:
                raise FtError("grpo.async_generation runs in one process for now; with several, set it to false.")
            return self.grpo.max_lag

        def _completions(self, rows: list[dict[str, Any]]) -> tuple[list[list[int]], Any]:
            """This step's completions: generated now, or (async_generation) by the generation started up to
            max_lag steps ago with the weights of then; then the generations of the next steps are started."""
            prompt_ids = [list(r["input_ids"]) for r in rows]
            lag = self._async_lag()
            if not lag:
                self._sync_now()
                return self._generate(prompt_ids)
            result = None
            if self._pending and self._pending[0][0] == prompt_ids:
                completion_ids, logps, metrics = self._pending.pop(0)[1].result()
                if metrics:
                    self._record(metrics)
                result = (completion_ids, logps)
            else:
                if self._pending:  # not the prompts expected (a resumed run, the end of the data): start again
                    self.async_misses += 1
                    log.debug("grpo: the generation started ahead was for other prompts; generating these now")
                for _, future in self._pending:
                    future.result()
                self._pending.clear()
                self._sync_now()
                result = self._generate(prompt_ids)
            self._start_ahead(lag)
            return result

        def _start_ahead(self, lag: int) -> None:
            import concurrent.futures

            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ft-grpo-generate")
            while len(self._pending) < lag:
                prompt_ids = self._prompts_ahead(len(self._pending) + 1)
                if prompt_ids is None:
                    return
                apply = None
                if self.state.global_step != self._synced_step:  # written now, while the weights are this step's
                    apply = self.generation.snapshot(self.model)
                    self._synced_step = self.state.global_step

                def work(apply=apply, prompt_ids=prompt_ids):
                    metrics = apply() if apply is not None else None
                    return (*self._generate(prompt_ids), metrics)

                self._pending.append((prompt_ids, self._executor.submit(work)))

        def _prompts_ahead(self, ahead: int) -> list[list[int]] | None:
            """The prompt ids of the generation ``ahead`` steps after this one, from the sampler's order (None past
            the end of training)."""
            sampler, iterations = self._step_sampler, self.grpo.num_iterations
            if sampler is None:
                return None
            index = self.state.global_step // iterations + ahead
            total = self.state.max_steps if self.state.max_steps > 0 else math.inf
            if index * iterations >= total:
                return None
            return [list(self.train_dataset[i]["input_ids"]) for i in sampler.step_indices(index)]

        def close_generation(self) -> None:
            """Wait for generations still running, stop the generation thread, let the backend clean up."""
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            close = getattr(self.generation, "close", None)
            if close is not None:
                close()

        def _generate_step(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            opts, device = self.grpo, self.args.device
            g = opts.num_generations
            prompt_ids = [list(r["input_ids"]) for r in rows]
            completion_ids, sampling_logps = self._completions(rows)
            completion_ids = [list(c) if len(c) else [self.pad_token_id] for c in completion_ids]
            expanded = [r for r in rows for _ in range(g)]
            texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
            prompts = [r["prompt"] for r in expanded]
            completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                           for p, t in zip(prompts, texts, strict=True)]
            columns = {c: [r.get(c) for r in expanded] for c in rows[0] if c not in ("input_ids", "prompt")}

            check_stop = getattr(self, "ft_check_stop", None)
            if check_stop is not None:
                check_stop(f"generating completions ({self.generation.name})")
            values, unset = score(self.rewards, prompts, completions, completion_ids, columns,
                                  timeout=opts.reward_timeout, check_stop=check_stop)
            for j, reward in enumerate(self.rewards):
                if all(unset[j]) and reward.name not in self._said_none:  # None is allowed: it does not apply
                    self._said_none.add(reward.name)
                    log.warning("grpo: %s returned None for every completion of step %d (it applies to none of "
                                "them; the other rewards scored them)", describe_reward(reward),
                                self.state.global_step + 1)
            unscored = [k for k in range(len(prompts)) if all(none[k] for none in unset)]
            if unscored and "" not in self._said_none:  # as TRL: said once, the completion is left out
                self._said_none.add("")
                log.warning("grpo: every reward returned None for %d completion(s) of step %d, e.g. for prompt %s; "
                            "they are left out of their group (advantage 0). Make at least one reward score them.",
                            len(unscored), self.state.global_step + 1, _short(repr(prompts[unscored[0]]), 200))
            per_func = torch.tensor(values, dtype=torch.float32, device=device).T
            none = torch.tensor(unset, dtype=torch.bool, device=device).T
            rewards, bad = combine_rewards(per_func, none, [r.weight for r in self.rewards])
            batch_std = None
            if opts.scale_rewards == "batch":
                batch_std = nanstd(self.accelerator.gather(rewards))  # over every device's completions
            advantages, std = group_advantages(rewards, g, opts.scale_rewards, batch_std)
            if bad.any():
                advantages[bad.any(1)] = math.nan  # the loss is NaN: the health policy (stop/skip/warn) decides
                self._report_nonfinite(bad, per_func, prompts, completions)

            lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float32, device=device)
            # cut at max_completion_len (a completion that ended earlier met an end token or a stop)
            cut = [len(c) >= opts.max_completion_len and c[-1] not in self.eos_token_ids | set(opts.stop_token_ids)
                   for c in completion_ids]
            truncated = torch.tensor(cut, dtype=torch.float32, device=device)
            metrics = {"reward": torch.nanmean(rewards), "reward_std": nanstd(rewards),
                       "completion_length": lengths.mean(), "completion_truncated": truncated.mean(),
                       "frac_reward_zero_std": (std.view(-1, g)[:, 0] < 1e-8).float().mean()}
            for j, reward in enumerate(self.rewards):
                column = torch.where(none[:, j], math.nan, per_func[:, j])
                metrics[f"reward/{reward.name}/mean"] = torch.nanmean(column)
                metrics[f"reward/{reward.name}/std"] = nanstd(column)
            self._record(metrics)
            self._watch_signal(bool((std < 1e-8).all()))
            self._log_completions(prompts, texts, values, rewards, advantages)
            if sampling_logps is not None:  # empty completions were given one pad token above
                sampling_logps = [list(lp) if len(lp) else [math.nan] for lp in sampling_logps]
            return self._micro_batches(prompt_ids, completion_ids, advantages, sampling_logps,
                                       cut if opts.mask_truncated_completions else None)

        def _micro_batches(self, prompt_ids, completion_ids, advantages, sampling_logps=None, masked=None):
            """Split the step's completions into micro-batches (each padded to its own longest row) and compute
            what the loss compares against: the generating policy's log-probabilities (num_iterations > 1) and
            the reference's (beta > 0)."""
            opts, device, size = self.grpo, self.args.device, self.args.per_device_train_batch_size
            g = opts.num_generations
            # masked (mask_truncated_completions): completions cut at max_completion_len count no tokens in the loss
            masked = masked or [False] * len(completion_ids)
            tokens = torch.tensor(float(sum(len(c) for c, m in zip(completion_ids, masked, strict=True) if not m)),
                                  device=device)
            if self.args.world_size > 1:
                tokens = self.accelerator.reduce(tokens, reduction="sum")
            # dapo: the step's tokens per device, per micro-batch share (see policy_loss)
            step_tokens = tokens / self.args.world_size / self.args.gradient_accumulation_steps
            out = []
            for start in range(0, len(completion_ids), size):
                rows = range(start, start + size)
                batch = pack_rows([prompt_ids[i // g] for i in rows], [completion_ids[i] for i in rows],
                                  self.pad_token_id, device)
                batch["advantages"] = advantages[start:start + size]
                batch["step_tokens"] = step_tokens
                if any(masked[i] for i in rows):
                    keep = torch.tensor([not masked[i] for i in rows], device=device)
                    batch["completion_mask"] = batch["completion_mask"] * keep[:, None].to(batch["completion_mask"].dtype)
                correct = sampling_logps is not None and opts.is_correction != "none"
                with torch.no_grad():
                    if opts.num_iterations > 1 or correct:
                        batch["old_logps"] = self._logps(self.model, batch)[0]
                    if correct:
                        sampled = pad_floats([sampling_logps[i] for i in rows], batch["completion_ids"].shape[1],
                                             device)
                        batch["importance"], stats = is_weights(batch["old_logps"], sampled, batch["completion_mask"],
                                                                opts.is_correction, opts.is_cap, opts.is_min)
                        self._record(stats)
                    if self.reference is not None:
                        batch["ref_logps"] = self._reference_logps(batch)
                out.append(batch)
            return out

        def _reference_logps(self, batch):
            width = batch["completion_ids"].shape[1]
            extra = {"logits_to_keep": width + 1} if self._logits_to_keep else {}
            logits = self.reference.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                            position_ids=batch["position_ids"], use_cache=False, **extra).logits
            return completion_logps(logits[:, -(width + 1):-1], batch["completion_ids"], self.grpo.temperature)[0]

        def _watch_signal(self, flat: bool) -> None:
            """Warn once when the first NO_SIGNAL_STEPS generations all gave every group equal rewards: no gradient,
            nothing learned (later, equal rewards mostly mean the policy has converged)."""
            self._flat_steps = self._flat_steps + 1 if flat else -(10**9)  # a signal once: never warn
            if self._flat_steps != NO_SIGNAL_STEPS or not self.is_world_process_zero():
                return
            message = (f"in the first {NO_SIGNAL_STEPS} generations, every group's completions got the same reward, "
                       "so the advantages and the gradient are 0 and nothing is learned. Check what the rewards give "
                       f"({COMPLETIONS_FILE} in the output directory shows them); a reward that rarely pays needs "
                       "more num_generations, a higher temperature, or a graded reward next to it.")
            log.warning("grpo: %s", message)
            state = getattr(self, "ft_state", None)
            if state is not None:
                state.warnings.append({"check": "grpo_no_signal", "step": self.state.global_step + 1,
                                       "message": message})

        def _report_nonfinite(self, bad, per_func, prompts, completions):
            row, j = (int(x) for x in bad.nonzero()[0])
            name = self.rewards[j].name
            log.warning("grpo: reward '%s' returned %s for %d completion(s), e.g. for prompt %s, completion %s; this "
                        "step's loss is NaN and health.on_nonfinite decides what happens (stop, skip or warn)",
                        name, float(per_func[row, j]), int(bad[:, j].sum()), _short(repr(prompts[row]), 200),
                        _short(repr(completions[row]), 200))

        # sample completions -> OUTPUT_DIR/completions.jsonl

        def _log_completions(self, prompts, texts, values, rewards, advantages):
            step = self.state.global_step + 1
            if not self._log_every or not self.is_world_process_zero():
                return
            path = Path(self.args.output_dir) / COMPLETIONS_FILE
            if not self._log_ready:  # a resumed run drops what was logged after its checkpoint
                self._log_ready = True
                kept, dropped = [], []
                if path.is_file():
                    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:
                            record = None
                        logged = record.get("step", 0) if isinstance(record, dict) else None
                        if not isinstance(logged, (int, float)) or isinstance(logged, bool):
                            dropped.append(number)  # not a record this plugin wrote (a damaged or edited line)
                        elif logged <= self.state.global_step:
                            kept.append(line + "\n")
                if dropped:
                    log.warning("%s: %d line(s) that are not a completion record were dropped (lines %s%s)", path,
                                len(dropped), ", ".join(map(str, dropped[:10])), " ..." if len(dropped) > 10 else "")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(kept), encoding="utf-8")
            if step != 1 and step % self._log_every:
                return
            names = [r.name for r in self.rewards]
            with path.open("a", encoding="utf-8") as fh:
                for i, text in enumerate(texts):
                    entry = {"step": step, "prompt": prompts[i], "completion": text,
                             "rewards": {n: _json_number(values[j][i]) for j, n in enumerate(names)},
                             "reward": _json_number(float(rewards[i])), "advantage": _json_number(float(advantages[i]))}
                    fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    return GRPOTrainer


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 6)


def pad_floats(rows: list[list[float]], width: int, device: Any) -> Any:
    """Per-token values right-padded with 0 to ``width`` (``[B, width]`` float32)."""
    import torch

    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out.to(device)


def pack_rows(prompts: list[list[int]], completions: list[list[int]], pad: int, device: Any) -> dict[str, Any]:
    """One micro-batch: prompts left-padded and completions right-padded to their longest, so every row's
    completion starts at the same column (the loss keeps only those logits). Positions count real tokens
    from 0, as during generation."""
    import torch

    p_width, c_width = max(len(p) for p in prompts), max(len(c) for c in completions)
    n = len(prompts)
    ids = torch.full((n, p_width + c_width), pad, dtype=torch.long)
    mask = torch.zeros((n, p_width + c_width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, p_width - len(p):p_width] = torch.as_tensor(p)
        ids[i, p_width:p_width + len(c)] = torch.as_tensor(c)
        mask[i, p_width - len(p):p_width + len(c)] = 1
    completion_mask = mask[:, p_width:]
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :p_width] = -100
    ids, mask = ids.to(device), mask.to(device)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "completion_ids": ids[:, p_width:], "completion_mask": completion_mask.to(device),
            "labels": labels.to(device)}


CURVES_FILE = "grpo_curves.png"


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


def plot_grpo(history: list[dict[str, Any]], path: Path) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[Any], list[Any]]:
        rows = [r for r in history if r.get(key) is not None]
        return [r["step"] for r in rows], [r[key] for r in rows]

    fig = Figure(figsize=(15, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_reward, ax_length, ax_policy = fig.subplots(1, 3)
    steps, mean = series("reward")
    _, std = series("reward_std")
    if mean:
        ax_reward.plot(steps, mean, "-", lw=2, color="black", label="reward (weighted sum)")
        if len(std) == len(mean):
            ax_reward.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                                   [m + s for m, s in zip(mean, std, strict=True)], color="black", alpha=0.1)
    names = sorted({k[len("reward/"):-len("/mean")] for r in history for k in r
                    if k.startswith("reward/") and k.endswith("/mean")})
    for name in names:
        ax_reward.plot(*series(f"reward/{name}/mean"), "--", label=name)
    ax_length.plot(*series("completion_length"), color="tab:green")
    for key in ("entropy", "kl", "clip_ratio"):
        if any(key in r for r in history):
            ax_policy.plot(*series(key), label=key)
    for ax, title in ((ax_reward, "reward (mean; band: std)"), (ax_length, "completion length (tokens)"),
                      (ax_policy, "entropy, KL, clip ratio")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return str(path)


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


__all__ = ["GRPOOptions", "PromptOptions", "combine_rewards", "group_advantages", "policy_loss", "is_weights",
           "completion_logps", "pack_rows",
           "score", "nanstd"]
