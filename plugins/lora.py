"""LoRA adapters (peft): wrap the base model, check the targets, save in the peft layout.

Select with ``plugins: [lora]`` (or ``-p lora``); configure in the ``lora:`` section. With
``qlora`` also selected the base model arrives quantized and is prepared for k-bit training
before the adapter is added. The plugin also adds ``ft merge`` (fold a saved adapter into its base)
and loads adapter directories for ``ft infer`` (``ft_load_trained``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import ConfigError, FtError, MissingDependencyError, Plugin, is_installed, load_or_explain

PLUGIN = Plugin(feature=True, provides=["adapter"])  # a trainable adapter on a frozen base

log = logging.getLogger("ft.lora")

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
# peft's task of each model head (``Method.head``): a classification task trains the head in full
# (peft adds it to modules_to_save) and saves it with the adapter.
PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}
CLASSIFIER_HEADS = ("score", "classifier")  # the names peft gives classification heads
SAVED_CONFIG = "ft_config.yaml"
# How the base was quantized while the adapter trained (QLoRA); ft merge / ft infer read it.
BASE_QUANTIZATION_FILE = "base_quantization.json"


class LoraSection(BaseModel):
    """The ``lora:`` section."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, description="Rank of the low-rank update matrices (8-64 is usual).")
    alpha: float = Field(32, description="Scale numerator: updates are scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | str = Field(
        ALL_LINEAR,
        description="Module names to adapt, e.g. [q_proj, v_proj] (a name matches a module whose path ends with "
        "it), 'all-linear' for every linear layer except the output head, or one regular expression that must match "
        "a module's whole path, as peft reads it (e.g. 'model.layers.[0-9]+.self_attn.(q|v)_proj').",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head] after adding tokens.",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): better quality, slower steps.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    init_from: str | None = Field(
        None,
        description="Directory of an existing adapter (adapter_config.json) to continue training; its own r, alpha "
        "and targets are used.",
    )


@hookimpl
def ft_add_config(registry):
    registry.add("lora", LoraSection)


def section(cfg: Any) -> LoraSection:
    return cfg.section("lora")


def peft_installed() -> bool:
    return is_installed("peft")


@hookimpl
def ft_validate_config(cfg):
    if not peft_installed():
        raise MissingDependencyError("The lora plugin needs peft, which is not installed: pip install 'ft[lora]'.")
    lora = section(cfg)
    problems = []
    if lora.r <= 0:
        problems.append(f"{cfg.where('lora', 'r')}: must be a positive integer (got {lora.r}); 8 to 64 is usual, e.g. r: 16.")
    if lora.alpha <= 0:
        problems.append(f"{cfg.where('lora', 'alpha')}: must be positive (got {lora.alpha}); 1-2x r is usual, e.g. alpha: 32.")
    targets = lora.target_modules
    if isinstance(targets, str) and targets != ALL_LINEAR:
        import re

        if re.escape(targets) == targets:  # a plain name: meant as a list of one, which matches by suffix
            problems.append(
                f"{cfg.where('lora', 'target_modules')}: must be a list of module names, '{ALL_LINEAR}', or a "
                f"regular expression over whole module paths (got {targets!r}); write target_modules: [{targets}] or "
                f"target_modules: {ALL_LINEAR}."
            )
        try:  # one string is a regular expression over the module paths (peft: re.fullmatch)
            re.compile(targets)
        except re.error as exc:
            problems.append(
                f"{cfg.where('lora', 'target_modules')}: {targets!r} is not a regular expression ({exc}); give a list "
                f"of module names such as [q_proj, v_proj], a valid expression, or target_modules: {ALL_LINEAR}."
            )
    elif isinstance(targets, list) and not targets:
        problems.append(
            f"{cfg.where('lora', 'target_modules')}: is empty, so nothing would train; list module names such as "
            f"[q_proj, v_proj] or use target_modules: {ALL_LINEAR}."
        )
    if lora.init_from:
        from ft.api import resolve_path

        path = resolve_path(cfg, lora.init_from)
        if not (Path(path) / "adapter_config.json").is_file():
            problems.append(
                f"{cfg.where('lora', 'init_from')}: no adapter at {path} (adapter_config.json missing); point it at the "
                "output_dir of an earlier lora run."
            )
    return problems


