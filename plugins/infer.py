"""``ft infer``: generate from a trained run -- one prompt, or an interactive chat with history -- or score
with a trained reward model or process reward model.

Essential plugin. Which model a run directory holds is asked of every loaded plugin through
``ft_load_trained``: the lora plugin loads adapter directories (base + adapter, QLoRA bases
quantized as they were trained, with the head the adapter was trained on); this plugin loads full
model directories, as the class their ``config.json`` names (a causal LM, or the sequence / token
classifier of a ``method: reward_model`` / ``method: prm`` run).

What ``ft infer`` does follows the model's head:

- causal LM: generate an answer to PROMPT, or chat;
- sequence classifier (a reward model): score texts -- each ``--response`` as the assistant's answer
  to PROMPT (rendered as GRPO's ``reward_model`` reward renders it: the chat template when there is
  one), or PROMPT itself, exactly as given, without ``--response``; one score (the first logit) per text;
- token classifier (a PRM): score each ``--step`` of a solution to PROMPT, laid out as training lays
  out ``type: stepwise_supervised`` rows (``ft_plugins.prm``), with the run's ``step_separator``; per
  step ``softmax(logits)[1]`` at the separator's last token, and the label it implies.

A mode that makes no sense for the head (a chat with a classifier, ``--temperature`` for a scorer,
``--step`` for a reward model) is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ft import hookimpl
from ft.api import CAUSAL_LM, SEQUENCE_CLASSIFICATION, FtError, Plugin, load_or_explain

PLUGIN = Plugin(essential=True)  # essential: always active


@hookimpl
def ft_add_commands(cli):
    import click

    from ft.api import handle_errors

    @cli.command()
    @click.argument("output_dir", type=click.Path(file_okay=False, exists=True))
    @click.argument("prompt", required=False)
    @click.option("--max-new-tokens", type=int, default=None, help="Generation length (default 256).")
    @click.option("--temperature", type=float, default=None, help="0 = greedy (the default).")
    @click.option("--response", "responses", multiple=True, help="Reward model: an answer to PROMPT to score "
                  "(repeat for several).")
    @click.option("--step", "steps", multiple=True, help="Process reward model: a step of the solution to PROMPT, "
                  "in order (repeat for each step).")
    @click.option("--step-separator", default=None, help="Process reward model: the text after each step (default: "
                  "the run's stepwise_supervised step_separator, else a newline).")
    @handle_errors
    def infer(output_dir, prompt, max_new_tokens, temperature, responses, steps, step_separator):
        """Generate from a trained model or adapter (one PROMPT, or an interactive chat); score with a trained
        reward model (PROMPT and --response ..., or a text) or process reward model (PROMPT and --step ...)."""
        warning = unfinished_run(output_dir)
        if warning:
            click.secho(f"warning: {warning}", fg="yellow", err=True)
        model, tokenizer = load_for_inference(output_dir)
        head = head_of(model)
        if head == CAUSAL_LM:
            _refuse(head, responses=responses, steps=steps, step_separator=step_separator)
            options = {"max_new_tokens": 256 if max_new_tokens is None else max_new_tokens,
                       "temperature": 0.0 if temperature is None else temperature}
            if prompt is not None:
                generate(model, tokenizer, [{"role": "user", "content": prompt}], **options)
            else:
                chat(output_dir, loaded=(model, tokenizer), **options)
            return
        _refuse(head, max_new_tokens=max_new_tokens, temperature=temperature)
        if prompt is None:
            raise FtError(f"{output_dir} holds a {HEAD_NAMES[head]}: it scores texts, it does not chat. "
                          + USAGE[head])
        if head == SEQUENCE_CLASSIFICATION:
            _refuse(head, steps=steps, step_separator=step_separator)
            texts = [render_pair(tokenizer, prompt, r) for r in responses] if responses else [prompt]
            for score, shown in zip(score_texts(model, tokenizer, texts), responses or [prompt], strict=True):
                click.echo(f"{score:.6f}\t{_one_line(shown)}")
        else:
            _refuse(head, responses=responses)
            if not steps:
                raise FtError(f"{output_dir} holds a {HEAD_NAMES[head]}: give the steps to score. " + USAGE[head])
            separator = step_separator if step_separator is not None else run_step_separator(output_dir)
            for i, (step, (p_good, label)) in enumerate(zip(steps, score_steps(model, tokenizer, prompt, steps,
                                                                                 separator), strict=True), 1):
                click.echo(f"step {i}\t{p_good:.6f}\t{'good' if label else 'bad'}\t{_one_line(step)}")


HEAD_NAMES = {"sequence_classification": "reward model (a sequence classifier)",
              "token_classification": "process reward model (a token classifier)",
              "causal_lm": "causal language model"}
USAGE = {"sequence_classification": "Usage: ft infer RUN PROMPT --response ANSWER [--response ANSWER ...], or "
                                    "ft infer RUN TEXT to score a text as it is.",
         "token_classification": "Usage: ft infer RUN PROMPT --step STEP1 --step STEP2 ... [--step-separator SEP].",
         "causal_lm": "Usage: ft infer RUN [PROMPT] [--max-new-tokens N] [--temperature T]."}
OPTION_NAMES = {"responses": "--response", "steps": "--step", "step_separator": "--step-separator",
                "max_new_tokens": "--max-new-tokens", "temperature": "--temperature"}


def _refuse(head: str, **given: Any) -> None:
    """Options that make no sense for a model with this head, if given: an error naming them."""
    bad = [OPTION_NAMES[k] for k, v in given.items() if v not in (None, ())]
    if bad:
        what = "scores, it does not generate" if head != CAUSAL_LM else "generates, it does not score"
        raise FtError(f"{', '.join(bad)}: not an option for a {HEAD_NAMES[head]}, which {what}. {USAGE[head]}")


def _require_generator(model: Any, output_dir: str | Path) -> None:
    head = head_of(model)
    if head != CAUSAL_LM:
        raise FtError(f"{output_dir} holds a {HEAD_NAMES[head]}: it scores texts, it does not generate. {USAGE[head]}")


def _one_line(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


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
    """A full model directory (config.json + weights) and its tokenizer, the model built as the head its
    config names (a reward model's or PRM's classifier, else a causal LM)."""
    import transformers

    from ft.api import AUTO_CLASSES, config_head

    config = Path(run_dir) / "config.json"
    if not config.is_file():
        return None
    head = config_head(config)
    auto = getattr(transformers, AUTO_CLASSES[head])
    model = load_or_explain(str(run_dir), "model", auto.from_pretrained, run_dir, dtype=dtype)
    tokenizer = load_or_explain(str(run_dir), "tokenizer", transformers.AutoTokenizer.from_pretrained, str(run_dir))
    if head != CAUSAL_LM and model.config.pad_token_id is None:  # a classifier pools at the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer


def head_of(model: Any) -> str:
    """The head of a loaded model (a peft model's: its base's)."""
    from ft.api import architecture_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return architecture_head(type(base).__name__)


# -- scoring (reward models, process reward models) --------------------------------------------


def render_pair(tokenizer: Any, prompt: str, response: str) -> str:
    """The text a reward model scores for ``response`` to ``prompt``: as GRPO's ``reward_model`` reward
    renders it (the chat template when the tokenizer has one)."""
    from ft_plugins.rewards import render_scored

    return render_scored(tokenizer, [{"role": "user", "content": prompt}], response)


def score_texts(model: Any, tokenizer: Any, texts: list[str]) -> list[float]:
    """A reward model's score (first logit) of each text, tokenized as it is (no special tokens added, as
    the ``reward_model`` reward does), one text per forward pass (no padding)."""
    import torch

    device = next(model.parameters()).device
    scores = []
    for text in texts:
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        if inputs["input_ids"].shape[1] == 0:
            raise FtError("ft infer: an empty text has no token to score; give a non-empty PROMPT / --response.")
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        scores.append(float(logits[0, 0].float()))
    return scores


def score_steps(model: Any, tokenizer: Any, prompt: str, steps: list[str] | tuple[str, ...],
                separator: str = "\n") -> list[tuple[float, int]]:
    """A PRM's ``(p(good), label)`` for each step: the row laid out exactly as ``type: stepwise_supervised``
    trains it (``ft_plugins.prm``), read at each step separator's last token."""
    import torch
    from ft_plugins.prm import StepwiseOptions, StepwiseTokenize

    options = StepwiseOptions(path="<ft infer>", type="stepwise_supervised", step_separator=separator)
    row = StepwiseTokenize(tokenizer, options, "--step-separator")([{"prompt": prompt, "completions": list(steps),
                                                                      "labels": [1] * len(steps)}])[0]
    if not isinstance(row, dict):  # a Dropped: an empty step list or a step that is not a text
        raise FtError(f"ft infer: the steps cannot be laid out: {getattr(row, 'detail', row)}")
    positions = [i for i, label in enumerate(row["prm_labels"]) if label >= 0]
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["prm_input_ids"]], device=device)).logits[0, positions].float()
    probs = logits.softmax(-1)
    good = probs[:, 1] if probs.shape[-1] > 1 else torch.sigmoid(logits[:, 0])
    return [(float(p), int(label)) for p, label in zip(good, logits.argmax(-1), strict=True)]


