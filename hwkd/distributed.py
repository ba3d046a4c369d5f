"""torchrun support: the process group, who writes, and keeping every rank's model the same.

torchrun (``torchrun --nproc-per-node N -m hwkd compress ...``) sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; ``init_from_env`` sees them and joins the group (gloo on CPU, nccl on CUDA).
No launcher of our own. Training wraps the student in DistributedDataParallel inside ``train.fit``;
each global batch is split across ranks (``shard``), so N processes see the batches one would;
pruning decisions are rank 0's, broadcast (``sync_model``); only rank 0 writes files.
"""

from __future__ import annotations

import os
from typing import Any


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device) -> Any:
    """Join torchrun's process group when its environment is there; return the device this rank uses.

    On CUDA each rank takes ``cuda:LOCAL_RANK``. Idempotent (a second call does nothing).
    """
    import torch
    import torch.distributed as dist

    if env_world_size() <= 1 or not dist.is_available():
        return device
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def shard(chunk: list) -> list:
    """This rank's share of a global batch (every world-th item, from its rank)."""
    return chunk[rank() :: world_size()] if active() else chunk


def any_rank(flag: bool, device=None) -> bool:
    """True when ``flag`` is true on any rank (a NaN on one rank must stop them all, not hang them)."""
    if not active():
        return bool(flag)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)  # nccl reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def wrap(model, device):
    """``model`` in DistributedDataParallel when running under torchrun, else itself."""
    if not active():
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)  # buffers (BN statistics) follow rank 0


def average_gradients(params) -> None:
    """All-reduce (mean) the gradients of parameters DDP does not own (KD adapters trained beside it)."""
    if not active():
        return
    import torch.distributed as dist

    n = world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(n)


def sync_model(model) -> None:
    """Give every rank rank 0's structure and weights (after a pruning step: its decisions win)."""
    if not active():
        return
    import torch.distributed as dist

    from hwkd.artifacts import apply_structure, assign_tensors, model_structure

    payload = [None]
    if is_main():
        payload = [{"structure": model_structure(model),
                    "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}]  # fmt: skip
    dist.broadcast_object_list(payload, src=0)
    if not is_main():
        device = next(model.parameters()).device
        apply_structure(model, payload[0]["structure"])
        assign_tensors(model, payload[0]["state_dict"])
        model.to(device)
