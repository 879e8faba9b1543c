"""YAML -> a small core pydantic model plus one section model per plugin.

Errors are collected, not raised one by one: the user sees every problem at once, each with
its key path, the YAML line, and a "did you mean" for unknown keys.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, model_validator

from ft.kernel.config_file import RawConfig, format_loc
from ft.kernel.errors import ConfigError, FtError
from ft.kernel.formats import DatasetOptions
from ft.kernel.redact import is_secret_key, redact, redact_text

# ``json_schema_extra`` of a field, or of a plugin's section model, whose values do not change what training
# computes (where files go, how often it logs or saves): a resumed run may change them (``ft.engine.resume``).
AFFECTS_TRAINING = "affects_training"
NOT_TRAINING = {AFFECTS_TRAINING: False}
# ``json_schema_extra`` of a field of a method's section (or of the whole section model) whose value changes the
# prepared rows: a prompt length limit that drops rows, a length that cuts them ... Only such fields of the method's
# section enter the prepared-data cache key (``ft.engine.cache``): changing any other (``dpo.beta``, a GRPO reward) reuses
# the tokenized data. A field that shapes the data and is not marked would silently reuse stale rows: when unsure,
# mark it. Combine with NOT_TRAINING as ``{**SHAPES_DATA, **NOT_TRAINING}`` if both apply.
SHAPES_DATA_KEY = "shapes_data"
SHAPES_DATA = {SHAPES_DATA_KEY: True}
MAX_COUNT = 2**31 - 1  # counts beyond a C int fail deep inside torch / itertools, so they are refused here
MAX_SEED = 2**32 - 1  # numpy's seeds


class CoreConfig(BaseModel):
    """Keys every run has. Flat and familiar to axolotl users; plugins own their own sections."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    base_model: str = Field(description="Hub id or local directory of the model to fine-tune.")
    tokenizer: str | None = Field(None, description="Tokenizer hub id or directory; defaults to base_model.")
    plugins: list[str] = Field(default_factory=list, description="Optional features to select (also `-p NAME`).")
    plugin_paths: list[str] = Field(
        default_factory=list, description="Plugin .py files to load and select without packaging (also `-p ./file.py`)."
    )
    method: str = Field("sft", description="Training method, registered by a plugin: sft (default), dpo, grpo ...")

    # data
    datasets: list[Any] = Field(description="Training datasets; each entry's keys depend on its `type`.")
    test_datasets: list[Any] = Field(default_factory=list, description="Evaluation datasets (same form).")
    val_set_size: float = Field(0.0, ge=0, description="Held-out evaluation part: a fraction (<1) or a row count.")
    shuffle: bool = Field(True, description="Shuffle the concatenated training rows with the seed.")
    sequence_len: int = Field(
        2048, gt=0, le=MAX_COUNT, description="Maximum tokens per sample (and per packed bin)."
    )
    excess_length: Literal["drop", "truncate", "error"] = Field(
        "drop", description="What to do with samples longer than sequence_len."
    )
    strict: bool = Field(False, description="Treat any dropped row as an error.")
    train_on_inputs: bool = Field(False, description="Also train on prompt/input tokens.")
    dataset_prepared_path: str = Field(
        "./prepared", description="Cache directory for tokenized datasets.", json_schema_extra=NOT_TRAINING
    )
    dataset_num_proc: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Processes for tokenization; default: all cores.",
        json_schema_extra=NOT_TRAINING
    )
    special_tokens: dict[str, str] = Field(
        default_factory=dict, description="Special tokens to set, e.g. {pad_token: '<|pad|>'}."
    )
    tokens: list[str] = Field(default_factory=list, description="Extra tokens to add to the vocabulary.")
    chat_template: str | None = Field(
        None, description="Default chat template of every chat dataset entry that sets none (a shipped name, a "
        ".jinja file or inline jinja); null = the tokenizer's own."
    )
    eval_sample_packing: bool | None = Field(
        None, description="Pack the evaluation samples too when packing is selected (null = yes, like training)."
    )

    # training
    output_dir: str = Field(
        "./out", description="Where checkpoints, weights and reports go.", json_schema_extra=NOT_TRAINING
    )
    micro_batch_size: int = Field(
        1, ge=1, le=MAX_COUNT, description="Samples (or packed bins) per device per step."
    )
    eval_batch_size: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Per-device eval batch; defaults to micro_batch_size.",
        json_schema_extra=NOT_TRAINING
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=MAX_COUNT, description="Micro-batches per optimizer step."
    )
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    num_epochs: float = Field(1.0, gt=0, le=MAX_COUNT, description="Epochs, when max_steps is not set.")
    max_steps: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="Optimizer steps; overrides num_epochs."
    )
    warmup_steps: int | None = Field(None, ge=0, le=MAX_COUNT, description="Warmup steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of all steps.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    optimizer: str = Field("adamw_torch_fused", description="Optimizer name from the optimizer registry.")
    lr_scheduler: str = Field("cosine", description="Scheduler name from the scheduler registry.")
    lr_scheduler_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra arguments of the scheduler, e.g. {num_cycles: 2} for "
        "cosine_with_restarts or {num_decay_steps: 100} for warmup_stable_decay."
    )
    cosine_min_lr_ratio: float | None = Field(
        None, ge=0, le=1, description="With lr_scheduler cosine: the learning rate decays to this fraction of the "
        "peak instead of 0 (e.g. 0.1)."
    )
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 training; auto = where the device supports it.")
    fp16: bool = Field(False, description="fp16 mixed precision (GPUs without bf16).")
    tf32: bool | None = Field(None, description="Allow TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        None, description="Passed through, e.g. {use_reentrant: false}."
    )
    seed: int = Field(
        42, ge=0, le=MAX_SEED, description="Seed for shuffling, initialisation and dropout (0 to 2**32 - 1)."
    )
    save_steps: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="Checkpoint every N steps (default: at the end only).",
        json_schema_extra=NOT_TRAINING
    )
    saves_per_epoch: int | None = Field(
        None, gt=0, description="Checkpoints per epoch, evenly spaced (instead of save_steps).",
        json_schema_extra=NOT_TRAINING
    )
    save_strategy: Literal["steps", "epoch", "no"] | None = Field(
        None, description="When to checkpoint: steps (save_steps / saves_per_epoch), epoch (at each epoch's end) or "
        "no; null = steps when save_steps or saves_per_epoch is set, else only the final weights.",
        json_schema_extra=NOT_TRAINING
    )
    save_total_limit: int | None = Field(
        3, ge=1, le=MAX_COUNT, description="Checkpoints to keep.", json_schema_extra=NOT_TRAINING
    )
    logging_steps: int = Field(
        10, ge=1, le=MAX_COUNT, description="Log every N steps.", json_schema_extra=NOT_TRAINING
    )
    eval_steps: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="Evaluate every N steps (when there is eval data).",
        json_schema_extra=NOT_TRAINING
    )
    evals_per_epoch: int | None = Field(
        None, gt=0, description="Evaluations per epoch, evenly spaced (instead of eval_steps; when there is eval data).",
        json_schema_extra=NOT_TRAINING
    )
    eval_strategy: Literal["steps", "epoch", "no"] | None = Field(
        None, description="When to evaluate: steps (eval_steps / evals_per_epoch), epoch (at each epoch's end) or no; "
        "null = steps when eval_steps or evals_per_epoch is set, else once at the end.",
        json_schema_extra=NOT_TRAINING
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop when the metric_for_best_model has not improved for this many evaluations."
    )
    load_best_model_at_end: bool = Field(
        False, description="End with the weights of the best checkpoint by metric_for_best_model (needs the save "
        "cadence to fall on evaluations)."
    )
    metric_for_best_model: str | None = Field(
        None, description="Metric that decides the best checkpoint and early stopping, e.g. eval_loss (the default)."
    )
    greater_is_better: bool | None = Field(
        None, description="Whether a larger metric_for_best_model is better; default: false for losses, else true."
    )
    report_to: str | list[str] = Field(
        "none", description="Where to send metrics: none, tensorboard, wandb, mlflow, comet_ml, clearml, trackio ... "
        "(a list for several); each needs its package installed.", json_schema_extra=NOT_TRAINING
    )
    resume_from_checkpoint: str | None = Field(
        None, description="Checkpoint directory to resume from.", json_schema_extra=NOT_TRAINING
    )
    dataloader_num_workers: int = Field(
        0, ge=0, le=MAX_COUNT, description="DataLoader worker processes.", json_schema_extra=NOT_TRAINING
    )

    _source: str | None = PrivateAttr(None)
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)
    _capabilities: dict[str, tuple[str, ...]] = PrivateAttr(default_factory=dict)
    _method_features: frozenset[str] = PrivateAttr(default_factory=frozenset)
    _registries: Any = PrivateAttr(None)
    _known_names: frozenset[str] | None = PrivateAttr(None)  # installed plugins and methods (``section`` checks)

    @model_validator(mode="after")
    def _check_datasets(self) -> CoreConfig:
        if not self.datasets:
            raise ValueError("datasets: at least one dataset entry is required")
        return self

    # -- helpers for plugins and the core --------------------------------------------------

    @property
    def source(self) -> str | None:
        return self._source

    def section(self, name: str) -> Any:
        """A plugin's validated section, or its defaults when the YAML has none.

        None for an installed plugin (or a method) that declares no section, or one that is not loaded (blocked,
        failed); any other name is a mistake, and an error with a "did you mean" and the caller's file:line."""
        fields = type(self).model_fields
        if name in fields and name not in CoreConfig.model_fields:
            value = getattr(self, name, None)
            if value is None:
                model = _find_model(fields[name].annotation, None)
                return model() if model is not None else None
            return value
        if self._known_names is None or name in self._known_names:
            return None  # no plugin information (a config built by hand), or a plugin/method without a section
        import sys

        caller = sys._getframe(1)
        sections = sorted(n for n in fields if n not in CoreConfig.model_fields)
        close = difflib.get_close_matches(str(name), [*sections, *self._known_names], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        core = " It is a core key: read it as an attribute (cfg." + str(name) + ")." if name in CoreConfig.model_fields else ""
        raise FtError(f"{caller.f_code.co_filename}:{caller.f_lineno}: cfg.section({name!r}): no plugin or method "
                      f"named {name!r} is installed.{core}{hint} Sections: {', '.join(sections) or 'none'}.")

    def provides(self, capability: str) -> bool:
        """Whether an active plugin declares ``capability`` (``Plugin(provides=...)`` in its module), e.g.
        ``varlen_attention``: plugins ask for a capability, never for another plugin by name."""
        return capability in self._capabilities

    def method_supports(self, feature: str) -> bool:
        """Whether the chosen method declares ``feature`` (``"packing"``, ``"eval"``, ``"model_loss"``,
        ``"loss_watch"``, or one a plugin defines, like ``"generation"``)."""
        return feature in self._method_features

    def providers(self, capability: str) -> list[str]:
        """The active plugins that declare ``capability`` (for messages and exclusive capabilities)."""
        return list(self._capabilities.get(capability, ()))

    @property
    def registries(self) -> Any:
        """What the loaded plugins registered (``formats``, ``methods``, ``optimizers``, ``schedulers``,
        ``rewards``), for plugins that resolve names the config gives; None before validation."""
        return self._registries

    def line_of(self, *path: Any) -> int | None:
        return self._lines.get(tuple(path))

    def where(self, *path: Any) -> str:
        """``file:line: key.path`` for messages."""
        line = self.line_of(*path)
        loc = format_loc(path)
        if self._source:
            return f"{self._source}:{line}: {loc}" if line else f"{self._source}: {loc}"
        return loc

    def effective_batch_size(self, world_size: int = 1) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size

    def to_saveable(self) -> dict[str, Any]:
        """The resolved config as plain data, secrets redacted."""
        return redact(self.model_dump(mode="json", exclude_none=False))


Config = CoreConfig  # the type plugins annotate with; the runtime model subclasses it


# -- rules across core keys ----------------------------------------------------------------

# report_to value -> (modules of which one must be importable, how to install); transformers'
# integrations. "all" reports to every installed one, "none" to none.
REPORTERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'ft[tensorboard]'"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet-ml"),
    "clearml": (("clearml",), "pip install clearml"),
    "neptune": (("neptune",), "pip install neptune"),
    "azure_ml": (("azureml",), "pip install azureml-core"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
    "dagshub": (("dagshub",), "pip install dagshub mlflow"),
    "flyte": (("flytekit",), "pip install flytekit flytekitplugins-deck-standard"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "trackio": (("trackio",), "pip install trackio"),
}


# -- sections ------------------------------------------------------------------------------


@dataclass
class SectionRegistry:
    """Collects plugin config sections (``ft_add_config``)."""

    sections: dict[str, tuple[type[BaseModel], str]] = field(default_factory=dict)
    _plugin: str = "<core>"

    def scoped(self, plugin: str) -> SectionRegistry:
        view = SectionRegistry(self.sections, plugin)
        return view

    def add(self, name: str, model: type[BaseModel]) -> None:
        if name in CoreConfig.model_fields:
            raise FtError(f"plugin '{self._plugin}' declares section '{name}', which is a core key; rename it.")
        if name in self.sections:
            other = self.sections[name][1]
            raise FtError(f"config section '{name}' is declared twice: by plugin '{other}' and by '{self._plugin}'.")
        self.sections[name] = (model, self._plugin)


# -- YAML with line numbers ----------------------------------------------------------------


# -- the runtime model ---------------------------------------------------------------------


def build_config_model(
    sections: Mapping[str, tuple[type[BaseModel], str]], formats: Mapping[str, type[DatasetOptions]]
) -> type[CoreConfig]:
    """The config model for this plugin set: core keys + plugin sections + typed dataset entries."""
    fields: dict[str, Any] = {}
    for name in sorted(sections):
        model, plugin = sections[name]
        fields[name] = (model | None, Field(None, description=f"Options of plugin '{plugin}'."))
    entry_models = [_entry_model(name, formats[name]) for name in sorted(formats)]
    if entry_models:
        entry_union = (
            Annotated[Union[tuple(entry_models)], Field(discriminator="type")]  # noqa: UP007
            if len(entry_models) > 1
            else entry_models[0]
        )
        fields["datasets"] = (list[entry_union], Field(description="Training datasets; keys depend on `type`."))
        fields["test_datasets"] = (list[entry_union], Field(default_factory=list, description="Evaluation datasets."))
    return create_model("FtConfig", __base__=CoreConfig, **fields)


_entry_cache: dict[tuple[str, type], type] = {}


def _entry_model(name: str, options: type[DatasetOptions]) -> type:
    key = (name, options)
    if key not in _entry_cache:
        _entry_cache[key] = create_model(
            f"{options.__name__}_{name}", __base__=options, type=(Literal[name], Field(description="Dataset format."))
        )
    return _entry_cache[key]


def validate_config(
    raw: RawConfig,
    model: type[CoreConfig],
    *,
    feature_plugins: Sequence[str] = (),
    active: Sequence[str] = (),
    format_names: Sequence[str] = (),
    extra_problems: Sequence[tuple[tuple, str]] = (),
    unavailable: Sequence[str] = (),
    key_hints: Callable[[str, Any], str | None] | None = None,
    context: Mapping[str, Any] | None = None,
) -> CoreConfig:
    """Validate raw data against the model; raise one ConfigError listing every problem.

    ``extra_problems`` are ``(key path, message)`` pairs found by the caller (they get their
    file:line here); ``unavailable`` describes installed plugins that failed or are blocked, named
    when a dataset type is unknown (the type may be theirs). ``key_hints(path, value)`` says what to
    write instead of an unknown key (plugins register hints, e.g. for axolotl's key names).
    ``context`` is pydantic's validation context: sections whose values name registered things (a GRPO run's
    rewards) check them against ``context["registries"]`` in the same pass as every other key.
    """
    problems: list[tuple[tuple, str]] = list(extra_problems)
    data = dict(raw.data)
    # A section for an installed feature that is not selected: say how to select it.
    for key in list(data):
        if key in feature_plugins and key not in active:
            problems.append(((key,), f"section '{key}' configures plugin '{key}', which is not selected. "
                                     f"Add it to `plugins: [{key}]` or pass `-p {key}`."))
            data.pop(key)
    for i, entry in enumerate(data.get("datasets") or []) if isinstance(data.get("datasets"), list) else []:
        _check_entry_type(entry, ("datasets", i), format_names, problems, unavailable)
    for i, entry in enumerate(data.get("test_datasets") or []) if isinstance(data.get("test_datasets"), list) else []:
        _check_entry_type(entry, ("test_datasets", i), format_names, problems, unavailable)
    bad_entries = [loc[:2] for loc, _ in problems if loc and loc[0] in ("datasets", "test_datasets")]
    cfg = None
    try:
        cfg = model.model_validate(data, context=dict(context) if context else None)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _clean_loc(err["loc"], format_names)
            if err["type"] in ("union_tag_invalid", "union_tag_not_found") or loc[:2] in bad_entries:
                continue  # the entry's type is wrong: reported by _check_entry_type with a better message
            problems.append((loc, _message(err, loc, model, format_names, data, key_hints)))
    if problems:
        seen, out = set(), []
        for loc, msg in problems:
            line = raw.lines.get(loc) or _nearest_line(raw.lines, loc)
            where = f"{raw.source}:{line}: " if raw.source and line else (f"{raw.source}: " if raw.source else "")
            text = f"{where}{format_loc(loc)}: {msg}" if loc else f"{where}{msg}"
            if text not in seen:
                seen.add(text)
                out.append((line or 0, text))
        raise ConfigError([text for _, text in sorted(out, key=lambda item: item[0])], raw.source)
    assert cfg is not None
    cfg._source = raw.source
    cfg._lines = raw.lines
    return cfg


def _check_entry_type(entry: Any, loc: tuple, format_names: Sequence[str], problems: list,
                      unavailable: Sequence[str] = ()) -> None:
    if not isinstance(entry, dict):
        return
    t = entry.get("type")
    if t is None:
        problems.append((loc, f"missing key 'type'. Known dataset types: {', '.join(sorted(format_names))}."))
    elif t not in format_names:
        close = difflib.get_close_matches(str(t), list(format_names), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        if unavailable:
            cause = ("It may come from an installed plugin that is not loaded: " + "; ".join(unavailable)
                     + ". Fix or unblock that plugin (see `ft plugins`).")
        else:
            cause = "A type from a third-party plugin needs that plugin installed."
        problems.append((loc + ("type",), f"unknown dataset type '{t}'.{hint} Known: {', '.join(sorted(format_names))}. "
                                           + cause))


def _clean_loc(loc: tuple, format_names: Sequence[str]) -> tuple:
    out: list[Any] = []
    for i, part in enumerate(loc):
        # discriminated unions put the tag into the location: datasets.0.<type>.key
        if i >= 2 and loc[i - 2] in ("datasets", "test_datasets") and isinstance(loc[i - 1], int) and part in format_names:
            continue
        # optional sections show up as 'function-after[...]' or the model name in some pydantic versions
        if isinstance(part, str) and part.startswith(("function-", "nullable[")):
            continue
        out.append(part)
    return tuple(out)


def _message(err: dict, loc: tuple, model: type[BaseModel], format_names: Sequence[str], data: dict,
             key_hints: Callable[[str, Any], str | None] | None = None) -> str:
    if err["type"] == "extra_forbidden":
        key = loc[-1] if loc else ""
        hint = key_hints(_hint_path(loc), err.get("input")) if key_hints and loc else None
        if hint:
            return f"unknown key. {hint}"
        known = _known_keys(model, loc[:-1], data)
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        if len(loc) == 1 and not close:
            hint = " (Is it the section of a plugin that is not installed? See `ft plugins`.)"
        return f"unknown key.{hint}"
    if err["type"] == "missing":
        return "required key is missing."
    msg = err.get("msg", "invalid value")
    given = err.get("input")
    if any(is_secret_key(part) for part in loc if isinstance(part, str)):  # an error must not print a secret
        given = None
    elif isinstance(given, str):
        given = redact_text(given)
    if err["type"] not in ("missing",) and not isinstance(given, (dict, list)) and given is not None:
        return f"{msg} (got {given!r})."
    return f"{msg}."


def _hint_path(loc: tuple) -> str:
    """``adapter`` or ``datasets[].field_human`` (test_datasets share the datasets hints)."""
    parts = ["datasets" if p == "test_datasets" else ("[]" if isinstance(p, int) else str(p)) for p in loc]
    return ".".join(parts).replace(".[]", "[]")


def _known_keys(model: type[BaseModel], loc: tuple, data: dict) -> list[str]:
    """Field names of the model found at ``loc`` (for "did you mean")."""
    current: Any = model
    value: Any = data
    for n, part in enumerate(loc):
        if isinstance(part, int):
            value = value[part] if isinstance(value, list) and part < len(value) else {}
            continue
        value = value.get(part, {}) if isinstance(value, dict) else {}
        # a list of a union (dataset entries): pick the member by the indexed item's `type`
        index = loc[n + 1] if n + 1 < len(loc) else None
        item = value[index] if isinstance(index, int) and isinstance(value, list) and index < len(value) else value
        current = _field_model(current, part, item)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _field_model(model: Any, name: str, value: Any) -> Any:
    fields = getattr(model, "model_fields", {})
    if name not in fields:
        return None
    return _find_model(fields[name].annotation, value)


def _find_model(annotation: Any, value: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = typing.get_args(annotation)
    candidates = [a for a in args]
    for a in candidates:
        found = _find_model(a, value)
        if found is not None:
            # for dataset unions pick the member whose `type` matches
            type_field = getattr(found, "model_fields", {}).get("type")
            if type_field is not None and isinstance(value, dict) and "type" in value:
                lit = typing.get_args(type_field.annotation)
                if lit and value["type"] not in lit:
                    continue
            return found
    return None


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc) - 1, 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


# -- paths `ft run` will open -------------------------------------------------------------------


# -- what changes training (the resume check compares only that) ------------------------------


def affects_training(declared: Any) -> bool:
    """False when a field (``FieldInfo``) or a section model declares ``affects_training: False``."""
    extra = getattr(declared, "json_schema_extra", None)
    if extra is None and isinstance(declared, type) and issubclass(declared, BaseModel):
        extra = declared.model_config.get("json_schema_extra")
    return not (isinstance(extra, dict) and extra.get(AFFECTS_TRAINING) is False)


def shapes_data(declared: Any) -> bool:
    """True when a field (``FieldInfo``) or a section model declares ``shapes_data: True`` (``SHAPES_DATA``)."""
    extra = getattr(declared, "json_schema_extra", None)
    if extra is None and isinstance(declared, type) and issubclass(declared, BaseModel):
        extra = declared.model_config.get("json_schema_extra")
    return isinstance(extra, dict) and extra.get(SHAPES_DATA_KEY) is True


def data_shaping_values(section: BaseModel | None) -> dict[str, Any] | None:
    """The values (JSON) of a section's fields marked ``SHAPES_DATA``: all of them when the section model itself
    is marked; None for no section."""
    if section is None:
        return None
    dumped = section.model_dump(mode="json")
    if shapes_data(type(section)):
        return dumped
    return {name: dumped.get(name) for name, info in type(section).model_fields.items() if shapes_data(info)}


def training_values(cfg: CoreConfig, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a config as ``to_saveable`` writes it) without what does not change what training computes:
    keys and plugin sections declared ``affects_training: False``, and plugin sections that are absent (null)
    or at their defaults, so installing a plugin that declares a section changes nothing."""
    fields = type(cfg).model_fields
    out: dict[str, Any] = {}
    for key, value in data.items():
        info = fields.get(key)
        if info is None:  # the section of a plugin not installed now: it counts only if it was set
            if value is not None:
                out[key] = value
            continue
        if not affects_training(info):
            continue
        section = _find_model(info.annotation, None) if key not in CoreConfig.model_fields else None
        if section is not None:
            if not affects_training(section) or value is None:
                continue
            try:
                if value == redact(section().model_dump(mode="json")):
                    continue
            except ValidationError:  # a section without defaults for every field
                pass
        out[key] = value
    return out


def entry_default(cfg: CoreConfig, group: str, index: int, key: str) -> Any:
    """The default of option ``key`` of dataset entry ``group[index]`` (a sentinel that equals nothing if it has none)."""
    entries = getattr(cfg, group, None) or []
    if index >= len(entries):
        return _NO_DEFAULT
    info = type(entries[index]).model_fields.get(key)
    if info is None or info.is_required():
        return _NO_DEFAULT
    import json

    return json.loads(json.dumps(info.get_default(call_default_factory=True), default=str))


_NO_DEFAULT = object()


