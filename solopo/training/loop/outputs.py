"""What a run leaves behind: checkpoints (save/resume), the HF model, logs.jsonl / TensorBoard / W&B, curves."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from solopo.pipeline.errors import MissingDependencyError
from solopo.pipeline.io import write_json

log = logging.getLogger("solopo")


def latest_checkpoint(ckpt_dir: Path, run_key: str) -> Path | None:
    if not ckpt_dir.exists():
        return None
    found = []
    for p in ckpt_dir.glob("step-*"):
        meta = p / "solopo.json"
        if meta.exists() and json.loads(meta.read_text()).get("run_key") == run_key:
            found.append((int(p.name.split("-")[1]), p))
    return max(found)[1] if found else None


def save_model(
    lm, tokenizer, state_dict, model_dir: Path, dtype: torch.dtype, extra_json: dict[str, dict] | None = None
) -> None:
    tmp = model_dir.with_name(f".{model_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    state_dict = dict(lm.state_dict() if state_dict is None else state_dict)
    # Tied tensors (embeddings = LM head) stay one tensor: cast each distinct storage once.
    cast: dict[tuple, torch.Tensor] = {}
    for k, v in state_dict.items():
        if v.is_floating_point() and v.dtype != dtype:
            key = (v.data_ptr(), v.shape, v.stride())
            cast[key] = cast[key] if key in cast else v.to(dtype)
            state_dict[k] = cast[key]
    lm.save_pretrained(tmp, state_dict=state_dict)
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained states the model's dtype, not the saved one
    write_json(config, tmp / "config.json")
    _finish_model_dir(tmp, model_dir, tokenizer, extra_json)


def _finish_model_dir(tmp: Path, model_dir: Path, tokenizer, extra_json: dict[str, dict] | None) -> None:
    """Tokenizer, HF trainer files and the running log into `tmp`, then `tmp` replaces `model_dir` (one rename)."""
    tokenizer.save_pretrained(tmp)
    for name, obj in (extra_json or {}).items():
        write_json(obj, tmp / name)
    for extra in ("logs.jsonl",):
        if (model_dir / extra).exists():
            shutil.copy2(model_dir / extra, tmp / extra)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)


def save_adapter_model(
    peft_model,
    tokenizer,
    adapter_sd: dict[str, torch.Tensor],
    model_dir: Path,
    dtype: torch.dtype,
    base_path: str,
    merge: bool,
    extra_json: dict[str, dict] | None = None,
) -> None:
    """A LoRA run's model dir. merge=True: the merged HF checkpoint at the top (what eval and AutoModelForCausalLM
    load) and the adapter in `adapter/`; merge=False: the adapter at the top (PeftModel.from_pretrained)."""
    from solopo.training import peft as lora

    tmp = model_dir.with_name(f".{model_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter_dir = tmp / lora.ADAPTER_SUBDIR if merge else tmp
    lora.save_adapter(peft_model, adapter_sd, adapter_dir, dtype)
    if merge:
        lora.merge(base_path, adapter_dir, tmp, dtype)
    _finish_model_dir(tmp, model_dir, tokenizer, extra_json)


def make_writer(cfg, model_dir: Path, rank: int):
    if rank != 0 or cfg.report_to == "none":
        return None
    if cfg.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise MissingDependencyError("tensorboard", "pip install tensorboard", "train.report_to=tensorboard") from e
        return SummaryWriter(log_dir=str(model_dir.with_name(model_dir.name + ".tensorboard")))
    try:
        import wandb
    except ImportError as e:
        raise MissingDependencyError("wandb", "pip install wandb", "train.report_to=wandb") from e
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "solopo"), name=model_dir.name, config=cfg.model_dump())

    class _W:
        def add_scalar(self, k, v, step):
            run.log({k: v}, step=step)

        def close(self):
            run.finish()

    return _W()


def log_row(row: dict, model_dir: Path, writer) -> None:
    log.info(
        "[train] step %d loss %.4f (po %.4f + ra %.4f) r_w %.3f r_l %.3f acc %.2f ra_dist %.3f %.0f tok/s peak %.2f GB",
        row["step"],
        row["loss"],
        row["po_loss"],
        row["ra_loss"],
        row["reward_chosen"],
        row["reward_rejected"],
        row["reward_acc"],
        row["ra_distance"],
        row["tokens_per_s"],
        row["peak_mem_gb"],
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / "logs.jsonl", "a") as f:  # append-only log; the model dir is replaced at the end
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(f"train/{k}", v, row["step"])


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for k in ("loss", "po_loss", "ra_loss"):
        axes[0].plot(steps, [r[k] for r in history], label=k)
    axes[0].set_title("loss = po + ra")
    for k in ("reward_chosen", "reward_rejected"):
        axes[1].plot(steps, [r[k] for r in history], label=k)
    axes[1].plot(steps, [r["reward_acc"] for r in history], label="reward_acc")
    axes[1].set_title("short rewards")
    axes[2].plot(steps, [r["ra_distance"] for r in history], label="|r_short - r_long|")
    axes[2].set_title("RA distance (chosen)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
