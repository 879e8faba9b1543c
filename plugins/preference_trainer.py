"""The Trainer of the preference methods: one forward pass per batch, the shared maths, the metrics.

A batch (from ``preference_data.UnitCollator`` or, packed, from the packing plugin's collator)
holds every sequence of every unit (a pair: chosen then rejected) plus ``sequence_ids``, which
names the sequence of each token (-1 on padding). One forward pass of the policy scores them all;
per-sequence log-probabilities are sums over each sequence's scored labels. Logits are computed
only where a label is scored (the output layer is handed the hidden states at those positions):
prompts and padding cost no output-layer work and no log-softmax memory.

The reference policy (DPO, KTO) is ``ft.api.ReferenceModel`` (the base with the adapter
disabled under lora/qlora, else a frozen copy), or with ``precompute_ref_logps`` log-probabilities
computed in one pass before training and stored beside the prepared data, keyed by the model.

Loss normalisation: each unit (pair, KTO row) weighs the same within an optimizer step, whatever
the number of units in each micro-batch (packed bins hold varying numbers of pairs): the loss of
a micro-batch is the sum of its units' losses over the number of units in the whole accumulation
window (and over all processes).

Each method's loss is a method of :class:`PreferenceTrainer`, picked from the ``LOSSES`` table by the
method's name. Importing this module imports torch and transformers (the plugin imports it when training).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ft_plugins import preference_losses as losses
from transformers import Trainer

from ft.api import (
    IGNORE_INDEX,
    FtError,
    accumulation_share,
    cache_file_problem,
    has_adapter,
    output_layer,
    record_cache_file,
    target_logps,
)

log = logging.getLogger("ft.preference")

# What the model takes from a batch (the rest -- labels, sequence_ids, per-unit values -- is ours).
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
              "max_length_k")


@dataclass
class PreferenceSetup:
    """What a preference Trainer needs besides the usual arguments (``Method.trainer_kwargs``)."""

    method: str  # dpo | kto | orpo | simpo
    options: Any  # the method's config section
    sequences: tuple[str, ...]  # the sequences of a unit, in batch order
    reference: Any = None  # ft.api.ReferenceModel, or None (no reference, or precomputed)
    precompute: bool = False
    cache_dir: str | None = None  # the prepared data's directory (precomputed log-probs go beside it)
    nll_on_prompt: bool = False  # ORPO with train_on_inputs: the NLL term covers the whole chosen sequence


def model_inputs(batch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The model's inputs in ``batch`` (those of the ``kl_`` sequences with ``prefix="kl_"``)."""
    return {key: batch[prefix + key] for key in MODEL_KEYS if prefix + key in batch}


@contextlib.contextmanager
def hidden_states_at(model: Any, rows: Any, cols: Any, shape: tuple[int, int]) -> Any:
    """While active, the model's output layer sees only the hidden states at ``(rows, cols)`` of the
    ``shape`` = ``[R, L]`` batch, as one ``[1, N, H]`` row: logits (and their log-softmax and gradient)
    exist only where something is scored -- not for prompts, not for padding. Yields a list that holds
    True once the selection happened (a model whose output layer saw another shape is left alone and
    returns all logits)."""
    head = output_layer(model)
    done: list[bool] = []

    def select(module: Any, args: tuple) -> Any:
        hidden = args[0]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(shape):
            return None
        done.append(True)
        return (hidden[rows, cols].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(select) if head is not None else None
    try:
        yield done
    finally:
        if handle is not None:
            handle.remove()


def previous_positions(sequence_ids: Any) -> Any:
    """For rows of consecutive sequences: where each token's predecessor in its sequence is (-1 at a
    sequence's first token and on padding)."""
    length = sequence_ids.shape[1]
    prev = torch.arange(-1, length - 1, device=sequence_ids.device).expand_as(sequence_ids).clone()
    same = torch.zeros_like(sequence_ids, dtype=torch.bool)
    same[:, 1:] = (sequence_ids[:, 1:] == sequence_ids[:, :-1]) & (sequence_ids[:, 1:] >= 0)
    return torch.where(same, prev, torch.full_like(prev, -1))


def per_sequence(values: Any, sequence_ids: Any, mask: Any, count: int) -> tuple[Any, Any]:
    """Sums of ``values`` and of ``mask`` per sequence id (``[count]`` each)."""
    index = sequence_ids.clamp(min=0).flatten()
    sums = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, index, (values * mask).flatten())
    counts = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, index, mask.flatten().to(values.dtype))
    return sums, counts