# -- applying the adapter ------------------------------------------------------------------


def is_quantized(model: Any) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_quantized", False)
    )


def keep_4bit_layout(model: Any) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference while they train.

    On a CPU with AVX512-BF16, a 4-bit layer's forward in eval mode without grad (an evaluation) repacks
    its weight in place into a CPU-only layout; the backward of the next training steps then reads that
    layout as the usual one, and the adapter's gradients are wrong (measured on the tiny model: off by up
    to 0.12 where they are at most 0.14). With fsdp the repacked, gathered weight would also be dropped
    at the next gather while its quant_state, shared by the shards, stays flagged as repacked.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@hookimpl
def ft_apply_adapter(cfg, model):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    from ft.api import model_head, resolve_path

    lora = section(cfg)
    if is_quantized(model):
        # casts norms to fp32, freezes the base, makes inputs require grad for checkpointing
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs,
        )
        keep_4bit_layout(model)

    if lora.init_from:
        path = resolve_path(cfg, lora.init_from)
        adapted = PeftModel.from_pretrained(model, path, is_trainable=True)
        log.info("lora: continuing from the adapter in %s (its r, alpha and targets are used)", path)
    else:
        check_modules(cfg, lora, model)
        head = model_head(cfg)[0]
        targets = lora.target_modules
        if head != "causal_lm" and targets == ALL_LINEAR:
            # a classification head trains in full (modules_to_save), so it is no LoRA target
            targets = [n for n in linear_module_names(model) if n not in CLASSIFIER_HEADS]
        peft_config = LoraConfig(
            task_type=PEFT_TASKS[head],
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            modules_to_save=lora.modules_to_save or None,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            bias=lora.bias,
        )
        try:
            adapted = get_peft_model(model, peft_config)
        except ValueError as exc:  # peft's own checks (e.g. a module type it cannot adapt)
            raise ConfigError([f"{cfg.where('lora')}: peft refused the adapter: {exc}"], cfg.source) from None
    trainable, total = adapted.get_nb_trainable_parameters()
    log.info("lora: training %s of %s parameters (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return adapted


def _matches(name: str, key: str) -> bool:
    """peft's rule for a module name in a list: the full path, or a path ending in ``.key``."""
    return name == key or name.endswith("." + key)


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the model's linear layers (``q_proj``, ``down_proj`` ...), in model order."""
    import torch

    names: dict[str, None] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names[path.rsplit(".", 1)[-1]] = None
    return list(names)


def check_modules(cfg: Any, lora: LoraSection, model: Any) -> None:
    """Every name in target_modules / modules_to_save must match a module of this model."""
    paths = [path for path, _ in model.named_modules() if path]
    problems = []
    if isinstance(lora.target_modules, str) and lora.target_modules != ALL_LINEAR:
        import re

        if not any(re.fullmatch(lora.target_modules, p) for p in paths):
            problems.append(
                f"{cfg.where('lora', 'target_modules')}: the regular expression '{lora.target_modules}' matches no "
                f"module path of {type(model).__name__} (it must match a whole path, e.g. "
                f"{next((p for p in paths if p.endswith('q_proj')), paths[-1] if paths else '')!r}). Its linear layers "
                f"are named: {', '.join(linear_module_names(model)[:10]) or 'none'}."
            )
    targets = [] if isinstance(lora.target_modules, str) else list(lora.target_modules)
    missing = [key for key in targets if not any(_matches(p, key) for p in paths)]
    if missing:
        real = linear_module_names(model)
        problems.append(
            f"{cfg.where('lora', 'target_modules')}: {', '.join(missing)} match(es) no module of "
            f"{type(model).__name__}. Its linear layers are named: {', '.join(real[:10]) or 'none'}. "
            f"Use some of those, or target_modules: {ALL_LINEAR}."
        )
    missing = [key for key in lora.modules_to_save if not any(_matches(p, key) for p in paths)]
    if missing:
        leaves = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths if not p.rsplit(".", 1)[-1].isdigit()))
        problems.append(
            f"{cfg.where('lora', 'modules_to_save')}: {', '.join(missing)} match(es) no module of "
            f"{type(model).__name__}. Module names in it include: {', '.join(leaves[:12])}."
        )
    if problems:
        raise ConfigError(problems, cfg.source)


