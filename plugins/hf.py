"""Load models and tokenizers with transformers; pad, collate and save the plain way.

Essential plugin: it answers ``ft_load_tokenizer``, ``ft_model_kwargs``, ``ft_load_model``,
and ``ft_save_weights``. The loaders are ``trylast`` where another plugin may take over (a
custom loader, an adapter or FSDP saver).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import ConfigError, FtError, Plugin

PLUGIN = Plugin(essential=True)  # essential: always active

log = logging.getLogger("ft.hf")

# Added special tokens with these words in their name are meant to be spare (Llama-3's
# <|reserved_special_token_N|> and <|finetune_right_pad_id|>, Gemma's <pad>, <unusedN> ...).
PAD_NAME_HINTS = ("pad", "reserved", "unused")


class HfOptions(BaseModel):
    """The ``hf:`` section: how transformers loads the model and tokenizer."""

    model_config = ConfigDict(extra="forbid")

    attn_implementation: str = Field(
        "sdpa", description="Attention implementation: sdpa, eager, flash_attention_2, or a registered kernel."
    )
    trust_remote_code: bool = Field(
        False, description="Run modelling/tokenizer code shipped with the checkpoint. Only for repositories you trust."
    )
    allow_pickle: bool = Field(
        False, description="Allow pickled (.bin) weights. Off: only safetensors are loaded (pickle can run code)."
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit of the model and tokenizer.")
    pad_to_multiple_of: int | None = Field(
        None, ge=1, description="Pad each batch to a multiple of this length (8 or 64 helps tensor cores)."
    )
    padding_side: Literal["right", "left"] = Field(
        "right", description="Padding side saved with the tokenizer (training always pads on the right)."
    )
    use_kernels: bool = Field(
        False,
        description="Let transformers swap hub-kernel layers (RMSNorm ...) for kernels from the Hugging Face hub "
        "(the `kernels` package; on a GPU this downloads and runs hub code). Off: ft's kernel plugins own the "
        "layers. On, transformers redoes it at every train()/eval() switch, undoing kernel plugins' patches of "
        "those layers (ft then stops after the first step and names the plugin).",
    )


def options(cfg: Any) -> HfOptions:
    return cfg.section("hf")


@hookimpl
def ft_add_config(registry):
    registry.add("hf", HfOptions)


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@hookimpl
def ft_validate_config(cfg):
    """What transformers would refuse only after the data is prepared: special token names, and a precision
    this machine cannot train in (torch is imported only when fp16 or bf16 is asked for explicitly)."""
    problems = [f"{cfg.where('special_tokens', key)}: unknown special token name '{key}'. Use one of: "
                f"{', '.join(SPECIAL_TOKEN_NAMES)} (extra tokens go in `tokens:`)."
                for key in cfg.special_tokens if key not in SPECIAL_TOKEN_NAMES]
    if cfg.fp16 or cfg.bf16 is True:
        from ft.api import resolve_precision

        try:
            if resolve_precision(cfg) == "bf16" and not _has_cuda():
                # transformers refuses bf16 mixed precision without a GPU, after the data is prepared
                problems.append(f"{cfg.where('bf16')}: bf16: true needs a GPU with bf16 support, and this machine has "
                                "no CUDA GPU; use `bf16: auto` (bf16 where the device supports it, fp32 here).")
        except ConfigError as exc:
            problems.extend(exc.problems)
    problems.extend(attention_problems(cfg))
    return problems


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# attn_implementation -> (module to find, what to install); hub kernels ("org/repo") need `kernels`
ATTENTION_PACKAGES = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": ("flash_attn_interface", "install FlashAttention-3 (hopper/ in the flash-attention "
                          "repository)"),
}


def attention_problems(cfg: Any) -> list[str]:
    """An attention implementation whose package is not installed (transformers would refuse it at load)."""
    import importlib.util

    impl = options(cfg).attn_implementation
    module, fix = ATTENTION_PACKAGES.get(impl, (None, ""))
    if module is None and "/" in impl:
        module, fix = "kernels", "pip install kernels"
    if module is None:
        return []
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return []
    return [f"{cfg.where('hf', 'attn_implementation')}: {impl} needs the '{module}' package, which is not installed: "
            f"{fix}; or use attn_implementation: sdpa (the default, built into torch)."]


# -- tokenizer -----------------------------------------------------------------------------


@hookimpl(trylast=True)
def ft_load_tokenizer(cfg):
    from transformers import AutoTokenizer

    from ft.api import resolve_path

    opts = options(cfg)
    key = "tokenizer" if cfg.tokenizer else "base_model"
    source = resolve_path(cfg, cfg.tokenizer or cfg.base_model)
    _say_remote_code(cfg, source, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=opts.revision, trust_remote_code=opts.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise FtError(_load_failure(cfg, key, source, "tokenizer", exc)) from exc
    tokenizer.padding_side = opts.padding_side

    added_special = _apply_special_tokens(cfg, tokenizer)
    if cfg.tokens:
        n = tokenizer.add_tokens(list(cfg.tokens))
        log.info("added %d of %d tokens from `tokens:` (%d already in the vocabulary)", n, len(cfg.tokens), len(cfg.tokens) - n)
    if added_special:
        log.info("added special tokens: %s", ", ".join(added_special))
    _choose_pad_token(cfg, tokenizer)
    return tokenizer


def _say_remote_code(cfg: Any, source: str, what: str) -> None:
    if options(cfg).trust_remote_code:
        log.warning("%s: true, so loading the %s runs the Python code shipped with %s (if it has any). Only do this "
                    "for repositories you trust.", cfg.where("hf", "trust_remote_code"), what, source)


def _apply_special_tokens(cfg: Any, tokenizer: Any) -> list[str]:
    """Set ``special_tokens:`` (pad_token, eos_token ...); return the ones that were new."""
    new = []
    for key, token in cfg.special_tokens.items():  # the names are checked by ft_validate_config
        before = len(tokenizer)
        tokenizer.add_special_tokens({key: token})
        if len(tokenizer) > before:
            new.append(token)
    return new


def _choose_pad_token(cfg: Any, tokenizer: Any) -> str:
    """Give the tokenizer a pad token: its own, else a spare special token, else eos.

    Whichever it is, training stays right: labels are built before padding and the
    collator masks padding by position, so a real EOS is still trained.
    """
    if tokenizer.pad_token is not None:
        how = "set in special_tokens" if "pad_token" in cfg.special_tokens else "the tokenizer's own"
        log.info("pad token: %s (%s)", tokenizer.pad_token, how)
        return "own"
    spare = find_spare_special_token(tokenizer)
    if spare is not None:
        tokenizer.pad_token = spare
        log.info("pad token: %s (the tokenizer has none; using an unused reserved special token)", spare)
        return "reserved"
    if tokenizer.eos_token is None:
        raise ConfigError(
            [f"{cfg.where('special_tokens')}: the tokenizer has neither a pad token nor an eos token. "
             "Set one, e.g. `special_tokens: {pad_token: '<|pad|>'}`."],
            cfg.source,
        )
    tokenizer.pad_token = tokenizer.eos_token
    log.warning(
        "pad token: %s (= eos; the tokenizer has no pad or spare special token). EOS is still trained: "
        "padding is masked by position. Set `special_tokens: {pad_token: ...}` to choose another.",
        tokenizer.eos_token,
    )
    return "eos"


def find_spare_special_token(tokenizer: Any) -> str | None:
    """An added special token that looks reserved/unused and that nothing else uses."""
    in_use = {t for t in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token) if t}
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template or "")
    candidates = []
    for token_id, added in sorted(tokenizer.added_tokens_decoder.items()):
        text = added.content
        if not added.special or text in in_use or text in template:
            continue
        name = text.lower()
        for rank, hint in enumerate(PAD_NAME_HINTS):  # a token named "pad" beats a "reserved" one
            if hint in name:
                candidates.append((rank, token_id, text))
                break
    return min(candidates)[2] if candidates else None


# -- model ---------------------------------------------------------------------------------


@hookimpl
def ft_model_kwargs(cfg):
    from ft.api import resolve_precision, torch_dtype

    opts = options(cfg)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(resolve_precision(cfg)),
        "attn_implementation": opts.attn_implementation,
        "trust_remote_code": opts.trust_remote_code,
        # transformers >= 5 kernelizes hub-kernel layers by default, again at every train()/eval() switch,
        # which silently drops a forward a kernel plugin bound on them (docs/writing-a-kernel-plugin.md)
        "use_kernels": opts.use_kernels,
    }
    if not opts.allow_pickle:
        kwargs["use_safetensors"] = True
    if opts.revision:
        kwargs["revision"] = opts.revision
    return kwargs


@hookimpl(trylast=True)
def ft_load_model(cfg, kwargs, tokenizer):
    import transformers

    from ft.api import AUTO_CLASSES, model_head, resolve_path

    source = resolve_path(cfg, cfg.base_model)
    if kwargs.get("trust_remote_code"):
        _say_remote_code(cfg, source, "model")
    head, num_labels = model_head(cfg)
    if num_labels is not None:  # a classification head on the base (new weights, unless the checkpoint has one)
        kwargs = {**kwargs, "num_labels": num_labels}
        log.info("%s: loading %s as %s with %d output(s)", cfg.method, cfg.base_model, AUTO_CLASSES[head], num_labels)
    try:
        model = getattr(transformers, AUTO_CLASSES[head]).from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise FtError(_load_failure(cfg, "base_model", source, "model", exc)) from exc
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise FtError(
                f"{cfg.where('base_model')}: the model {cfg.base_model} does not fit in memory while loading. "
                "Use a smaller model, bf16 (`bf16: auto` on a GPU), or an adapter with quantization (-p lora -p qlora)."
            ) from exc
        raise
    _fit_embeddings(model, tokenizer)
    _align_special_ids(model, tokenizer)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model, cfg.gradient_checkpointing_kwargs)
        model.config.use_cache = False
    return model


def _enable_checkpointing(model: Any, kwargs: dict[str, Any] | None) -> None:
    # transformers >= 5.2x calls it activation checkpointing; older 5.x only has the old name
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _fit_embeddings(model: Any, tokenizer: Any) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
        log.info("resized token embeddings from %d to %d rows for added tokens", rows, len(tokenizer))


def _align_special_ids(model: Any, tokenizer: Any) -> None:
    """The model's pad id follows the tokenizer; its generation stops at the tokenizer's eos too."""
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    gen.pad_token_id = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    if eos is None:
        return
    current = gen.eos_token_id
    ids = [] if current is None else ([current] if isinstance(current, int) else list(current))
    if eos not in ids:
        gen.eos_token_id = eos if not ids else [*ids, eos]


def _load_failure(cfg: Any, key: str, source: str, what: str, exc: BaseException) -> str:
    opts = options(cfg)
    hints = []
    text = str(exc)
    if not Path(source).exists():
        hints.append(f"'{source}' is not a local directory; as a hub id it could not be fetched "
                     "(check the spelling, your network, HF_TOKEN for gated models)")
    if "safetensors" in text.lower() and not opts.allow_pickle:
        hints.append("the checkpoint has no safetensors weights; set `hf: {allow_pickle: true}` only if you trust it")
    if "trust_remote_code" in text and not opts.trust_remote_code:
        hints.append("it needs custom code; set `hf: {trust_remote_code: true}` only if you trust it")
    hint = ("; ".join(hints) + ". ") if hints else ""
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{cfg.where(key)}: could not load the {what} from '{source}': {first}. {hint}".rstrip()


# -- save ------------------------------------------------------------------------


@hookimpl(trylast=True)
def ft_save_weights(cfg, trainer, model, output_dir):
    """Plain ``save_pretrained`` (safetensors) on the main process; sharded engines go through the trainer."""
    out = Path(output_dir)
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        before = _snapshot(out)
        trainer.save_model(str(out))  # gathers the shards; writes on the main process only
        return _changed(out, before) if trainer.is_world_process_zero() else []
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()
        return []
    before = _snapshot(out)
    unwrapped = trainer.accelerator.unwrap_model(model)
    unwrapped.save_pretrained(str(out), safe_serialization=True)
    trainer.accelerator.wait_for_everyone()
    return _changed(out, before)


def _snapshot(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in out.glob("*") if p.is_file()} if out.is_dir() else {}


def _changed(out: Path, before: dict[str, float]) -> list[str]:
    return sorted(p for p, t in _snapshot(out).items() if before.get(p) != t)