@dataclass
class Scored:
    """Per-sequence log-probabilities of one forward pass."""

    sums: Any  # [S] summed log-probabilities of the scored labels
    counts: Any  # [S] scored labels
    nll_sum: Any = None  # ORPO with nll_on_prompt: summed log-probs of the first sequences' every next token
    nll_count: Any = None

    def by_unit(self, n: int) -> tuple[Any, ...]:
        """``(sums, counts)`` split into the unit's ``n`` sequences: ``[U]`` tensors each."""
        sums, counts = self.sums.view(-1, n), self.counts.view(-1, n)
        return tuple(sums[:, k] for k in range(n)) + tuple(counts[:, k] for k in range(n))


def forward_logps(model: Any, batch: dict[str, Any], prefix: str = "", *, whole_first_sequences: int = 0) -> Scored:
    """Run ``model`` once on every sequence of the batch and score each sequence's labels.

    A token is scored from its predecessor's hidden state: the previous position, or where the
    batch's ``previous`` says (rows where the rejected side continues from the shared prompt).
    Logits are computed only for scored tokens (``hidden_states_at``). ``whole_first_sequences`` = n
    also scores every token of the first sequence of each n-sequence unit (ORPO's NLL on the prompt).
    """
    labels, sequence_ids = batch[f"{prefix}labels"], batch[f"{prefix}sequence_ids"]
    count = int(sequence_ids.max()) + 1
    prev = batch.get(f"{prefix}previous")
    if prev is None:
        prev = previous_positions(sequence_ids)
    has_prev = prev >= 0
    scored = (labels != IGNORE_INDEX) & has_prev
    wanted, first, targets = scored, None, labels
    if whole_first_sequences:
        first = has_prev & (sequence_ids % whole_first_sequences == 0)
        wanted = scored | first
        targets = torch.where(scored, labels, batch[f"{prefix}input_ids"])  # scored labels are the tokens themselves
    rows, at = wanted.nonzero(as_tuple=True)
    cols = prev[rows, at]
    with hidden_states_at(model, rows, cols, tuple(labels.shape)) as selected:
        out = model(**model_inputs(batch, prefix), use_cache=False)
    logits = out.logits[0] if selected else out.logits[rows, cols]  # [N, V]
    logps = target_logps(logits, targets[rows, at])[0]  # float32; -100 gives 0
    on_scored = scored[rows, at]
    sums, counts = per_sequence(logps, sequence_ids[rows, at], on_scored, count)
    result = Scored(sums, counts)
    if first is not None:
        on_first = first[rows, at]
        result.nll_sum, result.nll_count = (logps * on_first).sum(), on_first.sum()
    return result


# -- the Trainer ------------------------------------------------------------------------------------


