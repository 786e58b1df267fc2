"""Process-group helpers shared by the loop, the step and the reference pass (one rank or many)."""

from __future__ import annotations

import logging
import os
import resource
import socket

import torch

log = logging.getLogger("solopo")


# --- distributed ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(use_deepspeed: bool) -> tuple[int, int, int]:
    """(rank, local_rank, world). One plain process without launcher env: sets a 1-rank env for DeepSpeed."""
    if use_deepspeed and "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 or use_deepspeed:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if use_deepspeed:
                import deepspeed

                deepspeed.init_distributed(dist_backend=backend)
            else:
                dist.init_process_group(backend=backend)
    return rank, local_rank, world


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def rank_shard(n: int, rank: int, world: int) -> list[int]:
    """Indices rank..n step world, padded cyclically so that every rank gets ceil(n / world) of them: under ZeRO-3
    each forward is collective, so all ranks must run the same number of them. Duplicates are dropped on merge."""
    per = -(-n // world)
    mine = list(range(rank, n, world))
    return (mine + list(range(n)))[:per] if mine else list(range(n))[:per]


def gather_rows(cols: dict[str, list], world: int) -> dict[str, list]:
    """All ranks' reference columns, merged (first occurrence of an id wins), identical on every rank."""
    if world == 1:
        return cols
    import torch.distributed as dist

    parts: list[dict[str, list] | None] = [None] * world
    dist.all_gather_object(parts, cols)
    out: dict[str, list] = {k: [] for k in cols}
    seen: set[str] = set()
    for part in parts:
        for i, eid in enumerate(part["id"]):
            if eid not in seen:
                seen.add(eid)
                for k in out:
                    out[k].append(part[k][i])
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
