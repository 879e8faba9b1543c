"""ft.engine.scoring is the one place for token log-probabilities, the reference forward and the accumulation
normaliser; the trainers that use them are module-level classes; the grpo package keeps its layout rules."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "plugins" / "grpo"


def test_grpo_modules_are_small():
    """grpo was one 1,567-line module holding six concerns; its package keeps each under 600 lines (the import
    rule and the no-shell rule cover it with every plugin: test_api, test_crash)."""
    big = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert len(list(PACKAGE.glob("*.py"))) >= 5 and not big, big


def test_importing_the_grpo_plugin_stays_light_and_its_trainers_are_module_level_classes():
    code = "import sys, ft_plugins.grpo, ft_plugins.preference; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from ft_plugins import grpo, preference

    trainer = grpo.trainer_class()
    assert trainer.__qualname__ == "GRPOTrainer" and trainer.__module__ == "ft_plugins.grpo.trainer"
    pref = preference.trainer_class()
    assert pref.__qualname__ == "PreferenceTrainer" and pref.__module__ == "ft_plugins.preference_trainer"
    from ft_plugins import ebft

    built_on_grpo = ebft.trainer_class()
    assert built_on_grpo.__qualname__ == "EBFTTrainer" and built_on_grpo.__module__ == "ft_plugins.ebft.trainer"
    assert issubclass(built_on_grpo, trainer)


def test_each_preference_method_has_its_loss_in_the_table():
    from ft_plugins.preference import SECTIONS
    from ft_plugins.preference_trainer import LOSSES, PreferenceSetup, PreferenceTrainer

    assert set(LOSSES) == set(SECTIONS)
    assert all(callable(fn) for fn in LOSSES.values())
    with pytest.raises(Exception, match="no preference loss for method 'nope'"):
        PreferenceTrainer(preference=PreferenceSetup("nope", None, ("chosen", "rejected")))


def test_the_dead_copies_are_gone():
    for gone in ("ft.reference", "ft.engine.reference"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(gone)
    import ft.api
    import ft.engine.scoring

    for name in ("ReferenceModel", "token_logps", "sequence_logps", "target_logps", "has_adapter",
                 "accumulation_share", "output_layer"):
        assert getattr(ft.api, name) is getattr(ft.engine.scoring, name), name


def test_target_logps_is_what_each_method_computed_before():
    import torch

    from ft.api import sequence_logps, target_logps, token_logps

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 0] = -100
    # GRPO's completion log-probs at a temperature, with the entropy
    scaled = logits / 0.7
    want = scaled.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, -1)
    logps, entropy = target_logps(logits, targets, temperature=0.7, entropy=True)
    assert logps[0, 0] == 0 and torch.allclose(logps[targets != -100], want[targets != -100])
    probs = torch.softmax(scaled, -1)
    assert torch.allclose(entropy, -(probs * torch.log_softmax(scaled, -1)).sum(-1), atol=1e-6)
    # the label convention: position t scores labels[t + 1]
    logps, mask = token_logps(logits, targets)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logps, ref * mask, atol=1e-6)
    total, counts = sequence_logps(logits, targets)
    assert torch.allclose(total, (ref * mask).sum(-1), atol=1e-6) and counts.tolist() == [4, 4]


def test_the_accumulation_share_divides_over_processes_and_micro_batches():
    import torch

    from ft.api import accumulation_share

    args = SimpleNamespace(device=torch.device("cpu"), world_size=1, gradient_accumulation_steps=4)
    trainer = SimpleNamespace(args=args)
    assert float(accumulation_share(trainer, 8.0)) == 2.0  # 8 items over 4 micro-batches
    trainer.current_gradient_accumulation_steps = 2  # a window cut short at the end of an epoch
    assert float(accumulation_share(trainer, 8.0)) == 4.0
    assert float(accumulation_share(trainer, 8.0, micro_batches=8)) == 1.0
    args.world_size = 2  # the count summed over processes (reduce), then divided by them
    trainer.accelerator = SimpleNamespace(reduce=lambda t, reduction: t * 2 if reduction == "sum" else math.nan)
    assert float(accumulation_share(trainer, 8.0, micro_batches=4)) == 2.0


def test_a_reference_model_is_called_like_a_model_without_gradients(ft_tiny_model_dir):
    import torch
    from ft_plugins.preference_trainer import forward_logps, output_layer
    from transformers import AutoModelForCausalLM

    from ft.api import ReferenceModel

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir)
    reference = ReferenceModel.for_training(model, "test")
    assert output_layer(reference) is reference.copy.get_output_embeddings()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "sequence_ids": torch.zeros_like(ids)}
    policy = forward_logps(model, batch)
    ref = forward_logps(reference, batch)
    assert policy.sums.requires_grad and not ref.sums.requires_grad
    assert torch.allclose(policy.sums.detach(), ref.sums)