class PreferenceTrainer(Trainer):
    """Trainer for dpo, kto, orpo and simpo (``self.preference`` says which)."""

    # compute_loss returns the units' summed losses over their share of the accumulation window
    # (ft.api.accumulation_share); the Trainer divides by the window's micro-batches
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, preference: PreferenceSetup, **kwargs: Any):
        self.preference = preference
        if preference.method not in LOSSES:
            raise FtError(f"no preference loss for method '{preference.method}'; known: {', '.join(LOSSES)}")
        super().__init__(*args, **kwargs)
        if preference.reference is not None:
            preference.reference.to(self.args.device)
        if preference.precompute:
            self._precompute_reference()

    # -- loss normalisation over the accumulation window --------------------------------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The window's micro-batches, and (as ``num_items_in_batch``) each one's share of its units."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        units = sum(self._units_in(b) for b in batch_samples)
        return batch_samples, accumulation_share(self, float(units), max(len(batch_samples), 1))

    def _units_in(self, batch: dict[str, Any]) -> int:
        return (int(batch["sequence_ids"].max()) + 1) // len(self.preference.sequences)

    def _normalise(self, unit_losses: Any, share: Any, extra: Any = None) -> Any:
        """Training: the sum over the units / their share of the window (each unit of the optimizer step
        weighs the same, over processes too). Evaluation: the mean."""
        if share is not None:
            units = unit_losses.numel()
            share = share.to(unit_losses.device)
            loss = unit_losses.sum() / share
            return loss + extra * units / share if extra is not None else loss
        loss = unit_losses.mean()
        return loss + extra if extra is not None else loss

    # -- forward passes ---------------------------------------------------------------------

    def _policy(self, model: Any, batch: dict[str, Any], prefix: str = "", whole_first: int = 0) -> Scored:
        return forward_logps(model, batch, prefix, whole_first_sequences=whole_first)

    def _reference(self, batch: dict[str, Any], prefix: str = "") -> Scored:
        return forward_logps(self.preference.reference, batch, prefix)  # a ReferenceModel: no gradients

    # -- the methods ---------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        share = num_items_in_batch if self.model.training else None
        loss = LOSSES[self.preference.method](self, model, inputs, share)
        return (loss, {}) if return_outputs else loss

    def _ref_pair(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        chosen, rejected, _cc, _rc = self._reference(batch).by_unit(2)
        return chosen, rejected

    def _record_pair(self, chosen_rewards, rejected_rewards, chosen, rejected, **more):
        self.ft_record({
            "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(), **more,
        })

    def dpo_loss(self, model: Any, batch: dict[str, Any], share: Any) -> Any:
        o = self.preference.options
        chosen, rejected, chosen_n, rejected_n = self._policy(model, batch).by_unit(2)
        ref_chosen, ref_rejected = self._ref_pair(batch)
        unit_losses, chosen_rewards, rejected_rewards = losses.dpo_losses(
            chosen, rejected, ref_chosen, ref_rejected, beta=o.beta, loss_type=o.loss_type,
            label_smoothing=o.label_smoothing, chosen_counts=chosen_n, rejected_counts=rejected_n)
        self._record_pair(chosen_rewards, rejected_rewards, chosen, rejected)
        return self._normalise(unit_losses, share)

    def _nll(self, scored: Scored, chosen: Any, chosen_n: Any) -> Any:
        """Mean negative log-likelihood of the chosen tokens in this micro-batch (TRL's token mean)."""
        if self.preference.nll_on_prompt:
            return -scored.nll_sum / scored.nll_count.clamp(min=1)
        return -chosen.sum() / chosen_n.sum().clamp(min=1)

    def orpo_loss(self, model: Any, batch: dict[str, Any], share: Any) -> Any:
        o = self.preference.options
        scored = self._policy(model, batch, whole_first=2 if self.preference.nll_on_prompt else 0)
        chosen, rejected, chosen_n, rejected_n = scored.by_unit(2)
        chosen_mean, rejected_mean = chosen / chosen_n.clamp(min=1), rejected / rejected_n.clamp(min=1)
        unit_losses, chosen_rewards, rejected_rewards, ratio, log_odds = losses.orpo_losses(
            chosen_mean, rejected_mean, beta=o.beta)
        nll = self._nll(scored, chosen, chosen_n)
        self._record_pair(chosen_rewards, rejected_rewards, chosen_mean, rejected_mean, nll_loss=nll.detach(),
                          log_odds_ratio=ratio.mean(), log_odds_chosen=log_odds.mean())
        return self._normalise(unit_losses, share, nll)

    def simpo_loss(self, model: Any, batch: dict[str, Any], share: Any) -> Any:
        o = self.preference.options
        scored = self._policy(model, batch)
        chosen, rejected, chosen_n, rejected_n = scored.by_unit(2)
        chosen_mean, rejected_mean = chosen / chosen_n.clamp(min=1), rejected / rejected_n.clamp(min=1)
        unit_losses, chosen_rewards, rejected_rewards = losses.simpo_losses(
            chosen_mean, rejected_mean, beta=o.beta, gamma=o.gamma)
        more = {}
        extra = None
        if o.cpo_alpha:
            nll = self._nll(scored, chosen, chosen_n)
            extra = o.cpo_alpha * nll
            more["nll_loss"] = nll.detach()
        self._record_pair(chosen_rewards, rejected_rewards, chosen_mean, rejected_mean, **more)
        return self._normalise(unit_losses, share, extra)

    def kto_loss(self, model: Any, batch: dict[str, Any], share: Any) -> Any:
        o = self.preference.options
        logps = self._policy(model, batch).sums
        with torch.no_grad():
            kl_logps = forward_logps(model, batch, "kl_").sums
        ref_logps = self._reference(batch).sums
        ref_kl_logps = self._reference(batch, "kl_").sums
        kl = (kl_logps - ref_kl_logps).mean().detach()
        if self.accelerator.num_processes > 1:
            kl = self.accelerator.reduce(kl, reduction="mean")
        kl = kl.clamp(min=0)
        desirable = batch["label"].bool()
        unit_losses, chosen_rewards, rejected_rewards = losses.kto_losses(
            logps, ref_logps, desirable, kl, beta=o.beta, desirable_weight=o.desirable_weight,
            undesirable_weight=o.undesirable_weight)
        metrics = {"kl": kl}
        if chosen_rewards.numel():
            metrics["rewards/chosen"] = chosen_rewards.mean()
            metrics["logps/chosen"] = logps[desirable].detach().mean()
        if rejected_rewards.numel():
            metrics["rewards/rejected"] = rejected_rewards.mean()
            metrics["logps/rejected"] = logps[~desirable].detach().mean()
        if chosen_rewards.numel() and rejected_rewards.numel():
            metrics["rewards/margins"] = chosen_rewards.mean() - rejected_rewards.mean()
        self.ft_record(metrics)
        return self._normalise(unit_losses, share)

    # -- evaluation: the loss and the metrics, no logits gathered -------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- precomputed reference log-probabilities ------------------------------------------------

    def _precompute_reference(self) -> None:
        path = reference_cache_path(self.model, self.preference, self.data_collator)
        stored = load_reference(path) if path is not None else None
        if stored is not None:
            log.info("%s: reference log-probabilities precomputed earlier, read from %s", self.preference.method,
                     path)
        else:
            stored = {}
            for name, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
                if dataset is not None:
                    stored[name] = self._reference_pass(dataset, name)
            if path is not None and self.accelerator.is_main_process:
                save_reference(path, stored)
                log.info("%s: reference log-probabilities computed in one pass and stored in %s",
                         self.preference.method, path)
        self.train_dataset = with_reference_columns(self.train_dataset, stored.get("train"))
        if self.eval_dataset is not None:
            self.eval_dataset = with_reference_columns(self.eval_dataset, stored.get("eval"))

    def _reference_pass(self, dataset: Any, name: str) -> list[Any]:
        """Reference log-probs of every unit of ``dataset`` (per row: a pair, or a bin's list of pairs)."""
        model = self.model
        device = next(model.parameters()).device
        target = self.args.device
        moved = device.type == "cpu" and target.type != "cpu"
        if moved:
            model.to(target)
        batch_size = self.args.per_device_eval_batch_size
        rank, world = self.args.process_index, self.args.world_size
        was_training = model.training
        model.eval()
        results: dict[int, list[list[float]]] = {}
        switch = model.disable_adapter() if has_adapter(model) else contextlib.nullcontext()
        try:
            with torch.no_grad(), switch:
                for b, start in enumerate(range(0, len(dataset), batch_size)):
                    if b % world != rank:
                        continue
                    rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                    batch = self._prepare_inputs(self.data_collator(rows))
                    scored = forward_logps(model, batch)
                    chosen, rejected, _c, _r = scored.by_unit(2)
                    units = [row_units(r, len(self.preference.sequences)) for r in rows]
                    pairs = list(zip(chosen.tolist(), rejected.tolist(), strict=True))
                    results[b] = _split(pairs, units)
        finally:
            model.train(was_training)
            if moved:
                model.to(device)
        if world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, results)
            for part in gathered:
                results.update(part)
        return [row for b in sorted(results) for row in results[b]]


