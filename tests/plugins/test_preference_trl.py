"""ft's preference losses and gradients equal TRL 1.x's on the same batch (tiny model, fp32, CPU).

For each method (and each DPO loss type) the same pairs go through ft's data path (format,
collator) and ft's Trainer, and the same token ids through TRL's trainer (DPOTrainer,
KTOTrainer, the experimental ORPOTrainer and CPOTrainer for SimPO), built offline on the tiny
model. The loss and every parameter's gradient must agree to 1e-5 relative.

The token ids are ft's: TRL's collators take ``prompt_ids`` + completion ids, so the completion
handed to TRL is ft's scored span (content + end-of-turn); the unscored newline ft keeps after the
end-of-turn token changes no scored log-probability (attention is causal). ORPO and CPO take
whole sequences with labels, so they get ft's sequences and labels unchanged.
"""

from __future__ import annotations

import math
import random

import pytest

from ft.kernel.formats import IGNORE_INDEX

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ft_one_torch_thread")]

trl = pytest.importorskip("trl")


def pair_rows(n: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        prompt = [{"role": "user", "content": f"What is {a} plus {b}?" + " Please answer." * (i % 3)}]
        if i % 2:
            prompt.insert(0, {"role": "system", "content": "You add numbers."})
        good = f"The result is {a + b}." + " Easy." * (i % 2)
        bad = f"It is {a + b + 1}, I think." + " Maybe not." * (i % 3)
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    return rows


def kto_rows(n: int = 6) -> list[dict]:
    rows = []
    for i, r in enumerate(pair_rows(n, seed=1)):
        side = "chosen" if i % 3 else "rejected"
        rows.append({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"})
    return rows


def ft_setup(tmp_path, model_dir, method: str, section: dict, rows: list[dict], fmt: str, **extra):
    """ft's context, tokenizer, prepared rows (in file order) and Trainer for ``rows``."""
    import torch
    from transformers import AutoModelForCausalLM

    from ft.engine.data import prepare_datasets
    from ft.engine.train import build_trainer
    from ft.kernel.context import load_context
    from ft.tools.tiny import write_jsonl

    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = {
        "base_model": str(model_dir), "method": method, method: section,
        "datasets": [{"path": str(data), "type": fmt}], "sequence_len": 128, "shuffle": False,
        "micro_batch_size": len(rows), "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"), "dataset_num_proc": 1, **extra,
    }
    ctx = load_context(config)
    tokenizer = ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg)
    prepared = prepare_datasets(ctx, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    trainer = build_trainer(ctx, model, tokenizer, prepared)
    ft_rows = [prepared.train[i] for i in range(len(prepared.train))]
    assert len(ft_rows) == len(rows)
    return tokenizer, trainer, model, ft_rows


def loss_and_grads(compute, model):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ft_loss, ft_grads, trl_loss, trl_grads, rel=1e-5):
    assert abs(ft_loss.item() - trl_loss.item()) <= rel * abs(trl_loss.item()), (ft_loss.item(), trl_loss.item())
    assert ft_grads.keys() == trl_grads.keys() and ft_grads
    for name, g in trl_grads.items():
        scale = g.abs().max().item()
        diff = (ft_grads[name] - g).abs().max().item()
        assert diff <= rel * scale + 1e-12, f"{name}: gradients differ by {diff} (largest {scale})"


def fresh_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


def split(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, scored completion ids) of one ft sequence."""
    scored = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
    first, last = scored[0], scored[-1]
    assert all(x != IGNORE_INDEX for x in labels[first:last + 1])
    return ids[:first], ids[first:last + 1]


def trl_dataset(tokenizer):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "What is 1 plus 1?", "chosen": "It is 2.", "rejected": "It is 3."}])


# -- DPO ------------------------------------------------------------------------------------------

DPO_CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("ipo", 0.1, 0.0), ("hinge", 0.1, 0.0),
             ("robust", 0.1, 0.2)]


@pytest.mark.parametrize("loss_type, beta, smoothing", DPO_CASES)
def test_dpo_loss_and_gradients_equal_trl(tmp_path, ft_tiny_model_dir, loss_type, beta, smoothing):
    import torch
    from trl import DPOConfig, DPOTrainer

    section = {"beta": beta, "loss_type": loss_type, "label_smoothing": smoothing}
    tokenizer, trainer, model, rows = ft_setup(tmp_path, ft_tiny_model_dir, "dpo", section, pair_rows(), "preference")
    # move the policy away from the reference so the loss is not the trivial one
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02, alpha=1.0)
    batch = trainer.data_collator(rows)
    ft_loss, ft_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)), model)

    trl_model = fresh_model(ft_tiny_model_dir)
    trl_model.load_state_dict(model.state_dict())
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], label_smoothing=smoothing,
                     report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=len(rows))
    trl_trainer = DPOTrainer(model=trl_model, ref_model=fresh_model(ft_tiny_model_dir), args=args,
                             train_dataset=trl_dataset(tokenizer), processing_class=tokenizer)
    examples = []
    for r in rows:
        prompt, chosen = split(r["chosen_input_ids"], r["chosen_labels"])
        prompt_r, rejected = split(r["rejected_input_ids"], r["rejected_labels"])
        assert prompt == prompt_r
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    trl_batch = trl_trainer.data_collator(examples)
    trl_model.train()
    trl_loss, trl_grads = loss_and_grads(lambda: trl_trainer.compute_loss(trl_model, trl_batch), trl_model)
    assert_same(ft_loss, ft_grads, trl_loss, trl_grads)


def test_conservative_dpo_equals_trl_cpo_sigmoid_on_the_log_ratios():
    """TRL 1.9's DPOTrainer ignores label_smoothing with sigmoid; ft applies the conservative form
    (cDPO), which TRL's CPO sigmoid loss computes on the same margins."""
    import torch
    from ft_plugins.preference_losses import dpo_losses
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(0)
    chosen, rejected, ref_c, ref_r = (torch.randn(8, generator=g) * 5 - 20 for _ in range(4))
    ft, _, _ = dpo_losses(chosen, rejected, ref_c, ref_r, beta=0.3, loss_type="sigmoid", label_smoothing=0.15)

    class Stub:  # the attributes CPOTrainer.cpo_loss reads
        alpha, beta, label_smoothing, loss_type = 0.0, 0.3, 0.15, "sigmoid"

        class accelerator:
            device = torch.device("cpu")

    trl_losses, _, _ = CPOTrainer.cpo_loss(Stub(), chosen - ref_c, rejected - ref_r)
    torch.testing.assert_close(ft, trl_losses, rtol=1e-6, atol=0)


def test_dpo_sigmoid_starts_at_ln2_when_the_policy_is_the_reference(tmp_path, ft_tiny_model_dir):
    tokenizer, trainer, model, rows = ft_setup(tmp_path, ft_tiny_model_dir, "dpo", {"beta": 0.1}, pair_rows(),
                                               "preference")
    loss = trainer.compute_loss(model, trainer.data_collator(rows))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


# -- KTO ------------------------------------------------------------------------------------------


def test_kto_loss_and_gradients_equal_trl(tmp_path, ft_tiny_model_dir):
    import torch
    from trl import KTOConfig, KTOTrainer

    section = {"beta": 0.2, "desirable_weight": 1.0, "undesirable_weight": 1.5}
    tokenizer, trainer, model, rows = ft_setup(tmp_path, ft_tiny_model_dir, "kto", section, kto_rows(), "kto")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = trainer.data_collator(rows)
    ft_loss, ft_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)), model)

    trl_model = fresh_model(ft_tiny_model_dir)
    trl_model.load_state_dict(model.state_dict())
    args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, desirable_weight=1.0, undesirable_weight=1.5,
                     report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=len(rows))
    from datasets import Dataset

    train = Dataset.from_list([{"prompt": "Hi", "completion": " there", "label": True},
                               {"prompt": "Hi", "completion": " you", "label": False}])
    trl_trainer = KTOTrainer(model=trl_model, ref_model=fresh_model(ft_tiny_model_dir), args=args, train_dataset=train,
                             processing_class=tokenizer)
    parts = [split(r["kto_input_ids"], r["kto_labels"]) for r in rows]
    examples = [{"prompt_ids": p, "completion_ids": c, "KL_completion_ids": parts[i - 1][1], "label": r["label"]}
                for i, ((p, c), r) in enumerate(zip(parts, rows, strict=True))]
    trl_batch = trl_trainer.data_collator(examples)
    trl_model.train()
    trl_loss, trl_grads = loss_and_grads(lambda: trl_trainer.compute_loss(trl_model, trl_batch), trl_model)
    assert_same(ft_loss, ft_grads, trl_loss, trl_grads)


