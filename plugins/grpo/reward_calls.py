"""Calling the reward functions of a run: built from the config, called with a time limit and a stop
check, their values checked (one number or None per completion), their errors said with the row."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ft_plugins.grpo.config import GRPOOptions, import_reward, reward_registry

from ft.api import FtError, defined_at


@dataclass
class RewardFunction:
    """A reward of this run: its name, weight, function and the plugin that registered it."""

    name: str
    weight: float
    fn: Callable[..., Any]
    plugin: str


def build_rewards(cfg: Any, opts: GRPOOptions) -> list[RewardFunction]:
    out = []
    for i, entry in enumerate(opts.rewards):
        if ":" in entry.name:
            out.append(RewardFunction(entry.name, entry.weight,
                                      import_reward(cfg, entry.name, cfg.where("grpo", "rewards", i, "name")),
                                      "import path"))
            continue
        registered = reward_registry(cfg).get(entry.name, cfg.where("grpo", "rewards", i, "name"))
        reward = registered.value
        fn = reward.fn
        if reward.options is not None:
            fn = reward.fn(reward.options(**dict(entry.model_extra or {})), cfg)
            if not callable(fn):
                raise FtError(f"reward '{entry.name}' (plugin '{registered.plugin}'): its factory returned {fn!r}, "
                              "not a reward function; fix the plugin.")
        out.append(RewardFunction(entry.name, entry.weight, fn, registered.plugin))
    return out


def score(rewards: Sequence[RewardFunction], prompts: list[Any], completions: list[Any],
          completion_ids: list[list[int]], columns: dict[str, list[Any]], *, timeout: float | None = None,
          check_stop: Callable[[str], None] | None = None) -> tuple[list[list[float]], list[list[bool]]]:
    """Each reward's value per completion (NaN where a reward said None) and where it said None.

    A reward returns one number or None (it does not apply to that completion) per completion, as a list, a
    tuple, a 1-D numpy array or torch tensor. Each call may take ``timeout`` seconds; ``check_stop(doing)`` is
    called while a reward runs and may raise to abandon the step (a stop signal). When every reward said None
    to every completion, nothing could be learned: that is an error naming the rewards."""
    values, unset = [], []
    n = len(completions)
    for reward in rewards:
        got = _call_reward(reward, prompts, completions, completion_ids, columns, timeout, check_stop)
        row, none = [], []
        for k, v in enumerate(_one_per_completion(reward, got, n)):
            if v is None:
                row.append(math.nan)
                none.append(True)
                continue
            try:
                row.append(float(v))
            except (TypeError, ValueError):
                raise FtError(f"{describe_reward(reward)} returned {shorten(repr(v), 80)} for completion {k}; a reward "
                              "is a number or None.") from None
            none.append(False)
        values.append(row)
        unset.append(none)
    if rewards and n and all(all(none) for none in unset):
        named = "; ".join(describe_reward(r) for r in rewards)
        raise FtError(f"every reward returned None for all {n} completions of this step ({named}). None means "
                      "\"this reward does not apply to that completion\", so nothing would be learned (every loss and "
                      "gradient 0). Make the reward return a number for the completions it scores (None is fine for "
                      "some of them), or check the row columns it reads.")
    return values, unset


def describe_reward(reward: RewardFunction) -> str:
    """``reward 'NAME' (plugin 'P', function F at FILE:LINE)``: where a reward's problem is to be fixed."""
    return f"reward '{reward.name}' (plugin '{reward.plugin}', {defined_at(reward.fn)})"