# The loss of each preference method (``PreferenceSetup.method``): ``(trainer, model, batch, share) -> loss``.
LOSSES = {"dpo": PreferenceTrainer.dpo_loss, "kto": PreferenceTrainer.kto_loss, "orpo": PreferenceTrainer.orpo_loss,
          "simpo": PreferenceTrainer.simpo_loss}


def row_units(row: dict[str, Any], sequences: int) -> int | None:
    """Units in a dataset row: None for an unpacked row (one unit), else the bin's count."""
    positions = row.get("position_ids")
    if positions is None:
        return None
    return sum(1 for p in positions if p == 0) // sequences


def _split(pairs: list[Any], units: list[int | None]) -> list[Any]:
    out, k = [], 0
    for n in units:
        if n is None:
            out.append(pairs[k])
            k += 1
        else:
            out.append(pairs[k:k + n])
            k += n
    return out


def with_reference_columns(dataset: Any, values: list[Any] | None) -> Any:
    """``dataset`` with ``ref_chosen_logps``/``ref_rejected_logps`` columns (per row, or per bin: lists)."""
    if values is None:
        return dataset
    if len(values) != len(dataset):
        raise FtError(f"the precomputed reference log-probabilities cover {len(values)} rows but the data has "
                      f"{len(dataset)}; delete the stale file under the prepared data's reference/ directory.")
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
    k = 0 if not values or not isinstance(values[0][0], (list, tuple)) else None
    if k == 0:
        chosen, rejected = [v[0] for v in values], [v[1] for v in values]
    else:
        chosen, rejected = [[p[0] for p in v] for v in values], [[p[1] for p in v] for v in values]
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


