"""Preference methods (dpo, kto, orpo, simpo): data formats, config errors, the debug view, training.

The losses themselves are checked against TRL in test_preference_trl.py; packing exactness in
test_preference_packing.py.
"""

from __future__ import annotations

import io
import json
import math
import random
import re

import pytest

from ft.kernel.errors import ConfigError
from ft.kernel.formats import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


def sums(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, right answer, wrong answer) triples."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append((f"What is {a} plus {b}?", f"The result is {a + b}.", f"The result is {a + b + rng.choice([-2, -1, 1, 2])}."))
    return out


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
             "rejected": [{"role": "assistant", "content": bad}]} for q, good, bad in sums(n, seed)]


def write_rows(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def config(tmp_path, model_dir, data, method="dpo", fmt="preference", **extra) -> dict:
    return {"base_model": str(model_dir), "method": method,
            "datasets": [{"path": data, "type": fmt}], "sequence_len": 64, "shuffle": False,
            "dataset_prepared_path": str(tmp_path / "prepared"), "output_dir": str(tmp_path / "out"),
            "dataset_num_proc": 1, **extra}


def prepare(cfg: dict):
    from ft.engine.data import prepare_datasets
    from ft.kernel.context import load_context

    ctx = load_context(cfg)
    tokenizer = ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg)
    return prepare_datasets(ctx, tokenizer), tokenizer


