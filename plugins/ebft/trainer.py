"""The EBFT Trainer: GRPO whose reward is feature matching against each row's reference completion.

A module-level class (imported when training: it needs torch); ``ft_plugins.ebft.trainer_class`` returns it.
"""

from __future__ import annotations

from typing import Any

import torch
from ft_plugins.ebft import NAME, REWARD, FeatureExtractor, feature_rewards
from ft_plugins.grpo import RewardFunction
from ft_plugins.grpo import trainer_class as grpo_trainer_class

from ft.api import FtError


class EBFTTrainer(grpo_trainer_class()):  # GRPO's Trainer, through grpo's documented API
    """GRPO whose reward is feature matching against the row's reference completion."""

    def __init__(self, *args: Any, features: FeatureExtractor, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.features = features
        self.features.frozen.to(self.args.device)
        if self._logits_to_keep:
            self.features.extra = {"logits_to_keep": 1}
        self.rewards = [RewardFunction(REWARD, 1.0, self._feature_reward, NAME), *self.rewards]
        self._step_rows: list[dict[str, Any]] = []

    def _generate_step(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._step_rows = rows  # the reward needs each group's prompt and reference tokens
        return super()._generate_step(rows)

    def _feature_reward(self, prompts, completions, completion_ids, **columns):
        rows, g = self._step_rows, self.grpo.num_generations
        if len(completion_ids) != len(rows) * g:
            raise FtError(f"ebft: {len(completion_ids)} completions for {len(rows)} prompts x {g}: the feature "
                          "reward scores whole groups only.")
        opts, device = self.grpo, self.args.device
        prompt_ids = [list(r["input_ids"]) for r in rows]
        with torch.no_grad():
            generated = self.features([prompt_ids[k // g] for k in range(len(completion_ids))],
                                      [list(c) for c in completion_ids], device)
            reference = self.features(prompt_ids, [list(r["reference_ids"]) for r in rows], device)
            got = feature_rewards(generated, reference, g, opts.alignment_coef, opts.diversity_coef,
                                  opts.whitening)
        self._record({"alignment": got["alignment"].mean(), "diversity": got["diversity"].mean(),
                      "cfm_loss": got["cfm"].mean()})
        return got["rewards"].tolist()
