"""Using a trained run: merge a LoRA adapter into its base (``ft merge``), generate (``ft infer``).

A run's output directory holds either a full model (``config.json`` + weights) or a peft
adapter (``adapter_config.json`` + ``adapter_model.safetensors``), plus the tokenizer. An
adapter trained on a quantized base (QLoRA) also holds ``base_quantization.json``, written by
the lora plugin, so the base can be rebuilt exactly as it was during training.

torch, transformers and peft are imported inside the functions: ``import ft`` stays light.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ft.errors import FtError, MissingDependencyError, is_installed

log = logging.getLogger("ft.inference")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_QUANTIZATION = "base_quantization.json"
SAVED_CONFIG = "ft_config.yaml"
DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def torch_dtype(name: str) -> Any:
    import torch

    key = DTYPES.get(str(name).lower().replace("torch.", ""))
    if key is None:
        raise FtError(f"unknown dtype '{name}'; use one of float32, bfloat16, float16.")
    return getattr(torch, key)


# -- finding the base model ----------------------------------------------------------------


def base_model_path(adapter_dir: str | Path) -> str:
    """The base model of an adapter: ``base_model_name_or_path`` of adapter_config.json, else the
    ``base_model`` of the run's saved ft_config.yaml; a relative local path is taken from the working
    directory, else next to the adapter (as ``ft.context.resolve_path`` does for configs)."""
    adapter_dir = Path(adapter_dir)
    candidates = []
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
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
            f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path, and no {SAVED_CONFIG} beside it; "
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
        f"base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG} to where the base model is now."
    )


def _looks_like_hub_id(value: str) -> bool:
    return not value.startswith(("/", ".", "~")) and value.count("/") <= 1 and "\\" not in value


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def load_tokenizer(run_dir: str | Path, base: str | None = None) -> Any:
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    source = str(run_dir) if _has_tokenizer(run_dir) or base is None else base
    return _loading(source, "tokenizer", AutoTokenizer.from_pretrained, source)


def read_base_quantization(adapter_dir: str | Path) -> dict[str, Any] | None:
    path = Path(adapter_dir) / BASE_QUANTIZATION
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


# -- loading ---------------------------------------------------------------------------------


def _loading(source: str, what: str, load: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)``; a missing or unreachable source becomes one clear error."""
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if Path(source).exists() else (
            " It is not a local directory; as a hub id it could not be fetched (check the spelling, your "
            "network, HF_TOKEN for gated models)."
        )
        raise FtError(f"could not load the {what} from '{source}': {first}.{hint}") from exc


def _load_quantized_base(base: str, quant: dict[str, Any], dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "this adapter was trained on a bitsandbytes-quantized base, and bitsandbytes is not installed: "
            "pip install 'ft[qlora]'."
        ) from None
    return _loading(base, "base model", AutoModelForCausalLM.from_pretrained, base,
                    quantization_config=BitsAndBytesConfig.from_dict(quant), dtype=dtype)


