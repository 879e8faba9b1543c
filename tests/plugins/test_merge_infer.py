"""`ft merge` and `ft infer` on saved runs: merged logits match the adapter's, text comes out."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from ft.kernel.errors import FtError

PROMPT = "What is 2 plus 3?"


@pytest.fixture(scope="module")
def lora_run(ft_tiny_model_dir, tmp_path_factory):
    """The output directory of a short `ft run` with the lora plugin (adapter + tokenizer + config)."""
    from ft.run import run
    from ft.tools.testing import write_config
    from ft.tools.tiny import make_chat_rows, write_jsonl

    root = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(root / "chat.jsonl", make_chat_rows(32))
    config = write_config(
        root / "config.yaml", base_model=ft_tiny_model_dir, dataset=data, plugins=["lora"], max_steps=4,
        learning_rate=1e-2, lr_scheduler="constant", lora={"r": 8, "alpha": 16, "dropout": 0.0},
    )
    run(config)
    return root / "out"


def prompt_ids(tokenizer):
    from ft_plugins.infer import _prompt_inputs

    return _prompt_inputs(tokenizer, [{"role": "user", "content": PROMPT}])["input_ids"]


def relative_difference(a, b) -> float:
    """max |a - b| / max |b|: the largest deviation, relative to the size of the logits."""
    return float((a - b).abs().max() / b.abs().max())


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# -- (c) merge --------------------------------------------------------------------------------


def test_merged_logits_match_the_adapter_model(lora_run, tmp_path, ft_tiny_model_dir):
    from ft_plugins.lora import load_adapter_model
    from transformers import AutoModelForCausalLM

    from ft.tools.testing import FtRunner

    result = FtRunner().invoke("merge", lora_run, "--to", tmp_path / "merged").assert_ok()
    assert f"merged model written to {tmp_path / 'merged'}" in result.output
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "config.json").is_file() and (merged_dir / "model.safetensors").is_file()
    assert (merged_dir / "tokenizer.json").is_file() and not (merged_dir / "adapter_config.json").exists()

    adapter_model, tokenizer = load_adapter_model(lora_run)  # base + adapter, fp32, not merged
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir).eval()
    ids = prompt_ids(tokenizer)
    expected = logits(adapter_model, ids)
    assert relative_difference(logits(merged, ids), expected) < 1e-4
    assert relative_difference(logits(base, ids), expected) > 1e-2  # the adapter did change the model
    assert merged.config.pad_token_id == tokenizer.pad_token_id


def test_merge_defaults_to_a_merged_folder_and_casts_to_the_chosen_dtype(lora_run, tmp_path):
    from ft_plugins.lora import merge_adapter
    from safetensors.torch import load_file

    run_copy = tmp_path / "run"
    shutil.copytree(lora_run, run_copy, ignore=shutil.ignore_patterns("merged"))
    written = merge_adapter(run_copy, dtype="bf16")
    assert written == str(run_copy / "merged")
    weights = load_file(run_copy / "merged" / "model.safetensors")
    assert {str(t.dtype) for t in weights.values()} == {"torch.bfloat16"}


def test_merge_errors(lora_run, tmp_path, ft_tiny_model_dir):
    from ft_plugins.lora import merge_adapter

    from ft.tools.testing import FtRunner

    with pytest.raises(FtError, match="holds no LoRA adapter .adapter_config.json is missing., so there is nothing to "
                                      "merge. It holds a full model already"):
        merge_adapter(ft_tiny_model_dir, tmp_path / "x")
    with pytest.raises(FtError, match="unknown dtype 'int3'; use one of float32, bfloat16, float16"):
        merge_adapter(lora_run, tmp_path / "x", dtype="int3")
    with pytest.raises(FtError, match="merging into the adapter's own directory"):
        merge_adapter(lora_run, lora_run)
    FtRunner().invoke("merge", tmp_path).assert_error("holds no LoRA adapter")


def test_base_model_is_found_from_the_saved_config_when_the_adapter_path_is_stale(lora_run, tmp_path, ft_tiny_model_dir):
    from ft_plugins.lora import base_model_path

    moved = tmp_path / "moved"
    shutil.copytree(lora_run, moved, ignore=shutil.ignore_patterns("merged"))
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/no/longer/here"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    (moved / "ft_config.yaml").write_text(f"base_model: {ft_tiny_model_dir}\n")
    assert base_model_path(moved) == str(ft_tiny_model_dir)

    (moved / "ft_config.yaml").unlink()
    with pytest.raises(FtError, match="is not found at /no/longer/here; edit base_model_name_or_path"):
        base_model_path(moved)


def test_an_unreachable_hub_base_is_one_clear_error(lora_run, tmp_path):
    from ft.tools.testing import FtRunner

    moved = tmp_path / "moved"
    shutil.copytree(lora_run, moved, ignore=shutil.ignore_patterns("merged"))
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someorg/not-a-model"  # a hub id; the tests run offline
    (moved / "adapter_config.json").write_text(json.dumps(config))
    (moved / "ft_config.yaml").unlink()  # else the base_model saved there is used
    FtRunner(env={"HF_HUB_OFFLINE": "1"}).invoke("merge", moved).assert_error(
        "could not load the base model from 'someorg/not-a-model'", "as a hub id it could not be fetched"
    )


def test_qlora_adapter_merges_into_the_dequantized_base(ft_tiny_model_dir, tmp_path, caplog):
    import torch
    from ft_plugins.lora import merge_adapter
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft.kernel.context import load_context

    config = {
        "base_model": str(ft_tiny_model_dir), "datasets": [{"path": "unused.jsonl", "type": "chat_template"}],
        "plugins": ["lora", "qlora"], "bf16": False,
        "lora": {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, "qlora": {"compute_dtype": "float32"},
    }
    ctx = load_context(config)
    kwargs = ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg)
    model = ctx.pm.call("ft_apply_adapter", cfg=ctx.cfg, model=AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, **kwargs))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # as if trained
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path / "qlora-run"
    ctx.pm.call("ft_save_weights", cfg=ctx.cfg, trainer=None, model=model, output_dir=str(out))
    tokenizer = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    tokenizer.save_pretrained(out)

    # What the QLoRA model computes while training: 4-bit weights dequantized to fp32. (In eval
    # mode bitsandbytes' CPU kernel computes in bf16 instead, so the comparison uses train mode.)
    model.train()
    ids = prompt_ids(tokenizer)
    expected = logits(model, ids)

    with caplog.at_level(logging.INFO, logger="ft.lora"):
        merged_dir = merge_adapter(out, tmp_path / "merged")
    assert "QLoRA adapter: merging into the base model dequantized from 4-bit NF4" in caplog.text
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert relative_difference(logits(merged, ids), expected) < 1e-4

    # a quantized layer without an adapter comes out dequantized: near the original, not equal to it
    original = load_file(ft_tiny_model_dir / "model.safetensors")
    merged_weights = load_file(f"{merged_dir}/model.safetensors")
    k_proj = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(merged_weights[k_proj], original[k_proj])
    assert relative_difference(merged_weights[k_proj], original[k_proj]) < 0.25
    assert torch.equal(merged_weights["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def test_merge_with_added_tokens_resizes_the_base(ft_tiny_model_dir, tmp_path):
    import torch
    from ft_plugins.lora import load_adapter_model, merge_adapter
    from transformers import AutoModelForCausalLM

    from ft.kernel.context import load_context

    config = {
        "base_model": str(ft_tiny_model_dir), "datasets": [{"path": "unused.jsonl", "type": "chat_template"}],
        "plugins": ["lora"], "bf16": False, "tokens": ["<think>", "</think>"],
        "lora": {"r": 4, "modules_to_save": ["embed_tokens", "lm_head"]},
    }
    ctx = load_context(config)
    pm = ctx.pm
    tokenizer = pm.call("ft_load_tokenizer", cfg=ctx.cfg)
    kwargs = ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg)
    model = pm.call("ft_apply_adapter", cfg=ctx.cfg, model=pm.call("ft_load_model", cfg=ctx.cfg, kwargs=kwargs, tokenizer=tokenizer))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # as if trained: the adapter and the new tokens' rows
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path / "run"
    pm.call("ft_save_weights", cfg=ctx.cfg, trainer=None, model=model, output_dir=str(out))
    tokenizer.save_pretrained(out)

    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(out, tmp_path / "merged")).eval()
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer) == 514
    ids = tokenizer("<think> What is 2 plus 3? </think>", return_tensors="pt")["input_ids"]
    assert ids.max() >= 512  # the new tokens are in the input
    adapter_model, _ = load_adapter_model(out)
    assert relative_difference(logits(merged, ids), logits(adapter_model, ids)) < 1e-4


# -- (d) infer --------------------------------------------------------------------------------


def test_infer_prints_a_reply_from_a_saved_adapter_run(lora_run):
    from ft.tools.testing import FtRunner

    result = FtRunner().invoke("infer", lora_run, PROMPT, "--max-new-tokens", "8").assert_ok()
    assert result.stdout.strip(), "no text was generated"


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_infer_from_a_full_model_directory(lora_run, tmp_path, temperature):
    """The reply is what transformers' own generate() gives the merged model for the chat prompt
    (greedy, and sampled from the same seed): the right weights, template, settings and decoding."""
    import torch
    from ft_plugins.infer import generate_once
    from ft_plugins.lora import merge_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = merge_adapter(lora_run, tmp_path / "merged")
    torch.manual_seed(0)
    text = generate_once(merged, PROMPT, max_new_tokens=6, temperature=temperature)

    model, tokenizer = AutoModelForCausalLM.from_pretrained(merged).eval(), AutoTokenizer.from_pretrained(merged)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    sampling = {"do_sample": True, "temperature": temperature} if temperature else {"do_sample": False}
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             pad_token_id=tokenizer.eos_token_id, **sampling)
    new_tokens = out[0, ids.shape[1]:]
    assert len(new_tokens) > 0 and not (len(new_tokens) == 1 and new_tokens[0] == tokenizer.eos_token_id)
    assert text == tokenizer.decode(new_tokens, skip_special_tokens=True)


def test_infer_applies_the_chat_template(lora_run):
    from ft_plugins.lora import load_tokenizer

    tokenizer = load_tokenizer(lora_run)
    text = tokenizer.decode(prompt_ids(tokenizer)[0])
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def test_chat_keeps_the_history_and_stops_at_end_of_input(lora_run, monkeypatch):
    import ft_plugins.infer as inference

    seen = []
    real_generate = inference.generate

    def recording_generate(model, tokenizer, messages, *args, **kwargs):
        seen.append([m["role"] for m in messages])
        return real_generate(model, tokenizer, messages, *args, **kwargs)

    monkeypatch.setattr(inference, "generate", recording_generate)
    lines = iter(["What is 1 plus 1?", "", "And 2 plus 2?"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    written = []
    history = inference.chat(lora_run, max_new_tokens=4, read=read, write=written.append)
    assert seen == [["user"], ["user", "assistant", "user"]]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "And 2 plus 2?"
    assert "/exit or Ctrl-D to quit" in written[0]


def test_chat_from_the_command_line_exits_on_slash_exit(lora_run):
    from click.testing import CliRunner

    from ft.cli import cli

    result = CliRunner().invoke(cli, ["infer", str(lora_run), "--max-new-tokens", "4"],
                                input="hello\n/reset\nhi again\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert "chatting with" in result.output and "(history cleared)" in result.output
    assert result.output.count("> ") == 4  # hello, /reset, hi again, /exit


def test_ft_infer_on_weights_with_refused_pickles_is_an_ft_error(tmp_path, ft_tiny_model_dir):
    import datetime
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from ft.tools.testing import FtRunner

    run_dir = tmp_path / "pickled"
    shutil.copytree(ft_tiny_model_dir, run_dir)
    state = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir).state_dict()
    torch.save({**state, "saved_at": datetime.datetime(2024, 1, 1)}, run_dir / "pytorch_model.bin")
    (run_dir / "model.safetensors").unlink()
    result = FtRunner().invoke("infer", str(run_dir), "Hello?")
    assert result.exit_code == 2, (result.output, result.traceback)
    assert "pickled" in result.output and str(run_dir) in result.output and "Traceback" not in result.output


# -- issue 22: merge onto a run, truncated weights, unfinished runs ------------------------------------


def test_merge_refuses_a_directory_that_holds_another_run_unless_forced(lora_run, tmp_path):
    from ft.tools.testing import FtRunner

    other = tmp_path / "other-run"
    other.mkdir()
    files = {"model.safetensors": b"weights of another run", "metrics.json": b"{}", "ft_config.yaml": b"seed: 1\n"}
    for name, content in files.items():
        (other / name).write_bytes(content)
    FtRunner().invoke("merge", lora_run, "--to", other).assert_error(
        f"--to {other}: the directory already holds ft_config.yaml, metrics.json, model.safetensors", "--force")
    assert {name: (other / name).read_bytes() for name in files} == files  # nothing written

    forced = FtRunner().invoke("merge", lora_run, "--to", other, "--force").assert_ok()
    assert (other / "model.safetensors").read_bytes() != files["model.safetensors"]
    assert "its ft_config.yaml, metrics.json will describe the run that was there, not this model" in forced.log
    FtRunner().invoke("merge", lora_run, "--to", tmp_path / "empty").assert_ok()  # a new directory is fine


def truncate(path):
    import os

    os.truncate(path, os.path.getsize(path) // 2)


def test_a_truncated_adapter_or_model_is_an_error_naming_the_file(lora_run, tmp_path, ft_tiny_model_dir):
    from ft.tools.testing import FtRunner

    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run, adapter, ignore=shutil.ignore_patterns("merged"))
    truncate(adapter / "adapter_model.safetensors")
    for command in (("merge", adapter, "--to", tmp_path / "m"), ("infer", adapter, PROMPT)):
        FtRunner().invoke(*command).assert_error(f"{adapter / 'adapter_model.safetensors'} is ", "cut short")
    assert not (tmp_path / "m").exists()

    full = tmp_path / "full"
    shutil.copytree(ft_tiny_model_dir, full)
    truncate(full / "model.safetensors")
    result = FtRunner().invoke("infer", full, PROMPT).assert_error(
        f"could not load the model from '{full}': {full / 'model.safetensors'} is ", "cut short")
    assert "failed in hook" not in result.output


def test_infer_warns_when_the_run_did_not_finish(ft_tiny_model_dir, tmp_path):
    from ft.tools.testing import FtRunner

    run_dir = tmp_path / "run"
    shutil.copytree(ft_tiny_model_dir, run_dir)
    result = FtRunner().invoke("infer", run_dir, PROMPT, "--max-new-tokens", "2").assert_ok()
    assert "warning" not in result.output  # a model directory that is no run's: nothing to say
    (run_dir / "ft_config.yaml").write_text(f"base_model: {ft_tiny_model_dir}\n")  # a run whose final save never ended
    result = FtRunner().invoke("infer", run_dir, PROMPT, "--max-new-tokens", "2").assert_ok()
    assert f"warning: {run_dir} has no metrics.json: its run did not finish" in result.output
