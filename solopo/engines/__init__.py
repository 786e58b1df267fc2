"""Where generation runs: `local` (one process, the backend of solopo.backends) or `ray` (Ray Data over
replicas of that backend, on one node's GPUs or a cluster's). Stages pick one with `open_backend`; both give
the Backend interface and seed per prompt. Whether both give the same samples depends on the backend: the
transformers backend in fp32 does (its draws do not depend on the batch); vLLM does not (its logits depend on
the batch a prompt shares, and Ray decides the batches' replicas). README: Reproducibility.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from solopo import backends
from solopo.backends import Backend
from solopo.pipeline.config import StageConfig

EngineName = Literal["local", "ray"]


class EngineConfig(StageConfig):
    """Config fields shared by the stages that generate (sample, eval)."""

    engine: EngineName = Field(default="local", description="local: this process; ray: Ray Data replicas")
    ray_address: str | None = Field(
        default=None, description="None: start a local Ray; 'auto': join the cluster of `ray start`; or host:port"
    )
    replicas: int = Field(default=1, ge=1, description="ray: backend replicas (each tensor_parallel_size GPUs)")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM: GPUs per replica")
    ray_cpus_per_replica: float = Field(default=1.0, gt=0, description="ray, no GPU in the cluster: CPUs per replica")
    ray_batch_prompts: int | None = Field(default=None, ge=1, description="ray: prompts per replica call")
    ray_max_retries: int = Field(default=3, ge=0, description="ray: retries of a failed replica call")


def open_backend(
    cfg: EngineConfig,
    name: str,
    model_path: str,
    ctx_note: Callable[[str], None] | None = None,
    **opts: Any,
) -> Backend:
    """The backend `name` in this process (engine local) or as Ray Data replicas (engine ray)."""
    if cfg.engine == "local":
        return backends.get_backend(name, model_path, ctx_note=ctx_note, **opts)  # looked up now: patchable
    from .ray_data import RayDataBackend, RayLayout

    layout = RayLayout(
        address=cfg.ray_address,
        replicas=cfg.replicas,
        tensor_parallel_size=cfg.tensor_parallel_size,
        cpus_per_replica=cfg.ray_cpus_per_replica,
        batch_prompts=cfg.ray_batch_prompts,
        max_retries=cfg.ray_max_retries,
    )
    return RayDataBackend(name, model_path, layout, ctx_note=ctx_note, **opts)


__all__ = ["EngineConfig", "EngineName", "open_backend"]
