"""Stage `train`: SoLoPO training (DPO, SimPO, ORPO x solo, long, expand-long, short) on the exported triplets.

One command on 1 CPU, 1 GPU, 8 GPUs or several nodes: with one process the loop runs in-process; with more
(num_processes > 1 or a hostfile) the stage launches itself through `accelerate launch` or the `deepspeed`
launcher (solopo.training.launch) and reads the result rank 0 wrote.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from solopo.chat import chat_format
from solopo.pipeline.config import register_preset
from solopo.pipeline.errors import SolopoError
from solopo.pipeline.io import dir_fingerprint, path_in_run, read_json
from solopo.pipeline.stage import Stage
from solopo.training.config import TrainConfig

from . import register

log = logging.getLogger("solopo")


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
    amendable = ("models/*/README.md",)  # eval adds its results table to the model card
    expensive = True

    @classmethod
    def progress(cls, out_dir: Path) -> str | None:
        """The newest readable checkpoint a killed run left (models/<algo>-<mode>.checkpoints/step-N)."""
        best: tuple[int, Path] | None = None
        for meta in out_dir.glob("models/*.checkpoints/step-*/solopo.json"):
            if not meta.parent.name.removeprefix("step-").isdigit():
                continue  # step-3.tmp (an interrupted save), step-3.bak: not a checkpoint
            try:
                step = json.loads(meta.read_text()).get("step")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                continue  # a damaged checkpoint is not one to resume from
            if isinstance(step, int) and not isinstance(step, bool) and (best is None or step > best[0]):
                best = (step, meta.parent)
        if best is None:
            return super().progress(out_dir)
        where = best[1].relative_to(out_dir.parent) if out_dir.parent in best[1].parents else best[1]
        return (
            f"resumable from step {best[0]} ({where}); rerun the same command to continue "
            "(another train config starts again from step 0)"
        )

    def fingerprint(self) -> dict[str, Any]:
        model = self.ctx.run.model
        chat = chat_format(self.ctx.run).fingerprint()  # the ids trained on; nothing added for the defaults
        if model is not None and Path(model).expanduser().is_dir():
            return {"model": dir_fingerprint(Path(model).expanduser()), **chat}
        return chat

    def run(self, data: pa.Table | None) -> pa.Table:
        from solopo.models import resolve_model
        from solopo.training.launch import hostfile_world, launch_plan, run_launched
        from solopo.training.loop.trainer import train
        from solopo.training.plan import prelaunch_check

        cfg: TrainConfig = self.config
        if data is not None and data.num_rows == 0:  # select ran with allow_empty=true: say why it is empty
            from solopo.pipeline.runner import read_manifest

            sel_dir = self.ctx.upstream_dirs.get("select", Path("select"))
            sel = sel_dir / "manifest.json"
            m, problem = read_manifest(sel_dir)
            drops = (m.get("drops") or {}) if m is not None else f"unknown ({problem})"
            raise SolopoError(
                f"train: the exported triplets are empty (0 pairs); select's drops by reason: {drops} (see {sel}). "
                "Sample more (sample.n), use a stronger model, or check the answers, then rerun `solopo pair`"
            )
        model_path = resolve_model(self.ctx.run.model, self.ctx.run.trust_remote_code)
        source = str(self.ctx.upstream_dirs.get("export", Path("export")) / "data.parquet")
        seed = cfg.seed if cfg.seed is not None else self.ctx.run.seed
        plan = launch_plan(cfg)  # the ranks (sp_size=auto counted as 1 until the memory plan resolves it)
        world = hostfile_world(cfg.hostfile) if cfg.hostfile else plan.num_processes
        kw = dict(
            model_path=model_path,
            table=data,
            out_dir=self.ctx.out_dir,
            seed=seed,
            source=source,
            trust_remote_code=self.ctx.run.trust_remote_code,
            chat=chat_format(self.ctx.run),
        )
        # before the model loads: refuse what cannot fit; deepspeed=auto on a GPU becomes the plan's choice
        cfg = prelaunch_check(cfg, model_path, data, world, self.ctx.note, self.ctx.stat)
        plan = launch_plan(cfg)  # again with the resolved sp_size (sp > 1 goes through DeepSpeed's launcher)
        if plan.in_process:
            result = train(cfg, ctx=self.ctx, **kw)
        else:
            result = run_launched(plan, cfg, **kw)
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
            # relative to the run dir: a copied or moved run dir keeps pointing at its own model
            "model_path": [path_in_run(result["model_path"], self.ctx.out_dir.parent)],
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
        from solopo.stages.export_card import SOURCES
        from solopo.training.model_card import base_model_id, base_model_license, write_model_card

        # The source datasets the triplets came from (export's `dataset` column), else the load stage's choice,
        # as Hub ids (the card metadata's `datasets` links to the Hub: musique -> dgslibisey/MuSiQue).
        if data is not None and "dataset" in data.column_names:
            datasets = sorted({str(x) for x in data.column("dataset").to_pylist() if x})
        else:
            load = getattr(self.ctx.config, "load", None)
            named = getattr(load, "dataset", None)
            datasets = [named] if named and named != "auto" else []
        datasets = [SOURCES.get(d, {}).get("hub_id", d) for d in datasets]
        write_model_card(
            result["model_path"],
            base_model=base_model_id(self.ctx.run.model, model_path),
            result=result,
            train_config=self.config.model_dump(mode="json"),
            datasets=datasets,
            license=base_model_license(self.ctx.run.model, model_path),
            chat=chat_format(self.ctx.run),
        )

    @staticmethod
    def load_result(model_dir: str | Path) -> dict[str, Any]:
        """HF Trainer's all_results.json of a trained model dir."""
        return read_json(Path(model_dir) / "all_results.json")
