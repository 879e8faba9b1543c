"""Importance-sampling correction and asynchronous generation of GRPO, without vLLM.

- The IS maths (``is_weights`` and the loss it weights) equals TRL 1.16's vLLM importance-sampling
  correction: TRL's own ``_generate_and_score_completions`` and ``_compute_loss`` run with
  ``use_vllm`` on and a fixed batch whose generation log-probabilities are given (as vLLM returns them,
  one NaN among them), for each of TRL's four modes; ratios, the loss and every gradient agree to 1e-5.
- Asynchronous generation with a generator that records the weights it generated with: with lag 1,
  step k's completions come from the weights after step k-1 - 1, the prompts generated ahead are the
  ones the step then gets, and with lag 0 a run is the synchronous run.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from test_grpo_trl import G, fixed_batch, make_ft, make_trl  # noqa: F401 - fixed_batch is a fixture

from ft.api import Plugin

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ft_one_torch_thread")]

IS_CASES = {  # mode, cap, floor
    "token_truncate": ("token_truncate", 1.02, None),
    "token_mask": ("token_mask", 1.02, 0.99),
    "sequence_truncate": ("sequence_truncate", 1.05, 0.95),
    "sequence_mask": ("sequence_mask", 1.03, None),
}


@pytest.mark.parametrize("case", list(IS_CASES))
def test_importance_sampling_equals_trl_vllm_correction(case, ft_tiny_model_dir, fixed_batch, tmp_path):  # noqa: F811
    import torch
    from ft_plugins.grpo import is_weights

    pytest.importorskip("trl")
    mode, cap, floor = IS_CASES[case]
    grpo = dict(loss_type="dapo", beta=0.04, num_iterations=1, scale_rewards="group", epsilon=0.2, epsilon_high=None,
                max_completion_len=16, temperature=0.7)
    trl = make_trl(ft_tiny_model_dir, fixed_batch, tmp_path, **grpo)
    ft = make_ft(ft_tiny_model_dir, fixed_batch, tmp_path, **grpo, is_correction=mode, is_cap=cap, is_min=floor)
    n = len(fixed_batch["completion_ids"])
    trl.model.train()
    ft.model.train()

    # what vLLM would have returned: the trainer's log-probabilities, perturbed; one token it could not score
    (clean,) = ft._micro_batches([list(p) for p in fixed_batch["prompt_ids"]], fixed_batch["completion_ids"],
                                 torch.zeros(n))
    with torch.no_grad():
        exact = ft._logps(ft.model, clean)[0]
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(11)) * 0.02
    sampled = [[float(x) for x in (exact[i] + noise[i])[: len(c)]] for i, c in enumerate(fixed_batch["completion_ids"])]
    sampled[1][0] = math.nan

    trl.use_vllm = True
    trl.vllm_importance_sampling_correction = True
    trl.vllm_importance_sampling_mode = mode
    trl.vllm_importance_sampling_clip_max = cap
    trl.vllm_importance_sampling_clip_min = floor
    prompt_ids, completion_ids, tool_mask, completions, _, extra, images, tool_images = trl._generate(None)
    trl._generate = lambda prompts: (prompt_ids, completion_ids, tool_mask, completions,
                                     [[None if math.isnan(x) else x for x in row] for row in sampled], extra, images,
                                     tool_images)
    out = trl._generate_and_score_completions([{"prompt": fixed_batch["prompts"][i // G], "index": i}
                                               for i in range(n)])

    advantages = out["advantages"].clone()
    (batch,) = ft._micro_batches([list(p) for p in fixed_batch["prompt_ids"]], fixed_batch["completion_ids"],
                                 advantages, sampled)
    mask = batch["completion_mask"]
    expected = out["importance_sampling_ratio"]
    got = batch["importance"]
    assert got.shape == expected.shape
    torch.testing.assert_close(got * (mask if got.shape[1] > 1 else 1), expected * (mask if got.shape[1] > 1 else 1),
                               rtol=1e-5, atol=1e-6)
    metrics = {k: v[-1] for k, v in trl._metrics["train"].items()}
    weights, stats = is_weights(batch["old_logps"], _padded(sampled, mask), mask, mode, cap, floor)
    for name in ("mean", "min", "max"):
        assert float(stats[f"is/{name}"]) == pytest.approx(metrics[f"sampling/importance_sampling_ratio/{name}"],
                                                           rel=1e-5, abs=1e-6)
    assert 0 < float(stats["is/clipped"]) < 1, "the bounds act on some ratios, not all"

    trl_loss = trl._compute_loss(trl.model, out)
    trl_loss.backward()
    ft_loss = ft.compute_loss(ft.model, batch)
    ft_loss.backward()
    # atol: the loss sums terms of both signs (advantages), so the 1e-6 by which the two trainers' log-probabilities
    # differ (positions, see test_grpo_trl) is not 1e-5 of the small sum
    torch.testing.assert_close(ft_loss, trl_loss, rtol=1e-5, atol=1e-6)
    trl_grads = dict(trl.model.named_parameters())
    for name, p in ft.model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name].grad, rtol=1e-5,
                                   atol=1e-5 * float(trl_grads[name].grad.abs().max()), msg=lambda m, name=name: f"{name}: {m}")


def _padded(rows, mask):
    from ft_plugins.grpo import pad_floats

    return pad_floats(rows, mask.shape[1], mask.device)


# -- asynchronous generation -------------------------------------------------------------------------------


class VersionedGeneration:
    """A generator apart from the training model: it samples nothing, but answers each prompt with a completion
    that encodes the weights version it last received (the number of syncs so far), and records every call."""

    name = "versioned"
    supports_async = True

    def __init__(self, trainer, eos):
        self.trainer, self.eos, self.version, self.calls = trainer, eos, 0, []

    def describe(self):
        return "a test generator"

    def generate(self, prompt_ids, n, sampling):
        self.calls.append(("generate", self.version, [list(p) for p in prompt_ids]))
        ids = [[10 + self.version, 20 + k, self.eos] for _ in prompt_ids for k in range(n)]
        return ids, [[-1.0] * len(c) for c in ids]

    def snapshot(self, model):
        step = self.trainer.state.global_step

        def apply():
            self.version += 1
            self.calls.append(("sync", step))
            return {"sync/bytes": 1.0, "sync/seconds": 0.0}

        return apply

    def sync_weights(self, model):
        return self.snapshot(model)()


def run_with(root, model_dir, tmp_name, extra=None, **grpo):
    """A GRPO run (plain prompts, 4 steps) with VersionedGeneration; returns the trainer and the run's history."""
    from ft import hookimpl
    from ft.run import run
    from ft.tools.testing import registered_plugin

    rows = [{"prompt": f"Count {i} and {i + 1}.", "index": i} for i in range(16)]
    work = root / tmp_name
    work.mkdir()
    (work / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"base_model": str(model_dir), "method": "grpo",
              "datasets": [{"path": str(work / "p.jsonl"), "type": "prompt"}], "sequence_len": 64,
              "dataset_prepared_path": str(work / "prepared"), "dataset_num_proc": 1, "output_dir": str(work / "out"),
              "micro_batch_size": 4, "max_steps": 4, "logging_steps": 1, "learning_rate": 1e-2, "seed": 3,
              "bf16": False, "save_steps": None,
              "grpo": {"num_generations": 2, "max_completion_len": 4, "is_correction": "none",
                       "rewards": [{"name": "length_penalty", "unit": "characters", "target": 3}], **grpo},
              **(extra or {})}
    (work / "c.yaml").write_text(yaml.safe_dump(config))
    seen = {}

    class Versioned:  # a generator plugin, as -p vllm is one
        PLUGIN = Plugin(provides=["separate_generation"])

        @hookimpl
        def ft_before_train(cfg, trainer):
            eos = trainer.processing_class.convert_tokens_to_ids("<|im_end|>")
            trainer.set_generation(VersionedGeneration(trainer, eos))
            seen["trainer"] = trainer

    with registered_plugin(Versioned, f"versioned_{tmp_name}"):
        run(work / "c.yaml")
    history = json.loads((work / "out" / "metrics.json").read_text())["history"]
    return seen["trainer"], history


