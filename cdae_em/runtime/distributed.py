"""Running one job over several processes (``torchrun``): ranks, row shards and collectives.

Started under ``torchrun`` (environment variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), ``init_from_env`` joins the process group: gloo on CPU, NCCL on CUDA (rank r on
node n uses the LOCAL_RANK-th device of ``--gpu``). Every stage then works on its rank's
contiguous block of rows (``shard``) and shares results with collectives (``gather_rows``,
``all_reduce_sum``, ``broadcast``). Work arrays are memory-mapped files in the output directory:
each rank writes its own rows, ``barrier`` orders the writes before the reads (several nodes need a
shared file system, as RELION's project directory is). Rank 0 alone writes the job's outputs.

Without torchrun (or with one process) every helper is a no-op and nothing is imported or
initialised: the single-process run is unchanged.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from cdae_em.errors import CdaeError, InputError

log = logging.getLogger(__name__)

TIMEOUT_MINUTES = 60  # a rank waiting longer than this at a collective gives up (another rank died)


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank (0 .. size - 1), size, and local rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """The current process group's ranks (World() when not distributed)."""
    if not active():
        return World()
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                 int(os.environ.get("LOCAL_RANK", "0")))


def active() -> bool:
    """Whether a process group with more than one process is initialised."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def local_device(gpu: str | None) -> str | None:
    """The CUDA device id of this process among ``gpu`` ("0,1,2,3"): the LOCAL_RANK-th of the list
    (None: CPU). One process: the first."""
    ids = gpu_ids(gpu)
    if not ids:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= len(ids):
        raise InputError(None, f"--gpu {gpu}: {len(ids)} device(s) for local rank {local}; give one device per process")
    return ids[local]


def init_from_env(device: torch.device) -> World:
    """Join the torchrun process group if this process was launched by torchrun with several
    processes (gloo for CPU, NCCL for CUDA ``device``); returns this process's World."""
    if not launched() or active():
        return world()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES))
    w = world()
    log.info("distributed run: rank %d of %d (%s, local rank %d)", w.rank, w.size, backend, w.local_rank)
    if not w.main:  # rank 0 tells the story; the others only warn
        logging.getLogger("cdae_em").setLevel(max(logging.WARNING, logging.getLogger("cdae_em").getEffectiveLevel()))
    return w


