"""compile: torch.compile of the model gives the losses of the eager model; known-bad combinations are refused."""

from __future__ import annotations

import json

import pytest
import torch
from ft_plugins import compile as compile_plugin


def _losses(out_dir):
    return [row["loss"] for row in json.loads((out_dir / "metrics.json").read_text())["history"]]


def test_compiled_run_trains_like_the_eager_run(ft_config, ft_dataset, ft_runner, tmp_path):
    from safetensors import safe_open

    data = ft_dataset(n=16)
    eager_out, compiled_out = tmp_path / "eager", tmp_path / "compiled"
    ft_runner.run(ft_config(name="eager.yaml", dataset=data, output_dir=str(eager_out))).assert_ok()
    # aot_eager runs dynamo + AOT autograd (the graphs inductor would get) without compiling C++,
    # which keeps this test short on a CPU; the inductor numerics are checked below.
    result = ft_runner.run(
        ft_config(name="compiled.yaml", dataset=data, output_dir=str(compiled_out),
                  compile={"backend": "aot_eager", "dynamic": True}),
        "-p", "compile",
    ).assert_ok()
    assert "torch.compile(mode=default, dynamic=True" in result.log
    assert _losses(compiled_out) == pytest.approx(_losses(eager_out), rel=1e-4)
    with safe_open(compiled_out / "model.safetensors", "pt") as f, safe_open(eager_out / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())  # the weights keep their names (no _orig_mod. prefix)


@pytest.mark.slow
def test_inductor_loss_and_gradients_equal_eager(ft_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100

    eager = model(input_ids=ids, labels=labels).loss
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    cfg = type("Cfg", (), {"section": lambda self, name: compile_plugin.CompileOptions(dynamic=False)})()
    records = compile_plugin.ft_patch_model(cfg, model)
    assert "backend=inductor" in str(records[0])
    compiled = model(input_ids=ids, labels=labels).loss
    compiled.backward()

    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compile_with_liger_is_refused(ft_config, ft_dataset, ft_runner):
    result = ft_runner.validate(ft_config(dataset=ft_dataset()), "-p", "compile", "-p", "liger")
    result.assert_error("compile together with liger is refused", "~890")


def test_cuda_graph_modes_are_refused_with_the_key(ft_config, ft_dataset, ft_runner):
    cfg = ft_config(dataset=ft_dataset(), compile={"mode": "reduce-overhead"})
    result = ft_runner.validate(cfg, "-p", "compile")
    result.assert_error("compile.mode", "reduce-overhead", "CUDA graphs", "max-autotune-no-cudagraphs")
