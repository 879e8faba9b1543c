"""``ft run CONFIG --nproc N``: re-run the same command under torchrun, one process per device.

The launcher is torch's own (``python -m torch.distributed.run``); ft adds nothing to it but
the translation of its options. ``--nnodes``, ``--node-rank``, ``--rdzv-endpoint`` and
``--rdzv-id`` pass through for multi-node runs (c10d rendezvous). Already inside a launcher
(``torchrun``, ``accelerate launch``: ``RANK`` and ``WORLD_SIZE`` are set), ft does not launch
again: the command runs in this process.

Every process then runs ``ft run`` without the launch options; the Trainer (accelerate) reads
the environment torchrun sets and splits the data between ranks.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence

from ft.kernel.errors import FtError

log = logging.getLogger("ft.launch")

# ft's launch options; each takes a value. The re-run command must not see them again.
LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id")


def strip_launch_options(argv: Sequence[str]) -> list[str]:
    """``argv`` without ft's launch options (``--nproc 2`` and ``--nproc=2`` forms)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--":
            out.append(arg)
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def under_launcher(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """True inside torchrun / accelerate launch / a SLURM step started with their env."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def is_main_process() -> bool:
    """True in the process of global rank 0, and in a run without a launcher (``RANK`` unset): the one that
    writes the run's files and reports progress."""
    return os.environ.get("RANK", "0") == "0"


def close_process_group() -> None:
    """End this process's part of a distributed run: wait for every rank, then destroy the process group.
    Left to interpreter exit, the backend's threads can still hold work of the last collectives (FSDP2's and
    ZeRO-3's gathers for generation, say), and a rank then aborts (SIGABRT, "terminate called without an active
    exception") after a run that finished. Nothing when torch was not loaded or no group was started."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def visible_gpus() -> int:
    """CUDA devices this process may use (0 without CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun_command(
    argv: Sequence[str],
    nproc: int,
    nnodes: str | None = None,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> list[str]:
    """The ``python -m torch.distributed.run ... -m ft.cli <argv>`` command line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    multi_node = nnodes is not None and str(nnodes) not in ("1", "1:1")
    if multi_node or rdzv_endpoint:
        cmd += ["--nnodes", str(nnodes or 1), "--rdzv-backend", "c10d"]
        if rdzv_endpoint:
            cmd += ["--rdzv-endpoint", rdzv_endpoint]
        if rdzv_id:
            cmd += ["--rdzv-id", rdzv_id]
        if node_rank is not None:
            cmd += ["--node-rank", str(node_rank)]
    else:
        # one node: a private rendezvous on a free local port, so parallel runs do not collide
        cmd += ["--standalone"]
    return [*cmd, "-m", "ft.cli", *strip_launch_options(argv)]


def check_options(
    nproc: int | None, nnodes: str | None, node_rank: int | None, rdzv_endpoint: str | None, gpus: int
) -> int:
    """Validate the launch options; return the processes to start on this node."""
    if nproc is None:
        nproc = gpus or 1
    if nproc < 1:
        raise FtError(f"--nproc {nproc}: give the number of processes to start on this node (1 or more).")
    if gpus and nproc > gpus:
        raise FtError(
            f"--nproc {nproc}: this node has {gpus} visible GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most one process per GPU: --nproc {gpus}."
        )
    multi_node = nnodes is not None and str(nnodes) not in ("1", "1:1")
    if nnodes is not None:
        parts = str(nnodes).split(":")
        if not all(p.isdigit() and int(p) >= 1 for p in parts) or len(parts) > 2:
            raise FtError(f"--nnodes {nnodes}: expected a node count (2) or a range MIN:MAX (2:4), as torchrun takes.")
    if multi_node and not rdzv_endpoint:
        raise FtError(
            f"--nnodes {nnodes}: a multi-node run needs a rendezvous point every node can reach: add "
            "--rdzv-endpoint HOST:PORT (the same on every node; HOST is usually the first node) and --rdzv-id JOB."
        )
    if node_rank is not None and node_rank < 0:
        raise FtError(f"--node-rank {node_rank}: node ranks start at 0.")
    if rdzv_endpoint and ":" not in rdzv_endpoint:
        log.info("--rdzv-endpoint %s has no port; torchrun uses 29400", rdzv_endpoint)
    return nproc


def launch(
    argv: Sequence[str],
    nproc: int | None = None,
    nnodes: str | None = None,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> int | None:
    """Run ``ft <argv>`` in ``nproc`` processes on this node through torchrun; return its exit code.

    ``argv`` is the command line after ``ft`` (``["run", "config.yaml", "--nproc", "2", ...]``).
    Under an existing launcher nothing is started and None is returned: the caller runs the
    command in this process.
    """
    if under_launcher():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if nproc is not None and nproc * int(str(nnodes or 1).split(":")[-1]) != world:
            log.warning("already running under a launcher with WORLD_SIZE=%d; ignoring --nproc %s", world, nproc)
        return None
    nproc = check_options(nproc, nnodes, node_rank, rdzv_endpoint, visible_gpus())
    cmd = torchrun_command(argv, nproc, nnodes, node_rank, rdzv_endpoint, rdzv_id)
    log.info("launching: %s", " ".join(cmd))
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:  # torchrun forwards the signal to its workers and exits
        return 130


__all__ = ["check_options", "launch", "strip_launch_options", "torchrun_command", "under_launcher"]