def rows_of(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


# -- the preference format ------------------------------------------------------------------------


def test_every_pair_layout_gives_the_same_tokens(tmp_path, ft_tiny_model_dir):
    q, good, bad = "What is 2 plus 3?", "The result is 5.", "The result is 6."
    system = "You add numbers."
    user, sys_msg = {"role": "user", "content": q}, {"role": "system", "content": system}
    layouts = {
        "messages": {"prompt": [sys_msg, user], "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]},
        "texts": {"prompt": [sys_msg, user], "chosen": good, "rejected": bad},
        "one message": {"prompt": [sys_msg, user], "chosen": {"role": "assistant", "content": good},
                        "rejected": {"role": "assistant", "content": bad}},
        "implicit prompt": {"chosen": [sys_msg, user, {"role": "assistant", "content": good}],
                            "rejected": [sys_msg, user, {"role": "assistant", "content": bad}]},
        "chatml.intel": {"system": system, "question": q, "chosen": good, "rejected": bad},
        # UltraFeedback: a prompt, and sides that are the whole conversations (they repeat the prompt's turns)
        "prompt + whole conversations": {"prompt": [sys_msg, user],
                                         "chosen": [sys_msg, user, {"role": "assistant", "content": good}],
                                         "rejected": [sys_msg, user, {"role": "assistant", "content": bad}]},
        "text prompt + system + whole conversations": {"system": system, "prompt": q,
                                                       "chosen": [user, {"role": "assistant", "content": good}],
                                                       "rejected": [user, {"role": "assistant", "content": bad}]},
    }
    data = write_rows(tmp_path / "layouts.jsonl", list(layouts.values()))
    out, tok = prepare(config(tmp_path, ft_tiny_model_dir, data))
    rows = rows_of(out.train)
    assert len(rows) == len(layouts) and out.report["dropped_total"] == 0
    assert all(r == rows[0] for r in rows)
    # and a text prompt is a user message
    text_prompt = write_rows(tmp_path / "text.jsonl", [{"prompt": q, "chosen": good, "rejected": bad}])
    out2, _ = prepare(config(tmp_path, ft_tiny_model_dir, text_prompt, dataset_prepared_path=str(tmp_path / "p2")))
    no_system = rows_of(out2.train)[0]
    assert tok.decode(no_system["chosen_input_ids"]).startswith("<|im_start|>user\nWhat is 2 plus 3?")
    # axolotl's field_messages names the prompt's field
    axolotl = write_rows(tmp_path / "axolotl.jsonl", [{"messages": [sys_msg, user],
                                                       "chosen": {"role": "assistant", "content": good},
                                                       "rejected": {"role": "assistant", "content": bad}}])
    cfg = config(tmp_path, ft_tiny_model_dir, axolotl, dataset_prepared_path=str(tmp_path / "p3"))
    cfg["datasets"][0]["field_messages"] = "messages"
    out3, _ = prepare(cfg)
    assert rows_of(out3.train) == [rows[0]] and out3.report["dropped_total"] == 0


def test_a_side_that_begins_with_another_user_turn_than_the_prompt_is_dropped(tmp_path, ft_tiny_model_dir):
    q, good, bad = sums(1)[0]
    other = {"role": "user", "content": "Something else?"}
    rows = [*pair_rows(1), {"prompt": q, "chosen": [other, {"role": "assistant", "content": good}],
                            "rejected": [other, {"role": "assistant", "content": bad}]}]
    data = write_rows(tmp_path / "ambiguous.jsonl", rows)
    out, _ = prepare(config(tmp_path, ft_tiny_model_dir, data))
    assert len(out.train) == 1
    [example] = out.report["dropped"]["prompt turn in the completion"]["examples"]
    assert example["where"] == f"{data}:2"
    assert example["detail"].startswith("'chosen' begins with a user message although the row has a prompt")


def test_kto_reads_the_chatml_intel_layout_with_its_system_message(tmp_path, ft_tiny_model_dir):
    q, good, bad = sums(1)[0]
    rows = [{"system": "You add numbers.", "question": q, "completion": good, "label": True},
            {"system": "You add numbers.", "question": q, "completion": bad, "label": False}]
    data = write_rows(tmp_path / "intel.jsonl", rows)
    expected = f"<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
    for name, extra in (("default", {}), ("field_prompt", {"field_prompt": "question"})):
        cfg = config(tmp_path, ft_tiny_model_dir, data, method="kto", fmt="kto", micro_batch_size=2,
                     dataset_prepared_path=str(tmp_path / name))
        cfg["datasets"][0].update(extra)
        out, tok = prepare(cfg)
        kept = rows_of(out.train)
        assert [r["label"] for r in kept] == [True, False] and out.report["dropped_total"] == 0, name
        assert tok.decode(kept[0]["kto_input_ids"]).startswith(expected), name


def test_field_messages_and_another_field_prompt_is_a_config_error(tmp_path, write_yaml):
    data = write_rows(tmp_path / "d.jsonl", pair_rows(2))
    cfg = config(tmp_path, "m", data)
    cfg["datasets"][0].update(field_messages="conversation", field_prompt="question")
    problems, path = errors(write_yaml, cfg)
    assert any(p.startswith(f"{path}:") and "field_messages ('conversation') and field_prompt ('question') both name "
               "the row field with the prompt; set one of them" in p for p in problems), problems


def test_labels_score_the_completion_and_its_end_of_turn_only(tmp_path, ft_tiny_model_dir):
    data = write_rows(tmp_path / "p.jsonl", pair_rows(1))
    out, tok = prepare(config(tmp_path, ft_tiny_model_dir, data))
    row = rows_of(out.train)[0]
    q, good, bad = sums(1)[0]
    for side, text in (("chosen", good), ("rejected", bad)):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        scored = [i for i, x in zip(ids, labels, strict=True) if x != IGNORE_INDEX]
        assert tok.decode(scored) == f"{text}<|im_end|>"  # content + end-of-turn; not the header, not the newline
        assert tok.decode(ids) == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{text}<|im_end|>\n"
    # both sides share the prompt token for token
    first = row["chosen_labels"].index(next(x for x in row["chosen_labels"] if x != IGNORE_INDEX))
    assert row["chosen_input_ids"][:first] == row["rejected_input_ids"][:first]


def test_bad_rows_are_dropped_and_reported_with_file_and_line(tmp_path, ft_tiny_model_dir):
    good = pair_rows(2)
    long_q = "What is " + " plus ".join(["1"] * 20) + "?"
    rows = [
        good[0],
        {"prompt": "Hi", "chosen": "Hello."},  # line 2: no rejected
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."},  # 3: identical sides
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]},  # 4
        {"prompt": "Hi", "chosen": "  ", "rejected": "Hello."},  # 5: empty completion
        {"prompt": long_q, "chosen": "Twenty.", "rejected": "Ten."},  # 6: prompt over max_prompt_len
        {"chosen": "Hello.", "rejected": "Bye."},  # 7: no prompt at all
        {"prompt": 5, "chosen": "a", "rejected": "b"},  # 8: malformed
        good[1],
    ]
    data = write_rows(tmp_path / "bad.jsonl", rows)
    out, _ = prepare(config(tmp_path, ft_tiny_model_dir, data, dpo={"max_prompt_len": 24}))
    assert len(out.train) == 2
    dropped = out.report["dropped"]
    where = {reason: [e["where"] for e in entry["examples"]] for reason, entry in dropped.items()}
    assert where == {
        "missing side": [f"{data}:2"],
        "chosen equals rejected": [f"{data}:3", f"{data}:4"],
        "empty completion": [f"{data}:5"],
        "prompt longer than max_prompt_len": [f"{data}:6"],
        "missing prompt": [f"{data}:7"],
        "malformed row": [f"{data}:8"],
    }
    detail = dropped["prompt longer than max_prompt_len"]["examples"][0]["detail"]
    assert detail.endswith("prompt tokens > max_prompt_len 24")
    assert "no 'rejected'" in dropped["missing side"]["examples"][0]["detail"]


