"""Optimizers and learning-rate schedulers by name (the names the reference configs use)."""

from __future__ import annotations

from ft import hookimpl

FT_FEATURE = False  # essential: always active

# ft name -> transformers OptimizerNames value
TRANSFORMERS_OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adafactor": "adafactor",
    "sgd": "sgd",
    "adagrad": "adagrad",
    "rmsprop": "rmsprop",
}
# 8-bit optimizers need bitsandbytes; transformers builds them, we check the import first.
BNB_OPTIMIZERS = {"adamw_8bit": "adamw_bnb_8bit", "adamw_bnb_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}

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


@hookimpl
def ft_register_optimizers(register):
    for name, hf_name in TRANSFORMERS_OPTIMIZERS.items():
        register.add(name, hf_name)
    for name, hf_name in BNB_OPTIMIZERS.items():
        register.add(name, _requires_bitsandbytes(hf_name))


@hookimpl
def ft_register_schedulers(register):
    for name, hf_name in SCHEDULERS.items():
        register.add(name, hf_name)


class _requires_bitsandbytes(str):
    """A transformers optim name that needs bitsandbytes; ``check()`` says how to install it."""

    def check(self) -> None:
        from ft.errors import MissingDependencyError, is_installed

        if not is_installed("bitsandbytes"):
            raise MissingDependencyError(
                f"optimizer '{self}' needs bitsandbytes, which is not installed: pip install 'ft[qlora]'"
            )
