"""``method: ebft`` (structured mode): the feature-matching reward equals a hand-written implementation of
the formula on a fixed batch, features are pooled as documented, they come from the frozen model (the
adapter disabled, or a frozen copy), the prompt_reference format, and a short run on the tiny model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from ft.kernel.context import load_context

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


def dot(x, y):
    return sum(p * q for p, q in zip(x, y, strict=True))


def unit(x):
    norm = math.sqrt(dot(x, x))
    return [v / norm for v in x]


def hand_whiten(group: list[list[float]], ref: list[float], tol: float = 1e-5):
    """axolotl's whitening written as the matrix it is: W = U diag(1/S) U^T with phi^T = U S V^T is the
    pseudo-inverse square root of the second-moment matrix M = phi^T phi = U S^2 U^T, here from numpy's
    symmetric eigendecomposition of M (eigenvalues S^2), in float64."""
    import numpy as np

    phi = np.array(group)
    values, vectors = np.linalg.eigh(phi.T @ phi)
    s = np.sqrt(np.clip(values, 0, None))
    keep = s > tol * s.max()
    w = (vectors[:, keep] / s[keep]) @ vectors[:, keep].T
    return (phi @ w).tolist(), (np.array(ref) @ w).tolist()


def hand_rewards(gen: list[list[float]], ref: list[list[float]], n: int, a: float, d: float, whitening: bool = False):
    """The formula, written out with Python floats: features normalised (or whitened per group), then
    alignment = cosine to the reference, diversity = mean dot product with the group's others."""

    def cos(x, y):
        return dot(x, y) / math.sqrt(dot(x, x) * dot(y, y))

    rewards, align, div, cfm = [], [], [], []
    for p, r in enumerate(ref):
        group = gen[p * n:(p + 1) * n]
        if whitening:
            group, r = hand_whiten(group, r)
        else:
            group, r = [unit(g) for g in group], unit(r)
        for j, g in enumerate(group):
            al = cos(g, r)
            dv = sum(dot(g, h) for k, h in enumerate(group) if k != j) / (n - 1)
            rewards.append(a * al - d * dv)
            align.append(al)
            div.append(dv)
        mean = [sum(g[i] for g in group) / n for i in range(len(r))]
        cfm.append(sum((m - x) ** 2 for m, x in zip(mean, r, strict=True)))
    return rewards, align, div, cfm


@pytest.mark.parametrize("whitening", [False, True], ids=["normalised", "whitened"])
@pytest.mark.parametrize("a, d", [(1.0, 1.0), (0.7, 0.25)])
def test_the_reward_equals_a_hand_written_reference(a, d, whitening):
    import torch
    from ft_plugins.ebft import feature_rewards

    g = torch.Generator().manual_seed(0)
    P, n, D = 3, 4, 6
    gen = torch.randn(P * n, D, generator=g, dtype=torch.float64) * 3
    ref = torch.randn(P, D, generator=g, dtype=torch.float64)
    got = feature_rewards(gen, ref, n, a, d, whitening=whitening)
    rewards, align, div, cfm = hand_rewards(gen.tolist(), ref.tolist(), n, a, d, whitening=whitening)
    for key, expected in (("rewards", rewards), ("alignment", align), ("diversity", div), ("cfm", cfm)):
        assert got[key].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6), key
    if whitening:  # whitening changes the reward: the test would not tell the two apart otherwise
        plain = feature_rewards(gen, ref, n, a, d)
        assert not torch.allclose(plain["rewards"], got["rewards"], atol=1e-3)


def test_the_whitened_reward_in_float32_on_wide_features_matches_the_reference():
    """The trainer's case: float32 features much wider than the group (rank n < D), where the
    pseudo-inverse drops the null space; the reference is the float64 formula."""
    import torch
    from ft_plugins.ebft import feature_rewards

    g = torch.Generator().manual_seed(3)
    P, n, D = 2, 4, 48
    gen = torch.randn(P * n, D, generator=g) + 0.5 * torch.randn(1, D, generator=g)  # correlated samples
    ref = torch.randn(P, D, generator=g)
    got = feature_rewards(gen, ref, n, 2.0, 2.0, whitening=True)
    rewards, align, div, cfm = hand_rewards(gen.double().tolist(), ref.double().tolist(), n, 2.0, 2.0, whitening=True)
    for key, expected in (("rewards", rewards), ("alignment", align), ("diversity", div), ("cfm", cfm)):
        assert got[key].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5), key
    # whitened within its group, a completion has unit norm and is orthogonal to the others: no diversity
    assert got["diversity"].abs().max() < 1e-5
    gen[1] = gen[0]  # two completions of group 0 repeat each other: the penalty falls on them alone
    got = feature_rewards(gen, ref, n, 2.0, 2.0, whitening=True)
    rewards, align, div, cfm = hand_rewards(gen.double().tolist(), ref.double().tolist(), n, 2.0, 2.0, whitening=True)
    assert got["diversity"].tolist() == pytest.approx(div, abs=1e-5)
    assert got["diversity"][0] == got["diversity"][1] == pytest.approx(0.5 / (n - 1), abs=1e-5)
    assert got["diversity"][2:].abs().max() < 1e-5


