"""chat_template options axolotl users rely on: ShareGPT data read as such, unknown roles dropped and
counted, a row's system prompt, tools and reasoning handed to the template, several end-of-turn tokens,
and one chat_template for all datasets."""

from __future__ import annotations

import json

import pytest
from test_formats_chat import TALK, build, one, trained_runs

from ft.kernel.errors import FtError
from ft.kernel.formats import Dropped

SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(messages, names=SHAREGPT_NAMES):
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def test_sharegpt_rows_train_like_openai_rows_with_no_options(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer)
    want = one(tokenize, TALK)
    # {conversations: [{from: human/gpt, value}]}: field, properties and roles by default
    assert one(tokenize, sharegpt(TALK), field="conversations") == want
    # role/content written with ShareGPT's role names (the literal translation of an axolotl config)
    renamed = [{"role": SHAREGPT_NAMES[m["role"]], "content": m["content"]} for m in TALK]
    assert one(tokenize, renamed) == want
    assert trained_runs(want, ft_tiny_tokenizer) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]


def test_unknown_role_drops_the_row_with_the_fix_and_roles_map_it(write_yaml, ft_tiny_tokenizer):
    talk = [*TALK[:2], {"role": "bot", "content": "Paris."}]
    (out,) = build(write_yaml, ft_tiny_tokenizer)([{"messages": talk}])
    assert isinstance(out, Dropped) and out.reason == "unknown role"
    assert "message 2 has role 'bot'" in out.detail and "roles: {assistant: [gpt, bot]}" in out.detail
    mapped = build(write_yaml, ft_tiny_tokenizer, roles={"assistant": ["bot"]})
    assert trained_runs(one(mapped, talk), ft_tiny_tokenizer) == ["Paris.<|im_end|>"]
    # a key given in `roles` replaces that role's defaults; the other roles keep theirs
    (gpt,) = mapped([{"conversations": sharegpt(TALK)}])
    assert isinstance(gpt, Dropped) and "'gpt'" in gpt.detail
    assert isinstance(mapped([{"messages": [{"role": "human", "content": "hi"}, talk[2]]}])[0], dict)


def test_unknown_roles_are_counted_in_the_drop_report(ft_runner, ft_config, ft_dataset):
    rows = [{"conversations": sharegpt(TALK)} for _ in range(5)]
    rows[3]["conversations"][2]["from"] = "narrator"
    data = ft_dataset(rows, name="talks.jsonl")
    config = ft_config(datasets=[{"path": str(data), "type": "chat_template"}])
    result = ft_runner.preprocess(config).assert_ok()
    assert "dropped 1 (unknown role)" in result.log and "talks.jsonl:4" in result.log
    assert "'narrator'" in result.log


def test_system_field_of_the_row_and_dropping_the_system_message(write_yaml, ft_tiny_tokenizer):
    tokenize = build(write_yaml, ft_tiny_tokenizer)
    (out,) = tokenize([{"system": "You are terse.", "messages": TALK[1:]}])
    assert out == one(tokenize, TALK)  # the row's system prompt comes first, untrained
    (kept,) = tokenize([{"system": "Ignored.", "messages": TALK}])  # the conversation has its own
    assert ft_tiny_tokenizer.decode(kept["input_ids"]).startswith("<|im_start|>system\nYou are terse.")
    dropped = build(write_yaml, ft_tiny_tokenizer, drop_system_message=True)
    assert one(dropped, TALK) == one(tokenize, TALK[1:])
    other = build(write_yaml, ft_tiny_tokenizer, field_system="prompt")
    assert one(other, TALK[1:]) == one(tokenize, TALK[1:])
    assert other([{"prompt": "You are terse.", "messages": TALK[1:]}])[0] == one(tokenize, TALK)


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)


def test_tools_reach_the_template_and_are_not_trained(write_yaml, ft_tiny_tokenizer):
    tools = [{"type": "function", "function": {"name": "capital", "parameters": {"type": "object"}}}]
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template=TOOLS_TEMPLATE)
    for given in (tools, json.dumps(tools)):  # a list, or its JSON text
        (out,) = tokenize([{"tools": given, "messages": TALK[1:3]}])
        text = ft_tiny_tokenizer.decode(out["input_ids"])
        assert text.startswith('<|im_start|>system\nTools: [{"type": "function"')
        assert trained_runs(out, ft_tiny_tokenizer) == ["Paris.<|im_end|>"]
    (bad,) = tokenize([{"tools": "not json", "messages": TALK[1:3]}])
    assert isinstance(bad, Dropped) and bad.reason == "malformed messages" and "'tools'" in bad.detail
    off = build(write_yaml, ft_tiny_tokenizer, chat_template=TOOLS_TEMPLATE, field_tools=None)
    (plain,) = off([{"tools": tools, "messages": TALK[1:3]}])
    assert "Tools:" not in ft_tiny_tokenizer.decode(plain["input_ids"])


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n"
    "{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
)