# -- where precomputed log-probabilities are kept -----------------------------------------------------


def reference_fingerprint(model: Any) -> str:
    """Hash of what decides the reference's log-probabilities: its weights (the base's, under an
    adapter), their dtypes, and the attention implementation."""
    try:
        import xxhash

        h: Any = xxhash.xxh3_128()
    except ImportError:  # pragma: no cover - xxhash is a dependency of ft[train]
        h = hashlib.sha256()
    adapter = has_adapter(model)
    config = getattr(model, "config", None)
    h.update(str(getattr(config, "_attn_implementation", None)).encode())
    for name, p in model.named_parameters():
        if adapter and p.requires_grad:  # the adapter is off in the reference
            continue
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        data = p.detach()
        if data.numel():
            h.update(data.cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def collator_settings(collator: Any) -> dict[str, str]:
    """What of a collator decides how the reference sees a batch: its class and its plain settings (the pair
    layout, padding, the dtype of a 4D attention mask)."""
    if collator is None:
        return {}
    plain = (bool, int, float, str, tuple, type(None))
    out = {"class": f"{type(collator).__module__}.{type(collator).__qualname__}"}
    for name, value in sorted(vars(collator).items()):
        if isinstance(value, plain) or type(value).__module__ == "torch":  # torch.dtype
            out[name] = str(value)
    return out


def reference_key(model: Any, collator: Any = None) -> str:
    """Key of precomputed reference log-probabilities, beside the prepared data (which fixes the tokenized
    rows): exactly what they depend on -- the reference's weights, dtypes and attention implementation
    (:func:`reference_fingerprint`), how the batches are laid out (:func:`collator_settings`), and the code
    that scores them. Not the method's loss settings (``beta``, ``loss_type`` ...): changing those reuses them."""
    from ft_plugins import preference_data

    code = hashlib.sha256()
    for module in (sys.modules[__name__], preference_data, inspect.getmodule(target_logps)):
        code.update(Path(module.__file__).read_bytes())
    inputs = {"reference": reference_fingerprint(model), "collator": collator_settings(collator),
              "code": code.hexdigest()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def reference_cache_path(model: Any, setup: PreferenceSetup, collator: Any = None) -> Path | None:
    if not setup.cache_dir:
        return None
    return Path(setup.cache_dir) / REFERENCE_DIR / f"{setup.method}-{reference_key(model, collator)[:24]}.json"


REFERENCE_DIR = "reference"


def load_reference(path: Path) -> dict[str, Any] | None:
    """The stored log-probabilities, or None (computed again) when there are none, or when the file does
    not match the checksum the prepared data's manifest holds for it (edited, damaged, or never recorded)."""
    if not path.is_file():
        return None
    cache_dir = path.parent.parent
    problem = cache_file_problem(cache_dir, path.relative_to(cache_dir).as_posix())
    if problem is not None:
        log.warning("the precomputed reference log-probabilities in %s do not match the prepared data's manifest "
                    "(%s); computing them again", path, problem)
        path.unlink(missing_ok=True)
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("the precomputed reference log-probabilities in %s cannot be read (%s); computing them again",
                    path, exc)
        return None


def save_reference(path: Path, stored: dict[str, Any]) -> None:
    """Written to a temporary file and renamed (a crash never leaves half a file), then listed with its
    checksum in the prepared data's manifest (what :func:`load_reference` checks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stored), encoding="utf-8")
    os.replace(tmp, path)
    cache_dir = path.parent.parent
    record_cache_file(cache_dir, path.relative_to(cache_dir).as_posix())
