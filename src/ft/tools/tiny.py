"""A tiny Llama-architecture model and a locally trained tokenizer, made offline.

Used by the demo (``examples/tiny.yaml``), the tests and ``ft.tools.testing``. Nothing here touches
the network: the tokenizer is trained with the ``tokenizers`` library on a built-in corpus and
the model is initialised from a config with random weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|reserved_0|>", "<|reserved_1|>"]

_WORDS = (
    "the a an of to in and is it that for on with as was at by be this are from or have not but what all were "
    "when we there can your which their said if do will each about how up out them then she many some so these "
    "would other into has more her two like him see time could no make than first been its who now people my "
    "made over did down only way find use may water long little very after words called just where most know "
    "model train data token loss learning rate batch sequence label mask chat user assistant system answer "
    "question hello hi thanks please yes sure capital france paris germany berlin italy rome spain madrid "
    "one two three four five six seven eight nine ten red green blue cat dog bird fish tree sun moon star "
    "add subtract multiply number result python code function return value list print write read file "
).split()


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(3, 16)
        words = [rng.choice(_WORDS) for _ in range(k)]
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", ""])
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 999)}"
        lines.append(line)
    lines += [" ".join(_WORDS), "0123456789 ,.;:!?'\"()[]{}<>-+*/=_#@$%&"]
    return lines


def make_tokenizer(out_dir: str | Path, vocab_size: int = 512, *, pad_token: str | None = None,
                   chat_template: str | None = CHATML_TEMPLATE) -> Any:
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token=None, unk_token=None,
        pad_token=pad_token, additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    if chat_template:
        fast.chat_template = chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def make_model(out_dir: str | Path, *, vocab_size: int | None = None, hidden_size: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 2048,
               seed: int = 0, tokenizer: Any = None) -> Any:
    """Save a randomly initialised LlamaForCausalLM (safetensors) in ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else 512
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>") if tokenizer is not None else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else None,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(Path(out_dir), safe_serialization=True)
    return model


def make_tiny(out_dir: str | Path, **kwargs: Any) -> Path:
    """Tokenizer + model in one directory (what ``base_model:`` points at)."""
    out = Path(out_dir)
    tok_kwargs = {k: kwargs.pop(k) for k in ("vocab_size", "pad_token", "chat_template") if k in kwargs}
    tok = make_tokenizer(out, **tok_kwargs)
    make_model(out, tokenizer=tok, **kwargs)
    return out


def make_chat_rows(n: int = 64, seed: int = 0, max_turns: int = 3, system: bool = True) -> list[dict[str, Any]]:
    """Small synthetic conversations in OpenAI messages format."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        if system and rng.random() < 0.5:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
        for _ in range(rng.randint(1, max_turns)):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            q = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Please add {a} to {b}."])
            messages.append({"role": "user", "content": q})
            messages.append({"role": "assistant", "content": f"The result is {a + b}."})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return p
