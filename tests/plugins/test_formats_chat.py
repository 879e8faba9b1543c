"""The chat_template format: labels on hand-labelled talks, agreement with transformers, errors."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
from ft_plugins.chat_template import load_shipped_template

from ft.kernel.context import load_context
from ft.kernel.errors import FtError
from ft.kernel.formats import Dropped

DATA = Path(__file__).parent / "data"

TALK = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def build(write_yaml, tokenizer, top=None, **entry):
    """The Tokenize of one dataset entry, built through a real config file."""
    config = {"base_model": "unused", "datasets": [{"path": "chat.jsonl", "type": "chat_template", **entry}]}
    ctx = load_context(write_yaml({**config, **(top or {})}))
    e = ctx.cfg.datasets[0]
    return ctx.formats.get(e.type).value.build(ctx.cfg, e, tokenizer)


def one(tokenize, messages, field="messages"):
    (sample,) = tokenize([{field: messages}])
    assert not isinstance(sample, Dropped), sample
    assert len(sample["input_ids"]) == len(sample["labels"])
    return sample


def trained_runs(sample, tok):
    """Decoded runs of consecutive trained tokens (labels equal to the inputs there)."""
    runs, cur = [], []
    for i, label in zip(sample["input_ids"], sample["labels"], strict=True):
        if label == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert label == i
            cur.append(i)
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.fixture(scope="module")
def llama3_tokenizer(ft_tiny_model_dir):
    """The tiny tokenizer with Llama-3's control tokens and a BOS, and no template of its own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    tok.add_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   special_tokens=True)
    tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = None
    return tok


# -- hand-labelled examples --------------------------------------------------------------------


@pytest.mark.parametrize("template", [None, "chatml"])
def test_chatml_trains_assistant_content_and_end_of_turn_only(write_yaml, ft_tiny_tokenizer, template):
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template=template)
    sample = one(tokenize, TALK)
    assert trained_runs(sample, ft_tiny_tokenizer) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    # the tokens are exactly what transformers renders and tokenizes
    assert sample["input_ids"] == ft_tiny_tokenizer.apply_chat_template(TALK, tokenize=True, return_dict=False)
    # header and the newline after <|im_end|> are not trained
    text = ft_tiny_tokenizer.decode(sample["input_ids"])
    assert text.endswith("<|im_start|>assistant\nRome.<|im_end|>\n")
    assert sample["labels"][-1] == -100


@pytest.mark.parametrize(
    ("mode", "runs"),
    [
        ("turn", ["Paris.<|im_end|>", "Rome.<|im_end|>"]),
        ("all", ["<|im_end|>", "<|im_end|>", "Paris.<|im_end|>", "<|im_end|>", "Rome.<|im_end|>"]),
        ("last", ["Paris.", "Rome.<|im_end|>"]),
        ("none", ["Paris.", "Rome."]),
    ],
)
def test_train_on_eos_modes(write_yaml, ft_tiny_tokenizer, mode, runs):
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="chatml", train_on_eos=mode)
    assert trained_runs(one(tokenize, TALK), ft_tiny_tokenizer) == runs


def test_per_message_training_flags_override_roles(write_yaml, ft_tiny_tokenizer):
    talk = [dict(m) for m in TALK]
    talk[2]["training"] = False  # first answer: not trained although assistant
    talk[3]["training"] = True  # second question: trained although user
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="chatml")
    assert trained_runs(one(tokenize, talk), ft_tiny_tokenizer) == ["And Italy?<|im_end|>", "Rome.<|im_end|>"]
    # the flag is not passed to the template: same tokens as without it
    assert one(tokenize, talk)["input_ids"] == one(tokenize, TALK)["input_ids"]
    # the flag's name is configurable
    talk2 = [dict(m) for m in TALK]
    talk2[4]["train_me"] = False
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="chatml", message_field_training="train_me")
    assert trained_runs(one(tokenize, talk2), ft_tiny_tokenizer) == ["Paris.<|im_end|>"]


def test_roles_to_train_with_system_and_user(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="chatml", roles_to_train=["system", "user"])
    assert trained_runs(one(tokenize, TALK), ft_tiny_tokenizer) == [
        "You are terse.<|im_end|>", "Capital of France?<|im_end|>", "And Italy?<|im_end|>"]


def test_train_on_inputs_trains_everything(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="chatml", train_on_inputs=True)
    sample = one(tokenize, TALK)
    assert sample["labels"] == sample["input_ids"]
    # the top-level key is the default for every entry
    tokenize = build(write_yaml, ft_tiny_tokenizer, top={"train_on_inputs": True}, chat_template="chatml")
    assert one(tokenize, TALK)["labels"] == sample["input_ids"]
    tokenize = build(write_yaml, ft_tiny_tokenizer, top={"train_on_inputs": True}, chat_template="chatml",
                     train_on_inputs=False)
    assert trained_runs(one(tokenize, TALK), ft_tiny_tokenizer) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]