# -- saving --------------------------------------------------------------------------------


@hookimpl(tryfirst=True)
def ft_save_weights(cfg, trainer, model, output_dir):
    from peft import PeftModel

    from ft.api import is_main_process

    accelerator = getattr(trainer, "accelerator", None)
    peft_model = accelerator.unwrap_model(model) if accelerator is not None else model
    if not isinstance(peft_model, PeftModel):
        return None  # full fine-tuning: another plugin saves
    _absolute_base_path(peft_model)
    if trainer is None:  # called directly (tests, notebooks)
        if not is_main_process():
            return []
        peft_model.save_pretrained(output_dir, safe_serialization=True)
    elif trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(output_dir)  # gathers the shards; writes on the main process only
        if not trainer.is_world_process_zero():
            return []
    else:
        if trainer.is_world_process_zero():
            peft_model.save_pretrained(output_dir, safe_serialization=True)
        trainer.accelerator.wait_for_everyone()
        if not trainer.is_world_process_zero():
            return []
    files = [str(Path(output_dir) / name) for name in ADAPTER_FILES]
    quantization = write_base_quantization(peft_model, output_dir)
    if quantization:
        files.append(quantization)
    for path in files:
        if not Path(path).is_file():
            raise FtError(f"lora: saving the adapter did not write {path}; check that {output_dir} is writable.")
    log.info("lora: adapter saved to %s (merge it into the base with `ft merge %s`)", output_dir, output_dir)
    return files


@hookimpl
def ft_callbacks(cfg):
    from transformers import TrainerCallback

    class RecordBaseQuantization(TrainerCallback):
        """Checkpoints of a QLoRA run also say how the base was quantized (for ft merge / ft infer)."""

        def on_save(self, args, state, control, model=None, **kwargs):
            from peft import PeftModel

            model = getattr(model, "module", model)  # DDP
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and isinstance(model, PeftModel) and checkpoint.is_dir():
                write_base_quantization(model, str(checkpoint))

    return [RecordBaseQuantization()]


def _absolute_base_path(peft_model: Any) -> None:
    """A base model given as a relative local directory is recorded absolute, so ft merge finds it."""
    for peft_config in peft_model.peft_config.values():
        base = peft_config.base_model_name_or_path
        if base and Path(base).is_dir():
            peft_config.base_model_name_or_path = str(Path(base).resolve())


def write_base_quantization(peft_model: Any, output_dir: str) -> str | None:
    """Record the quantization of a quantized base next to the adapter; returns the file or None."""
    qc = getattr(peft_model.get_base_model().config, "quantization_config", None)
    if qc is None:
        return None
    data = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    path = Path(output_dir) / BASE_QUANTIZATION_FILE
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return str(path)

# -- using a trained adapter: ft merge, and loading for ft infer ------------------------------------


