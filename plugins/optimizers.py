"""Optimizers and learning-rate schedulers by name (the names the reference configs use).

Every registered name either trains or is refused by ``ft validate``: an optimizer whose package
is missing says how to install it, and a scheduler whose settings are missing or unknown
(``cosine_with_min_lr`` without a floor, ``warmup_stable_decay`` without ``num_decay_steps``, an
``lr_scheduler_kwargs`` key the scheduler does not take) is a config error with the fix.

Section ``adam:``: the betas and epsilon of the Adam-family optimizers (AdamW in torch, fused, 8-bit,
paged, torchao; Lion takes the betas), as transformers' ``adam_beta1`` / ``adam_beta2`` / ``adam_epsilon``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import Plugin

PLUGIN = Plugin(essential=True)  # essential: always active

# ft name -> transformers OptimizerNames value
TRANSFORMERS_OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adafactor": "adafactor",
    "sgd": "sgd",
    "adagrad": "adagrad",
    "rmsprop": "rmsprop",
}
# bitsandbytes optimizers (8-bit states, paged states, Lion); transformers builds them, we check the import first.
# Paged optimizers page their states to CPU memory under GPU memory pressure (on CPU they are plain).
BNB_OPTIMIZERS = {
    "adamw_8bit": "adamw_bnb_8bit",
    "adamw_bnb_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "lion": "lion_32bit",
    "lion_32bit": "lion_32bit",
    "lion_8bit": "lion_8bit",
    "paged_lion_32bit": "paged_lion_32bit",
    "paged_lion_8bit": "paged_lion_8bit",
}
# torchao's low-bit AdamW (states in 8 or 4 bits); the ao_ names are axolotl's spelling.
TORCHAO_OPTIMIZERS = {
    "adamw_torch_8bit": "adamw_torch_8bit",
    "adamw_torch_4bit": "adamw_torch_4bit",
    "ao_adamw_8bit": "adamw_torch_8bit",
    "ao_adamw_4bit": "adamw_torch_4bit",
}
TORCHAO_MIN_VERSION = "0.15.0"  # what transformers' torchao integration accepts

SCHEDULERS = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant_with_warmup",  # warmup applies when set, else it is constant
    "constant_with_warmup": "constant_with_warmup",
    "cosine_with_restarts": "cosine_with_restarts",
    "polynomial": "polynomial",
    "inverse_sqrt": "inverse_sqrt",
    "cosine_with_min_lr": "cosine_with_min_lr",
    "warmup_stable_decay": "warmup_stable_decay",
}
# transformers scheduler -> the lr_scheduler_kwargs it takes (besides warmup and total steps)
SCHEDULER_KWARGS: dict[str, frozenset[str]] = {
    "cosine": frozenset({"num_cycles"}),
    "linear": frozenset(),
    "constant_with_warmup": frozenset(),
    "cosine_with_restarts": frozenset({"num_cycles"}),
    "polynomial": frozenset({"lr_end", "power"}),
    "inverse_sqrt": frozenset({"timescale"}),
    "cosine_with_min_lr": frozenset({"num_cycles", "min_lr", "min_lr_rate"}),
    "warmup_stable_decay": frozenset({"num_decay_steps", "num_stable_steps", "warmup_type", "decay_type",
                                      "min_lr_ratio", "num_cycles"}),
}
WSD_SHAPES = frozenset({"linear", "cosine", "1-sqrt"})


class AdamOptions(BaseModel):
    """The ``adam:`` section: Adam's (and Lion's) betas and epsilon."""

    model_config = ConfigDict(extra="forbid")

    beta1: float = Field(0.9, ge=0, lt=1, description="Decay of the first moment (momentum) estimate.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Decay of the second moment estimate (0.95 is common for "
                         "large models and long runs).")
    epsilon: float = Field(1e-8, gt=0, description="Added to the denominator for numerical stability.")


# optimizers that read adam_beta1/adam_beta2 (and, all but Lion, adam_epsilon) from TrainingArguments
TAKES_BETAS = frozenset({"adamw_torch", "adamw_torch_fused", *BNB_OPTIMIZERS, *TORCHAO_OPTIMIZERS})


@hookimpl
def ft_add_config(registry):
    registry.add("adam", AdamOptions)


@hookimpl
def ft_register_optimizers(register):
    for name, hf_name in TRANSFORMERS_OPTIMIZERS.items():
        register.add(name, hf_name)
    for name, needs_package in _OPTIMIZERS.items():
        register.add(name, needs_package)


@hookimpl
def ft_register_schedulers(register):
    for name, hf_name in SCHEDULERS.items():
        register.add(name, hf_name)


@hookimpl
def ft_validate_config(cfg):
    problems = []
    name = _OPTIMIZERS.get(cfg.optimizer)
    if name is not None:
        problem = name.problem()
        if problem:
            problems.append(f"{cfg.where('optimizer')}: {problem}")
    if cfg.lr_scheduler in SCHEDULERS:
        problems.extend(scheduler_problems(cfg))
    if "adam" in cfg.model_fields_set and cfg.optimizer not in TAKES_BETAS:
        problems.append(f"{cfg.where('adam')}: optimizer '{cfg.optimizer}' has no Adam betas or epsilon; remove the "
                        "adam: section or choose an Adam optimizer (adamw_torch_fused ...).")
    return problems


@hookimpl
def ft_trainer_args(cfg):
    adam = cfg.section("adam")
    # only what the user wrote: the defaults are transformers' own, and another plugin may set these
    args = {f"adam_{name}": getattr(adam, name) for name in sorted(adam.model_fields_set)}
    # cosine with a floor is transformers' cosine_with_min_lr (the floor goes in as min_lr_rate)
    if cfg.lr_scheduler == "cosine" and cfg.cosine_min_lr_ratio is not None:
        args["lr_scheduler_type"] = "cosine_with_min_lr"
    return args


def effective_scheduler(cfg: Any) -> str:
    """The transformers scheduler this config trains with."""
    if cfg.lr_scheduler == "cosine" and cfg.cosine_min_lr_ratio is not None:
        return "cosine_with_min_lr"
    return SCHEDULERS[cfg.lr_scheduler]


def scheduler_problems(cfg: Any) -> list[str]:
    """What would make the scheduler fail after the model loaded, found before."""
    problems = []
    hf_name = effective_scheduler(cfg)
    kwargs = dict(cfg.lr_scheduler_kwargs or {})
    where = cfg.where("lr_scheduler_kwargs") if cfg.line_of("lr_scheduler_kwargs") else cfg.where("lr_scheduler")
    allowed = SCHEDULER_KWARGS[hf_name]
    for key in sorted(set(kwargs) - allowed):
        takes = ", ".join(sorted(allowed)) if allowed else "none"
        problems.append(f"{where}: '{key}' is not an argument of the {cfg.lr_scheduler} scheduler (it takes: "
                        f"{takes}); remove it.")
    if cfg.cosine_min_lr_ratio is not None and cfg.lr_scheduler not in ("cosine", "cosine_with_min_lr"):
        problems.append(f"{cfg.where('cosine_min_lr_ratio')}: applies to lr_scheduler: cosine only (the scheduler "
                        f"is {cfg.lr_scheduler}); remove it or use lr_scheduler: cosine.")
    if hf_name == "cosine_with_min_lr":
        floors = [k for k in ("min_lr", "min_lr_rate") if k in kwargs]
        if cfg.cosine_min_lr_ratio is not None and floors:
            problems.append(f"{cfg.where('cosine_min_lr_ratio')}: the floor is also set by lr_scheduler_kwargs."
                            f"{floors[0]}; keep one.")
        elif cfg.cosine_min_lr_ratio is None and not floors:
            problems.append(f"{cfg.where('lr_scheduler')}: cosine_with_min_lr needs the learning rate it decays to: "
                            "set cosine_min_lr_ratio: 0.1 (a fraction of learning_rate), or lr_scheduler_kwargs: "
                            "{min_lr: 1.0e-6}.")
        elif len(floors) == 2:
            problems.append(f"{where}: min_lr and min_lr_rate both set the floor; keep one.")
        rate = kwargs.get("min_lr_rate", cfg.cosine_min_lr_ratio)
        if rate is not None and not (isinstance(rate, (int, float)) and 0 <= rate <= 1):
            problems.append(f"{where}: min_lr_rate must be a fraction of learning_rate between 0 and 1 (got {rate!r}).")
        low = kwargs.get("min_lr")
        if low is not None and not (isinstance(low, (int, float)) and 0 <= low <= cfg.learning_rate):
            problems.append(f"{where}: min_lr must be between 0 and learning_rate ({cfg.learning_rate}), got {low!r}.")
    if hf_name == "warmup_stable_decay":
        decay = kwargs.get("num_decay_steps")
        if decay is None:
            problems.append(f"{cfg.where('lr_scheduler')}: warmup_stable_decay needs the length of its decay: set "
                            "lr_scheduler_kwargs: {num_decay_steps: N} (optimizer steps; e.g. 10-20% of the run).")
        elif not isinstance(decay, int) or isinstance(decay, bool) or decay < 0:
            problems.append(f"{where}: num_decay_steps must be a whole number of steps >= 0 (got {decay!r}).")
        elif cfg.max_steps is not None and decay + (cfg.warmup_steps or 0) > cfg.max_steps:
            problems.append(f"{where}: num_decay_steps ({decay}) plus warmup_steps ({cfg.warmup_steps or 0}) is more "
                            f"than max_steps ({cfg.max_steps}); shorten the decay.")
        for key in ("warmup_type", "decay_type"):
            if key in kwargs and kwargs[key] not in WSD_SHAPES:
                problems.append(f"{where}: {key} must be one of {', '.join(sorted(WSD_SHAPES))} (got {kwargs[key]!r}).")
    if hf_name == "polynomial" and "lr_end" in kwargs:
        end = kwargs["lr_end"]
        if not isinstance(end, (int, float)) or not 0 <= end < cfg.learning_rate:
            problems.append(f"{where}: lr_end must be below learning_rate ({cfg.learning_rate}), got {end!r}.")
    if hf_name in ("cosine", "cosine_with_restarts", "cosine_with_min_lr") and "num_cycles" in kwargs:
        cycles = kwargs["num_cycles"]
        if not isinstance(cycles, (int, float)) or cycles <= 0:
            problems.append(f"{where}: num_cycles must be positive (got {cycles!r}).")
    return problems


class _requires(str):
    """A transformers optim name that needs a package; ``check()`` says how to install it."""

    def __new__(cls, value: str, package: str, fix: str, min_version: str | None = None):
        obj = super().__new__(cls, value)
        obj.package, obj.fix, obj.min_version = package, fix, min_version
        return obj

    def problem(self) -> str | None:
        from ft.api import is_installed

        if not is_installed(self.package):
            return f"optimizer '{self}' needs {self.package}, which is not installed: {self.fix}"
        if self.min_version:
            import importlib.metadata

            have = importlib.metadata.version(self.package)
            if _version(have) < _version(self.min_version):
                return f"optimizer '{self}' needs {self.package} >= {self.min_version} (installed: {have}): {self.fix}"
        return None

    def check(self) -> None:
        problem = self.problem()
        if problem:
            from ft.api import MissingDependencyError

            raise MissingDependencyError(problem)


_OPTIMIZERS: dict[str, _requires] = {}  # ft name -> the names that need a package (filled below)
for _table, _package, _fix, _min in ((BNB_OPTIMIZERS, "bitsandbytes", "pip install 'ft[qlora]'", None),
                                     (TORCHAO_OPTIMIZERS, "torchao", "pip install 'ft[torchao]'", TORCHAO_MIN_VERSION)):
    for _name, _hf in _table.items():
        _OPTIMIZERS[_name] = _requires(_hf, _package, _fix, _min)


def _version(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])