def test_truncation_applies_to_both_sides_alike(tmp_path, ft_tiny_model_dir):
    q = "What is 1 plus 1?"
    row = {"prompt": q, "chosen": "Two. " * 30, "rejected": "It is two, " * 25}
    data = write_rows(tmp_path / "long.jsonl", [row, *pair_rows(3)])
    dropped, _ = prepare(config(tmp_path, ft_tiny_model_dir, data, sequence_len=48))
    assert len(dropped.train) == 3 and dropped.report["dropped"]["longer than sequence_len"]["count"] == 1
    cut, tok = prepare(config(tmp_path, ft_tiny_model_dir, data, sequence_len=48, excess_length="truncate",
                              dataset_prepared_path=str(tmp_path / "p2")))
    long_pair = rows_of(cut.train)[0]
    for side in ("chosen", "rejected"):
        ids = long_pair[f"{side}_input_ids"]
        assert len(ids) == 48  # cut to sequence_len from the end: the prompt stays whole
        assert tok.decode(ids).startswith(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
        assert long_pair[f"{side}_labels"][-1] != IGNORE_INDEX  # the kept part of the completion is scored


def test_a_pair_that_truncation_makes_identical_is_dropped_and_counted_apart(tmp_path, ft_tiny_model_dir):
    q = "What is 1 plus 1?"
    same_start = {"prompt": q, "chosen": "The answer is two, " * 10 + "right.",
                  "rejected": "The answer is two, " * 10 + "wrong."}  # they differ only past sequence_len
    differ = {"prompt": q, "chosen": "Two. " * 30, "rejected": "It is two, " * 25}
    data = write_rows(tmp_path / "long.jsonl", [same_start, differ, *pair_rows(2)])
    out, _ = prepare(config(tmp_path, ft_tiny_model_dir, data, sequence_len=48, excess_length="truncate"))
    assert len(out.train) == 3
    assert all(r["chosen_input_ids"] != r["rejected_input_ids"] for r in rows_of(out.train))
    [example] = out.report["dropped"]["chosen equals rejected"]["examples"]
    assert example["where"] == f"{data}:1" and "identical after truncation to sequence_len 48" in example["detail"]
    # the truncated pair that is kept counts as truncated; the one truncation spoilt as a drop only
    assert out.report["truncated"] == out.stats["truncated"] == 1 and out.report["dropped_total"] == 1


def test_kto_drops_an_unpaired_pair_that_truncation_makes_identical(tmp_path, ft_tiny_model_dir):
    q = "What is 1 plus 1?"
    same_start = {"prompt": q, "chosen": "The answer is two, " * 10 + "right.",
                  "rejected": "The answer is two, " * 10 + "wrong."}
    data = write_rows(tmp_path / "long.jsonl", [same_start, *pair_rows(2)])
    out, _ = prepare(config(tmp_path, ft_tiny_model_dir, data, method="kto", fmt="kto", micro_batch_size=2,
                            sequence_len=48, excess_length="truncate"))
    assert [r["label"] for r in rows_of(out.train)] == [True, False, True, False]
    [example] = out.report["dropped"]["samples of one row are identical"]["examples"]
    assert example["where"] == f"{data}:1" and "after truncation to sequence_len 48" in example["detail"]


def test_a_long_pair_names_the_side_that_is_too_long(tmp_path, ft_tiny_model_dir):
    row = {"prompt": "What is 1 plus 1?", "chosen": "Two.", "rejected": "It is two, " * 25}
    data = write_rows(tmp_path / "long.jsonl", [row, *pair_rows(2)])
    out, _ = prepare(config(tmp_path, ft_tiny_model_dir, data, sequence_len=48))
    [example] = out.report["dropped"]["longer than sequence_len"]["examples"]
    assert re.fullmatch(r"rejected (\d+) tokens \(prompt (\d+) \+ completion (\d+)\) > sequence_len 48",
                        example["detail"]), example["detail"]


def test_kto_rows_and_unpaired_pairs(tmp_path, ft_tiny_model_dir):
    q, good, bad = sums(1)[0]
    rows = [
        {"prompt": q, "completion": good, "label": True},
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": bad}],
         "label": False},
        {"prompt": q, "chosen": good, "rejected": bad},  # a pair: unpaired into two rows
        {"prompt": q, "completion": good, "label": "yes"},  # line 4: malformed label
        {"prompt": q, "label": True},  # line 5: no completion
    ]
    data = write_rows(tmp_path / "kto.jsonl", rows)
    out, tok = prepare(config(tmp_path, ft_tiny_model_dir, data, method="kto", fmt="kto", micro_batch_size=2))
    kept = rows_of(out.train)
    assert [r["label"] for r in kept] == [True, False, True, False]
    assert kept[0]["kto_input_ids"] == kept[2]["kto_input_ids"] and kept[1]["kto_input_ids"] == kept[3]["kto_input_ids"]
    scored = [i for i, x in zip(kept[1]["kto_input_ids"], kept[1]["kto_labels"], strict=True) if x != IGNORE_INDEX]
    assert tok.decode(scored) == f"{bad}<|im_end|>"
    dropped = out.report["dropped"]
    assert dropped["malformed row"]["examples"][0] == {"where": f"{data}:4",
                                                        "detail": "'label' must be true or false, got 'yes'"}
    assert dropped["missing side"]["examples"][0]["where"] == f"{data}:5"


