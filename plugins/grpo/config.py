"""GRPO's config section (``grpo:``), its checks, reward entries, and the ``prompt`` dataset format."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from ft.api import (
    NOT_TRAINING,
    DatasetOptions,
    Dropped,
    FtError,
    TextEncoder,
    entry_where,
    resolve_path,
)

COLUMNS = ("input_ids", "prompt")
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")  # the reward functions' own arguments
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
    disable_dropout: bool = Field(
        True, description="Set every dropout of the policy (LoRA's too) to 0 for the run, as TRL's GRPO does: the "
        "log-probabilities that importance sampling and the clipped ratio compare with the sampler's are then "
        "deterministic, not each drawn with another dropout mask.")
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



def validate(cfg: Any) -> list[str]:
    """The problems of a ``method: grpo`` config (``ft_validate_config``)."""
    opts, problems = options(cfg), []
    if not opts.rewards:
        problems.append(f"{cfg.where('grpo', 'rewards') if cfg.line_of('grpo', 'rewards') else cfg.where('grpo')}: "
                        "method grpo needs at least one reward, e.g. `rewards: [{name: exact_match, field: answer}]`; "
                        f"registered rewards: {', '.join(sorted(reward_registry(cfg).names())) or 'none'}.")
    for i, entry in enumerate(opts.rewards):  # checked during validation already when the registries were given
        errors = reward_errors(reward_registry(cfg), entry)
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


def reward_registry(cfg: Any) -> Any:
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

