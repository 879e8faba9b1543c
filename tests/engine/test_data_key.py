"""The prepared-data cache key holds only what shapes the data (issue 24, item 5).

Of the method's section, only fields marked ``SHAPES_DATA`` enter the key: changing ``dpo.beta`` or a GRPO
reward reuses the tokenized rows; changing a marked field (``max_prompt_len``) prepares them again. The
precomputed reference log-probabilities are keyed by the reference's weights, the batch layout and the
scoring code -- not by ``beta``.
"""

from __future__ import annotations

import copy
import logging

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field
from test_grpo import grpo_config
from test_preference import config, pair_rows, prepare, train_config, write_rows

from ft.api import NOT_TRAINING, SHAPES_DATA

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


def test_only_marked_fields_of_a_section_shape_the_data():
    from ft.kernel.config import data_shaping_values

    class Section(BaseModel):
        model_config = ConfigDict(extra="forbid")
        beta: float = 0.1
        limit: int | None = Field(None, json_schema_extra=SHAPES_DATA)
        where: str = Field("x", json_schema_extra={**SHAPES_DATA, **NOT_TRAINING})

    class Whole(BaseModel):
        model_config = ConfigDict(json_schema_extra=SHAPES_DATA)
        a: int = 1
        b: int = 2

    assert data_shaping_values(Section(beta=0.5, limit=3)) == {"limit": 3, "where": "x"}
    assert data_shaping_values(Whole()) == {"a": 1, "b": 2}
    assert data_shaping_values(None) is None


def test_changing_dpo_beta_reuses_the_prepared_data_and_max_prompt_len_does_not(tmp_path, ft_tiny_model_dir):
    data = write_rows(tmp_path / "pairs.jsonl", pair_rows(12))
    first, _ = prepare(config(tmp_path, ft_tiny_model_dir, data, dpo={"beta": 0.1}))
    assert first.stats["cache"] == "built"
    other_loss, _ = prepare(config(tmp_path, ft_tiny_model_dir, data,
                                   dpo={"beta": 0.5, "loss_type": "hinge", "precompute_ref_logps": True}))
    assert other_loss.stats["cache"] == "hit" and other_loss.cache_dir == first.cache_dir
    limited, _ = prepare(config(tmp_path, ft_tiny_model_dir, data, dpo={"beta": 0.1, "max_prompt_len": 40}))
    assert limited.stats["cache"] == "built" and limited.cache_dir != first.cache_dir


def test_changing_a_grpo_reward_reuses_the_prepared_prompts(tmp_path, ft_tiny_model_dir):
    from ft.kernel.context import load_context
    from ft.run import preprocess

    path = grpo_config(tmp_path, ft_tiny_model_dir)
    first, _ = preprocess(load_context(path))
    raw = yaml.safe_load(path.read_text())
    changed = copy.deepcopy(raw)
    changed["grpo"]["rewards"][1]["weight"] = 2.0
    changed["grpo"]["beta"] = 0.04
    changed["grpo"]["rewards"].append({"name": "exact_match", "field": "answer"})
    path.write_text(yaml.safe_dump(changed, sort_keys=False))
    second, _ = preprocess(load_context(path))
    assert second.stats["cache"] == "hit" and second.cache_dir == first.cache_dir


def test_the_reference_logps_key_follows_the_weights_and_layout_not_the_loss_settings(ft_tiny_model_dir):
    import torch
    from ft_plugins.preference import DpoSection
    from ft_plugins.preference_data import SharedPromptCollator, UnitCollator
    from ft_plugins.preference_trainer import PreferenceSetup, reference_cache_path
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir)
    collator = SharedPromptCollator(0, torch.float32)

    def path(beta=0.1, loss_type="sigmoid", collator=collator):
        setup = PreferenceSetup("dpo", DpoSection(beta=beta, loss_type=loss_type, precompute_ref_logps=True),
                                ("chosen", "rejected"), precompute=True, cache_dir="/prepared/key")
        return reference_cache_path(model, setup, collator)

    base = path()
    assert path(beta=0.5, loss_type="ipo") == base, "beta and the loss do not change the reference's log-probs"
    assert path(collator=SharedPromptCollator(0, torch.bfloat16)) != base, "the 4D mask's dtype does"
    assert path(collator=UnitCollator(0, ("chosen", "rejected"))) != base, "so does the pair layout"
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert path() != base, "and the reference's weights"
    model.to(torch.bfloat16)
    assert path() != base


@pytest.mark.slow
def test_a_new_beta_reads_the_stored_reference_logps(tmp_path, ft_tiny_model_dir, caplog):
    from ft.run import run

    caplog.set_level(logging.INFO)
    cfg = train_config(tmp_path, ft_tiny_model_dir, val_set_size=0, eval_steps=None, max_steps=1,
                       dpo={"beta": 0.1, "precompute_ref_logps": True})
    run(cfg)
    assert "computed in one pass and stored in" in caplog.text
    stored = list((tmp_path / "prepared").glob("*/reference/dpo-*.json"))
    assert len(stored) == 1
    caplog.clear()
    run({**cfg, "dpo": {"beta": 0.5, "loss_type": "hinge", "precompute_ref_logps": True}}, overwrite=True)
    assert "reference log-probabilities precomputed earlier, read from" in caplog.text
    assert list((tmp_path / "prepared").glob("*/reference/dpo-*.json")) == stored