# -- config errors, before any model loads -----------------------------------------------------------


def errors(write_yaml, cfg: dict, plugin_args=()) -> list[str]:
    from ft.kernel.context import load_context

    path = write_yaml(cfg)
    with pytest.raises(ConfigError) as info:
        load_context(path, plugin_args)
    return info.value.problems, str(path)


def test_config_errors_name_file_line_and_fix(tmp_path, write_yaml):
    data = write_rows(tmp_path / "d.jsonl", pair_rows(2))
    problems, path = errors(write_yaml, config(tmp_path, "m", data, fmt="chat_template"))
    assert any(p.startswith(f"{path}:") and "dataset type 'chat_template' gives input_ids, labels, but method 'dpo' "
               "needs chosen_input_ids" in p and "Types for this method: preference." in p for p in problems), problems

    problems, path = errors(write_yaml, config(tmp_path, "m", data, kto={"beta": 0.2}))
    assert any("kto: section 'kto' configures method 'kto', but the method is 'dpo'. Set `method: kto`" in p
               for p in problems), problems

    problems, path = errors(write_yaml, config(tmp_path, "m", data, dpo={"loss_type": "hinge", "label_smoothing": 0.1}))
    assert any(p.startswith(f"{path}:") and "dpo.label_smoothing: label_smoothing applies to loss_type sigmoid" in p
               for p in problems), problems

    problems, path = errors(write_yaml, config(tmp_path, "m", data, dpo={"loss_type": "sigmod"}))
    assert any("dpo.loss_type: Input should be 'sigmoid', 'ipo', 'hinge' or 'robust'" in p for p in problems), problems

    problems, path = errors(write_yaml, config(tmp_path, "m", data, dpo={"max_prompt_len": 64}))
    assert any("dpo.max_prompt_len: max_prompt_len (64) must be below sequence_len (64)" in p for p in problems)

    problems, path = errors(write_yaml, config(tmp_path, "m", data, train_on_inputs=True))
    assert any("train_on_inputs: dpo scores the completions of preference data only" in p for p in problems)