def base_model_path(adapter_dir: str | Path) -> str:
    """The base model of an adapter: ``base_model_name_or_path`` of adapter_config.json, else the
    ``base_model`` of the run's saved ft_config.yaml; a relative local path is taken from the working
    directory, else next to the adapter (as ``ft.kernel.context.resolve_path`` does for configs)."""
    adapter_dir = Path(adapter_dir)
    candidates = []
    config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path"):
        candidates.append(str(config["base_model_name_or_path"]))
    saved = adapter_dir / SAVED_CONFIG
    if saved.is_file():
        import yaml

        data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        if isinstance(data, dict) and data.get("base_model"):
            candidates.append(str(data["base_model"]))
    if not candidates:
        raise FtError(
            f"{adapter_dir / ADAPTER_CONFIG_FILE}: no base_model_name_or_path, and no {SAVED_CONFIG} beside it; "
            "set base_model_name_or_path to the base model's hub id or directory."
        )
    for value in candidates:
        p = Path(value).expanduser()
        if p.exists():
            return str(p)
        if not p.is_absolute() and (adapter_dir / p).exists():
            return str(adapter_dir / p)
    for value in candidates:
        if _looks_like_hub_id(value):
            return value
    raise FtError(
        f"the base model of the adapter in {adapter_dir} is not found at {candidates[0]}; edit "
        f"base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG_FILE} to where the base model is now."
    )


def _looks_like_hub_id(value: str) -> bool:
    return not value.startswith(("/", ".", "~")) and value.count("/") <= 1 and "\\" not in value


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def load_tokenizer(run_dir: str | Path, base: str | None = None) -> Any:
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    source = str(run_dir) if _has_tokenizer(run_dir) or base is None else base
    return load_or_explain(source, "tokenizer", AutoTokenizer.from_pretrained, source)


def read_base_quantization(adapter_dir: str | Path) -> dict[str, Any] | None:
    path = Path(adapter_dir) / BASE_QUANTIZATION_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def describe_quantization(quant: dict[str, Any]) -> str:
    if quant.get("load_in_4bit"):
        return f"4-bit {str(quant.get('bnb_4bit_quant_type', 'nf4')).upper()}"
    if quant.get("load_in_8bit"):
        return "8-bit"
    return str(quant.get("quant_method", "quantized"))


def _require_peft() -> None:
    if not is_installed("peft"):
        raise MissingDependencyError("loading a LoRA adapter needs peft, which is not installed: pip install 'ft[lora]'.")


