"""Stopping a run on Ctrl-C or SIGTERM: the step in progress finishes, a checkpoint is saved on every rank,
and the message says how to resume."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.kernel.errors import FtError

if TYPE_CHECKING:
    from ft.kernel.context import Context


class Interrupted(FtError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the exit code is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@dataclass
class StopRequest:
    signum: int | None = None
    at: float = 0.0
    step: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


SAME_REQUEST_SECONDS = 2.0  # under torchrun a signal can arrive twice (terminal + launcher): one request


@contextlib.contextmanager
def stop_on_signals(trainer: Any) -> Iterator[StopRequest]:
    """While training: the first SIGINT/SIGTERM saves a checkpoint at the next step end and stops;
    a second one stops at once."""
    request = StopRequest()
    callback = stop_callback(request)
    trainer.add_callback(callback)
    previous: dict[int, Any] = {}
    under_launcher = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ

    def handler(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if request.signum is None:
            request.signum, request.at = signum, now
            say(f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
                 "stopping (send it again to stop at once, without saving)")
            return
        if under_launcher and now - request.at < SAME_REQUEST_SECONDS:
            return
        say(f"received {signal.Signals(signum).name} again: stopping now, without saving")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        trainer.remove_callback(callback)


def say(message: str) -> None:
    print(f"\n[ft] {message}", file=sys.stderr, flush=True)


def stop_callback(request: StopRequest) -> Any:
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        """At each optimizer step's end: if a signal came (on any rank), save and stop."""

        def on_step_end(self, args, state, control, **kwargs):
            if any_rank(request.signum is not None, args):
                request.step = state.global_step
                if request.signum is None:  # another rank got it
                    request.signum = signal.SIGTERM
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopOnSignal()


def any_rank(flag: bool, args: Any) -> bool:
    if getattr(args, "world_size", 1) <= 1:
        return flag
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return flag
    device = args.device if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def interrupted_error(ctx: Context, trainer: Any, request: StopRequest) -> Interrupted:
    cfg = ctx.cfg
    step = trainer.state.global_step
    checkpoint = Path(cfg.output_dir) / f"checkpoint-{step}"
    saved = f"checkpoint saved: {checkpoint}" if checkpoint.is_dir() else "no checkpoint could be saved"
    return Interrupted(
        f"stopped by {request.name} after step {step} of {trainer.state.max_steps}; {saved}.\n"
        f"  To resume, run the same command again: {resume_command(cfg)}\n"
        "  (ft run continues from the newest complete checkpoint in output_dir; --fresh starts over, deleting its checkpoints.)",
        int(request.signum or signal.SIGTERM),
    )


def resume_command(cfg: Any) -> str:
    """The command line that resumes this run (this process's own, without --fresh/--overwrite)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("ft", "ft.exe", "cli.py", "__main__.py") and argv[1:2] == ["run"]:
        command = "ft " + shlex.join(a for a in argv[1:] if a not in ("--fresh", "--overwrite"))
    else:
        command = f"ft run {shlex.quote(str(cfg.source or 'CONFIG.yaml'))}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        command += "  (with the same --nproc / launcher options)"
    return command
