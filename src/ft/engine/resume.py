"""Where a run starts: decided once, before any data or model is loaded.

``plan_resume(ctx, fresh=..., overwrite=...)`` tidies the output directory in named steps and
returns a :class:`ResumePlan`, which ``run.py`` hands to training:

1. ``check_flags``: ``--fresh`` and ``resume_from_checkpoint`` together are refused.
2. ``refuse_finished``: a finished run is replaced only with ``--overwrite``.
3. ``clear_leftovers``: the staging directories of saves that did not finish are removed (the
   output-dir lock, ``ft.engine.outputs.lock_output_dir``, makes sure no other run is writing them).
4. ``start_over``: ``--fresh`` (or ``--overwrite`` of a finished run) sets the earlier run's
   checkpoints (and final outputs) aside in ``.ft-set-aside/``. They are deleted once this run
   saves its first checkpoint or finishes, and put back as they were if it stops before then
   (``ft.engine.outputs.lock_output_dir``; after a kill, by the next run's ``put_back``).
5. ``set_damaged_aside``: checkpoints that fail verification become ``damaged-checkpoint-N``.
6. ``check_same_config``: checkpoints of another config are an error naming the keys.

Only the main process decides and changes files. The other ranks return a placeholder at once
(deciding too would race the main process's tidying); training makes every rank follow the main
process's plan (:meth:`ResumePlan.shared`), so they cannot disagree about where to start.

Nothing here imports torch or transformers at module import time.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.engine.checkpoints import (
    DAMAGED_PREFIX,
    MANIFEST_FILE,
    REPLACED_PREFIX,
    SET_ASIDE,
    STAGING_PREFIX,
    Checkpoint,
    find_resumable,
    last_good_checkpoint,
    list_checkpoints,
    put_back_set_aside,
    set_aside,
    unused_name,
    verify,
)
from ft.engine.config_diff import config_differences
from ft.engine.launch import is_main_process
from ft.engine.outputs import METRICS_FILE, RUN_FILES, finished_weights, is_finished
from ft.kernel.errors import FtError

if TYPE_CHECKING:
    from ft.kernel.context import Context

log = logging.getLogger("ft.resume")


@dataclass(frozen=True)
class ResumePlan:
    """Where training starts: ``checkpoint`` (None = step 0) and why, in words."""

    checkpoint: str | None
    reason: str

    def shared(self) -> ResumePlan:
        """The main process's plan, on every rank of a multi-process run (a collective)."""
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch comes with ft[train]
            return self
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        box: list[Any] = [self if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


START = ResumePlan(None, "a new run")
FOLLOW_MAIN = ResumePlan(None, "another rank: the main process decides")


def plan_resume(ctx: Context, *, fresh: bool = False, overwrite: bool = False) -> ResumePlan:
    """Decide where this run starts (see the module docstring); refuse what would lose work."""
    cfg = ctx.cfg
    out = Path(cfg.output_dir)
    check_flags(ctx, fresh)
    if not is_main_process():  # it would race the main process's tidying; training follows the main's plan
        return FOLLOW_MAIN
    if out.exists() and not out.is_dir():
        raise FtError(f"{cfg.where('output_dir')}: '{out}' is a file, not a directory; choose another output_dir.")
    put_back(out)
    finished = refuse_finished(ctx, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    clear_leftovers(out)
    explicit = cfg.resume_from_checkpoint
    if explicit:
        if finished:  # its checkpoints stay: one of them is resumed
            start_over(out, "--overwrite", checkpoints=False, finished=True)
        return explicit_resume(ctx, str(explicit))
    if fresh or finished:  # finished: only reached with --overwrite
        start_over(out, "--fresh" if fresh else "--overwrite", finished=finished)
        return ResumePlan(None, "--fresh: starting over" if fresh else "--overwrite: starting over")
    found = set_damaged_aside(out)
    if found is None:
        return START
    check_same_config(ctx, found)
    reason = "the output dir holds checkpoints of this run"
    if finished_weights(out):
        reason = "the final save of this run did not finish"
    plan = ResumePlan(str(found.path), f"{reason} (step {found.step}); --fresh would delete them and start over")
    log.info("resuming from %s: %s", plan.checkpoint, plan.reason)
    return plan


# -- the steps -------------------------------------------------------------------------------------------


def check_flags(ctx: Context, fresh: bool) -> None:
    if fresh and ctx.cfg.resume_from_checkpoint:
        raise FtError(f"{ctx.cfg.where('resume_from_checkpoint')}: --fresh starts over, but the config names a "
                      "checkpoint to resume from; drop one of the two.")


def refuse_finished(ctx: Context, overwrite: bool) -> bool:
    """Whether output_dir holds a finished run (or weights that no checkpoint can finish); an error unless
    ``overwrite``. Weights without ``metrics.json`` are a final save that did not finish: they do not count
    when a checkpoint can write them again."""
    cfg = ctx.cfg
    out = Path(cfg.output_dir)
    weights = finished_weights(out)
    checkpoints = list_checkpoints(out)
    if is_finished(out):
        what = f"a finished run ({', '.join([METRICS_FILE, *weights])})"
    elif weights and last_good_checkpoint(out) is None:
        what = (f"weights ({', '.join(weights)}) but no {METRICS_FILE}: the final save of that run did not finish, "
                "and no checkpoint is left to finish it from")
    else:
        return False
    deleted = (f"deletes its {len(checkpoints)} checkpoints ({', '.join(c.path.name for c in checkpoints)}) and "
               if checkpoints else "")
    if not overwrite:
        raise FtError(
            f"{cfg.where('output_dir')}: '{out}' already holds {what}. To train again from step 0 pass --overwrite: "
            f"it {deleted}replaces the weights. To keep them, choose another output_dir: --set output_dir={out}-2"
        )
    log.warning("--overwrite: %s holds %s; this run %sreplaces them once it has saved a checkpoint (or finished)",
                out, what, deleted)
    return True


def clear_leftovers(out: Path) -> None:
    """Remove what saves that did not finish left behind (never picked up as checkpoints)."""
    for leftover in [*out.glob(f"{STAGING_PREFIX}*"), *out.glob(f"{REPLACED_PREFIX}*")]:
        log.info("removing %s, left by a save that did not finish", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def put_back(out: Path) -> None:
    """A run killed after ``start_over`` and before it saved anything: the run it replaced is put back."""
    if out.is_dir():
        restored = put_back_set_aside(out)
        if restored:
            log.warning("the run that --overwrite/--fresh started in %s stopped before it saved anything: the earlier "
                        "run it replaced is put back (%s)", out, ", ".join(restored))


def start_over(out: Path, flag: str, *, checkpoints: bool = True, finished: bool = False) -> None:
    """Set the earlier run aside (``--fresh``, or ``--overwrite`` of a finished run): its checkpoints, and a
    finished run's final outputs. They are deleted once this run saves, put back if it stops before."""
    old = list_checkpoints(out) if checkpoints else []
    files = [out / name for name in RUN_FILES if (out / name).is_file()] if finished else []
    if set_aside(out, [c.path for c in old] + files) is None:
        return
    what = ", ".join([c.path.name for c in old] + [f.name for f in files])
    level = logging.INFO if finished else logging.WARNING  # refuse_finished has warned about a finished run
    log.log(level, "%s: the earlier run in %s (%s) is set aside in %s; it is deleted once this run saves its first "
            "checkpoint (or finishes), and put back if this run stops before then", flag, out, what, out / SET_ASIDE)


def set_damaged_aside(out: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; newer damaged ones are renamed ``damaged-checkpoint-N``."""
    found, skipped = find_resumable(out)
    aside = []
    for checkpoint, problems in skipped:
        target = unused_name(out, f"{DAMAGED_PREFIX}{checkpoint.path.name}")
        log.warning("%s cannot be resumed from: %s. Set aside as %s%s.", checkpoint.path, "; ".join(problems),
                    target.name, f"; falling back to {found.path.name}" if found else "")
        os.rename(checkpoint.path, target)
        aside.append(target.name)
    if found is None and aside:
        log.warning("every checkpoint in %s is damaged (set aside as %s): this run starts over from step 0. To keep "
                    "what they hold, stop it now and move them elsewhere; their files are left as they were.",
                    out, ", ".join(aside))
    return found


def check_same_config(ctx: Context, checkpoint: Checkpoint) -> None:
    """Checkpoints of another config are not resumed silently: an error naming the keys that differ."""
    differences = config_differences(ctx, checkpoint.path)
    if not differences:
        return
    cfg = ctx.cfg
    shown = differences[:12] + ([f"... and {len(differences) - 12} more"] if len(differences) > 12 else [])
    lines = "\n".join(f"    {d}" for d in shown)
    raise FtError(
        f"{cfg.where('output_dir')}: '{cfg.output_dir}' holds checkpoints of a run with another config "
        f"(newest: {checkpoint.path.name}); these keys differ (checkpoint -> now):\n{lines}\n"
        f"  To continue that run, restore those values. To start over in this directory pass --fresh (its "
        f"checkpoints are removed), or choose a new output_dir (--set output_dir={cfg.output_dir}-2). To resume it "
        f"with these changes on purpose, set resume_from_checkpoint: {checkpoint.path}"
    )


def explicit_resume(ctx: Context, explicit: str) -> ResumePlan:
    """``resume_from_checkpoint: PATH``: that checkpoint, verified; deliberate config changes are allowed."""
    from ft.kernel.context import resolve_path

    cfg = ctx.cfg
    path = Path(resolve_path(cfg, explicit))
    if not path.is_dir():
        raise FtError(f"{cfg.where('resume_from_checkpoint')}: '{explicit}' is not a checkpoint directory "
                      f"(it does not exist). Checkpoints are the checkpoint-N folders in output_dir.")
    problems = verify(path)
    if problems and (path / MANIFEST_FILE).is_file():
        good = last_good_checkpoint(path.parent)
        hint = f" The newest complete one there is {good.path}." if good else ""
        raise FtError(f"{cfg.where('resume_from_checkpoint')}: {path} cannot be resumed from: "
                      f"{'; '.join(problems)}.{hint}")
    differences = config_differences(ctx, path)
    if any(d.startswith("weight_decay: 0 -> ") or d.startswith("weight_decay: 0.0 -> ") for d in differences):
        raise FtError(f"{cfg.where('weight_decay')}: weight_decay cannot be turned on when resuming {path}: its "
                      "optimizer state does not say which parameters decay (biases and norms do not). Keep "
                      "weight_decay: 0 for this run, or start a new one with it.")
    if problems:
        log.warning("resume_from_checkpoint: %s was not written by ft (%s); resuming from it unverified",
                    path, problems[0])
    if differences:
        log.warning("resuming from %s with a config that differs from the one that wrote it: %s. This run "
                    "trains with the new values (learning rate and weight decay too: the restored optimizer "
                    "and schedule are adjusted to them).", path, "; ".join(differences))
    log.info("resuming from %s (resume_from_checkpoint)", path)
    return ResumePlan(str(path), "resume_from_checkpoint")