def shutdown() -> None:
    """Leave the process group (end of the job)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(n: int, w: World | None = None) -> tuple[int, int]:
    """This rank's contiguous block [lo, hi) of ``n`` rows (sizes differ by at most one)."""
    w = w or world()
    return n * w.rank // w.size, n * (w.rank + 1) // w.size


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if active():
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: CUDA for NCCL, CPU for gloo."""
    if active() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(part: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (shards may differ in length); returned on
    ``part``'s device. One process: ``part``."""
    if not active():
        return part
    comm = _comm_device()
    lengths = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(world().size)]
    torch.distributed.all_gather(lengths, torch.tensor([len(part)], device=comm))
    longest = int(max(int(x) for x in lengths))
    padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=comm)
    padded[:len(part)] = part.to(comm)
    pieces = [torch.empty_like(padded) for _ in lengths]
    torch.distributed.all_gather(pieces, padded)
    return torch.cat([p[:int(m)] for p, m in zip(pieces, lengths)]).to(part.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor on ``t``'s device)."""
    if not active():
        return t
    comm = t.to(_comm_device()).clone()
    torch.distributed.all_reduce(comm)
    return comm.to(t.device)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


class RowShard:
    """Rows [lo, hi) of an array-like (``len``, ``shape``, ``[rows]``) as an array-like."""

    def __init__(self, images, lo: int, hi: int):
        self.images, self.lo, self.hi = images, lo, hi
        self.shape = (hi - lo, *images.shape[1:])
        self.device = getattr(images, "device", None) if isinstance(images, torch.Tensor) else None

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            return self.images[slice(*(self.lo + r for r in rows.indices(len(self))[:2]))]
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
        return self.images[self.lo + rows]


def per_row(fn: Callable, images, *args, rows_too: tuple[str, ...] = (), **kwargs):
    """``fn(images, ...)`` for a function whose outputs (a tensor or a tuple of tensors) have one
    row per image: each rank runs it on its shard and the rows are gathered, in order, on every
    rank. One process: ``fn(images, ...)``. The keyword arguments named in ``rows_too`` (array-likes
    with a row per image, or None) are sharded as ``images``."""
    if not active():
        return fn(images, *args, **kwargs)
    lo, hi = shard(len(images))
    view = lambda a: a[lo:hi] if isinstance(a, torch.Tensor) else RowShard(a, lo, hi)  # noqa: E731
    kwargs.update({name: view(kwargs[name]) for name in rows_too if kwargs.get(name) is not None})
    result = fn(view(images), *args, **kwargs)
    if isinstance(result, tuple):
        return tuple(gather_rows(r) for r in result)
    return gather_rows(result)


def run_rows(fn: Callable[[int, int], None], n: int) -> None:
    """Call ``fn(lo, hi)`` on this rank's rows of ``n`` (e.g. to fill its rows of a shared
    memory-mapped array), then wait for every rank."""
    lo, hi = shard(n)
    fn(lo, hi)
    barrier()


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 when not launched by torchrun); readable
    before the process group is joined."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def on_main(fn: Callable, *args, **kwargs) -> Any:
    """``fn(...)`` on rank 0 only; its result on every rank. If it fails, every rank fails: rank 0
    with the error itself, the others with a CdaeError carrying its message (so that no rank waits
    for a collective that will never come)."""
    if not active():
        return fn(*args, **kwargs)
    result, message, error = None, None, None
    if world().main:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # handed on to every rank below, then re-raised
            error, message = exc, str(exc) or type(exc).__name__
    result, message = broadcast((result, message))
    if error is not None:
        raise error
    if message is not None:
        raise CdaeError(f"rank 0 failed: {message}")
    return result


def gpu_ids(gpu: str | None) -> list[str]:
    """CUDA device ids of a ``--gpu`` value: "0,1,2,3" (also "0:1", RELION's way) -> ["0", "1", ...];
    None, "" or "cpu" -> []."""
    if gpu is None or str(gpu).strip().lower() in ("", "cpu", "-1", "none"):
        return []
    return [g for g in str(gpu).replace(":", ",").replace(" ", ",").split(",") if g]


def launch_command(n_processes: int, module: str, argv: list[str]) -> list[str]:
    """The torchrun command that runs ``python -m module argv`` in ``n_processes`` processes on this
    node (a standalone rendezvous on a free port)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_processes),
            "-m", module, *argv]


def relaunch_on_gpus(gpu: str | None, module: str, argv: list[str]) -> int | None:
    """With several devices in ``gpu`` and not yet under torchrun: run the same command as one
    process per device (torchrun, this node) and return its exit code; else None (run here).
    Fails with a one-line InputError when the devices are not there."""
    ids = gpu_ids(gpu)
    if len(ids) < 2 or launched():
        return None
    if not all(i.isdigit() for i in ids):
        raise InputError(None, f"--gpu {gpu}: expected device numbers such as 0,1,2,3")
    if not torch.cuda.is_available():
        raise InputError(None, f"--gpu {gpu}: CUDA is not available on this machine (torch {torch.__version__})")
    if max(int(i) for i in ids) >= torch.cuda.device_count():
        raise InputError(None, f"--gpu {gpu}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    import subprocess

    cmd = launch_command(len(ids), module, argv)
    log.info("running on GPUs %s: %s", ",".join(ids), " ".join(cmd))
    return subprocess.call(cmd)


def resolve_device(gpu: str | int | None) -> torch.device:
    """``None``/"" -> CPU; "0" -> cuda:0 (an error if CUDA is not available)."""
    if gpu is None or str(gpu).strip() in ("", "cpu", "-1"):
        return torch.device("cpu")
    gpu = str(gpu).split(",")[0].strip()
    if not torch.cuda.is_available():
        raise InputError(None, f"--gpu {gpu}: CUDA is not available on this machine (torch {torch.__version__})")
    return torch.device(f"cuda:{int(gpu)}")