def test_kto_config_errors(tmp_path, write_yaml):
    data = write_rows(tmp_path / "d.jsonl", pair_rows(2))
    problems, path = errors(write_yaml, config(tmp_path, "m", data, method="kto", fmt="kto", micro_batch_size=1))
    assert any(p.startswith(f"{path}:") and "micro_batch_size: kto estimates its KL term from mismatched pairs" in p
               for p in problems), problems
    problems, _ = errors(write_yaml, config(tmp_path, "m", data, method="kto", fmt="kto", micro_batch_size=4,
                                            plugins=["packing"]))
    assert any("plugin 'packing' needs packing, which method 'kto' does not support" in p for p in problems), problems


# -- ft preprocess --debug --------------------------------------------------------------------------


def test_debug_view_shows_prompt_chosen_and_rejected_with_scored_tokens(tmp_path, ft_tiny_model_dir):
    from ft.tools.debug import show_samples

    data = write_rows(tmp_path / "p.jsonl", pair_rows(3))
    out, tok = prepare(config(tmp_path, ft_tiny_model_dir, data))
    buf = io.StringIO()
    show_samples(out.train, tok, 1, stream=buf, colour=False)
    text = buf.getvalue()
    q, good, bad = sums(1)[0]
    assert f"prompt:\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" in text
    assert f"chosen:\n[+{good}<|im_end|>+]\n" in text and f"rejected:\n[+{bad}<|im_end|>+]\n" in text
    assert "--- row 2" not in text


# -- training -----------------------------------------------------------------------------------------


METHODS = {
    "dpo": ("preference", {"beta": 0.1}),
    "kto": ("kto", {"beta": 0.1, "undesirable_weight": 1.2}),
    "orpo": ("preference", {"beta": 0.2}),
    "simpo": ("preference", {"beta": 2.0, "gamma": 0.5, "cpo_alpha": 0.5}),
}