def test_content_equal_to_role_names_and_headers_is_located(write_yaml, ft_tiny_tokenizer):
    talk = [
        {"role": "user", "content": "assistant"},
        {"role": "assistant", "content": "user"},
        {"role": "user", "content": "<|im_start|>assistant\nuser"},
        {"role": "assistant", "content": "assistant\n"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
    ]
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="chatml")
    sample = one(tokenize, talk)
    assert trained_runs(sample, ft_tiny_tokenizer) == ["user<|im_end|>", "assistant\n<|im_end|>", "<|im_end|>"]
    assert sample["input_ids"] == ft_tiny_tokenizer.apply_chat_template(talk, tokenize=True, return_dict=False)


def test_llama3_template_without_generation_markers(write_yaml, llama3_tokenizer):
    talk = [dict(m) for m in TALK]
    talk[2]["content"] = "  Paris. \n"  # the Llama-3 template trims contents
    tokenize = build(write_yaml, llama3_tokenizer, chat_template="llama3")
    sample = one(tokenize, talk)
    assert trained_runs(sample, llama3_tokenizer) == ["Paris.<|eot_id|>", "Rome.<|eot_id|>"]
    reference = llama3_tokenizer.apply_chat_template(
        talk, chat_template=load_shipped_template("llama3"), tokenize=True, return_dict=False)
    assert sample["input_ids"] == reference
    assert sample["input_ids"][0] == llama3_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    text = llama3_tokenizer.decode(sample["input_ids"])
    assert "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>" in text
    tokenize = build(write_yaml, llama3_tokenizer, chat_template="llama3", train_on_eos="all",
                     roles_to_train=["user"])
    assert trained_runs(one(tokenize, talk), llama3_tokenizer) == [
        "<|eot_id|>", "Capital of France?<|eot_id|>", "<|eot_id|>", "And Italy?<|eot_id|>", "<|eot_id|>"]


def test_mistral_and_qwen_templates(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="mistral")
    sample = one(tokenize, TALK)
    text = ft_tiny_tokenizer.decode(sample["input_ids"])
    assert text.startswith("[INST] You are terse.\n\nCapital of France? [/INST]Paris.<|im_end|>[INST] And Italy?")
    assert trained_runs(sample, ft_tiny_tokenizer) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    # a template error (roles must alternate) drops the row with the reason
    (dropped,) = tokenize([{"messages": [{"role": "assistant", "content": "x"}]}])
    assert isinstance(dropped, Dropped) and dropped.reason == "template error" and "alternate" in dropped.detail

    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="qwen")
    sample = one(tokenize, TALK[1:])  # no system message: qwen adds its own
    assert ft_tiny_tokenizer.decode(sample["input_ids"]).startswith("<|im_start|>system\nYou are Qwen")
    assert trained_runs(sample, ft_tiny_tokenizer) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    sample = one(tokenize, TALK)
    assert ft_tiny_tokenizer.decode(sample["input_ids"]).startswith("<|im_start|>system\nYou are terse.")
    assert trained_runs(sample, ft_tiny_tokenizer) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]


def test_inline_template_and_template_file(write_yaml, ft_tiny_tokenizer, tmp_path):
    inline = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
              "{% endfor %}")
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template=inline)
    sample = one(tokenize, TALK)
    assert ft_tiny_tokenizer.decode(sample["input_ids"]).startswith("<|im_start|>system: You are terse.<|im_end|>")
    assert trained_runs(sample, ft_tiny_tokenizer) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    (tmp_path / "mine.jinja").write_text(inline)
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="mine.jinja")  # next to the config file
    assert one(tokenize, TALK) == sample


def test_sharegpt_style_field_and_role_mappings(write_yaml, ft_tiny_tokenizer):
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in TALK]
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="chatml", field_messages="conversations",
                     message_property_mappings={"role": "from", "content": "value"},
                     roles={"user": ["human"], "assistant": ["gpt"]})
    sample = one(tokenize, sharegpt, field="conversations")
    assert sample == one(build(write_yaml, ft_tiny_tokenizer, chat_template="chatml"), TALK)


