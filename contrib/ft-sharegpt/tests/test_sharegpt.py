"""`type: sharegpt` gives the labels of the same talks in OpenAI format through chat_template.

Uses the fixtures of ``ft.tools.testing`` (installed with ft): ``ft_tiny_model_dir``, ``ft_tiny_tokenizer``,
``ft_dataset``, ``ft_config``, ``ft_runner``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
ShareGPTOptions = pytest.importorskip("ft_sharegpt", reason="pip install ./contrib/ft-sharegpt").ShareGPTOptions

from ft.kernel.context import load_context  # noqa: E402
from ft.kernel.formats import Dropped  # noqa: E402
from ft.tools.tiny import make_chat_rows  # noqa: E402

TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def to_sharegpt(row: dict, roles: dict[str, str] = TO_SHAREGPT) -> dict:
    return {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in row["messages"]]}


def tokenize(model_dir, entry: dict, rows: list[dict], **config) -> list:
    """Rows through the format registered for ``entry['type']``, as ft's data path calls it."""
    from transformers import AutoTokenizer

    ctx = load_context({"base_model": str(model_dir), "datasets": [{"path": "unused.jsonl", **entry}], **config})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fmt = ctx.formats.get(entry["type"])
    return fmt.value.build(ctx.cfg, ctx.cfg.datasets[0], tokenizer)(rows)


@pytest.fixture(scope="module")
def talks():
    rows = make_chat_rows(24, seed=3, max_turns=3)
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    return rows


def test_registered_by_this_distribution(ft_tiny_model_dir):
    ctx = load_context({"base_model": str(ft_tiny_model_dir), "datasets": [{"path": "x.jsonl", "type": "sharegpt"}]})
    assert ctx.formats.get("sharegpt").plugin == "sharegpt"
    assert ctx.pm.infos["sharegpt"].distribution == "ft-sharegpt"
    entry = ctx.cfg.datasets[0]
    assert entry.field_messages == "conversations"
    assert entry.message_property_mappings == {"role": "from", "content": "value"}
    assert entry.roles == {"system": ["system"], "user": ["human"], "assistant": ["gpt"]}


@pytest.mark.parametrize("options", [
    {},
    {"roles_to_train": ["assistant", "user"]},
    {"train_on_eos": "all"},
    {"train_on_eos": "last"},
    {"chat_template": "chatml"},
    {"train_on_inputs": True},
])
def test_same_labels_as_openai_format(ft_tiny_model_dir, talks, options):
    want = tokenize(ft_tiny_model_dir, {"type": "chat_template", **options}, talks)
    got = tokenize(ft_tiny_model_dir, {"type": "sharegpt", **options}, [to_sharegpt(r) for r in talks])
    assert got == want
    assert all(isinstance(s, dict) for s in got)
    assert any(label != -100 for s in got for label in s["labels"])
    if not options:  # role headers are never trained; assistant contents are
        assert any(label == -100 for s in got for label in s["labels"])


def test_unknown_role_is_dropped_with_a_reason_and_the_fix(ft_tiny_model_dir, talks):
    rows = [to_sharegpt(r) for r in talks[:3]]
    rows[1]["conversations"][-1]["from"] = "bing"
    out = tokenize(ft_tiny_model_dir, {"type": "sharegpt"}, rows)
    assert isinstance(out[1], Dropped) and out[1].reason == "unknown role"
    assert "message" in out[1].detail and "'bing'" in out[1].detail and "{assistant: [gpt, bing]}" in out[1].detail
    assert isinstance(out[0], dict) and isinstance(out[2], dict)
    # mapping the role fixes it: the other default roles are kept
    fixed = tokenize(ft_tiny_model_dir, {"type": "sharegpt", "roles": {"assistant": ["gpt", "bing"]}}, rows)
    want = tokenize(ft_tiny_model_dir, {"type": "chat_template"}, talks[:3])
    assert fixed == want
    # an unknown role is never rendered as it is: strict_roles: false is refused with the fix
    from ft.kernel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"strict_roles.*never rendered as they are.*roles: \{assistant"):
        tokenize(ft_tiny_model_dir, {"type": "sharegpt", "strict_roles": False}, rows)


def test_other_field_names(ft_tiny_model_dir, talks):
    rows = [{"talk": [{"speaker": m["from"], "value": m["value"]} for m in to_sharegpt(r)["conversations"]]}
            for r in talks[:4]]
    entry = {"type": "sharegpt", "field_messages": "talk", "message_property_mappings": {"role": "speaker"}}
    assert tokenize(ft_tiny_model_dir, entry, rows) == tokenize(ft_tiny_model_dir, {"type": "chat_template"}, talks[:4])


def test_options_merge_with_the_defaults():
    opts = ShareGPTOptions(path="x", type="sharegpt", roles={"user": ["human", "user"]},
                           message_property_mappings={"content": "text"})
    assert opts.roles == {"system": ["system"], "user": ["human", "user"], "assistant": ["gpt"]}
    assert opts.message_property_mappings == {"role": "from", "content": "text"}


def test_preprocess_reports_drops_and_config_errors(ft_runner, ft_config, ft_dataset, talks):
    rows = [to_sharegpt(r) for r in talks[:6]]
    rows[2]["conversations"][0]["from"] = "narrator"
    data = ft_dataset(rows, name="talks.jsonl")
    config = ft_config(datasets=[{"path": str(data), "type": "sharegpt"}])
    result = ft_runner.preprocess(config).assert_ok()
    assert "unknown role" in result.log and "talks.jsonl:3" in result.log
    strict = ft_runner.preprocess(config, "--set", "strict=true")
    strict.assert_error("unknown role", "talks.jsonl:3")
    typo = ft_config(name="typo.yaml", datasets=[{"path": str(data), "type": "sharegpt", "strict_role": False}])
    ft_runner.validate(typo).assert_error("datasets[0].strict_role", "Did you mean 'strict_roles'?")