def test_async_generation_trails_by_the_lag_and_generates_the_steps_prompts(ft_tiny_model_dir, tmp_path):
    sync_trainer, sync_history = run_with(tmp_path, ft_tiny_model_dir, "sync")
    sync_calls = sync_trainer.generation.calls
    assert [c[0] for c in sync_calls] == ["sync", "generate"] * 4, "synchronous: sync, then generate, every step"
    assert [c[1] for c in sync_calls if c[0] == "generate"] == [1, 2, 3, 4]

    trainer, history = run_with(tmp_path, ft_tiny_model_dir, "async", async_generation=True, max_lag=1)
    calls = trainer.generation.calls
    generated = [c for c in calls if c[0] == "generate"]
    # step 1 generates on the spot, then each step starts the next one's generation with its own weights
    assert [c[1] for c in generated] == [1, 1, 2, 3], "step k+1 generated with the weights of step k-1 (lag 1)"
    assert [c[2] for c in generated] == [c[2] for c in sync_calls if c[0] == "generate"], \
        "the prompts generated ahead are exactly the ones each step gets"
    assert trainer.async_misses == 0
    assert [c[1] for c in calls if c[0] == "sync"] == [0, 1, 2]  # no sync for a step past the end
    assert trainer._executor is None and not trainer._pending, "closed at the end of training"
    assert [r["step"] for r in history] == [1, 2, 3, 4]

    lag0_trainer, lag0_history = run_with(tmp_path, ft_tiny_model_dir, "lag0", async_generation=True, max_lag=0)
    assert lag0_trainer.generation.calls == sync_calls
    for key in ("loss", "reward", "grad_norm", "completion_length"):
        assert [r[key] for r in lag0_history] == [r[key] for r in sync_history], f"lag 0 is the synchronous run ({key})"