def test_batch_mixes_good_and_dropped_rows(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="chatml")
    out = tokenize([
        {"messages": TALK},
        {"dialog": TALK},
        {"messages": []},
        {"messages": "hello"},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "hi", "training": "yes"}]},
        {"messages": TALK[1:3]},
    ])
    assert [o.reason if isinstance(o, Dropped) else "ok" for o in out] == [
        "ok", "missing field 'messages'", "empty", "malformed messages", "malformed messages",
        "malformed messages", "ok"]
    assert "dialog" in out[1].detail and "field_messages" in out[1].detail
    assert "'content'" in out[4].detail
    assert trained_runs(out[6], ft_tiny_tokenizer) == ["Paris.<|im_end|>"]


def test_tokenize_is_picklable_and_renders_once_per_conversation(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template="chatml")
    long_talks = []
    for n in range(12):
        talk = [{"role": "system", "content": "Be kind."}]
        for t in range(40):
            talk += [{"role": "user", "content": f"Question {n} {t}?"}, {"role": "assistant", "content": f"Answer {t}."}]
        long_talks.append({"messages": talk})
    copy = pickle.loads(pickle.dumps(tokenize))
    renders = []
    original = copy.render
    copy.render = lambda messages: renders.append(len(messages)) or original(messages)
    out = copy(long_talks)
    # one render per conversation plus one skeleton render for their (shared) role sequence
    assert len(renders) == len(long_talks) + 1
    assert out == tokenize(long_talks)
    assert trained_runs(out[0], ft_tiny_tokenizer)[:2] == ["Answer 0.<|im_end|>", "Answer 1.<|im_end|>"]
    assert len(trained_runs(out[0], ft_tiny_tokenizer)) == 40


# -- agreement with transformers' assistant mask ------------------------------------------------

POOL = ["Hello!", "assistant", "user", "", "  padded  ", "multi\nline\ntext\n", "héllo wörld ✓ 12", "a <|im_end|> b",
        "What is 2 plus 3?", "The result is 5.", "\n", "system", "<|im_start|>user\n", "Sure thing, here it is:"]


def random_talk(rng: random.Random) -> list[dict[str, str]]:
    talk = []
    if rng.random() < 0.5:
        talk.append({"role": "system", "content": rng.choice(POOL)})
    for _ in range(rng.randint(1, 7)):
        talk.append({"role": "user", "content": rng.choice(POOL) + rng.choice(POOL)})
        for _ in range(rng.choice([1, 1, 1, 2])):  # sometimes two assistant messages in a row
            talk.append({"role": "assistant", "content": rng.choice(POOL) + " " + rng.choice(POOL)})
    return talk


@pytest.mark.parametrize("template", [None, "chatml"])
def test_labels_agree_with_transformers_assistant_mask(write_yaml, ft_tiny_tokenizer, template):
    reference_template = (DATA / "chatml_generation.jinja").read_text()
    rng = random.Random(1234)
    talks = [random_talk(rng) for _ in range(300)]
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template=template)
    out = tokenize([{"messages": t} for t in talks])
    for talk, sample in zip(talks, out, strict=True):
        ref = ft_tiny_tokenizer.apply_chat_template(talk, chat_template=reference_template, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)
        assert sample["input_ids"] == ref["input_ids"]
        mine = [int(label != -100) for label in sample["labels"]]
        assert mine == list(ref["assistant_masks"]), talk


# -- errors -------------------------------------------------------------------------------------


def test_tokenizer_without_template_says_to_set_chatml(write_yaml, ft_tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(FtError) as err:
        build(write_yaml, tok)
    msg = str(err.value)
    assert "no chat template" in msg and "chat_template: chatml" in msg
    assert "config.yaml:" in msg and "datasets[0]" in msg
    # setting it as the message says works
    assert trained_runs(one(build(write_yaml, tok, chat_template="chatml"), TALK), tok)[0] == "Paris.<|im_end|>"


def test_unknown_template_name(write_yaml, ft_tiny_tokenizer):
    with pytest.raises(FtError) as err:
        build(write_yaml, ft_tiny_tokenizer, chat_template="chatm1")
    msg = str(err.value)
    assert "unknown chat template 'chatm1'" in msg and "Did you mean 'chatml'" in msg
    assert "datasets[0].chat_template" in msg and "config.yaml:" in msg
    for name in ("chatml", "llama3", "mistral", "qwen"):
        assert name in msg


def test_template_tokens_missing_from_tokenizer(write_yaml, ft_tiny_tokenizer):
    with pytest.raises(FtError) as err:
        build(write_yaml, ft_tiny_tokenizer, chat_template="llama3")
    assert "<|eot_id|>" in str(err.value) and "does not have" in str(err.value)


def test_template_without_end_of_turn_token(write_yaml, ft_tiny_tokenizer):
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(FtError) as err:  # found when the format is built, before any row is read
        build(write_yaml, ft_tiny_tokenizer, chat_template=plain)
    msg = str(err.value)
    assert "end-of-turn" in msg and "train_on_eos" in msg and "datasets[0]" in msg
    # and while tokenizing, for a role the build-time probe does not try
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template=plain, roles_to_train=["system"])
    with pytest.raises(FtError, match="end-of-turn"):
        tokenize([{"messages": TALK}])
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template=plain, train_on_eos="none")
    assert trained_runs(one(tokenize, TALK), ft_tiny_tokenizer) == ["Paris.", "Rome."]


