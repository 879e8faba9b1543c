"""``ft infer``: generate from a trained run -- one prompt, or an interactive chat with history.

Essential plugin. Which model a run directory holds is asked of every loaded plugin through
``ft_load_trained``: the lora plugin loads adapter directories (base + adapter, QLoRA bases
quantized as they were trained); this plugin loads full model directories.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ft import hookimpl
from ft.api import FtError, Plugin, load_or_explain

PLUGIN = Plugin(essential=True)  # essential: always active


@hookimpl
def ft_add_commands(cli):
    import click

    from ft.api import handle_errors

    @cli.command()
    @click.argument("output_dir", type=click.Path(file_okay=False, exists=True))
    @click.argument("prompt", required=False)
    @click.option("--max-new-tokens", type=int, default=256, show_default=True)
    @click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
    @handle_errors
    def infer(output_dir, prompt, max_new_tokens, temperature):
        """Generate from a trained model or adapter: one PROMPT, or an interactive chat."""
        warning = unfinished_run(output_dir)
        if warning:
            click.secho(f"warning: {warning}", fg="yellow", err=True)
        if prompt is not None:
            generate_once(output_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature)
        else:
            chat(output_dir, max_new_tokens=max_new_tokens, temperature=temperature)


def unfinished_run(run_dir: str | Path) -> str | None:
    """Why the weights in ``run_dir`` may not be a finished run's (None when they are, or it is no run's directory:
    a merged model, a downloaded one). A run writes ft_config.yaml first and metrics.json last."""
    run_dir = Path(run_dir)
    if (run_dir / "ft_checkpoint.json").is_file():
        return (f"{run_dir} is a checkpoint, not the final weights of a run; generating from the weights it "
                "held at that step.")
    if (run_dir / "ft_config.yaml").is_file() and not (run_dir / "metrics.json").is_file():
        return (f"{run_dir} has no metrics.json: its run did not finish (or its final save was cut short), so these "
                "weights may not be the trained ones. Resume it with `ft run` on its config to finish it.")
    return None


def load_for_inference(run_dir: str | Path, plugins: Any = None) -> tuple[Any, Any]:
    """A trained run's directory -> (model on the best device, tokenizer).

    Every loaded plugin is asked through ``ft_load_trained`` (the lora plugin answers for adapter
    directories); this plugin answers last, for full model directories.
    """
    import torch

    from ft.api import make_plugin_manager

    run_dir = Path(run_dir)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    pm = plugins or make_plugin_manager()
    loaded = pm.call("ft_load_trained", run_dir=run_dir, dtype=dtype)
    if loaded is None:
        raise FtError(
            f"{run_dir} holds neither a model (config.json) nor an adapter that an installed plugin can load "
            "(adapter_config.json needs the lora plugin); pass the output_dir of a finished run."
        )
    model, tokenizer = loaded
    if cuda and getattr(model, "hf_device_map", None) is None and not getattr(model, "is_loaded_in_4bit", False):
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


@hookimpl(trylast=True)
def ft_load_trained(run_dir, dtype):
    """A full model directory (config.json + weights) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(run_dir) / "config.json").is_file():
        return None
    model = load_or_explain(str(run_dir), "model", AutoModelForCausalLM.from_pretrained, run_dir, dtype=dtype)
    tokenizer = load_or_explain(str(run_dir), "tokenizer", AutoTokenizer.from_pretrained, str(run_dir))
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