def dequantized_base(base: str, quant: dict[str, Any]) -> Any:
    """The base model in float32 with every bitsandbytes layer replaced by its dequantized weights.

    These are the weights the adapter was trained against (not the original full-precision ones),
    so the merged model computes what the QLoRA model computed.
    """
    import bitsandbytes as bnb
    import torch
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import AutoModelForCausalLM

    quantized = _load_quantized_base(base, quant, torch.float32)
    weights = {}
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[f"{name}.weight"] = dequantize_bnb_weight(module.weight, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weights[f"{name}.weight"] = dequantize_bnb_weight(module.weight, module.state)
    weights = {k: v.to("cpu", torch.float32) for k, v in weights.items()}
    del quantized
    model = _loading(base, "base model", AutoModelForCausalLM.from_pretrained, base, dtype=torch.float32)
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
    weights = adapter_dir / ADAPTER_WEIGHTS
    if emb_path and weights.is_file():
        with safe_open(str(weights), framework="pt") as fh:
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
    unless ``quantized`` is False (then the dequantized base, in float32)."""
    _require_peft()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    base = base_model_path(adapter_dir)
    tokenizer = load_tokenizer(adapter_dir, base)
    quant = read_base_quantization(adapter_dir)
    dtype = dtype or torch.float32
    if quant and quantized:
        model = _load_quantized_base(base, quant, dtype)
    elif quant:
        model = dequantized_base(base, quant)
    else:
        model = _loading(base, "base model", AutoModelForCausalLM.from_pretrained, base, dtype=dtype)
    _match_vocab(model, adapter_dir, tokenizer)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


def merge_adapter(output_dir: str | Path, to_dir: str | Path | None = None, dtype: str = "float32") -> str:
    """Merge the LoRA adapter in ``output_dir`` into its base; write a full model + tokenizer.

    The merge is done in float32, then the weights are cast to ``dtype``. A QLoRA adapter is merged
    into the base dequantized from the bits it was trained on. Returns the directory written
    (default ``<output_dir>/merged``).
    """
    output_dir = Path(output_dir)
    if not is_adapter_dir(output_dir):
        hint = " It holds a full model already: use it as it is." if (output_dir / "config.json").is_file() else ""
        raise FtError(f"{output_dir} holds no LoRA adapter ({ADAPTER_CONFIG} is missing), so there is nothing to merge.{hint}")
    target = Path(to_dir) if to_dir else output_dir / "merged"
    if target.resolve() == output_dir.resolve():
        raise FtError(f"--to {target}: merging into the adapter's own directory would mix two models; choose another directory.")
    final_dtype = torch_dtype(dtype)
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


def load_for_inference(run_dir: str | Path) -> tuple[Any, Any]:
    """A full model directory or an adapter directory -> (model on the best device, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if is_adapter_dir(run_dir):
        model, tokenizer = load_adapter_model(run_dir, dtype=dtype)
    elif (run_dir / "config.json").is_file():
        model = _loading(str(run_dir), "model", AutoModelForCausalLM.from_pretrained, run_dir, dtype=dtype)
        tokenizer = load_tokenizer(run_dir)
    else:
        raise FtError(
            f"{run_dir} holds neither a model (config.json) nor a LoRA adapter ({ADAPTER_CONFIG}); pass the "
            "output_dir of a finished run."
        )
    if cuda and getattr(model, "hf_device_map", None) is None and not getattr(model, "is_loaded_in_4bit", False):
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


# -- generation ------------------------------------------------------------------------------


def _prompt_inputs(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # no chat template: the conversation as plain text, one message per line
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, return_tensors="pt")


def generate(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 256,
    temperature: float = 0.0, stream: bool = True,
) -> str:
    """Answer the last user message of ``messages``; stream tokens to stdout; return the reply."""
    import torch
    from transformers import TextStreamer

    if max_new_tokens <= 0:
        raise FtError(f"--max-new-tokens must be positive (got {max_new_tokens}).")
    if temperature < 0:
        raise FtError(f"--temperature must be 0 (greedy) or positive (got {temperature}).")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in _prompt_inputs(tokenizer, messages).items()}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id, **sampling,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_once(output_dir: str | Path, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0) -> str:
    """``ft infer OUTPUT_DIR PROMPT``: one answer, streamed (chat template applied when there is one)."""
    model, tokenizer = load_for_inference(output_dir)
    return generate(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens, temperature)


def chat(
    output_dir: str | Path, max_new_tokens: int = 256, temperature: float = 0.0,
    read: Callable[[str], str] = input, write: Callable[[str], Any] = print,
) -> list[dict[str, str]]:
    """``ft infer OUTPUT_DIR``: an interactive chat that keeps the history.

    ``/exit`` or end of input (Ctrl-D) ends it, ``/reset`` clears the history. Returns the history.
    """
    model, tokenizer = load_for_inference(output_dir)
    write(f"chatting with {output_dir}: /exit or Ctrl-D to quit, /reset to clear the history")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            write("(history cleared)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, history, max_new_tokens, temperature)
        history.append({"role": "assistant", "content": reply})
    return history