def test_async_generation_needs_a_separate_generator(ft_tiny_model_dir, tmp_path, write_yaml):
    from ft.kernel.errors import ConfigError
    from ft.run import run

    (tmp_path / "x.jsonl").write_text(json.dumps({"prompt": "Hi."}) + "\n")
    path = write_yaml({"base_model": str(ft_tiny_model_dir), "method": "grpo",
                       "datasets": [{"path": "x.jsonl", "type": "prompt"}], "micro_batch_size": 2,
                       "grpo": {"num_generations": 2, "async_generation": True,
                                "rewards": [{"name": "length_penalty"}]}})
    with pytest.raises(ConfigError) as info:
        run(path)
    assert "asynchronous generation needs a generator apart from the training model: add -p vllm" in str(info.value)


# -- sharded training: generation on the gathered parameters --------------------------------------------------


def test_fsdp2_and_zero3_generate_with_the_full_parameters_like_ddp(ft_tiny_model_dir, tmp_path):
    """Two processes over gloo: under FSDP2 and ZeRO-3 each process samples with the full parameters (gathered
    for generation, resharded after), so with the same seed it draws exactly DDP's completions, before and
    after an optimizer step."""
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}]} for i in range(16)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "FT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    completions = {}
    for name, extra in (("ddp", {}), ("fsdp", {"plugins": ["fsdp"]}),
                        ("zero3", {"plugins": ["deepspeed"], "deepspeed": {"stage": 3}})):
        config = {"base_model": str(ft_tiny_model_dir), "method": "grpo",
                  "datasets": [{"path": str(tmp_path / "prompts.jsonl"), "type": "prompt"}], "sequence_len": 64,
                  "dataset_prepared_path": str(tmp_path / "prepared"), "dataset_num_proc": 1,
                  "output_dir": str(tmp_path / name), "micro_batch_size": 4, "max_steps": 2, "logging_steps": 1,
                  "learning_rate": 1e-2, "seed": 5, "bf16": False, "save_steps": None,
                  "grpo": {"num_generations": 4, "max_completion_len": 12, "log_completions_steps": 1,
                           "rewards": [{"name": "length_penalty", "unit": "characters", "target": 12}]}, **extra}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        proc = subprocess.run([sys.executable, "-m", "ft.cli", "run", str(tmp_path / f"{name}.yaml"), "--nproc", "2"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
        lines = [json.loads(x) for x in (tmp_path / name / "completions.jsonl").read_text().splitlines()]
        completions[name] = [(x["step"], x["completion"]) for x in lines]
    assert {step for step, _ in completions["ddp"]} == {1, 2}
    assert completions["fsdp"] == completions["ddp"]
    assert completions["zero3"] == completions["ddp"]


@pytest.mark.parametrize("disable", [True, False])
def test_grpo_disables_dropout_so_old_log_probs_match_the_samplers(ft_tiny_model_dir, tmp_path, disable):
    """LoRA's dropout (0.05 by default) made every old log-prob, which IS weights and the clipped ratio compare with
    the sampler's, a draw under another mask: against a real vLLM the LoRA run's ratios strayed ~10% by step 3.
    As TRL's GRPO does, the policy's dropout is off for the run unless grpo.disable_dropout is false."""
    import torch

    trainer, _history = run_with(tmp_path, ft_tiny_model_dir, f"dropout_{disable}",
                                 extra={"plugins": ["lora"], "max_steps": 1, "lora": {"r": 4, "alpha": 8, "dropout": 0.05}},
                                 disable_dropout=disable)
    rates = {m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == ({0.0} if disable else {0.05})