def adapter_head(adapter_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """The model head an adapter was trained on (its peft ``task_type``) and the keyword arguments that
    build it (``num_labels``: the rows of the classification head saved with the adapter)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    head = {task: h for h, task in PEFT_TASKS.items()}.get(config.get("task_type") or "", "causal_lm")
    weights = adapter_dir / ADAPTER_WEIGHTS_FILE
    if head == "causal_lm" or not weights.is_file():
        return head, {}
    from safetensors import safe_open

    names = set(config.get("modules_to_save") or ()) | set(CLASSIFIER_HEADS)
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            parts = key.split(".")
            if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in names:
                return head, {"num_labels": fh.get_slice(key).get_shape()[0]}
    return head, {}


def _auto_class(head: str) -> Any:
    import transformers

    from ft.api import AUTO_CLASSES

    return getattr(transformers, AUTO_CLASSES[head])


def _load_quantized_base(base: str, quant: dict[str, Any], dtype: Any, head: str = "causal_lm", **head_kwargs: Any) -> Any:
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "this adapter was trained on a bitsandbytes-quantized base, and bitsandbytes is not installed: "
            "pip install 'ft[qlora]'."
        ) from None
    return load_or_explain(base, "base model", _auto_class(head).from_pretrained, base,
                    quantization_config=BitsAndBytesConfig.from_dict(quant), dtype=dtype, **head_kwargs)


def dequantized_base(base: str, quant: dict[str, Any], head: str = "causal_lm", **head_kwargs: Any) -> Any:
    """The base model in float32 with every bitsandbytes layer replaced by its dequantized weights.

    These are the weights the adapter was trained against (not the original full-precision ones),
    so the merged model computes what the QLoRA model computed.
    """
    import bitsandbytes as bnb
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    quantized = _load_quantized_base(base, quant, torch.float32, head, **head_kwargs)
    weights = {}
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[f"{name}.weight"] = dequantize_bnb_weight(module.weight, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weights[f"{name}.weight"] = dequantize_bnb_weight(module.weight, module.state)
    weights = {k: v.to("cpu", torch.float32) for k, v in weights.items()}
    del quantized
    model = load_or_explain(base, "base model", _auto_class(head).from_pretrained, base, dtype=torch.float32,
                            **head_kwargs)
    with torch.no_grad():
        for name, weight in weights.items():
            param = model.get_parameter(name)
            if param.shape != weight.shape:
                raise FtError(f"dequantized {name} has shape {tuple(weight.shape)}, the base has {tuple(param.shape)}.")
            param.copy_(weight)
    return model


def _match_vocab(model: Any, adapter_dir: Path, tokenizer: Any) -> None:
    """Resize the base's embeddings to what the adapter was trained with (added tokens)."""
    from safetensors import safe_open

    embeddings = model.get_input_embeddings()
    emb_path = next((n for n, m in model.named_modules() if m is embeddings), None)
    rows = None
    weights = adapter_dir / ADAPTER_WEIGHTS_FILE
    if emb_path and weights.is_file():
        with load_or_explain(str(weights), "LoRA adapter", safe_open, str(weights), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith(f"{emb_path}.weight") or ".".join(key.split(".")[:-1]).endswith(emb_path):
                    rows = fh.get_slice(key).get_shape()[0]
                    break
    current = embeddings.weight.shape[0]
    if rows is None and len(tokenizer) > current:
        log.warning(
            "the tokenizer has %d tokens, the base model %d embeddings, and the adapter saved none: the added "
            "tokens' embeddings are freshly initialised (train with lora.modules_to_save: [embed_tokens, lm_head])",
            len(tokenizer), current,
        )
        rows = len(tokenizer)
    if rows is not None and rows != current:
        model.resize_token_embeddings(rows)


def load_adapter_model(adapter_dir: str | Path, dtype: Any = None, quantized: bool = True) -> tuple[Any, Any]:
    """Base model + adapter (not merged) and the tokenizer. A QLoRA adapter gets its quantized base,
    unless ``quantized`` is False (then the dequantized base, in float32). The base is built with the
    head the adapter was trained on (a reward model's classifier: ``adapter_head``)."""
    _require_peft()
    import torch
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    base = base_model_path(adapter_dir)
    tokenizer = load_tokenizer(adapter_dir, base)
    quant = read_base_quantization(adapter_dir)
    dtype = dtype or torch.float32
    head, head_kwargs = adapter_head(adapter_dir)
    if quant and quantized:
        model = _load_quantized_base(base, quant, dtype, head, **head_kwargs)
    elif quant:
        model = dequantized_base(base, quant, head, **head_kwargs)
    else:
        model = load_or_explain(base, "base model", _auto_class(head).from_pretrained, base, dtype=dtype,
                                **head_kwargs)
    if head != "causal_lm" and tokenizer.pad_token_id is not None:  # a classifier pools at the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    _match_vocab(model, adapter_dir, tokenizer)
    model = load_or_explain(str(adapter_dir), "LoRA adapter", PeftModel.from_pretrained, model, str(adapter_dir))
    model.eval()
    return model, tokenizer


def merge_adapter(output_dir: str | Path, to_dir: str | Path | None = None, dtype: str = "float32",
                  force: bool = False) -> str:
    """Merge the LoRA adapter in ``output_dir`` into its base; write a full model + tokenizer.

    The merge is done in float32, then the weights are cast to ``dtype``. A QLoRA adapter is merged
    into the base dequantized from the bits it was trained on. Returns the directory written
    (default ``<output_dir>/merged``). A directory that already holds a run or a model is refused
    unless ``force``.
    """
    output_dir = Path(output_dir)
    if not is_adapter_dir(output_dir):
        hint = " It holds a full model already: use it as it is." if (output_dir / "config.json").is_file() else ""
        raise FtError(f"{output_dir} holds no LoRA adapter ({ADAPTER_CONFIG_FILE} is missing), so there is nothing to merge.{hint}")
    target = Path(to_dir) if to_dir else output_dir / "merged"
    if target.resolve() == output_dir.resolve():
        raise FtError(f"--to {target}: merging into the adapter's own directory would mix two models; choose another directory.")
    if target.exists() and not target.is_dir():
        raise FtError(f"--to {target}: it is a file; give a directory to write the merged model into.")
    found = occupied(target)
    if found and force:
        stale = [name for name in found if name in ("ft_config.yaml", "metrics.json", "ft_plugins.json")]
        log.warning("--force: writing the merged model into %s, which holds %s%s", target, ", ".join(found),
                    f"; its {', '.join(stale)} will describe the run that was there, not this model" if stale else "")
    if found and not force:
        raise FtError(
            f"--to {target}: the directory already holds {', '.join(found[:6])}{' ...' if len(found) > 6 else ''} "
            "(a run or a model); merging would replace its weights and leave its other files describing a different "
            "model. Choose a new or empty directory, or pass --force to write into it anyway."
        )
    from ft.api import torch_dtype_named

    final_dtype = torch_dtype_named(dtype)
    quant = read_base_quantization(output_dir)
    if quant:
        log.info(
            "QLoRA adapter: merging into the base model dequantized from %s (the weights it was trained "
            "against), saved as %s", describe_quantization(quant), str(final_dtype).replace("torch.", ""),
        )
    model, tokenizer = load_adapter_model(output_dir, quantized=False)
    merged = model.merge_and_unload()
    merged = merged.to(final_dtype)
    if tokenizer.pad_token_id is not None:  # the pad token chosen for training, as the run saved it
        merged.config.pad_token_id = tokenizer.pad_token_id
        if getattr(merged, "generation_config", None) is not None:
            merged.generation_config.pad_token_id = tokenizer.pad_token_id
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    log.info("merged model (%s) written to %s", str(final_dtype).replace("torch.", ""), target)
    return str(target)


# What marks a directory as a run's or a model's: never written into by ``ft merge`` without --force.
RUN_MARKERS = ("ft_config.yaml", "metrics.json", "ft_plugins.json", "config.json", ADAPTER_CONFIG_FILE,
               BASE_QUANTIZATION_FILE, "tokenizer.json", "tokenizer_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def occupied(directory: Path) -> list[str]:
    """The files and checkpoints in ``directory`` that belong to a run or a model (empty if none)."""
    if not directory.is_dir():
        return []
    found = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if name in RUN_MARKERS or name.endswith(WEIGHT_SUFFIXES) or (entry.is_dir() and name.startswith("checkpoint-")):
            found.append(name + ("/" if entry.is_dir() else ""))
    return found


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


@hookimpl
def ft_load_trained(run_dir, dtype):
    """An adapter directory -> (base + adapter, tokenizer); other directories are not ours."""
    if not is_adapter_dir(run_dir):
        return None
    return load_adapter_model(run_dir, dtype=dtype)


@hookimpl
def ft_add_commands(cli):
    import click

    from ft.api import handle_errors, setup_logging

    @cli.command()
    @click.argument("output_dir", type=click.Path(file_okay=False, exists=True))
    @click.option("--to", "to_dir", type=click.Path(file_okay=False), default=None,
                  help="Where to write the merged model.")
    @click.option("--dtype", default="float32", show_default=True, help="dtype of the merged weights.")
    @click.option("--force", is_flag=True, help="Write into a directory that already holds a run or a model.")
    @handle_errors
    def merge(output_dir, to_dir, dtype, force):
        """Merge a trained LoRA adapter into its base model and write a full model."""
        setup_logging()
        written = merge_adapter(output_dir, to_dir, dtype=dtype, force=force)
        click.echo(f"merged model written to {written}")
