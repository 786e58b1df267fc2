"""Optimizer backends behind one small interface: plain torch (+ DDP-style grad averaging) or DeepSpeed."""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger("solopo")


# --- backends: plain torch or DeepSpeed, one small interface --------------------------------------------------
class PlainBackend:
    def __init__(self, module, optimizer, scheduler, cfg):
        self.module, self.optimizer, self.scheduler, self.cfg = module, optimizer, scheduler, cfg
        self.grad_norm: torch.Tensor | float = 0.0  # of the last step; a device tensor until the step's check

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def micro_done(self, boundary: bool) -> None:
        if not boundary:
            return
        _average_grads_across_ranks(self.module)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def local_params(self) -> list[torch.Tensor]:
        """The parameter values this rank holds (all of them without ZeRO-3)."""
        return [p.detach() for p in self.module.parameters()]

    def save_checkpoint(self, path: Path, state: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(
            {
                "model": trained_state(self.module.lm),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                **state,
            },
            tmp / "state.pt",
        )
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Path) -> dict:
        # Plain tensors, numbers and strings only: no pickled code runs when a checkpoint is read.
        blob = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        load_trained_state(self.module.lm, blob.pop("model"))
        self.optimizer.load_state_dict(blob.pop("optimizer"))
        self.scheduler.load_state_dict(blob.pop("scheduler"))
        return blob

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.module.lm.state_dict()


def trained_state(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: the whole state dict in full fine-tuning; only the trained tensors
    when part of the model is frozen (LoRA: the adapter, not the base, which is the model on disk)."""
    sd = lm.state_dict()
    frozen = {n for n, p in lm.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return sd if not frozen else {k: v for k, v in sd.items() if k not in frozen}


def load_trained_state(lm: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """The inverse of trained_state: only frozen tensors may be absent from the checkpoint."""
    frozen = {n for n, p in lm.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - frozen:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _average_grads_across_ranks(module: torch.nn.Module) -> None:
    """Without DeepSpeed, several ranks (accelerate launch) are plain data parallel: each rank's loss is the mean
    over its own examples, so the global mean gradient is the rank average. One flat all-reduce per step (no
    overlap with backward: DeepSpeed is the fast path); a missing grad counts as zeros so all ranks reduce the
    same buffer."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


class DeepSpeedBackend(PlainBackend):
    def __init__(self, engine, cfg):
        self.engine, self.cfg = engine, cfg
        self.module = engine.module
        self.grad_norm = 0.0

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already divided by the examples of the whole step: no extra 1/grad_accum.
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_done(self, boundary: bool) -> None:
        self.engine.step()  # DeepSpeed counts micro-batches and updates at the accumulation boundary
        if boundary:
            gn = self.engine.get_global_grad_norm()
            self.grad_norm = gn  # None when DeepSpeed did not compute one: the weights' check still runs

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def local_params(self) -> list[torch.Tensor]:
        # ZeRO-3 keeps only this rank's partition of each parameter in `ds_tensor`.
        return [getattr(p, "ds_tensor", p).detach() for p in self.module.parameters()]

    def save_checkpoint(self, path: Path, state: dict) -> None:
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state=state)

    def load_checkpoint(self, path: Path) -> dict:
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        return client or {}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.cfg.deepspeed == "zero3":
            sd = self.engine._zero3_consolidated_16bit_state_dict()  # every rank must call; rank 0 gets it
            return None if sd is None else {k.removeprefix("lm."): v for k, v in sd.items()}
        return self.module.lm.state_dict()


def make_scheduler(optimizer, cfg, total_steps: int):
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
