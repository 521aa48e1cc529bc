"""Several processes under torchrun (torch.distributed): the share of the samples each one observes, and the sums
and gathers that make their results one.

`torchrun --nproc-per-node N -m cnnmod decompose ...` starts N copies of the command. Each reads its rank from the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), joins the process group (gloo
on the CPU, NCCL on CUDA, one GPU per local rank), and works on a contiguous share of the planned samples. Counts are
integers, so their sum over the ranks is the same whatever the order: N processes give the counts, the masks and
the module files of one. Rank 0 writes and prints; the other ranks print nothing but their own errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..errors import CnnmodError

__all__ = ["SINGLE", "Shard", "joined", "one_process_only"]

T = TypeVar("T")

# gloo sums these integer types; the others travel as int32/int64 (counts never need more)
_GLOO_TYPES = (torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float64)


class RankExit(SystemExit):
    """A rank other than 0 stops, with status 0, because rank 0 reported an error (which rank 0 alone prints and
    exits with). torchrun stops every worker as soon as one fails: a failing rank 1 could stop rank 0 before its
    error line is out, so only rank 0 fails and torchrun's status is rank 0's."""

    def __init__(self) -> None:
        super().__init__(0)


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` processes; `Shard()` is the whole job in one process."""

    rank: int = 0
    world: int = 1
    backend: str = ""
    local_world: int = 1
    """Processes on this machine (they share its memory)."""

    @property
    def main(self) -> bool:
        """Whether this process writes outputs and prints results (rank 0)."""
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous share of `n` items (shares differ in size by at most one; some may be empty)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place on every rank (a no-op in one process)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            if self.backend == "gloo" and t.dtype not in _GLOO_TYPES:
                wide = t.to(torch.int64 if t.dtype == torch.int64 or not t.is_floating_point() else torch.float64)
                dist.all_reduce(wide)
                t.copy_(wide)
            else:
                dist.all_reduce(t)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (rows may differ in number) concatenated in rank order, on every rank."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        rows = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        counts = [torch.zeros_like(rows) for _ in range(self.world)]
        dist.all_gather(counts, rows)
        sizes = [int(c) for c in counts]
        padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    def total(self, value: float) -> float:
        """`value` summed over the ranks."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0])

    def first(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only (checking an output path, say); a CnnmodError there stops every rank: rank 0
        raises it (and prints it), the others exit with status 0 and print nothing
        (torchrun's status is rank 0's)."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        result: T | None = None
        message: list[str | None] = [None]
        if self.main:
            try:
                result = fn()
            except CnnmodError as e:
                message[0] = str(e) or type(e).__name__
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            if self.main:
                raise CnnmodError(message[0])
            raise RankExit()
        return result

    @property
    def device(self) -> torch.device:
        """Where tensors travel between ranks: this rank's GPU with NCCL, else the CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


SINGLE = Shard()


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets WORLD_SIZE) with 2+ ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def one_process_only(what: str) -> None:
    """Stop, before anything is read or written, a job that does not share its work between torchrun's processes
    (each would do all of it and write the same files): rank 0 raises the error, which it alone prints; the other
    ranks exit with status 0 and print nothing (torchrun's status is rank 0's). Nothing happens outside torchrun."""
    if not in_torchrun():
        return
    if os.environ.get("RANK", "0").strip() != "0":
        raise RankExit()
    raise CnnmodError(f"{what} runs in one process; start it without torchrun")


@contextmanager
def joined(device: str | None) -> Iterator[tuple[Shard, str | None]]:
    """This process's shard and the device it runs on: under torchrun, the process group is joined on entry and
    left on exit (gloo on the CPU; NCCL with `cuda:LOCAL_RANK` on CUDA); otherwise `(SINGLE, device)`."""
    if not in_torchrun():
        yield SINGLE, device
        return
    import torch.distributed as dist

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except (KeyError, ValueError) as e:
        raise CnnmodError(f"WORLD_SIZE is set but {e} is missing or not a number: start cnnmod with torchrun") \
            from None
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise CnnmodError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): start at most "
                              f"{torch.cuda.device_count()} processes per node")
        torch.cuda.set_device(local)
        backend, device = "nccl", f"cuda:{local}"
    elif kind == "cpu":
        backend = "gloo"
    else:
        raise CnnmodError(f"torchrun runs cnnmod on cpu or cuda, not {kind}")
    started = not dist.is_initialized()
    if started:
        try:
            dist.init_process_group(backend)
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CnnmodError(f"cannot join the torchrun process group ({first}); on one machine without a "
                              "network, set GLOO_SOCKET_IFNAME=lo") from None
    try:
        yield Shard(rank, world, backend, local_world), device
        if started and dist.is_initialized():
            _leave_together()
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def _leave_together() -> None:
    """Wait for every process before the group is destroyed: a process that destroys its gloo group while rank 0
    is still writing the store was seen to abort in gloo's threads ("terminate called without an active
    exception"; twice in one CI run). A rank that failed meanwhile does not come: then there is nothing to wait
    for, and its error is what gets printed."""
    import torch.distributed as dist

    try:
        dist.barrier()
    except (RuntimeError, ValueError):
        pass
