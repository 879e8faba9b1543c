"""ft's GRPO maths equals TRL's GRPOTrainer (1.9) on a fixed batch, to 1e-5 relative.

Both trainers get the same model weights, the same prompts, the same completions (TRL's generation
is replaced by the fixed batch) and reward functions that return the same fixed values (some None).
Compared, per loss type and reward scaling:

- the advantages: TRL's ``_generate_and_score_completions`` against ft's ``score`` +
  ``combine_rewards`` + ``group_advantages`` (what ft's trainer runs after generating);
- the reference log-probabilities (beta > 0): TRL's reference model against ft's ``ReferenceModel``;
- the loss and every parameter's gradient: TRL's ``_compute_loss`` against ft's trainer
  ``compute_loss`` on the micro-batch ft builds itself (``_micro_batches``), with the same
  "old policy" log-probabilities (perturbed, so ratios differ from 1 and clipping acts);
- the logged entropy, clip ratio and KL.

The prompts have different lengths, so shorter ones are left-padded. TRL's training forward passes no
position ids (a padded prompt's positions then count its padding), ft passes the positions generation
used; RoPE makes that a uniform shift, and the log-probabilities still agree to about 1e-6.
One micro-batch holds the whole step (gradient_accumulation_steps 1): with more, TRL 1.9 under
transformers 5.24 divides the loss by the accumulation steps twice (once itself, once in the
Trainer), which ft does not.
"""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("trl")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ft_one_torch_thread")]

G = 4  # completions per prompt
PROMPTS = ["What is 1 plus 2?", "Please add 3 to 4, thank you very much.", "Add 5 and 1."]  # 24, 32, 20 tokens


@pytest.fixture(scope="module")
def fixed_batch(ft_tiny_model_dir):
    """Prompts of different lengths, completions of varied lengths (some ending in EOS), rewards with Nones."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ft_tiny_model_dir)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    prompt_ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                  for p in prompts]
    assert len({len(p) for p in prompt_ids}) == 3, "prompts of different lengths: left padding is exercised"
    rng = random.Random(7)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    completion_ids = []
    for i in range(len(prompts) * G):
        ids = [rng.randrange(10, 400) for _ in range(rng.randint(3, 12))]
        completion_ids.append(ids + [eos] if i % 3 else ids)  # every third one is cut at max length
    correct = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # group 2: all equal (std 0)
    style = [0.5, None, -0.25, 0.75, 0.1, 0.2, -0.3, None, 0.0, 0.4, -0.6, 0.9]
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    return {"tok": tok, "prompts": prompts, "prompt_ids": prompt_ids, "completion_ids": completion_ids,
            "texts": texts, "correct": correct, "style": style, "weights": (1.0, 0.5)}


def reward_functions(batch):
    """Two reward functions that look their value up by the completion's index (a dataset column)."""

    def correct(prompts, completions, completion_ids, index, **kwargs):
        return [batch["correct"][i] for i in index]

    def style(prompts, completions, completion_ids, index, **kwargs):
        return [batch["style"][i] for i in index]

    return correct, style


