"""Rewards for online RL (``grpo.rewards``), registered like any third-party reward.

- ``exact_match``: 1.0 when the completion (or what ``extract`` pulls out of it) equals the row's
  ``answer`` column (``field``), else 0.0.
- ``regex_match``: 1.0 when ``pattern`` matches the completion, else 0.0; ``{column}`` in the pattern
  is replaced by that column's value, escaped (``"The result is {answer}\\\\."``).
- ``json_schema``: 1.0 when the completion is JSON (a surrounding markdown code fence is allowed) that
  validates against ``schema`` (inline, or ``schema_file``), else 0.0. Needs ``jsonschema``
  (``pip install 'ft[rl]'``).
- ``length_penalty``: ``-per_token * max(0, length - target)`` in tokens or characters (with
  ``two_sided``, also below the target).
- ``reward_model``: the first logit of a sequence-classification model (any Hugging Face checkpoint)
  on the prompt and completion, rendered with its own chat template when it has one.

A reward function receives ``(prompts, completions, completion_ids, **columns)`` and returns one float
(or None: not applicable to this row) per completion. Completions of chat prompts are
``[{"role": "assistant", "content": text}]``, of plain-text prompts the text (as in TRL).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ft import hookimpl
from ft.api import FtError, MissingDependencyError, Plugin, is_installed, resolve_path

PLUGIN = Plugin()  # registers rewards; they act only when grpo.rewards names them

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def text_of(item: Any) -> str:
    """The text of a completion or prompt: a string, or the content of the last message of a list."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], dict):
        return str(item[-1].get("content", ""))
    return "" if item is None else str(item)


def _column(columns: dict[str, list[Any]], field: str, reward: str) -> list[Any]:
    if field not in columns:
        raise FtError(f"reward '{reward}' compares with column '{field}', which the rows do not have (columns: "
                      f"{', '.join(sorted(columns)) or 'none'}); set the reward's `field` option.")
    return columns[field]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- exact_match ------------------------------------------------------------------------------------


class ExactMatchOptions(_Options):
    field: str = Field("answer", description="Row column holding the expected answer.")
    extract: str | None = Field(None, description="Regex applied to the completion; its first group (or the whole "
                                "match) is compared. Default: the whole completion.")
    ignore_case: bool = Field(False, description="Compare case-insensitively.")

    @field_validator("extract")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


def exact_match(opts: ExactMatchOptions, cfg: Any) -> Any:
    extract = re.compile(opts.extract) if opts.extract else None

    def norm(text: str) -> str:
        text = " ".join(text.split())
        return text.lower() if opts.ignore_case else text

    def reward(prompts, completions, completion_ids, **columns):
        answers = _column(columns, opts.field, "exact_match")
        out: list[float | None] = []
        for completion, answer in zip(completions, answers, strict=True):
            if answer is None:
                out.append(None)
                continue
            text = text_of(completion)
            if extract is not None:
                found = extract.search(text)
                if found is None:
                    out.append(0.0)
                    continue
                text = found.group(1) if found.groups() else found.group(0)
            out.append(1.0 if norm(text) == norm(str(answer)) else 0.0)
        return out

    return reward


# -- regex_match ------------------------------------------------------------------------------------