def run_step_separator(run_dir: str | Path) -> str:
    """The ``step_separator`` of the run's ``stepwise_supervised`` datasets (its ``ft_config.yaml``); a newline
    (the format's default) when the directory holds no run config."""
    import yaml

    path = Path(run_dir) / "ft_config.yaml"
    if not path.is_file():
        return "\n"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise FtError(f"{path}: cannot be read ({error}); pass --step-separator.") from error
    entries = [e for e in config.get("datasets") or [] if isinstance(e, dict) and e.get("type") == "stepwise_supervised"]
    separators = list(dict.fromkeys(e.get("step_separator", "\n") for e in entries))
    if len(separators) > 1:
        raise FtError(f"{path}: the run's datasets use different step separators ({', '.join(map(repr, separators))});"
                      " pass the one to use with --step-separator.")
    return separators[0] if separators else "\n"


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
    _require_generator(model, output_dir)
    return generate(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens, temperature)


def chat(
    output_dir: str | Path, max_new_tokens: int = 256, temperature: float = 0.0,
    read: Callable[[str], str] = input, write: Callable[[str], Any] = print, loaded: tuple[Any, Any] | None = None,
) -> list[dict[str, str]]:
    """``ft infer OUTPUT_DIR``: an interactive chat that keeps the history.

    ``/exit`` or end of input (Ctrl-D) ends it, ``/reset`` clears the history. Returns the history.
    ``loaded``: the (model, tokenizer) already loaded from ``output_dir``.
    """
    model, tokenizer = loaded or load_for_inference(output_dir)
    _require_generator(model, output_dir)
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