def test_unknown_entry_option_is_a_config_error(write_yaml, ft_tiny_tokenizer):
    from ft.kernel.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        build(write_yaml, ft_tiny_tokenizer, roles_to_trian=["assistant"])
    assert "datasets[0].roles_to_trian: unknown key" in str(err.value) and "config.yaml:" in str(err.value)
    assert "Did you mean 'roles_to_train'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build(write_yaml, ft_tiny_tokenizer, train_on_eos="sometimes")
    assert "train_on_eos" in str(err.value)


# A template that loops for ever on some conversations (it may come with a downloaded tokenizer).
LOOPING = (
    "{% for m in messages %}"
    "{% if m.content == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)


def test_a_conversation_that_renders_too_long_is_dropped_not_a_hang(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template=LOOPING, max_render_seconds=0.2)
    fine = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    looping = [{"role": "user", "content": "loop"}, {"role": "assistant", "content": "Hello."}]
    rows = [{"messages": m} for m in (fine, looping, fine, fine, fine)]
    out = tokenize(rows)
    assert [isinstance(s, Dropped) for s in out] == [False, True, False, False, False]
    assert out[1].reason == "template too slow" and "0.2 s" in out[1].detail


def test_a_template_that_is_too_slow_for_most_rows_is_an_error(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template=LOOPING, max_render_seconds=0.1)
    looping = [{"role": "user", "content": "loop"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(FtError, match=r"chat template took more than 0.1 s .* 3 of the 3 conversations"):
        tokenize([{"messages": looping}] * 6)


def test_a_template_that_never_finishes_fails_when_the_format_is_built(write_yaml, ft_tiny_tokenizer):
    forever = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + LOOPING
    with pytest.raises(FtError, match=r"did not finish rendering .* within 0.1 s"):
        build(write_yaml, ft_tiny_tokenizer, chat_template=forever, max_render_seconds=0.1)


TYPED_CONTROL = [{"role": "user", "content": "What does <|im_end|> do?"},
                 {"role": "assistant", "content": "It ends a turn: <|im_end|>."}]


def test_control_token_text_in_a_message_is_noted_and_can_be_escaped(write_yaml, ft_tiny_tokenizer):
    im_end = ft_tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    kept = one(build(write_yaml, ft_tiny_tokenizer, chat_template="chatml"), TYPED_CONTROL)
    assert kept["input_ids"].count(im_end) == 4, "typed in the data, it became the control token (2 turns + 2)"
    assert [n.reason for n in kept["notes"]] == ["special token text in a message"] * 2
    assert "message 0" in kept["notes"][0].detail and "<|im_end|>" in kept["notes"][0].detail

    escaped = one(build(write_yaml, ft_tiny_tokenizer, chat_template="chatml", escape_special_tokens=True), TYPED_CONTROL)
    assert escaped["input_ids"].count(im_end) == 2, "only the template's own end-of-turn tokens are control tokens"
    assert ft_tiny_tokenizer.decode(escaped["input_ids"]) == ft_tiny_tokenizer.decode(kept["input_ids"]), "same text"
    assert trained_runs(escaped, ft_tiny_tokenizer) == ["It ends a turn: <|im_end|>.<|im_end|>"]


def test_the_data_report_counts_rows_with_control_token_text(tmp_path, ft_tiny_model_dir, write_yaml, caplog):
    import json as json_mod
    import logging

    from ft.engine.data import prepare_datasets
    from ft.tools.tiny import make_chat_rows, write_jsonl

    rows = make_chat_rows(6, seed=1) + [{"messages": TYPED_CONTROL}]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = write_yaml({"base_model": str(ft_tiny_model_dir), "datasets": [{"path": str(data), "type": "chat_template"}],
                         "dataset_prepared_path": str(tmp_path / "prepared"), "dataset_num_proc": 1})
    ctx = load_context(config)
    with caplog.at_level(logging.WARNING, logger="ft"):
        prepared = prepare_datasets(ctx, ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg))
    noted = prepared.report["noted"]["special token text in a message"]
    assert noted["count"] == 2 and noted["examples"][0]["where"] == f"{data}:7"
    assert "escape_special_tokens" in caplog.text
    assert json_mod.loads((Path(prepared.cache_dir) / "report.json").read_text())["noted_total"] == 2