class RegexMatchOptions(_Options):
    pattern: str = Field(description="Regular expression; {column} is replaced by that row column's value (escaped).")
    full: bool = Field(False, description="The whole completion must match (default: found anywhere in it).")
    ignore_case: bool = Field(False, description="Match case-insensitively.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(_PLACEHOLDER.sub("x", value))
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


def regex_match(opts: RegexMatchOptions, cfg: Any) -> Any:
    flags = re.IGNORECASE if opts.ignore_case else 0
    needed = _PLACEHOLDER.findall(opts.pattern)
    fixed = None if needed else re.compile(opts.pattern, flags)

    def reward(prompts, completions, completion_ids, **columns):
        values = {name: _column(columns, name, "regex_match") for name in needed}
        out: list[float | None] = []
        for k, completion in enumerate(completions):
            pattern = fixed
            if pattern is None:
                if any(values[n][k] is None for n in needed):
                    out.append(None)
                    continue
                pattern = re.compile(_PLACEHOLDER.sub(lambda m, k=k: re.escape(str(values[m.group(1)][k])), opts.pattern),
                                     flags)
            text = text_of(completion)
            hit = pattern.fullmatch(text.strip()) if opts.full else pattern.search(text)
            out.append(1.0 if hit else 0.0)
        return out

    return reward


# -- json_schema ------------------------------------------------------------------------------------


class JsonSchemaOptions(_Options):
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema, inline.")
    schema_file: str | None = Field(None, description="A .json file holding the schema (relative to the config).")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_schema(self) -> JsonSchemaOptions:
        if (self.schema_ is None) == (self.schema_file is None):
            raise ValueError("give the schema inline (schema: {...}) or as schema_file, one of the two")
        return self


_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def json_schema(opts: JsonSchemaOptions, cfg: Any) -> Any:
    if not is_installed("jsonschema"):
        raise MissingDependencyError("reward 'json_schema' needs the 'jsonschema' package: pip install 'ft[rl]' "
                                     "(or pip install jsonschema).")
    import jsonschema

    schema = opts.schema_
    if schema is None:
        path = resolve_path(cfg, opts.schema_file)
        try:
            with open(path, encoding="utf-8") as fh:
                schema = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise FtError(f"reward 'json_schema': cannot read the schema file '{path}': {exc}") from None
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise FtError(f"reward 'json_schema': the schema is not a valid JSON Schema: {exc.message}") from None
    validator = cls(schema)

    def reward(prompts, completions, completion_ids, **columns):
        out: list[float | None] = []
        for completion in completions:
            text = text_of(completion)
            fenced = _FENCE.match(text)
            try:
                value = json.loads(fenced.group(1) if fenced else text)
            except (json.JSONDecodeError, ValueError):
                out.append(0.0)
                continue
            out.append(1.0 if validator.is_valid(value) else 0.0)
        return out

    return reward


# -- length_penalty ---------------------------------------------------------------------------------


class LengthPenaltyOptions(_Options):
    target: int = Field(0, ge=0, description="Length without penalty (at most, or exactly with two_sided).")
    per_token: float = Field(0.01, ge=0, description="Penalty per token (or character) beyond the target.")
    unit: Literal["tokens", "characters"] = Field("tokens", description="Measure the completion in tokens or characters.")
    two_sided: bool = Field(False, description="Also penalise completions shorter than the target.")


def length_penalty(opts: LengthPenaltyOptions, cfg: Any) -> Any:
    def reward(prompts, completions, completion_ids, **columns):
        out: list[float | None] = []
        for completion, ids in zip(completions, completion_ids, strict=True):
            length = len(ids) if opts.unit == "tokens" else len(text_of(completion))
            excess = max(0, length - opts.target) + (max(0, opts.target - length) if opts.two_sided else 0)
            out.append(-opts.per_token * excess)
        return out

    return reward


# -- reward_model -----------------------------------------------------------------------------------


class RewardModelOptions(_Options):
    model: str = Field(description="Hub id or local directory of a sequence-classification model (its first logit "
                       "is the reward).")
    batch_size: int = Field(16, ge=1, description="Completions scored per forward pass.")
    max_length: int | None = Field(None, ge=1, description="Truncate the scored text to this many tokens.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto = bfloat16 on a GPU that has it, else float32.")


def render_scored(tokenizer: Any, prompt: Any, completion: Any) -> str:
    """The text a reward model scores for ``completion`` to ``prompt`` (messages or a text): the conversation
    through the chat template when the tokenizer has one (``ft infer`` on a reward model renders the same)."""
    if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
        messages = [*prompt, {"role": "assistant", "content": text_of(completion)}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if isinstance(prompt, list):
        return "\n".join(m.get("content", "") for m in prompt) + "\n" + text_of(completion)
    return text_of(prompt) + text_of(completion)


def reward_model(opts: RewardModelOptions, cfg: Any) -> Any:
    import os

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ft.api import load_or_explain

    source = resolve_path(cfg, opts.model)
    if os.path.isfile(os.path.join(source, "adapter_config.json")):
        raise FtError(f"reward 'reward_model': {source} holds a LoRA adapter (a `method: reward_model` run with lora), "
                      f"not a whole classifier; run `ft merge {source}` and set model: {source}/merged.")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        auto = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    else:
        device, auto = torch.device("cpu"), torch.float32
    dtype = auto if opts.dtype == "auto" else getattr(torch, opts.dtype)
    tokenizer = load_or_explain(source, "reward model's tokenizer", AutoTokenizer.from_pretrained, source)
    model = load_or_explain(source, "reward model", AutoModelForSequenceClassification.from_pretrained, source,
                            dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def reward(prompts, completions, completion_ids, **columns):
        texts = [render_scored(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        out: list[float | None] = []
        for start in range(0, len(texts), opts.batch_size):
            batch = tokenizer(texts[start:start + opts.batch_size], return_tensors="pt", padding=True,
                              truncation=opts.max_length is not None, max_length=opts.max_length,
                              add_special_tokens=False)
            with torch.inference_mode():
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            out.extend(float(x) for x in logits[:, 0].float().cpu())
        return out

    return reward


@hookimpl
def ft_register_rewards(register):
    register.add("exact_match", exact_match, options=ExactMatchOptions,
                 description="1.0 when the completion equals the row's answer")
    register.add("regex_match", regex_match, options=RegexMatchOptions,
                 description="1.0 when a regular expression (with {column} placeholders) matches the completion")
    register.add("json_schema", json_schema, options=JsonSchemaOptions,
                 description="1.0 when the completion is JSON valid against a JSON Schema")
    register.add("length_penalty", length_penalty, options=LengthPenaltyOptions,
                 description="minus a penalty per token (or character) beyond a target length")
    register.add("reward_model", reward_model, options=RewardModelOptions,
                 description="the score of a sequence-classification reward model")
