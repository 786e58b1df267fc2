"""Stage `train`: SoLoPO training (DPO, SimPO, ORPO x solo, long, expand-long, short) on the exported triplets.

One command on 1 CPU, 1 GPU, 8 GPUs or several nodes: with one process the loop runs in-process; with more
(num_processes > 1 or a hostfile) the stage launches itself through `accelerate launch` or the `deepspeed`
launcher (solopo.training.launch) and reads the result rank 0 wrote.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from solopo.pipeline.config import StageConfig, parse_length, register_preset
from solopo.pipeline.errors import SolopoError
from solopo.pipeline.io import dir_fingerprint, read_json
from solopo.pipeline.stage import Stage

from . import register

log = logging.getLogger("solopo")


class TrainConfig(StageConfig):
    algo: Literal["dpo", "simpo", "orpo"] = "orpo"
    mode: Literal["solo", "long", "expand-long", "short"] = "solo"
    alpha: float | None = Field(
        default=None, description="SoLo-RA weight; None = paper default (DPO 3, SimPO 1, ORPO 1)"
    )
    beta: float | None = Field(default=None, description="None = DPO 0.1 (TRL), SimPO 2.0 (SimPO paper)")
    gamma: float = Field(default=0.5, description="SimPO target reward margin")
    orpo_lambda: float = Field(default=0.1, description="ORPO odds-ratio weight (ORPO paper; TRL's ORPOConfig.beta)")
    orpo_nll: Literal["completion", "sequence"] = Field(
        default="completion",
        description="ORPO NLL over the chosen completion (paper) or the whole prompt+completion (TRL's ORPOTrainer)",
    )
    ra_ref: Literal["long", "short"] = Field(
        default="long", description="DPO long reward reference: pi_ref(y_w|x_long) precomputed, or reuse the short one"
    )
    target_len: int | None = Field(
        default=None, description="which long length of the data to train on; None = largest"
    )
    lr: float = Field(default=5e-7, gt=0)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(
        default=None, gt=0, description="stop after this many optimizer steps (overrides epochs)"
    )
    micro_batch_size: int = Field(default=1, gt=0)
    grad_accum: int = Field(default=8, gt=0)
    max_length: int | None = Field(default=None, description="drop examples with a longer sequence (tokens)")
    logps_chunk: int = Field(
        default=1024, gt=0, description="LM-head rows per chunk when computing completion log-probs"
    )
    gradient_checkpointing: bool = True
    shared_prefix: bool = Field(
        default=False,
        description="compute each pair's prompt once for chosen and rejected (one packed row, block-causal mask; "
        "sdpa/eager attention) instead of a padded batch of two full sequences",
    )
    deepspeed: Literal["auto", "zero3", "zero2", "none"] = Field(
        default="auto",
        description="auto: none on CPU and on one GPU when weights+grads+AdamW fit in half of it, else zero3",
    )
    offload: Literal["none", "optimizer", "full"] = "none"
    launcher: Literal["auto", "none", "accelerate", "deepspeed"] = "auto"
    num_processes: int | None = Field(default=None, description="processes per node; None = GPUs visible (1 on CPU)")
    hostfile: str | None = None
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    logging_steps: int = Field(default=1, gt=0)
    save_steps: int = 0
    resume: bool = True
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    save_dtype: Literal["auto", "fp32"] = Field(
        default="auto", description="dtype of the saved weights: auto = the training dtype (bf16 when trained in bf16)"
    )
    disable_dropout: bool = Field(
        default=True,
        description="zero every dropout in the policy (TRL's default): the DPO reference is computed without dropout",
    )
    seed: int | None = Field(default=None, description="None = run.seed")

    @field_validator("target_len", "max_length", mode="before")
    @classmethod
    def _length(cls, v: Any) -> Any:
        return None if v is None else parse_length(v)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        # (positivity is checked per field, so that it is reported together with every other field's problem)
        problems = []
        if self.offload != "none" and self.deepspeed == "none":
            problems.append("offload needs deepspeed=zero2 or zero3")
        if self.offload == "full" and self.deepspeed not in ("zero3", "auto"):
            problems.append("offload=full (parameters too) needs deepspeed=zero3")
        if self.shared_prefix and self.attn == "flash_attention_2":
            problems.append("shared_prefix needs a custom attention mask: attn=sdpa or eager (or auto)")
        if self.alpha is not None and self.alpha < 0:
            problems.append("alpha must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# Small enough that the embedded 135M model trains a few steps in minutes on 2 CPU cores.
register_preset(
    "cpu-demo",
    {
        "train": {
            "max_steps": 3,
            "micro_batch_size": 1,
            "grad_accum": 2,
            "lr": 1e-6,
            "gradient_checkpointing": False,
            "logps_chunk": 512,
            "save_steps": 2,
        }
    },
)


@register
class TrainStage(Stage):
    name = "train"
    Config = TrainConfig
    after = "export"
    reads = ("id", "short_prompt", "long_prompt", "chosen_response", "rejected_response")
    writes = ("model_path", "algo", "mode", "alpha", "steps")
    version = "1"

    def fingerprint(self) -> dict[str, Any]:
        model = self.ctx.run.model
        if model is not None and Path(model).expanduser().is_dir():
            return {"model": dir_fingerprint(Path(model).expanduser())}
        return {}

    def run(self, data: pa.Table | None) -> pa.Table:
        from solopo.models import resolve_model
        from solopo.training.launch import launch_plan, run_launched
        from solopo.training.loop.trainer import train

        cfg: TrainConfig = self.config
        if data is not None and data.num_rows == 0:  # select ran with allow_empty=true: say why it is empty
            sel = self.ctx.upstream_dirs.get("select", Path("select")) / "manifest.json"
            drops = read_json(sel).get("drops", {}) if sel.exists() else "unknown (no select manifest)"
            raise SolopoError(
                f"train: the exported triplets are empty (0 pairs); select's drops by reason: {drops} (see {sel}). "
                "Sample more (sample.n), use a stronger model, or check the answers, then rerun `solopo pair`"
            )
        model_path = resolve_model(self.ctx.run.model)
        source = str(self.ctx.upstream_dirs.get("export", Path("export")) / "data.parquet")
        seed = cfg.seed if cfg.seed is not None else self.ctx.run.seed
        plan = launch_plan(cfg)
        if plan.in_process:
            result = train(
                cfg, model_path=model_path, table=data, out_dir=self.ctx.out_dir, seed=seed, source=source, ctx=self.ctx
            )
        else:
            result = run_launched(
                plan, cfg, model_path=model_path, table=data, out_dir=self.ctx.out_dir, seed=seed, source=source
            )
            for n in result.get("notes", []):
                self.ctx.note(n)
            for reason, ids in result.get("drops", {}).items():
                for i in ids:
                    self.ctx.drop(reason, example=i)
        for k in ("steps", "seconds", "tokens_per_s", "peak_mem_gb", "world_size", "attn", "dtype", "launcher"):
            if k in result:
                self.ctx.stat(k, result[k])
        final = result.get("final", {})
        for k, v in final.items():
            self.ctx.stat(f"final_{k}", v)
        self._write_card(result, model_path, data)
        row = {
            "model_path": [result["model_path"]],
            "algo": [cfg.algo],
            "mode": [cfg.mode],
            "alpha": [float(result["alpha"])],
            "beta": [float(result["beta"])],
            "steps": [int(result["steps"])],
            "target_len": [result.get("target_len")],
            "examples": [int(result["examples"])],
            "final_metrics": [json.dumps(final, sort_keys=True)],
        }
        for k in ("loss", "po_loss", "ra_loss", "reward_acc", "ra_distance"):
            row[k] = [float(final[k]) if k in final else None]
        return pa.table(row)

    def _write_card(self, result: dict[str, Any], model_path: str, data: pa.Table | None) -> None:
        """README.md model card (HF format) next to the weights; eval adds its table later (add_eval_results)."""
        from solopo.training.model_card import base_model_id, base_model_license, write_model_card

        # The source datasets the triplets came from (export's `dataset` column), else the load stage's choice.
        if data is not None and "dataset" in data.column_names:
            datasets = sorted({str(x) for x in data.column("dataset").to_pylist() if x})
        else:
            load = getattr(self.ctx.config, "load", None)
            named = getattr(load, "dataset", None)
            datasets = [named] if named and named != "auto" else []
        write_model_card(
            result["model_path"],
            base_model=base_model_id(self.ctx.run.model, model_path),
            result=result,
            train_config=self.config.model_dump(mode="json"),
            datasets=datasets,
            license=base_model_license(self.ctx.run.model, model_path),
        )

    @staticmethod
    def load_result(model_dir: str | Path) -> dict[str, Any]:
        """HF Trainer's all_results.json of a trained model dir."""
        return read_json(Path(model_dir) / "all_results.json")