def test_features_are_pooled_per_layer_normalised_and_concatenated():
    import torch
    from ft_plugins.ebft import layer_indices, pool_features

    assert layer_indices([0.25, 0.5, 0.75], 12) == [3, 6, 9]
    assert layer_indices([0.25, 0.5, 0.75, 1.0], 2) == [1, 2]  # no repeats, never the embeddings
    g = torch.Generator().manual_seed(1)
    hidden = [torch.randn(2, 5, 3, generator=g) for _ in range(3)]  # embeddings + 2 layers
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])  # completion tokens (a padded one in row 0)
    last = pool_features(hidden, [1, 2], mask, "last_token")
    mean = pool_features(hidden, [1, 2], mask, "mean")
    for row, (last_at, span) in enumerate(((3, [2, 3]), (4, [1, 2, 3, 4]))):
        for b, layer in enumerate((1, 2)):
            h = hidden[layer][row]
            expect_last = h[last_at] / h[last_at].norm() / math.sqrt(2)
            avg = h[span].mean(0)
            expect_mean = avg / avg.norm() / math.sqrt(2)
            torch.testing.assert_close(last[row, 3 * b:3 * b + 3], expect_last)
            torch.testing.assert_close(mean[row, 3 * b:3 * b + 3], expect_mean)
    assert torch.allclose(last.norm(dim=-1), torch.ones(2))
    joint = pool_features(hidden, [1, 2], mask, "last_token", "joint")  # as they are: normalised as one vector later
    for row, last_at in ((0, 3), (1, 4)):
        torch.testing.assert_close(joint[row], torch.cat([hidden[1][row, last_at], hidden[2][row, last_at]]))


def write_rows(path: Path, n: int = 8, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                     "reference": f"The result is {a + b}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ebft_config(root: Path, model_dir: Path, **extra) -> dict:
    data = write_rows(root / "rows.jsonl")
    return {"base_model": str(model_dir), "method": "ebft", "datasets": [{"path": str(data), "type": "prompt_reference"}],
            "sequence_len": 64, "dataset_prepared_path": str(root / "prepared"), "dataset_num_proc": 1,
            "output_dir": str(root / "out"), "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2,
            "logging_steps": 1, "learning_rate": 1e-3, "seed": 3, "shuffle": False,
            "ebft": {"num_generations": 4, "max_completion_len": 8, "layers": [0.5, 1.0], **extra.pop("ebft", {})},
            **extra}


def test_prompt_reference_rows_carry_the_reference_tokens_and_eos(tmp_path, ft_tiny_model_dir, ft_tiny_tokenizer):
    from ft.engine.data import prepare_datasets

    config = ebft_config(tmp_path, ft_tiny_model_dir)
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    rows[1]["reference"] = "  "
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = load_context(config)
    prepared = prepare_datasets(ctx, ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg))
    assert len(prepared.train) == len(rows) - 1
    assert "rows.jsonl:2" in json.dumps(prepared.report) and "missing reference" in json.dumps(prepared.report)
    first = prepared.train[0]
    expected = ft_tiny_tokenizer(rows[0]["reference"], add_special_tokens=False)["input_ids"] + [ft_tiny_tokenizer.eos_token_id]
    assert first["reference_ids"] == expected
    assert first["input_ids"] == ft_tiny_tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True,
                                                                     tokenize=True, return_dict=False)


def trainer_for(tmp_path, model_dir, *plugins):
    from ft.engine.data import prepare_datasets
    from ft.engine.train import build_trainer

    config = ebft_config(tmp_path, model_dir, plugins=list(plugins))
    ctx = load_context(config)
    tokenizer = ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg)
    prepared = prepare_datasets(ctx, tokenizer)
    model = ctx.pm.call("ft_load_model", cfg=ctx.cfg, kwargs=ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg), tokenizer=tokenizer)
    model = ctx.pm.call("ft_apply_adapter", cfg=ctx.cfg, model=model) or model
    return build_trainer(ctx, model, tokenizer, prepared), model, prepared


def base_features(model_dir, prompt, completion, layers):
    import torch
    from ft_plugins.ebft import pool_features
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        hidden = base(input_ids=ids, output_hidden_states=True).hidden_states
    mask = torch.tensor([[0] * len(prompt) + [1] * len(completion)])
    return pool_features(hidden, layers, mask, "last_token")