def _one_per_completion(reward: RewardFunction, got: Any, n: int) -> list[Any]:
    """What a reward returned, as a list of n values (numpy arrays and torch tensors converted)."""
    if not isinstance(got, (list, tuple)) and hasattr(got, "tolist") and hasattr(got, "shape"):
        shape = tuple(got.shape)
        if len(shape) != 1:
            raise FtError(f"{describe_reward(reward)} returned an array of shape {shape} for {n} completions; a "
                          f"reward function returns one value per completion (a list, or an array of shape ({n},)).")
        got = got.tolist()
    if not isinstance(got, Sequence) or isinstance(got, (str, bytes)):
        raise FtError(f"{describe_reward(reward)} returned {type(got).__name__} {shorten(repr(got), 80)} for {n} "
                      "completions; a reward function returns a list with one number (or None) per completion.")
    if len(got) != n:
        raise FtError(f"{describe_reward(reward)} returned {len(got)} values for {n} completions; a reward function "
                      "returns one number (or None) per completion, in the order of the completions.")
    return list(got)


POLL_SECONDS = 0.1  # how often a wait on a reward looks at its time limit and at a stop request


def _call_reward(reward: RewardFunction, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 columns: dict[str, list[Any]], timeout: float | None = None,
                 check_stop: Callable[[str], None] | None = None) -> Any:
    def call(**kwargs: Any) -> Any:
        return _call_with_limit(reward, kwargs, timeout, check_stop)

    try:
        return call(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except _RewardRaised as batch_error:  # find the row it fails on, to name it
        error, culprit = batch_error.error, None
        for k in range(len(completions)):
            try:
                call(prompts=[prompts[k]], completions=[completions[k]], completion_ids=[completion_ids[k]],
                     **{c: [v[k]] for c, v in columns.items()})
            except _RewardRaised as row_error:
                error, culprit = row_error.error, k
                break
        frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
        at = f" (at {frame.filename}:{frame.lineno} in {frame.name})" if frame else ""
        if culprit is None:
            row = "on a batch of completions (each alone it scores fine)"
        else:
            shown = {"prompt": prompts[culprit], "completion": completions[culprit],
                     **{c: v[culprit] for c, v in columns.items()}}
            row = "on this row: " + shorten(json.dumps(shown, ensure_ascii=False, default=str), 600)
        raise FtError(f"reward '{reward.name}' (plugin '{reward.plugin}') raised {type(error).__name__}: {error}{at} "
                      f"{row}. Fix the reward (or the row), or remove it from grpo.rewards.") from error


def _call_with_limit(reward: RewardFunction, kwargs: dict[str, Any], timeout: float | None,
                     check_stop: Callable[[str], None] | None) -> Any:
    """``reward.fn(**kwargs)`` on a worker thread, so that the wait can end: at the time limit (an error naming
    the reward and the line it was running) or when ``check_stop`` raises (Ctrl-C). The thread is a daemon: a
    reward stuck for good does not keep the process alive once the run has stopped."""
    outcome: dict[str, Any] = {}
    device = _cuda_device()

    def work() -> None:
        try:
            if device is not None:  # the current CUDA device is per thread: keep this rank's
                import torch

                torch.cuda.set_device(device)
            outcome["value"] = reward.fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=work, name=f"ft-reward-{reward.name}", daemon=True)
    started = time.monotonic()
    thread.start()
    while True:
        thread.join(POLL_SECONDS if timeout is None else min(POLL_SECONDS, timeout))
        if not thread.is_alive():
            break
        if check_stop is not None:
            check_stop(f"waiting for reward '{reward.name}'")
        if timeout is not None and time.monotonic() - started >= timeout:
            frame = sys._current_frames().get(thread.ident or -1)
            at = ""
            if frame is not None:
                last = traceback.extract_stack(frame)[-1]
                at = f"; it was running {last.filename}:{last.lineno} in {last.name}"
            raise FtError(f"{describe_reward(reward)} did not return within grpo.reward_timeout ({timeout:g} s) "
                          f"for {len(kwargs.get('completions') or ())} completions{at}. Make the reward faster, "
                          "or raise grpo.reward_timeout (null: no limit).")
    error = outcome.get("error")
    if isinstance(error, FtError) or not isinstance(error, Exception):  # FtError says it all; None: it returned
        if error is not None:
            raise error
        return outcome["value"]
    raise _RewardRaised(error)


class _RewardRaised(Exception):
    """What a reward function raised (and not the time limit or a stop request, which end the step as they are)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _cuda_device() -> int | None:
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