def train_config(tmp_path, model_dir, method="dpo", n=24, **extra) -> dict:
    fmt, section = METHODS[method]
    data = write_rows(tmp_path / "pairs.jsonl", pair_rows(n))
    base = config(tmp_path, model_dir, data, method=method, fmt=fmt, **{method: section})
    base.update({"micro_batch_size": 4, "max_steps": 4, "logging_steps": 1, "learning_rate": 1e-2,
                 "lr_scheduler": "constant", "seed": 0, "val_set_size": 4, "eval_steps": 2, "shuffle": True})
    base.update(extra)
    return base


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_logs_its_metrics(tmp_path, ft_tiny_model_dir, method):
    from ft.run import run

    result = run(train_config(tmp_path, ft_tiny_model_dir, method))
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    history, summary = metrics["history"], metrics["summary"]
    assert summary["method"] == method and summary["steps"] == 4
    expected = {"dpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                        "logps/chosen", "logps/rejected"),
                "kto": ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                        "kl"),
                "orpo": ("rewards/accuracies", "nll_loss", "log_odds_ratio", "log_odds_chosen"),
                "simpo": ("rewards/margins", "rewards/accuracies", "nll_loss")}[method]
    train_rows = [r for r in history if "loss" in r]
    assert len(train_rows) == 4 and all(math.isfinite(r["loss"]) for r in train_rows)
    assert all(name in train_rows[-1] for name in expected), train_rows[-1]
    evals = [r for r in history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(f"eval_{name}" in evals[-1] for name in expected), evals[-1]
    assert set(summary["method_metrics"]) >= set(expected)
    if method == "dpo":
        assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
        assert train_rows[0]["rewards/accuracies"] == 0.0 and train_rows[0]["rewards/margins"] == 0.0
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert result.metrics["train_tokens"] > 0


@pytest.mark.slow
def test_reference_plans_are_logged_and_precomputed_logps_give_the_same_run(tmp_path, ft_tiny_model_dir, caplog):
    import logging

    from ft.run import run

    caplog.set_level(logging.INFO)
    copy = run(train_config(tmp_path / "copy", ft_tiny_model_dir, val_set_size=0, eval_steps=None))
    assert "dpo: reference model = a frozen copy of the initial model" in caplog.text
    caplog.clear()
    cfg = train_config(tmp_path / "pre", ft_tiny_model_dir, val_set_size=0, eval_steps=None,
                       dpo={"beta": 0.1, "precompute_ref_logps": True})
    pre = run(cfg)
    assert "reference log-probabilities precomputed in one pass before training (the initial model)" in caplog.text
    assert "computed in one pass and stored in" in caplog.text and "frozen copy" not in caplog.text
    stored = list((tmp_path / "pre" / "prepared").glob("*/reference/dpo-*.json"))
    assert len(stored) == 1
    def losses(name):
        history = json.loads((tmp_path / name / "out" / "metrics.json").read_text())["history"]
        return [v for h in history if "loss" in h for v in (h["loss"], h["rewards/margins"])]

    assert copy.metrics["steps"] == pre.metrics["steps"] == 4
    assert losses("pre") == pytest.approx(losses("copy"), rel=1e-5, abs=1e-6)
    # a second run reads the stored log-probabilities
    caplog.clear()
    run(cfg, overwrite=True)
    assert "reference log-probabilities precomputed earlier, read from" in caplog.text
    # an edited file fails its checksum: computed again, with a warning, and the run is the same
    [stored_file] = stored
    values = json.loads(stored_file.read_text())
    values["train"] = [[c - 5.0, r] for c, r in values["train"]]
    stored_file.write_text(json.dumps(values))
    caplog.clear()
    run(cfg, overwrite=True)
    assert "do not match the prepared data's manifest" in caplog.text and "computing them again" in caplog.text
    assert losses("pre") == pytest.approx(losses("copy"), rel=1e-5, abs=1e-6)


def test_stored_reference_logps_are_checked_against_the_prepared_data_manifest(tmp_path, caplog):
    from ft_plugins.preference_trainer import load_reference, save_reference

    from ft.engine.cache import write_manifest

    cache_dir = tmp_path / "key"
    cache_dir.mkdir()
    (cache_dir / "report.json").write_text("{}")
    write_manifest(cache_dir)
    path = cache_dir / "reference" / "dpo-abc.json"
    stored = {"train": [[-1.5, -2.5], [-3.0, -4.0]]}
    save_reference(path, stored)
    assert load_reference(path) == stored
    assert "reference/dpo-abc.json" in json.loads((cache_dir / "manifest.json").read_text())["added"]
    # same size, other values: only the checksum tells
    path.write_text(path.read_text().replace("-1.5", "-7.5"))
    assert load_reference(path) is None and not path.exists()
    assert "(reference/dpo-abc.json changed since it was written); computing them again" in caplog.text
    # a file the manifest does not list (written by hand, or a run killed before recording it) is not trusted
    by_hand = cache_dir / "reference" / "kto-def.json"
    by_hand.write_text(json.dumps(stored))
    caplog.clear()
    assert load_reference(by_hand) is None
    assert "is not listed in the cache's manifest.json" in caplog.text


@pytest.mark.slow
def test_lora_uses_the_adapter_disabled_base_as_the_reference(tmp_path, ft_tiny_model_dir, caplog):
    import logging

    from ft.run import run

    caplog.set_level(logging.INFO)
    result = run(train_config(tmp_path, ft_tiny_model_dir, plugins=["lora"], lora={"r": 4, "alpha": 8},
                              learning_rate=5e-3))
    assert "reference model = the base model with the adapter disabled (no second copy in memory)" in caplog.text
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and result.metrics["steps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_packed_runs_train(tmp_path, ft_tiny_model_dir, method):
    from ft.run import run

    result = run(train_config(tmp_path, ft_tiny_model_dir, method, plugins=["packing"], micro_batch_size=2))
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert result.metrics["steps"] == 4 and all(math.isfinite(r["loss"]) for r in history if "loss" in r)
    assert any("eval_rewards/accuracies" in r for r in history)  # eval rows are laid out by the packed collator


# -- resume after kill -9 -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True])
def test_resume_after_kill_9_gives_the_same_losses(tmp_path, ft_tiny_model_dir, precompute):
    """Killed (SIGKILL) after checkpoint-3: the resumed run's losses and rewards equal the uninterrupted
    run's, whether the reference is a frozen copy of the initial model or precomputed log-probabilities
    (read back from beside the prepared data)."""
    import signal

    import yaml
    from test_crash import PausedRun

    from ft.run import run

    def write(root):
        cfg = train_config(root, ft_tiny_model_dir, n=16, val_set_size=0, eval_steps=None, max_steps=8, save_steps=3,
                           micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-3,
                           dpo={"beta": 0.1, "precompute_ref_logps": precompute})
        path = root / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def history(root):
        rows = json.loads((root / "out" / "metrics.json").read_text())["history"]
        return {r["step"]: r for r in rows}

    run(write(tmp_path / "whole"))
    config = write(tmp_path / "killed")
    paused = PausedRun(tmp_path / "killed", config, "step_end:5")
    paused.proc.kill()
    assert paused.finish() == -signal.SIGKILL
    resumed = run(config)
    assert resumed.metrics["resumed_from"].endswith("checkpoint-3") and resumed.metrics["steps"] == 8
    want, got = history(tmp_path / "whole"), history(tmp_path / "killed")
    for step in range(4, 9):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True])
