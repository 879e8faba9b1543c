"""The ``ebft`` training method: Energy-Based Fine-Tuning, structured mode (feature matching, no reward function).

EBFT ("Matching Features, Not Tokens", Jelassi et al. 2026, arXiv 2603.12248) trains on prompts with a
reference completion. It is GRPO (the same generation, groups, advantages and clipped loss: this plugin
subclasses ``ft_plugins.grpo``'s Trainer) with one reward computed from the model's own features:

1. For every prompt the policy samples ``num_generations`` completions (a group).
2. A frozen model -- the base with the adapter disabled under lora/qlora, else a frozen copy made before
   training -- reads ``prompt + completion`` and ``prompt + reference``; the hidden states at the layers
   ``layers`` (fractions of the depth: 0.25 = a quarter of the way up) are pooled over the completion's
   tokens (``pooling``: ``last_token`` or ``mean``) and concatenated into the feature phi:
   ``normalization: per_layer`` L2-normalises each layer's vector first (divided by sqrt(number of layers),
   so phi has norm 1); ``joint`` concatenates them as they are and L2-normalises phi as one vector.
3. Completion j of a group gets the reward

       r_j = alignment_coef * cos(phi_j, phi_ref) - diversity_coef * mean_{j' != j} cos(phi_j, phi_j')

   (the paper's factor 2 on both terms is absorbed in the coefficients). With ``whitening: true`` the
   group's features are whitened instead of normalised (W = U diag(1/S) U^T from the SVD of the group's
   generated features, applied to them and to the reference; axolotl's ``use_whitening``): the alignment
   stays a cosine and the diversity becomes the whitened features' dot product (the paper's variant i).

Logged besides GRPO's metrics: ``alignment`` (mean cosine to the reference), ``diversity`` (mean pairwise
similarity within groups) and ``cfm_loss``, the conditional feature-matching diagnostic
``||mean_j(phi_j) - phi_ref||^2`` averaged over groups: it falls as the generated features match the
reference's.

Data: structured mode, ``type: prompt_reference`` rows ``{"prompt": messages or text, "reference": text}``;
strided mode, ``type: strided`` raw documents ``{"text": ...}`` cut at anchors every ``stride`` tokens: the
``context_len`` tokens before an anchor are the prompt, the next ``max_completion_len`` tokens the reference,
and the policy's short rollouts from the anchor are matched to it. Settings: the ``ebft:`` section (GRPO's
sampling and loss settings plus the ones above).

torch is imported inside functions.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from ft_plugins.grpo import GENERATION, GRPOOptions, PromptOptions, PromptTokenize, build_prompt_tokenize
from pydantic import Field, field_validator

from ft import hookimpl
from ft.api import SHAPES_DATA, DatasetOptions, Dropped, FtError, Method, Plugin

PLUGIN = Plugin()  # a method: chosen with `method: ebft`

log = logging.getLogger("ft.ebft")

NAME = "ebft"
COLUMNS = ("input_ids", "prompt", "reference_ids")
REWARD = "feature_matching"
MALFORMED = "malformed row"
METRICS = ("reward", "reward_std", "alignment", "diversity", "cfm_loss", "completion_length", "entropy",
           "clip_ratio", "kl", "completion_truncated")


class EbftOptions(GRPOOptions):
    """The ``ebft:`` section: GRPO's generation and loss settings, plus the feature-matching reward's."""

    max_completion_len: int = Field(256, ge=1, json_schema_extra=SHAPES_DATA, description="Most tokens per "
                                    "completion (sequence_len bounds the prompt); type strided cuts references of "
                                    "this length from the documents.")

    layers: list[float] = Field([0.25, 0.5, 0.75], min_length=1, description="Depths whose hidden states make the "
                                "features, as fractions of the layer count (0 < f <= 1; 0.5 = the middle layer).")
    pooling: Literal["last_token", "mean"] = Field(
        "last_token", description="Pool a completion's hidden states at its last token, or average them over its tokens.")
    normalization: Literal["per_layer", "joint"] = Field(
        "per_layer", description="How the layers' pooled hidden states become one feature: per_layer = each layer's "
        "L2-normalised, then concatenated (every layer weighs the same; axolotl's strided mode); joint = concatenated "
        "as they are, then L2-normalised as one vector (larger-norm layers weigh more; axolotl's structured mode).")
    whitening: bool = Field(False, description="Whiten each group's features before the reward (axolotl's "
                            "use_whitening): W = U diag(1/S) U^T from the SVD of the group's generated features, "
                            "applied to them and to the reference; the alignment is then the cosine of the whitened "
                            "features, the diversity their plain dot product (the paper's variant i).")
    alignment_coef: float = Field(1.0, ge=0, description="Weight of the cosine similarity to the reference's features.")
    diversity_coef: float = Field(1.0, ge=0, description="Weight of the penalty on the mean pairwise similarity of a "
                                  "group's completions (keeps the group from collapsing to one answer).")

    @field_validator("layers")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        bad = [f for f in value if not 0 < f <= 1]
        if bad:
            raise ValueError(f"layer fractions must be in (0, 1], got {bad}; e.g. [0.25, 0.5, 0.75]")
        return value


# -- data: prompt + reference ---------------------------------------------------------------------


class PromptReferenceOptions(PromptOptions):
    """Dataset-entry options of ``type: prompt_reference``."""

    field_reference: str = Field("reference", description="Row field with the reference completion: a text (or "
                                 "one assistant message).")


class PromptReferenceTokenize:
    """Rows -> GRPO's prompt columns plus ``reference_ids`` (the reference completion's tokens, then EOS)."""

    def __init__(self, prompts: PromptTokenize, tokenizer: Any, field: str):
        from ft.api import TextEncoder

        self.prompts, self.field = prompts, field
        self.encoder, self.eos = TextEncoder(tokenizer), tokenizer.eos_token_id

    def _text(self, value: Any) -> str | None:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) and value.strip() else None

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        out = self.prompts(rows)
        kept, texts = [], []
        for r, (row, got) in enumerate(zip(rows, out, strict=True)):
            if isinstance(got, Dropped):
                continue
            text = self._text(row.get(self.field))
            if text is None:
                out[r] = Dropped("missing reference", f"'{self.field}' must be a non-empty text (or one message)")
                continue
            kept.append(r)
            texts.append(text)
        for r, ids in zip(kept, self.encoder.ids(texts), strict=True):
            out[r]["reference_ids"] = list(ids) + ([self.eos] if self.eos is not None else [])
        return out


def build_prompt_reference(cfg: Any, entry: PromptReferenceOptions, tokenizer: Any) -> PromptReferenceTokenize:
    return PromptReferenceTokenize(build_prompt_tokenize(cfg, entry, tokenizer), tokenizer, entry.field_reference)


# -- data: strided anchors in raw documents -------------------------------------------------------


class StridedOptions(DatasetOptions):
    """Dataset-entry options of ``type: strided`` (EBFT's strided mode): raw documents, cut at anchors."""

    field: str = Field("text", description="Row field with the document's raw text.")
    stride: int = Field(256, ge=1, description="Tokens between two anchors; the first anchor is this far into the "
                        "document.")
    context_len: int = Field(512, ge=1, description="Most tokens of the document before an anchor that make its "
                             "prompt (at most sequence_len).")


class StridedTokenize:
    """Documents -> one sample per anchor: the ``context_len`` tokens before it as the prompt, the next
    ``max_completion_len`` tokens as the reference (short rollouts of that length are matched to it)."""

    def __init__(self, tokenizer: Any, options: StridedOptions, rollout_len: int):
        from ft.api import TextEncoder

        self.encoder, self.options, self.rollout_len = TextEncoder(tokenizer), options, rollout_len
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        import json

        o = self.options
        out: list[Any] = [None] * len(rows)
        kept, texts = [], []
        for r, row in enumerate(rows):
            text = row.get(o.field)
            if not isinstance(text, str) or not text.strip():
                out[r] = Dropped(MALFORMED, f"'{o.field}' must be a non-empty text (the document)")
                continue
            kept.append(r)
            texts.append(text)
        for r, ids in zip(kept, self.encoder.ids(texts), strict=True):
            ids = self.bos + list(ids)
            samples = []
            for anchor in anchor_positions(len(ids), o.stride, self.rollout_len):
                context = ids[max(0, anchor - o.context_len):anchor]
                samples.append({"input_ids": context, "reference_ids": ids[anchor:anchor + self.rollout_len],
                                "prompt": json.dumps(self.tokenizer.decode(context), ensure_ascii=False)})
            out[r] = samples or Dropped("document too short", f"{len(ids)} tokens: no anchor at a multiple of "
                                        f"{o.stride} is followed by {self.rollout_len} tokens")
        return out


def anchor_positions(length: int, stride: int, rollout_len: int) -> list[int]:
    """Anchors at ``stride``, ``2 * stride`` ... with ``rollout_len`` tokens after each."""
    return list(range(stride, length - rollout_len + 1, stride))


def build_strided(cfg: Any, entry: StridedOptions, tokenizer: Any) -> StridedTokenize:
    from ft.api import entry_where

    section = cfg.section(cfg.method)
    rollout_len = getattr(section, "max_completion_len", None)
    if rollout_len is None:
        raise FtError(f"{entry_where(cfg, entry, 'type')}: type strided is EBFT's strided mode; it needs an online "
                      f"method (method: ebft), whose max_completion_len is the rollout length, not {cfg.method}.")
    if entry.context_len > cfg.sequence_len:
        raise FtError(f"{entry_where(cfg, entry, 'context_len')}: context_len ({entry.context_len}) is longer than "
                      f"sequence_len ({cfg.sequence_len}); lower it, e.g. context_len: {cfg.sequence_len}.")
    return StridedTokenize(tokenizer, entry, rollout_len)


# -- the maths --------------------------------------------------------------------------------------


def layer_indices(fractions: list[float], num_layers: int) -> list[int]:
    """Indices into ``hidden_states`` (0 = the embeddings, ``num_layers`` = the last layer) of the depths
    ``fractions``, without repeats, in order."""
    picked = [min(num_layers, max(1, round(f * num_layers))) for f in fractions]
    return list(dict.fromkeys(picked))


def pool_features(hidden_states: Any, layers: list[int], mask: Any, pooling: str,
                  normalization: str = "per_layer") -> Any:
    """``[B, D]`` features: each layer's hidden states pooled over ``mask`` (``[B, T]``, the completion's
    tokens) at the last one or on average, then concatenated. ``per_layer``: each layer's pooled vector
    L2-normalised first and the concatenation divided by sqrt(len(layers)) (norm 1); ``joint``: concatenated
    as they are (``feature_rewards`` normalises -- or whitens -- the whole vector)."""
    import torch

    mask = mask.to(torch.float32)
    blocks = []
    for i in layers:
        h = hidden_states[i].float()
        if pooling == "last_token":
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
            pooled = h[torch.arange(h.shape[0], device=h.device), last]
        else:
            pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        blocks.append(pooled if normalization == "joint" else torch.nn.functional.normalize(pooled, dim=-1))
    features = torch.cat(blocks, dim=-1)
    return features if normalization == "joint" else features / math.sqrt(len(layers))


WHITEN_TOL = 1e-5  # singular values below this fraction of the largest are dropped (axolotl's whiten_tol)


def whiten(generated: Any, reference: Any, tol: float = WHITEN_TOL) -> tuple[Any, Any]:
    """Whiten each group (``generated`` ``[P, n, D]``, ``reference`` ``[P, D]``) with its generated features'
    feature-space SVD: ``phi^T = U S V^T``, ``W = U diag(1/S) U^T`` (singular values under ``tol`` x the
    largest are dropped: a pseudo-inverse), returned as ``(generated @ W, reference @ W)``. No centering,
    as axolotl's ``whiten_embeddings_batched``; W is applied as ``((x @ U) / S) @ U^T``, never built as D x D."""
    import torch

    u, s, _ = torch.linalg.svd(generated.transpose(1, 2), full_matrices=False)  # u [P, D, k], s [P, k]
    inv = torch.where(s > tol * s.amax(-1, keepdim=True), 1.0 / (s + 1e-12), torch.zeros_like(s)).unsqueeze(1)

    def apply(x: Any) -> Any:
        return ((x @ u) * inv) @ u.transpose(1, 2)

    return apply(generated), apply(reference.unsqueeze(1)).squeeze(1)


def feature_rewards(generated: Any, reference: Any, num_generations: int, alignment_coef: float,
                    diversity_coef: float, whitening: bool = False) -> dict[str, Any]:
    """The feature-matching reward of each completion (``generated`` ``[P * n, D]``, groups consecutive;
    ``reference`` ``[P, D]``), with its alignment and diversity terms (``[P * n]``) and the CFM
    diagnostic ``||mean(gen) - ref||^2`` per group (``[P]``).

    The features are L2-normalised first, or, with ``whitening``, whitened per group (:func:`whiten`);
    then alignment = cos(phi_j, phi_ref), diversity = mean_{j' != j} phi_j . phi_j' (a cosine when
    normalised, the whitened features' dot product when whitened), and the CFM is taken on them."""
    import torch

    n = num_generations
    gen = generated.float() if generated.dtype != torch.float64 else generated
    gen = gen.view(-1, n, generated.shape[-1])  # [P, n, D]
    ref = reference.to(gen.dtype)
    if whitening:
        try:
            gen, ref = whiten(gen, ref)
        except torch.linalg.LinAlgError as error:  # an SVD that does not converge: rare, and only this step
            log.warning("ebft: whitening failed this step (%s); the features are L2-normalised instead", error)
            whitening = False
    if not whitening:
        gen, ref = torch.nn.functional.normalize(gen, dim=-1), torch.nn.functional.normalize(ref, dim=-1)
    unit_gen = torch.nn.functional.normalize(gen, dim=-1)
    unit_ref = torch.nn.functional.normalize(ref, dim=-1)
    alignment = (unit_gen * unit_ref.unsqueeze(1)).sum(-1)  # [P, n]
    sims = gen @ gen.transpose(1, 2)  # [P, n, n]
    others = ~torch.eye(n, dtype=torch.bool, device=sims.device)
    diversity = (sims * others).sum(-1) / max(n - 1, 1)
    rewards = alignment_coef * alignment - diversity_coef * diversity
    cfm = ((gen.mean(1) - ref) ** 2).sum(-1)
    return {"rewards": rewards.reshape(-1), "alignment": alignment.reshape(-1), "diversity": diversity.reshape(-1),
            "cfm": cfm}


# -- the trainer ----------------------------------------------------------------------------------


class FeatureExtractor:
    """Features of ``prompt + completion`` sequences from the frozen model (``ft.api.ReferenceModel``: the
    adapter disabled, or a frozen copy)."""

    def __init__(self, frozen: Any, options: EbftOptions, num_layers: int, pad_token_id: int):
        self.frozen, self.options, self.pad = frozen, options, pad_token_id
        self.layers = layer_indices(options.layers, num_layers)
        self.extra: dict[str, Any] = {}  # {"logits_to_keep": 1} where the model takes it: no logits for all tokens

    def __call__(self, prompts: list[list[int]], completions: list[list[int]], device: Any) -> Any:
        from ft_plugins.grpo import pack_rows

        batch = pack_rows(prompts, completions, self.pad, device)
        width = batch["completion_ids"].shape[1]
        mask = batch["attention_mask"].clone()
        mask[:, : mask.shape[1] - width] = 0  # the completion's tokens only
        out = self.frozen.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"], output_hidden_states=True, use_cache=False, **self.extra)
        return pool_features(out.hidden_states, self.layers, mask, self.options.pooling, self.options.normalization)


def _num_layers(model: Any) -> int:
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config
    layers = getattr(config, "num_hidden_layers", None)
    if not layers:
        raise FtError(f"ebft: cannot tell how many layers {type(model).__name__} has (no config.num_hidden_layers), "
                      "so ebft.layers cannot be placed.")
    return int(layers)


def trainer_kwargs(cfg: Any, model: Any, tokenizer: Any, data: Any) -> dict[str, Any]:
    from ft.api import ReferenceModel

    opts = cfg.section(NAME)
    frozen = ReferenceModel.for_training(model, "ebft features")  # the base with the adapter off, or a frozen copy
    reference = frozen if opts.beta > 0 else None  # the KL's reference is the same frozen model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extractor = FeatureExtractor(frozen, opts, _num_layers(model), pad)
    log.info("ebft: features from hidden states %s of %d layers (%s pooling, %s normalisation%s), frozen model = %s",
             extractor.layers, _num_layers(model), opts.pooling, opts.normalization,
             ", whitened per group" if opts.whitening else "", frozen.plan)
    return {"grpo": opts, "rewards": [], "reference": reference, "ft_cfg": cfg, "features": extractor}


def trainer_class() -> type:
    """The EBFT Trainer class (imported when training: it needs torch and transformers)."""
    from ft_plugins.ebft.trainer import EBFTTrainer

    return EBFTTrainer


# -- registration and checks --------------------------------------------------------------------------


@hookimpl
def ft_add_config(registry):
    registry.add(NAME, EbftOptions)


@hookimpl
def ft_register_formats(register):
    register.add("prompt_reference", PromptReferenceOptions, build_prompt_reference, columns=COLUMNS)
    register.add("strided", StridedOptions, build_strided, columns=COLUMNS)


def _collator(cfg: Any, tokenizer: Any) -> Any:
    from ft_plugins.grpo import prompt_collator

    return prompt_collator(cfg, tokenizer)


@hookimpl
def ft_register_methods(register):
    register.add(Method(
        name=NAME, columns=COLUMNS, collator=_collator, trainer_class=trainer_class, trainer_kwargs=trainer_kwargs,
        metrics=METRICS, features=frozenset({GENERATION}),
        description="energy-based fine-tuning: GRPO whose reward matches the frozen model's features of a "
        "completion to those of the reference",
    ))


@hookimpl
def ft_validate_config(cfg):
    if cfg.method != NAME:
        return None
    opts, problems = cfg.section(NAME), []
    if opts.rewards:
        problems.append(f"{cfg.where(NAME, 'rewards')}: ebft's reward is feature matching against the reference; "
                        "other rewards are not supported with it yet. Remove ebft.rewards (or use method grpo).")
    per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    if per_step % opts.num_generations:
        problems.append(f"{cfg.where('micro_batch_size')}: micro_batch_size x gradient_accumulation_steps "
                        f"({per_step} completions per device and step) must be a multiple of ebft.num_generations "
                        f"({opts.num_generations}): each device generates whole groups.")
    if opts.epsilon >= 1:
        problems.append(f"{cfg.where(NAME, 'epsilon')}: epsilon must be below 1 (0.2 is usual).")
    return problems
