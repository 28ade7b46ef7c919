"""The ranks of a multi-process run: who am I, and the few collectives the recipe needs.

Under torchrun every worker gets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` and the rendezvous address in its environment; a plain
``python -m kubetune_trainer`` has none of them and is a world of one. The process group
is created here, before the Hugging Face Trainer's, so that the recipe can use it while
preparing (agreeing on the checkpoint to resume from) and so that its timeout is ours:

- backend: gloo on CPU; on CUDA ``cuda:nccl,cpu:gloo`` (nccl for tensors on GPUs, gloo
  for the few CPU tensors: our stop flag, FSDP's CPU-offloaded state);
- timeout: ``COLLECTIVE_TIMEOUT`` (10 min, not torch's 30). A dead peer otherwise leaves
  the survivors blocked in a collective for half an hour before the attempt fails and the
  operator can start the next one. Ten minutes still covers the slowest legitimate wait
  we know of: rank 0 uploading a large checkpoint while the others wait at the barrier
  after it (and a full-state gather of a large FSDP model).

Each rank exits on its own (torchrun tears the others down when one fails), so no
collective is ever waited on by a rank that has already given up.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

COLLECTIVE_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World:
        values = os.environ if env is None else env
        size = int(values.get("WORLD_SIZE", "1"))
        return cls(
            size=size,
            rank=int(values.get("RANK", "0")),
            local_rank=int(values.get("LOCAL_RANK", "0")),
            local_size=int(values.get("LOCAL_WORLD_SIZE", str(size))),
        )


def backend() -> str:
    """The torch.distributed backend for this machine."""
    import torch

    return "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"


def ddp_backend() -> str:
    """The name TrainingArguments.ddp_backend expects for the same choice."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init(world: World) -> None:
    """Join the process group (a no-op for a world of one). Each process uses the one
    device its LOCAL_RANK names: never several GPUs from one process (nn.DataParallel)."""
    if not world.distributed:
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend(),
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS),
        )


def _active() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def barrier() -> None:
    if _active():
        import torch.distributed as dist

        dist.barrier()


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not _active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across(values: list[float]) -> list[float]:
    """Element-wise sums over all ranks (a CPU tensor: gloo carries it on any backend)."""
    if not _active():
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":  # a pure-nccl group (created by someone else)
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu().tolist()]