# -- ORPO and SimPO (TRL's experimental ORPOTrainer and CPOTrainer) -----------------------------


def whole_sequence_batch(rows: list[dict], pad: int) -> dict:
    import torch

    out = {}
    for side in ("chosen", "rejected"):
        longest = max(len(r[f"{side}_input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), pad)
        labels = torch.full((len(rows), longest), IGNORE_INDEX)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r[f"{side}_input_ids"])
            ids[i, :n] = torch.tensor(r[f"{side}_input_ids"])
            labels[i, :n] = torch.tensor(r[f"{side}_labels"])
            mask[i, :n] = 1
        out.update({f"{side}_input_ids": ids, f"{side}_labels": labels, f"{side}_attention_mask": mask})
    return out


@pytest.mark.parametrize("on_prompt", [True, False])
def test_orpo_loss_and_gradients_equal_trl(tmp_path, ft_tiny_model_dir, on_prompt):
    """TRL's ORPO takes its NLL over the whole chosen sequence (prompt included), which ft does with
    ``train_on_inputs: true``; ft's default scores the completion only, as SFT does -- there TRL's
    odds-ratio term plus the completion's NLL (the model's own loss) is the reference."""
    import torch
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer, trainer, model, rows = ft_setup(tmp_path, ft_tiny_model_dir, "orpo", {"beta": 0.25}, pair_rows(),
                                               "preference", train_on_inputs=on_prompt)
    batch = trainer.data_collator(rows)
    ft_loss, ft_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)), model)

    trl_model = fresh_model(ft_tiny_model_dir)
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=0.25, report_to=[], use_cpu=True, bf16=False,
                      max_length=128)
    trl_trainer = ORPOTrainer(model=trl_model, args=args, train_dataset=trl_dataset(tokenizer),
                              processing_class=tokenizer)
    trl_batch = whole_sequence_batch(rows, tokenizer.pad_token_id)
    trl_model.train()

    def trl_loss_fn():
        loss, _metrics = trl_trainer.get_batch_loss_metrics(trl_model, trl_batch)
        if on_prompt:
            return loss
        # swap TRL's whole-sequence NLL for the completion's NLL (the model's own loss on the labels)
        chosen = trl_batch["chosen_input_ids"]
        whole = trl_batch["chosen_input_ids"].masked_fill(trl_batch["chosen_attention_mask"] == 0, IGNORE_INDEX)
        out = trl_model(chosen, attention_mask=trl_batch["chosen_attention_mask"])
        shift = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        whole_nll = torch.nn.functional.cross_entropy(shift, whole[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        completion_nll = torch.nn.functional.cross_entropy(shift, trl_batch["chosen_labels"][:, 1:].reshape(-1),
                                                           ignore_index=IGNORE_INDEX)
        return loss - whole_nll + completion_nll

    trl_loss, trl_grads = loss_and_grads(trl_loss_fn, trl_model)
    assert_same(ft_loss, ft_grads, trl_loss, trl_grads)


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_loss_and_gradients_equal_trl_cpo(tmp_path, ft_tiny_model_dir, cpo_alpha):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    section = {"beta": 2.0, "gamma": 0.8, "cpo_alpha": cpo_alpha}
    tokenizer, trainer, model, rows = ft_setup(tmp_path, ft_tiny_model_dir, "simpo", section, pair_rows(), "preference")
    batch = trainer.data_collator(rows)
    ft_loss, ft_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)), model)

    trl_model = fresh_model(ft_tiny_model_dir)
    args = CPOConfig(output_dir=str(tmp_path / "trl"), loss_type="simpo", beta=2.0, simpo_gamma=0.8,
                     cpo_alpha=cpo_alpha, report_to=[], use_cpu=True, bf16=False, max_length=128)
    trl_trainer = CPOTrainer(model=trl_model, args=args, train_dataset=trl_dataset(tokenizer),
                             processing_class=tokenizer)
    trl_batch = whole_sequence_batch(rows, tokenizer.pad_token_id)
    trl_model.train()
    trl_loss, trl_grads = loss_and_grads(lambda: trl_trainer.get_batch_loss_metrics(trl_model, trl_batch)[0],
                                         trl_model)
    assert_same(ft_loss, ft_grads, trl_loss, trl_grads)