@pytest.mark.slow
@pytest.mark.parametrize("plugins", [("lora",), ()], ids=["lora-adapter-disabled", "full-frozen-copy"])
def test_features_come_from_the_frozen_model(tmp_path, ft_tiny_model_dir, plugins):
    import torch

    trainer, model, prepared = trainer_for(tmp_path, ft_tiny_model_dir, *plugins)
    with torch.no_grad():  # the policy moves away from the base (as training would move it)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    row = prepared.train[0]
    prompt, completion = list(row["input_ids"]), list(row["reference_ids"])
    extractor = trainer.features
    assert extractor.layers == [1, 2]
    got = extractor([prompt], [completion], torch.device("cpu"))
    expected = base_features(ft_tiny_model_dir, prompt, completion, extractor.layers)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the trained policy's own features differ: the extractor did not read them
        hidden = model(input_ids=torch.tensor([prompt + completion]), output_hidden_states=True).hidden_states
    from ft_plugins.ebft import pool_features

    policy = pool_features(hidden, extractor.layers, torch.tensor([[0] * len(prompt) + [1] * len(completion)]),
                           "last_token")
    assert not torch.allclose(policy, expected, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("features", [{}, {"whitening": True, "normalization": "joint"}], ids=["plain", "whitened"])
def test_a_short_ebft_run_logs_alignment_diversity_and_cfm(tmp_path, ft_tiny_model_dir, features):
    from ft.run import run

    result = run(ebft_config(tmp_path, ft_tiny_model_dir, plugins=["lora"], ebft=features))
    assert result.metrics["steps"] == 2
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    for r in history:
        assert {"alignment", "diversity", "cfm_loss", "reward/feature_matching/mean"} <= set(r)
        assert -1 <= r["alignment"] <= 1 and -1 <= r["diversity"] <= 1 and 0 <= r["cfm_loss"]
        assert features or r["cfm_loss"] <= 4  # unit features: |mean - ref| <= 2 (whitened ones are not unit)
        assert r["reward/feature_matching/mean"] == pytest.approx(r["alignment"] - r["diversity"], abs=1e-4)
    line = json.loads((tmp_path / "out" / "completions.jsonl").read_text().splitlines()[0])
    assert set(line["rewards"]) == {"feature_matching"}


def test_strided_mode_cuts_documents_at_anchors(tmp_path, ft_tiny_model_dir, ft_tiny_tokenizer):
    from ft.engine.data import prepare_datasets
    from ft.tools.tiny import corpus

    doc = " ".join(corpus(40, seed=2))
    short = "Too short."
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": doc}) + "\n" + json.dumps({"text": short}) + "\n")
    config = ebft_config(tmp_path, ft_tiny_model_dir, ebft={"max_completion_len": 6})
    config["datasets"] = [{"path": str(tmp_path / "docs.jsonl"), "type": "strided", "stride": 20, "context_len": 30}]
    ctx = load_context(config)
    prepared = prepare_datasets(ctx, ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg))
    ids = ft_tiny_tokenizer(doc, add_special_tokens=False)["input_ids"]
    anchors = list(range(20, len(ids) - 6 + 1, 20))
    assert len(anchors) >= 5 and len(prepared.train) == len(anchors)
    for k, a in enumerate(anchors):
        row = prepared.train[k]
        assert row["input_ids"] == ids[max(0, a - 30):a]
        assert row["reference_ids"] == ids[a:a + 6]
        assert json.loads(row["prompt"]) == ft_tiny_tokenizer.decode(ids[max(0, a - 30):a])
    assert "docs.jsonl:2" in json.dumps(prepared.report) and "document too short" in json.dumps(prepared.report)


@pytest.mark.slow
def test_a_short_strided_run(tmp_path, ft_tiny_model_dir):
    from ft.run import run
    from ft.tools.tiny import corpus

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": " ".join(corpus(30, seed=s))}) + "\n"
                                                 for s in range(3)))
    config = ebft_config(tmp_path, ft_tiny_model_dir, ebft={"max_completion_len": 4}, plugins=["lora"])
    config["datasets"] = [{"path": str(tmp_path / "docs.jsonl"), "type": "strided", "stride": 32, "context_len": 48}]
    result = run(config)
    assert result.metrics["steps"] == 2
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert all({"alignment", "diversity", "cfm_loss"} <= set(r) for r in history)


def test_an_error_in_the_module_level_trainers_reward_names_ebft_not_grpo():
    """EBFTTrainer extends GRPO's Trainer from its own module (ebft/trainer.py): an error in its code is ebft's
    (the frames of a plugin package are its plugin's), not grpo's whose frames surround it."""
    from types import SimpleNamespace

    from ft_plugins.ebft.trainer import EBFTTrainer

    from ft.kernel.errors import plugin_in_traceback
    from ft.kernel.plugins import PluginManager

    PluginManager()  # loads the installed plugins (ebft, grpo) that errors are attributed to
    assert EBFTTrainer.__module__ == "ft_plugins.ebft.trainer"
    broken = SimpleNamespace(_step_rows=None, grpo=SimpleNamespace(num_generations=2))
    with pytest.raises(TypeError) as caught:
        EBFTTrainer._feature_reward(broken, ["p"], ["c"], [[1]])
    plugin, frames = plugin_in_traceback(caught.value)
    assert plugin == "ebft" and "ebft/trainer.py" in frames[-1]
