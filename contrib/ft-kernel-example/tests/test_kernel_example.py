"""The kernel plugin template: same outputs as the original modules, every replacement recorded.

Uses the fixtures of ``ft.tools.testing`` (installed with ft): ``ft_tiny_model_dir``, ``ft_runner``,
``ft_config``, ``ft_dataset``, ``ft_hook_recorder``, and its ``assert_patch_survives``.
"""

from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

kx = pytest.importorskip("ft_kernel_example", reason="pip install ./contrib/ft-kernel-example")

from ft.kernel.errors import FtError  # noqa: E402
from ft.tools.testing import assert_patch_survives  # noqa: E402


@pytest.fixture(scope="module")
def model(ft_tiny_model_dir):
    m = transformers.AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, dtype=torch.float32)
    return m.eval()


def norm_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if type(module).__name__.endswith("RMSNorm")]


def test_outputs_and_gradients_match_the_original(model):
    patched = copy.deepcopy(model)
    originals = norm_names(patched)
    records = kx.patch_rms_norms(patched)

    # every replaced module is recorded, and nothing else
    assert len(originals) == 2 * patched.config.num_hidden_layers + 1
    assert [r.target for r in records] == [f"{n} (LlamaRMSNorm)" for n in originals]
    assert all(r.plugin == "kernel_example" and r.undo is None for r in records)
    assert all(type(patched.get_submodule(n)).__name__ == "RMSNorm" for n in originals)
    assert norm_names(patched) == originals  # the class name still ends with RMSNorm, by design
    # same parameters under the same names: checkpoints and optimizers do not notice the swap
    assert list(patched.state_dict()) == list(model.state_dict())

    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids, labels=ids)
    got = patched(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    want.loss.backward()
    got.loss.backward()
    for name in originals:
        torch.testing.assert_close(patched.get_submodule(name).weight.grad, model.get_submodule(name).weight.grad,
                                   atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_keeps_the_input_dtype(model):
    patched = copy.deepcopy(model).to(torch.bfloat16)
    kx.patch_rms_norms(patched)
    norm = patched.get_submodule("model.norm")
    x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    reference = copy.deepcopy(model).to(torch.bfloat16).get_submodule("model.norm")
    torch.testing.assert_close(out, reference(x))


def test_compiled_replacement_matches(model):
    patched = copy.deepcopy(model)
    options = kx.KernelExampleOptions(compile=True, compile_backend="eager")  # eager: no C++ toolchain needed
    records = kx.patch_rms_norms(patched, options)
    assert all(r.replacement.endswith("(torch.compile)") for r in records)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_refuses_a_norm_that_computes_something_else(model):
    class GemmaStyleRMSNorm(torch.nn.Module):  # scales by (1 + weight): not what our kernel computes
        def __init__(self, dim):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(dim))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    patched = copy.deepcopy(model)
    patched.model.norm = GemmaStyleRMSNorm(model.config.hidden_size)
    with pytest.raises(FtError, match=r"model\.norm \(GemmaStyleRMSNorm\) differs from the original"):
        kx.patch_rms_norms(patched)
    # nothing was swapped: the check runs before any module is replaced
    assert type(patched.get_submodule("model.layers.0.input_layernorm")).__name__ == "LlamaRMSNorm"


@pytest.mark.parametrize("hub_kernels", [False, True], ids=["as-ft-loads", "transformers-defaults"])
def test_the_swap_survives_train_and_runs_in_training(ft_tiny_model_dir, hub_kernels):
    """Swapped modules run in every training step, also where transformers re-kernelizes its hub-kernel
    layers at each train()/eval() switch (a forward bound on a LlamaRMSNorm instance would be dropped)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir, dtype=torch.float32,
                                                              use_kernels=hub_kernels)
    records = assert_patch_survives(model, kx.patch_rms_norms, plugin="kernel_example")
    assert len(records) == 5


# -- through ft ------------------------------------------------------------------------------


def test_acts_only_when_selected_and_records_reach_the_run(ft_runner, ft_config, ft_dataset, ft_hook_recorder):
    config = ft_config(dataset=ft_dataset(n=8), max_steps=1)
    ft_runner.run(config).assert_ok()
    assert not ft_hook_recorder.called("ft_patch_model", "kernel_example")  # installed but not selected

    ft_hook_recorder.clear()
    result = ft_runner.run(config, "-p", "kernel_example", "--set", f"output_dir={config.parent / 'out2'}")
    result.assert_ok()
    [records] = ft_hook_recorder.results("ft_patch_model", "kernel_example")
    assert len(records) == 5 and records[0].target == "model.layers.0.input_layernorm (LlamaRMSNorm)"
    # the run's plugin manifest says what was replaced
    manifest = json.loads((result.output_dir / "ft_plugins.json").read_text())
    assert [p for p in manifest["patches"] if p.startswith("[kernel_example]")] == [str(r) for r in records]


def test_section_is_validated(ft_runner, ft_config, ft_dataset):
    config = ft_config(dataset=ft_dataset(n=2), kernel_example={"compile": False, "tolerence": 1e-3})
    ft_runner.validate(config).assert_error("kernel_example", "not selected", "-p kernel_example")
    ft_runner.validate(config, "-p", "kernel_example").assert_error(
        "kernel_example.tolerence", "Did you mean 'tolerance'?"
    )