def make_trl(model_dir, batch, tmp_path, **grpo):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    n = len(batch["completion_ids"])
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=n, num_generations=G,
        max_completion_length=grpo["max_completion_len"], loss_type=grpo["loss_type"], beta=grpo["beta"],
        epsilon=grpo["epsilon"], epsilon_high=grpo["epsilon_high"], num_iterations=grpo["num_iterations"],
        scale_rewards=grpo["scale_rewards"], temperature=grpo["temperature"], reward_weights=list(batch["weights"]),
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", learning_rate=1e-3, disable_tqdm=True,
    )  # bf16 off: TRL's default would run its reference model under bf16 autocast
    data = Dataset.from_list([{"prompt": p, "index": 0} for p in batch["prompts"]])
    trainer = GRPOTrainer(model=model, reward_funcs=list(reward_functions(batch)), args=args, train_dataset=data,
                          processing_class=batch["tok"])
    trainer.current_gradient_accumulation_steps = 1
    completions = [[{"role": "assistant", "content": t}] for t in batch["texts"]]
    fixed = ([batch["prompt_ids"][i // G] for i in range(n)], batch["completion_ids"], None, completions, None, {},
             None, [])
    trainer._generate = lambda prompts: fixed  # the fixed batch instead of sampling
    return trainer


def make_ft(model_dir, batch, tmp_path, **grpo):
    import torch
    from ft_plugins.grpo import GRPOOptions, RewardFunction, trainer_class
    from transformers import AutoModelForCausalLM, TrainingArguments

    from ft.api import ReferenceModel

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    n = len(batch["completion_ids"])
    opts = GRPOOptions(num_generations=G, **grpo)
    correct, style = reward_functions(batch)
    rewards = [RewardFunction("correct", batch["weights"][0], correct, "test"),
               RewardFunction("style", batch["weights"][1], style, "test")]
    reference = ReferenceModel.for_training(model, "grpo") if opts.beta else None
    tok = batch["tok"]
    if tok.pad_token is None:
        tok = copy.copy(tok)
        tok.pad_token = "<|reserved_0|>"
    args = TrainingArguments(output_dir=str(tmp_path / "ft"), per_device_train_batch_size=n, use_cpu=True,
                             report_to="none", save_strategy="no", learning_rate=1e-3, disable_tqdm=True)
    return trainer_class()(model=model, args=args, processing_class=tok, grpo=opts, rewards=rewards,
                           reference=reference)


def ft_advantages(batch, trainer):
    import torch
    from ft_plugins.grpo import combine_rewards, group_advantages, nanstd, score

    n = len(batch["completion_ids"])
    prompts = [batch["prompts"][i // G] for i in range(n)]
    completions = [[{"role": "assistant", "content": t}] for t in batch["texts"]]
    values, unset = score(trainer.rewards, prompts, completions, batch["completion_ids"], {"index": list(range(n))})
    rewards, bad = combine_rewards(torch.tensor(values).T, torch.tensor(unset).T, [r.weight for r in trainer.rewards])
    assert not bad.any()
    scale = trainer.grpo.scale_rewards
    return group_advantages(rewards, G, scale, nanstd(rewards) if scale == "batch" else None)[0]


CASES = {
    # loss_type, beta, num_iterations, scale_rewards, epsilon_high
    "grpo": ("grpo", 0.04, 2, "group", 0.28),
    "dr_grpo": ("dr_grpo", 0.04, 2, "none", None),
    "dapo": ("dapo", 0.0, 2, "batch", 0.28),
    "bnpo": ("bnpo", 0.1, 2, "group", None),
    "dapo_on_policy": ("dapo", 0.0, 1, "group", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_advantages_loss_and_gradients_equal_trl(case, ft_tiny_model_dir, fixed_batch, tmp_path):
    import torch

    loss_type, beta, iterations, scale, eps_high = CASES[case]
    grpo = dict(loss_type=loss_type, beta=beta, num_iterations=iterations, scale_rewards=scale, epsilon=0.2,
                epsilon_high=eps_high, max_completion_len=16, temperature=0.7)
    trl = make_trl(ft_tiny_model_dir, fixed_batch, tmp_path, **grpo)
    ft = make_ft(ft_tiny_model_dir, fixed_batch, tmp_path, **grpo)
    n = len(fixed_batch["completion_ids"])
    trl.model.train()
    ft.model.train()

    out = trl._generate_and_score_completions([{"prompt": fixed_batch["prompts"][i // G], "index": i} for i in range(n)])
    advantages = ft_advantages(fixed_batch, ft)
    torch.testing.assert_close(advantages, out["advantages"], rtol=1e-5, atol=1e-6)
    assert advantages.abs().sum() > 0

    (batch,) = ft._micro_batches([list(p) for p in fixed_batch["prompt_ids"]], fixed_batch["completion_ids"], advantages)
    assert torch.equal(batch["completion_ids"] * batch["completion_mask"], out["completion_ids"] * out["completion_mask"])
    assert float(batch["step_tokens"]) == float(out["num_items_in_batch"])
    if beta:
        torch.testing.assert_close(batch["ref_logps"] * batch["completion_mask"],
                                   out["ref_per_token_logps"] * out["completion_mask"], rtol=1e-5, atol=1e-6)
    if iterations > 1:  # the generating policy's log-probabilities, perturbed so that ratios leave [1-e, 1+e]
        torch.testing.assert_close(batch["old_logps"] * batch["completion_mask"],
                                   out["old_per_token_logps"] * out["completion_mask"], rtol=1e-5, atol=1e-6)
        noise = torch.randn(out["old_per_token_logps"].shape, generator=torch.Generator().manual_seed(3)) * 0.3
        out["old_per_token_logps"] = out["old_per_token_logps"] + noise
        batch["old_logps"] = batch["old_logps"] + noise

    trl_loss = trl._compute_loss(trl.model, out)
    trl_loss.backward()
    ft_loss = ft.compute_loss(ft.model, batch)
    ft_loss.backward()
    torch.testing.assert_close(ft_loss, trl_loss, rtol=1e-5, atol=1e-8)
    assert abs(float(trl_loss)) > 1e-4

    trl_grads = dict(trl.model.named_parameters())
    for name, p in ft.model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name].grad, rtol=1e-5, atol=1e-5 * float(trl_grads[name].grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ft.model.parameters()))
    assert total > 0

    metrics = {k: v[-1] for k, v in trl._metrics["train"].items()}
    recorded = ft.__dict__.get("_ft_metric_sums")  # not mixed in here: compare what compute_loss computed instead
    assert recorded is None
    logps, entropy = ft._logps(ft.model, batch, entropy=True)
    from ft_plugins.grpo import masked_mean, policy_loss

    _, stats = policy_loss(logps, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"],
                           batch["completion_mask"], loss_type=loss_type, epsilon_low=0.2,
                           epsilon_high=eps_high or 0.2, beta=beta, max_completion_len=16,
                           step_tokens=batch["step_tokens"])
    mask = batch["completion_mask"]
    assert float(masked_mean(entropy, mask)) == pytest.approx(metrics["entropy"], rel=1e-5)
    assert float(masked_mean(stats["clip_ratio"], mask)) == pytest.approx(metrics["clip_ratio/region_mean"], abs=1e-7)
    if iterations > 1:
        assert metrics["clip_ratio/region_mean"] > 0, "the perturbation should make some ratios clip"
    if beta:
        assert float(masked_mean(stats["kl"], mask)) == pytest.approx(metrics["kl"], rel=1e-5)
