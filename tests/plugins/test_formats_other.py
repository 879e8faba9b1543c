"""alpaca, completion and input_output formats: hand-labelled examples, options and drops."""

from __future__ import annotations

import pickle

import pytest
from ft_plugins.alpaca import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

from ft.kernel.context import load_context
from ft.kernel.errors import FtError
from ft.kernel.formats import Dropped


def build(write_yaml, tokenizer, type_, top=None, **entry):
    config = {"base_model": "unused", "datasets": [{"path": "data.jsonl", "type": type_, **entry}], **(top or {})}
    ctx = load_context(write_yaml(config))
    e = ctx.cfg.datasets[0]
    return ctx.formats.get(e.type).value.build(ctx.cfg, e, tokenizer)


def split(sample, tok):
    """(decoded untrained text, decoded trained text) of one sample."""
    assert len(sample["input_ids"]) == len(sample["labels"])
    for i, label in zip(sample["input_ids"], sample["labels"], strict=True):
        assert label in (-100, i)
    masked = [i for i, label in zip(sample["input_ids"], sample["labels"], strict=True) if label == -100]
    trained = [i for i, label in zip(sample["input_ids"], sample["labels"], strict=True) if label != -100]
    return tok.decode(masked), tok.decode(trained)


@pytest.fixture(scope="module")
def bos_tokenizer(ft_tiny_model_dir):
    """The tiny tokenizer with a BOS token (it has none of its own)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    tok.add_tokens(["<|begin|>"], special_tokens=True)
    tok.bos_token = "<|begin|>"
    return tok


# -- alpaca -----------------------------------------------------------------------------------


def test_alpaca_masks_the_prompt_and_trains_output_and_eos(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer, "alpaca")
    with_input, no_input = tokenize([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "output": "Hi!"},
    ])
    prompt, answer = split(with_input, ft_tiny_tokenizer)
    assert prompt == PROMPT_WITH_INPUT.format(instruction="Add the numbers.", input="2 and 3")
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert prompt.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert answer == "5<|im_end|>"
    assert with_input["input_ids"][-1] == ft_tiny_tokenizer.eos_token_id
    prompt, answer = split(no_input, ft_tiny_tokenizer)
    assert prompt == PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input" not in prompt
    assert answer == "Hi!<|im_end|>"


def test_alpaca_bos_and_train_on_inputs(write_yaml, bos_tokenizer):
    row = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    (sample,) = build(write_yaml, bos_tokenizer, "alpaca")([row])
    assert sample["input_ids"][0] == bos_tokenizer.bos_token_id
    assert sample["labels"][0] == -100
    prompt, answer = split(sample, bos_tokenizer)
    assert prompt == "<|begin|>" + PROMPT_NO_INPUT.format(instruction="Say hi.")  # empty input = no input
    assert answer == "Hi!<|im_end|>"
    (trained,) = build(write_yaml, bos_tokenizer, "alpaca", train_on_inputs=True)([row])
    assert trained["input_ids"] == sample["input_ids"]
    assert trained["labels"][1:] == trained["input_ids"][1:]  # all but BOS, which nothing predicts


def test_alpaca_field_names_and_drops(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer, "alpaca", field_instruction="q", field_output="a")
    ok, missing, bad, empty = tokenize([
        {"q": "Say hi.", "a": "Hi!"},
        {"instruction": "Say hi.", "output": "Hi!"},
        {"q": "Say hi.", "a": 3},
        {"q": " ", "a": ""},
    ])
    assert split(ok, ft_tiny_tokenizer)[1] == "Hi!<|im_end|>"
    assert isinstance(missing, Dropped) and missing.reason == "missing field 'q'" and "instruction" in missing.detail
    assert isinstance(bad, Dropped) and bad.reason == "malformed row" and "'a'" in bad.detail
    assert isinstance(empty, Dropped) and empty.reason == "empty"


# -- completion -------------------------------------------------------------------------------


def test_completion_appends_eos_and_chunks_to_sequence_len(write_yaml, ft_tiny_tokenizer):
    text = " ".join(["the model learns to read and write words"] * 12)
    ids = ft_tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [ft_tiny_tokenizer.eos_token_id]
    assert len(ids) > 40
    tokenize = build(write_yaml, ft_tiny_tokenizer, "completion", top={"sequence_len": 16})
    long, short, empty, missing = tokenize([{"text": text}, {"text": "Hello"}, {"text": "  "}, {"body": "x"}])
    assert isinstance(long, list) and [len(p["input_ids"]) for p in long] == [16] * (len(ids) // 16) + (
        [len(ids) % 16] if len(ids) % 16 else [])
    assert [i for p in long for i in p["input_ids"]] == ids  # nothing lost, EOS at the end
    assert all(p["labels"] == p["input_ids"] for p in long)  # every token trained
    assert ft_tiny_tokenizer.decode(short[0]["input_ids"]) == "Hello<|im_end|>"
    assert short[0]["labels"] == short[0]["input_ids"]
    assert isinstance(empty, Dropped) and empty.reason == "empty"
    assert isinstance(missing, Dropped) and missing.reason == "missing field 'text'"
    tokenize = build(write_yaml, ft_tiny_tokenizer, "completion", field="body")
    (sample,) = tokenize([{"body": "x"}])
    assert ft_tiny_tokenizer.decode(sample[0]["input_ids"]) == "x<|im_end|>"


def test_completion_starts_documents_with_bos_when_the_tokenizer_has_one(write_yaml, bos_tokenizer):
    (sample,) = build(write_yaml, bos_tokenizer, "completion")([{"text": "Hello"}])
    assert bos_tokenizer.decode(sample[0]["input_ids"]) == "<|begin|>Hello<|im_end|>"


# -- input_output -----------------------------------------------------------------------------


def test_input_output_labels_per_segment_without_added_special_tokens(write_yaml, bos_tokenizer):
    tok = bos_tokenizer
    row = {"segments": [
        {"text": "Question: what is 2 plus 3?\n", "label": False},
        {"text": "Answer: 5", "label": True},
        {"text": "<|im_end|>", "label": True},
        {"text": "\nignored tail", "label": False},
    ]}
    (sample,) = build(write_yaml, tok, "input_output")([row])
    pieces = [tok(s["text"], add_special_tokens=False)["input_ids"] for s in row["segments"]]
    assert sample["input_ids"] == [i for p in pieces for i in p]  # each segment on its own, no BOS/EOS added
    assert tok.bos_token_id not in sample["input_ids"]
    masked, trained = split(sample, tok)
    assert trained == "Answer: 5<|im_end|>"
    assert masked == "Question: what is 2 plus 3?\n\nignored tail"
    (everything,) = build(write_yaml, tok, "input_output", train_on_inputs=True)([row])
    assert everything["labels"] == everything["input_ids"]


def test_input_output_field_and_drops(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer, "input_output", field_segments="parts")
    ok, missing, no_label, not_list, empty = tokenize([
        {"parts": [{"text": "a", "label": False}, {"text": "b", "label": True}]},
        {"segments": [{"text": "a", "label": True}]},
        {"parts": [{"text": "a"}]},
        {"parts": "a"},
        {"parts": []},
    ])
    assert split(ok, ft_tiny_tokenizer) == ("a", "b")
    assert isinstance(missing, Dropped) and missing.reason == "missing field 'parts'"
    assert isinstance(no_label, Dropped) and no_label.reason == "malformed segments" and "label" in no_label.detail
    assert isinstance(not_list, Dropped) and not_list.reason == "malformed segments"
    assert isinstance(empty, Dropped) and empty.reason == "empty"


# -- shared -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "row"),
    [
        ("alpaca", {"instruction": "Say hi.", "output": "Hi!"}),
        ("completion", {"text": "Hello there"}),
        ("input_output", {"segments": [{"text": "a", "label": False}, {"text": "b", "label": True}]}),
        ("chat_template", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    ],
)
def test_tokenize_callables_are_picklable(write_yaml, ft_tiny_tokenizer, type_, row):
    tokenize = build(write_yaml, ft_tiny_tokenizer, type_)
    assert pickle.loads(pickle.dumps(tokenize))([row]) == tokenize([row])


def test_formats_need_an_eos_token(write_yaml, ft_tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    tok.eos_token = None
    for type_ in ("alpaca", "completion"):
        with pytest.raises(FtError) as err:
            build(write_yaml, tok, type_)
        assert "eos_token" in str(err.value) and "datasets[0]" in str(err.value)
