"""Config loading: every problem at once, with file:line, key path and a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import Plugin
from ft.kernel.config_file import apply_overrides, parse_yaml
from ft.kernel.context import load_context
from ft.kernel.errors import ConfigError, FtError
from ft.kernel.formats import DatasetOptions


class FakeOptions(DatasetOptions):
    roles_to_train: list[str] = Field(default_factory=lambda: ["assistant"], description="Roles.")


class FakeSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0, description="Rank.")
    alpha: int = Field(16, description="Alpha.")


class FakePlugin:
    """Registers a format 'fake' and a feature section 'fakefeat'."""

    PLUGIN = Plugin(feature=True)

    @hookimpl
    def ft_register_formats(self, register):
        register.add("fake", FakeOptions, lambda cfg, entry, tok: None)

    @hookimpl
    def ft_add_config(self, registry):
        registry.add("fakefeat", FakeSection)

    @hookimpl
    def ft_register_optimizers(self, register):
        register.add("fake_adam", "adamw_torch")

    @hookimpl
    def ft_register_schedulers(self, register):
        register.add("fake_const", "constant")


BASE = """\
base_model: tiny
optimizer: fake_adam
lr_scheduler: fake_const
datasets:
  - path: data.jsonl
    type: fake
"""


def ctx_of(text, tmp_path, plugin_args=(), overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    from ft_plugins import sft

    return load_context(path, plugin_args, overrides, entry_points=[],
                        extra_plugins=[("fakefeat", FakePlugin()), ("sft", sft)])


def problems_of(text, tmp_path, **kw):
    with pytest.raises(ConfigError) as info:
        ctx_of(text, tmp_path, **kw)
    return info.value.problems


def test_valid_config_and_defaults(tmp_path):
    ctx = ctx_of(BASE, tmp_path)
    cfg = ctx.cfg
    assert cfg.datasets[0].roles_to_train == ["assistant"] and cfg.datasets[0].type == "fake"
    assert cfg.sequence_len == 2048 and cfg.fakefeat is None and cfg.plugins == []


def test_absent_section_reads_as_its_defaults(tmp_path):
    cfg = ctx_of(BASE, tmp_path, plugin_args=["fakefeat"]).cfg
    assert cfg.fakefeat is None  # not in the YAML
    assert cfg.section("fakefeat") == FakeSection()
    with pytest.raises(FtError, match="cfg.section\\('no_such_section'\\): no plugin or method named"):
        cfg.section("no_such_section")  # issue 22: a typo was None, read as "section absent"
    cfg = ctx_of(BASE + "fakefeat:\n  r: 4\n", tmp_path, plugin_args=["fakefeat"]).cfg
    assert cfg.section("fakefeat").r == 4


def test_typo_top_level_key_has_line_and_suggestion(tmp_path):
    problems = problems_of(BASE + "micro_bach_size: 4\n", tmp_path)
    assert len(problems) == 1
    assert problems[0].endswith("c.yaml:7: micro_bach_size: unknown key. Did you mean 'micro_batch_size'?")


def test_typo_in_dataset_entry_uses_the_format_options(tmp_path):
    text = BASE + "    roles_to_trian: [assistant]\n"
    (problem,) = problems_of(text, tmp_path)
    assert "c.yaml:7: datasets[0].roles_to_trian: unknown key. Did you mean 'roles_to_train'?" in problem


def test_all_problems_reported_at_once(tmp_path):
    text = BASE + "sequence_len: -5\nlearning_rat: 0.1\nmicro_batch_size: many\n"
    problems = problems_of(text, tmp_path)
    assert len(problems) == 3, problems
    assert [int(p.split("c.yaml:")[1].split(":")[0]) for p in problems] == [7, 8, 9]  # in file order
    joined = "\n".join(problems)
    assert "c.yaml:7: sequence_len:" in joined and "greater than 0" in joined and "(got -5)" in joined
    assert "c.yaml:8: learning_rat: unknown key. Did you mean 'learning_rate'?" in joined
    assert "c.yaml:9: micro_batch_size:" in joined and "'many'" in joined


def test_unknown_dataset_type_suggests(tmp_path):
    (problem,) = problems_of(BASE.replace("type: fake", "type: fak"), tmp_path)
    assert "c.yaml:6: datasets[0].type: unknown dataset type 'fak'. Did you mean 'fake'?" in problem


def test_unknown_optimizer_suggests_with_line(tmp_path):
    (problem,) = problems_of(BASE.replace("fake_adam", "fake_adm"), tmp_path)
    assert "c.yaml:2: optimizer: unknown optimizer 'fake_adm'. Did you mean 'fake_adam'?" in problem


def test_section_for_unselected_feature(tmp_path):
    text = BASE + "fakefeat:\n  r: 4\n"
    (problem,) = problems_of(text, tmp_path)
    assert "c.yaml:7: fakefeat: section 'fakefeat' configures plugin 'fakefeat', which is not selected" in problem
    assert "plugins: [fakefeat]" in problem and "-p fakefeat" in problem
    cfg = ctx_of(text, tmp_path, plugin_args=["fakefeat"]).cfg
    assert cfg.fakefeat.r == 4 and cfg.plugins == ["fakefeat"]
    cfg = ctx_of("plugins: [fakefeat]\n" + text, tmp_path).cfg
    assert cfg.fakefeat.alpha == 16


def test_plugin_section_errors_have_paths(tmp_path):
    text = "plugins: [fakefeat]\n" + BASE + "fakefeat:\n  r: 0\n  alpah: 3\n"
    problems = problems_of(text, tmp_path)
    joined = "\n".join(problems)
    assert "c.yaml:9: fakefeat.r:" in joined and "greater than 0" in joined
    assert "c.yaml:10: fakefeat.alpah: unknown key. Did you mean 'alpha'?" in joined


def test_duplicate_keys_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="c.yaml:3: seed: duplicate key \\(first at line 1\\)"):
        parse_yaml("seed: 1\nbase_model: x\nseed: 2\n", "c.yaml")
    with pytest.raises(ConfigError, match="c.yaml:2: invalid YAML"):
        parse_yaml("a: [1, 2\nb: 3\n", "c.yaml")


def test_yaml_is_loaded_safely():
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_yaml("base_model: !!python/object/apply:os.system ['echo hi']\n", "c.yaml")


def test_set_overrides(tmp_path):
    ctx = ctx_of(BASE, tmp_path, plugin_args=["fakefeat"],
                 overrides=["fakefeat.r=32", "micro_batch_size=4", "datasets.0.roles_to_train=[user]", "bf16=false"])
    cfg = ctx.cfg
    assert cfg.fakefeat.r == 32 and cfg.micro_batch_size == 4 and cfg.bf16 is False
    assert cfg.datasets[0].roles_to_train == ["user"]
    with pytest.raises(FtError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(FtError, match="out of range"):
        apply_overrides({"datasets": []}, ["datasets.3.path=x"])


def test_missing_required_keys(tmp_path):
    problems = problems_of("seed: 1\n", tmp_path)
    joined = "\n".join(problems)
    assert "base_model: required key is missing." in joined and "datasets: required key is missing." in joined


def test_secrets_are_redacted(tmp_path):
    cfg = ctx_of(BASE + "special_tokens:\n  pad_token: '<pad>'\n", tmp_path).cfg
    data = cfg.to_saveable()
    assert data["special_tokens"] == {"pad_token": "<pad>"}
    from ft.kernel.redact import redact

    assert redact({"wandb": {"api_key": "abc"}, "hub_token": "t"}) == {"wandb": {"api_key": "***"}, "hub_token": "***"}


@pytest.mark.parametrize(("saved", "written"), [
    # secrets: any key with a secret word, whatever else its name says
    ({"openai_api_key": "sk-1"}, {"openai_api_key": "***"}),
    ({"api_token": "t-2"}, {"api_token": "***"}),
    ({"github_token": "ghp_3"}, {"github_token": "***"}),
    ({"hfToken": "hf_4"}, {"hfToken": "***"}),
    ({"db_password": "p", "client_secret": "s", "aws_secret_access_key": "k", "apikey": "a"},
     {"db_password": "***", "client_secret": "***", "aws_secret_access_key": "***", "apikey": "***"}),
    ({"credentials": {"user": "me", "pass": "p"}}, {"credentials": {"user": "***", "pass": "***"}}),
    ({"api_keys_in_list": ["k1"], "hub_token": ["t1", "t2"]}, {"api_keys_in_list": ["k1"], "hub_token": ["***", "***"]}),
    # not secrets: token lists and names, counts, flags, empty values, words that only contain "key"
    ({"tokenizer": "gpt2", "tokens": ["<a>"], "eot_tokens": ["<|im_end|>"]},
     {"tokenizer": "gpt2", "tokens": ["<a>"], "eot_tokens": ["<|im_end|>"]}),
    ({"special_tokens": {"pad_token": "<pad>", "eos_token": "</s>"}},
     {"special_tokens": {"pad_token": "<pad>", "eos_token": "</s>"}}),
    ({"max_tokens": 512, "key_count": 3, "use_auth_token": True, "api_key": ""},
     {"max_tokens": 512, "key_count": 3, "use_auth_token": True, "api_key": ""}),
    ({"pad_token": "<pad>", "monkey": "banana", "keys": ["instruction", "output"]},
     {"pad_token": "<pad>", "monkey": "banana", "keys": ["instruction", "output"]}),
    # credentials in URLs, wherever they are
    ({"path": "https://user:SECRET@host/data.jsonl"}, {"path": "https://user:***@host/data.jsonl"}),
    ({"base_model": "https://ghp_abc@github.com/org/repo"}, {"base_model": "https://***@github.com/org/repo"}),
    ({"datasets": [{"path": "s3://key:secret@bucket/x.jsonl"}]}, {"datasets": [{"path": "s3://key:***@bucket/x.jsonl"}]}),
    ({"path": "s3://bucket/data.jsonl", "note": "mail a@b.c"}, {"path": "s3://bucket/data.jsonl", "note": "mail a@b.c"}),
])
def test_secrets_are_redacted_by_pattern(saved, written):
    from ft.kernel.redact import redact

    assert redact(saved) == written


@pytest.mark.parametrize(("text", "written"), [
    # tokens in a URL's query string (signed URLs, API keys)
    ("https://host/data.jsonl?access_token=tok-1", "https://host/data.jsonl?access_token=***"),
    ("https://host/d.jsonl?x=1&token=tok-2#frag", "https://host/d.jsonl?x=1&token=***#frag"),
    ("https://acct.blob.core.windows.net/c/d.jsonl?sv=2022&se=2026&sig=abc%2Fdef%3D",
     "https://acct.blob.core.windows.net/c/d.jsonl?sv=2022&se=2026&sig=***"),
    ("https://b.s3.amazonaws.com/d.jsonl?X-Amz-Credential=AKIA1&X-Amz-Signature=f00d&X-Amz-Date=20260101",
     "https://b.s3.amazonaws.com/d.jsonl?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=20260101"),
    ("https://api.example/v1?key=k-3&api_key=k-4&apikey=k-5&signature=s-6&client_secret=s-7&password=p-8",
     "https://api.example/v1?key=***&api_key=***&apikey=***&signature=***&client_secret=***&password=***"),
    ("see https://host/x?token=tok-9 and more", "see https://host/x?token=*** and more"),
    ("https://u:pw@host/x?token=t", "https://u:***@host/x?token=***"),
    # authorization header values
    ("Authorization: Bearer eyJhbGciOi.abc-def_1", "Authorization: Bearer ***"),
    ("authorization=Basic dXNlcjpwYXNz", "authorization=Basic ***"),
    ("Authorization: ghp_raw", "Authorization: ***"),
    ("Bearer xyz", "Bearer ***"),
    ("token: bearer abc.def-1", "token: bearer ***"),
    ("curl -H 'Authorization: Bearer t0k' https://h", "curl -H 'Authorization: Bearer ***' https://h"),
    # not secrets: ordinary query values and words
    ("https://host/d.jsonl?split=train&revision=main", "https://host/d.jsonl?split=train&revision=main"),
    ("https://host/search?q=token&keyword=x", "https://host/search?q=token&keyword=x"),
    ("a bearer of good news", "a bearer of good news"),
    ("max tokens=512", "max tokens=512"),
])
def test_tokens_in_query_strings_and_authorization_values_are_redacted(text, written):
    from ft.kernel.redact import redact, redact_text

    assert redact_text(text) == written
    assert redact({"path": text}) == {"path": written}


def test_the_cache_key_sees_a_secret_but_its_key_json_does_not(tmp_path):
    """The key is a hash of the real inputs (another token may read other data); key.json, written for people
    to read, is redacted."""
    import datasets

    from ft.engine.cache import store

    inputs = {"entries": {"datasets": [{"entry": {"path": "https://h.invalid/d.jsonl?sig=sig-1d1d1d",
                                                  "headers": {"Authorization": "Bearer tok-2e2e2e"}}}]}}
    path = store(tmp_path, "k1", inputs, datasets.Dataset.from_dict({"input_ids": [[1, 2]]}), None, {}, {})
    text = (Path(path) / "key.json").read_text()
    assert "sig-1d1d1d" not in text and "tok-2e2e2e" not in text
    assert "d.jsonl?sig=***" in text


def test_an_authorization_header_mapping_is_redacted():
    from ft.kernel.redact import redact

    saved = {"headers": {"Authorization": "Bearer t-1", "Proxy-Authorization": "Basic b-2", "Accept": "text/plain"}}
    assert redact(saved) == {"headers": {"Authorization": "***", "Proxy-Authorization": "***", "Accept": "text/plain"}}


def test_validate_cli_prints_effective_batch_and_selection(tmp_path):
    from ft.cli import cli
    from ft.kernel.plugins import add_process_plugin, remove_process_plugin

    path = tmp_path / "c.yaml"
    (tmp_path / "data.jsonl").write_text("")  # validate checks that local dataset files exist
    path.write_text("plugins: [fakefeat]\n" + BASE + "micro_batch_size: 4\ngradient_accumulation_steps: 8\n")
    add_process_plugin("fakefeat", FakePlugin())
    try:
        res = CliRunner().invoke(cli, ["validate", str(path), "--nproc", "2"])
        assert res.exit_code == 0, res.output
        assert "effective batch size: 64 (micro_batch_size 4 x gradient_accumulation_steps 8 x 2 process(es))" in res.output
        assert "selected features: fakefeat" in res.output
        path.write_text(BASE + "micro_bach_size: 4\n")
        res = CliRunner().invoke(cli, ["validate", str(path)])
        assert res.exit_code == 2
        assert "micro_bach_size: unknown key. Did you mean 'micro_batch_size'?" in res.output
    finally:
        remove_process_plugin("fakefeat")


# -- values that pass the types but fail later: caught by `ft validate`, with file:line ------------------

REAL = """\
base_model: tiny
datasets:
  - path: data.jsonl
    type: chat_template