def test_reasoning_is_handed_to_the_template_and_trained_with_the_answer(write_yaml, ft_tiny_tokenizer):
    talk = [TALK[1], {"role": "assistant", "content": "Paris.", "reasoning_content": "France's capital is Paris."}]
    tokenize = build(write_yaml, ft_tiny_tokenizer, chat_template=THINKING_TEMPLATE)
    out = one(tokenize, talk)
    assert trained_runs(out, ft_tiny_tokenizer) == ["France's capital is Paris.\n</think>\n\nParis.<|im_end|>"]
    # the same through a field of another name
    renamed = [talk[0], {"role": "assistant", "content": "Paris.", "thinking": "France's capital is Paris."}]
    other = build(write_yaml, ft_tiny_tokenizer, chat_template=THINKING_TEMPLATE, field_thinking="thinking")
    assert one(other, renamed) == out
    # many conversations: the cached skeleton never carries one row's reasoning into another's
    rows = [{"messages": [TALK[1], {"role": "assistant", "content": f"A{i}.", "reasoning_content": f"R{i} why."}]}
            for i in range(5)]
    assert [trained_runs(s, ft_tiny_tokenizer) for s in tokenize(rows)] == [
        [f"R{i} why.\n</think>\n\nA{i}.<|im_end|>"] for i in range(5)]


MARKER_TEMPLATE = (  # an assistant turn ends with a marker special token, then the real end of turn
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.role == 'assistant' %}<|reserved_1|>{% endif %}<|im_end|>\n{% endfor %}"
)


def test_eot_tokens_say_which_tokens_end_a_turn(write_yaml, ft_tiny_tokenizer):
    default = build(write_yaml, ft_tiny_tokenizer, chat_template=MARKER_TEMPLATE)
    assert trained_runs(one(default, TALK[1:3]), ft_tiny_tokenizer) == ["Paris.<|reserved_1|>"]
    eot = build(write_yaml, ft_tiny_tokenizer, chat_template=MARKER_TEMPLATE, eot_tokens=["<|im_end|>"])
    assert trained_runs(one(eot, TALK[1:3]), ft_tiny_tokenizer) == ["Paris.<|reserved_1|><|im_end|>"]
    # several: whichever comes first ends the turn
    both = build(write_yaml, ft_tiny_tokenizer, chat_template="chatml", eot_tokens=["<|reserved_0|>", "<|im_end|>"],
                 train_on_eos="all")
    assert trained_runs(one(both, TALK), ft_tiny_tokenizer) == [
        "<|im_end|>", "<|im_end|>", "Paris.<|im_end|>", "<|im_end|>", "Rome.<|im_end|>"]
    with pytest.raises(FtError, match=r"eot_tokens: '<\|eot_id\|>' is not a token of this tokenizer"):
        build(write_yaml, ft_tiny_tokenizer, chat_template="chatml", eot_tokens=["<|eot_id|>"])
    with pytest.raises(FtError, match="none of eot_tokens"):
        build(write_yaml, ft_tiny_tokenizer, chat_template="chatml", eot_tokens=["<|reserved_0|>"])


def test_top_level_chat_template_is_the_default_of_every_entry(write_yaml, ft_tiny_tokenizer):
    inline = "{% for m in messages %}[{{ m.role }}] {{ m.content }}<|im_end|>{% endfor %}"
    tokenize = build(write_yaml, ft_tiny_tokenizer, top={"chat_template": inline})
    assert ft_tiny_tokenizer.decode(one(tokenize, TALK[1:3])["input_ids"]) == \
        "[user] Capital of France?<|im_end|>[assistant] Paris.<|im_end|>"
    own = build(write_yaml, ft_tiny_tokenizer, top={"chat_template": inline}, chat_template="chatml")
    assert ft_tiny_tokenizer.decode(one(own, TALK[1:3])["input_ids"]).startswith("<|im_start|>user")
    with pytest.raises(FtError, match=r"config.yaml:\d+: chat_template: unknown chat template 'chatmll'"):
        build(write_yaml, ft_tiny_tokenizer, top={"chat_template": "chatmll"})
