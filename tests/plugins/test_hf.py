"""The hf plugin: tokenizer (pad token, special and added tokens), model kwargs and loading."""

from __future__ import annotations

import logging

import pytest

from ft import hookimpl
from ft.kernel.context import load_context
from ft.kernel.errors import ConfigError, FtError
from ft.kernel.formats import DatasetOptions


class HandFormat:
    """A dataset type for these tests, so they do not depend on the format plugins."""

    @hookimpl
    def ft_register_formats(register):
        register.add("hand", DatasetOptions, lambda cfg, entry, tokenizer: None)


def make_ctx(base_model, **overrides):
    config = {"base_model": str(base_model), "datasets": [{"path": "rows.jsonl", "type": "hand"}], **overrides}
    return load_context(config, extra_plugins=[("hand_format", HandFormat)])


def load_tokenizer(ctx):
    return ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg)


def load_model(ctx, tokenizer):
    kwargs = ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg)
    return ctx.pm.call("ft_load_model", cfg=ctx.cfg, kwargs=kwargs, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tokenizer_without_spares(tmp_path_factory):
    """A tokenizer with no pad token and no reserved/unused special tokens: eos must pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<eos>", "<bos>", "hello", "world", "again", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", unk_token="[UNK]")
    out = tmp_path_factory.mktemp("tok-no-spares")
    fast.save_pretrained(out)
    return out


# -- pad token -----------------------------------------------------------------------------------


def test_missing_pad_token_uses_a_reserved_special_token_not_eos(ft_tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="ft")
    tok = load_tokenizer(make_ctx(ft_tiny_model_dir))
    assert tok.pad_token == "<|reserved_0|>"
    assert tok.pad_token != tok.eos_token
    assert "pad token: <|reserved_0|>" in caplog.text and "reserved" in caplog.text


def test_tokenizer_own_pad_token_is_kept(tmp_path, caplog):
    from ft.tools.tiny import make_tokenizer

    make_tokenizer(tmp_path, pad_token="<|endoftext|>")
    caplog.set_level(logging.INFO, logger="ft")
    tok = load_tokenizer(make_ctx(tmp_path))
    assert tok.pad_token == "<|endoftext|>"
    assert "the tokenizer's own" in caplog.text


def test_without_spare_tokens_eos_pads_and_says_so(tokenizer_without_spares, caplog):
    caplog.set_level(logging.INFO, logger="ft")
    tok = load_tokenizer(make_ctx(tokenizer_without_spares))
    assert tok.pad_token == "<eos>" == tok.eos_token
    assert "= eos" in caplog.text


def test_eos_stays_trained_when_eos_is_the_pad_token(tokenizer_without_spares):
    """Labels are built before padding: the real EOS keeps its label, padding (same id) does not."""
    ctx = make_ctx(tokenizer_without_spares)
    tok = load_tokenizer(ctx)
    collate = ctx.method.collator(ctx.cfg, tok)  # the sft method's padding collator (no ft_collator plugin is active)
    eos = tok.eos_token_id
    short = tok("hello")["input_ids"] + [eos]
    long = tok("hello world again")["input_ids"] + [eos]
    batch = collate([{"input_ids": short, "labels": [-100] + short[1:]}, {"input_ids": long, "labels": long}])
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    assert ids.tolist().count(eos) == 1 + (len(long) - len(short))  # the pad positions hold eos too
    assert labels[len(short) - 1].item() == eos  # the real EOS is trained
    assert (labels[len(short):] == -100).all() and (mask[len(short):] == 0).all()


def test_special_tokens_section_sets_pad_and_resizes_embeddings(ft_tiny_model_dir):
    ctx = make_ctx(ft_tiny_model_dir, special_tokens={"pad_token": "<|pad|>"}, tokens=["<tool>", "</tool>"])
    tok = load_tokenizer(ctx)
    assert tok.pad_token == "<|pad|>"
    assert len(tok) == 512 + 3
    assert tok.convert_tokens_to_ids("<tool>") != tok.unk_token_id
    model = load_model(ctx, tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


def test_unknown_special_token_name_is_a_config_error(ft_tiny_model_dir):
    with pytest.raises(ConfigError, match=r"special_tokens\.pad: unknown special token name 'pad'"):
        load_tokenizer(make_ctx(ft_tiny_model_dir, special_tokens={"pad": "<|pad|>"}))


# -- model kwargs and loading --------------------------------------------------------------------


def test_bf16_auto_on_cpu_loads_fp32_and_only_safetensors(ft_tiny_model_dir):
    import torch

    ctx = make_ctx(ft_tiny_model_dir)  # bf16 defaults to auto
    kwargs = ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg)
    assert kwargs["dtype"] == torch.float32
    assert kwargs["use_safetensors"] is True
    assert kwargs["trust_remote_code"] is False
    assert kwargs["attn_implementation"] == "sdpa"
    model = load_model(ctx, load_tokenizer(ctx))
    assert next(model.parameters()).dtype == torch.float32


def test_hf_section_options_reach_from_pretrained(ft_tiny_model_dir):
    ctx = make_ctx(ft_tiny_model_dir, hf={"allow_pickle": True, "attn_implementation": "eager", "revision": "v1"})
    kwargs = ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg)
    assert "use_safetensors" not in kwargs
    assert kwargs["attn_implementation"] == "eager" and kwargs["revision"] == "v1"


def test_pickle_only_checkpoint_is_refused_with_the_fix(ft_tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(ft_tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    ctx = make_ctx(pickled)
    with pytest.raises(FtError, match="allow_pickle: true"):
        load_model(ctx, load_tokenizer(ctx))
    trusted = make_ctx(pickled, hf={"allow_pickle": True})
    assert load_model(trusted, load_tokenizer(trusted)) is not None


def test_missing_model_directory_names_the_key(tmp_path):
    ctx = make_ctx(tmp_path / "no-such-model")
    with pytest.raises(FtError, match=r"base_model: could not load the tokenizer from .*no-such-model"):
        load_tokenizer(ctx)


def test_gradient_checkpointing_and_its_kwargs_pass_through(ft_tiny_model_dir):
    ctx = make_ctx(ft_tiny_model_dir, gradient_checkpointing=True,
                   gradient_checkpointing_kwargs={"use_reentrant": False})
    model = load_model(ctx, load_tokenizer(ctx))
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing
    assert model.config.use_cache is False


def test_generation_stops_at_the_tokenizer_eos(ft_tiny_model_dir):
    ctx = make_ctx(ft_tiny_model_dir)
    tok = load_tokenizer(ctx)
    model = load_model(ctx, tok)
    eos = model.generation_config.eos_token_id
    assert tok.eos_token_id in ([eos] if isinstance(eos, int) else eos)
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_trust_remote_code_says_that_checkpoint_code_runs(ft_tiny_model_dir, caplog, write_yaml):
    config = write_yaml({"base_model": str(ft_tiny_model_dir), "datasets": [{"path": "rows.jsonl", "type": "hand"}],
                         "hf": {"trust_remote_code": True}})
    ctx = load_context(config, extra_plugins=[("hand_format", HandFormat)])
    with caplog.at_level(logging.WARNING, logger="ft"):
        load_model(ctx, load_tokenizer(ctx))
    lines = [r.getMessage() for r in caplog.records if "trust_remote_code" in r.getMessage()]
    assert len(lines) == 2, lines  # the tokenizer's and the model's
    assert all(f"{config}:" in line and str(ft_tiny_model_dir) in line and "runs the Python code shipped" in line
               for line in lines), lines