def test_qlora_dpo_uses_the_quantized_base_without_its_adapter(tmp_path, ft_tiny_model_dir, caplog, precompute):
    import logging

    from ft.run import run

    caplog.set_level(logging.INFO)
    result = run(train_config(tmp_path, ft_tiny_model_dir, plugins=["lora", "qlora"], bf16=False, val_set_size=0,
                              eval_steps=None, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                              qlora={"compute_dtype": "float32"}, dpo={"beta": 0.1, "precompute_ref_logps": precompute}))
    plan = ("precomputed in one pass before training (the base with the adapter disabled)" if precompute
            else "reference model = the base model with the adapter disabled (no second copy in memory)")
    assert plan in caplog.text
    history = [r for r in json.loads((tmp_path / "out" / "metrics.json").read_text())["history"] if "loss" in r]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result.metrics["steps"] == 4 and history[-1]["rewards/margins"] > 0
    assert (tmp_path / "out" / "base_quantization.json").is_file()


def test_kto_mismatched_pairs_take_another_prompt(tmp_path, ft_tiny_model_dir):
    """The KL term's pairs put each prompt with a completion of another prompt, also when the two rows
    of an unpaired pair sit next to each other."""
    from ft.kernel.context import load_context

    questions = ["What is one plus two?", "Say hello.", "Name a red fish."]
    answers = [("It is three.", "It is four."), ("Hello there.", "Bye now."), ("A red cat.", "A blue dog.")]
    rows = [{"prompt": q, "chosen": good, "rejected": bad} for q, (good, bad) in zip(questions, answers, strict=True)]
    data = write_rows(tmp_path / "kto.jsonl", rows)  # 6 kto rows: each pair's two rows side by side
    cfg = config(tmp_path, ft_tiny_model_dir, data, method="kto", fmt="kto", micro_batch_size=6)
    out, tok = prepare(cfg)
    ctx = load_context(cfg)
    batch = ctx.method.collator(ctx.cfg, tok)(rows_of(out.train))
    texts = [tok.decode(ids[ids != tok.pad_token_id]) for ids in batch["kl_input_ids"]]
    flat = [a for pair in answers for a in pair]
    for i, text in enumerate(texts):
        assert questions[i // 2] in text
        partner = next(k for k, a in enumerate(flat) if f"{a}<|im_end|>" in text)
        assert partner // 2 != i // 2, f"row {i} is paired with its own prompt's answer: {text!r}"