"""


def real_problems(tmp_path, text: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(REAL + text)
    with pytest.raises(ConfigError) as info:
        load_context(path)
    return info.value.problems


@pytest.mark.parametrize(("text", "line", "says"), [
    ("seed: -1\n", 5, "seed: Input should be greater than or equal to 0"),
    ("seed: 1099511627776\n", 5, "seed: Input should be less than or equal to 4294967295"),
    ("micro_batch_size: 1.0e+18\n", 5, "micro_batch_size: Input should be less than or equal to 2147483647"),
    ("gradient_accumulation_steps: 1.0e+15\n", 5, "gradient_accumulation_steps: Input should be less than"),
    ("fp16: true\n", 5, "fp16: fp16 mixed precision needs a CUDA GPU"),
    ("special_tokens:\n  pad_token: '<pad>'\n  padding_token: '<p>'\n", 7,
     "special_tokens.padding_token: unknown special token name 'padding_token'"),
])
def test_values_that_would_fail_later_fail_validation_with_file_and_line(tmp_path, text, line, says):
    problems = real_problems(tmp_path, text)
    assert any(p.startswith(f"{tmp_path / 'c.yaml'}:{line}: {says}") for p in problems), problems


def test_bf16_on_a_gpu_without_it_fails_validation(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    problems = real_problems(tmp_path, "bf16: true\n")
    assert any(p.startswith(f"{tmp_path / 'c.yaml'}:5: bf16: this GPU has no bf16 support") for p in problems)


def test_warmup_longer_than_the_run_is_a_warning_of_ft_validate(tmp_path):
    from ft.cli import cli

    path = tmp_path / "c.yaml"
    (tmp_path / "data.jsonl").write_text("")
    path.write_text(REAL + "max_steps: 10\nwarmup_steps: 50\n")
    res = CliRunner().invoke(cli, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert (f"warning: {path}:6: warmup_steps: 50 warmup steps but max_steps is 10: the learning rate never "
            "reaches learning_rate") in res.output, res.output
