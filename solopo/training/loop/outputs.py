"""What a run leaves behind: checkpoints (save/resume), the HF model, logs.jsonl / TensorBoard / W&B, curves."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch

from solopo.models import save_dir_atomic, write_failure
from solopo.pipeline.errors import MissingDependencyError
from solopo.pipeline.io import stable_hash, write_json

from .distributed import all_reduce

log = logging.getLogger("solopo")


# --- where a run writes: the finished model dir, its staging twin, the checkpoints ----------------------------
def model_dirs(out_dir: str | Path, cfg) -> tuple[Path, Path, Path]:
    """(model dir, checkpoint dir, staging dir). A run writes its logs into the staging dir (`.NAME.partial-PID`,
    rank 0's PID), which becomes the model dir only when the model is saved: a failed run leaves the previous
    model, logs.jsonl included, untouched."""
    model_dir = Path(out_dir) / "models" / f"{cfg.algo}-{cfg.mode}"
    return (
        model_dir,
        model_dir.with_name(model_dir.name + ".checkpoints"),
        model_dir.with_name(f".{model_dir.name}.partial-{os.getpid()}"),
    )


def open_staging(model_dir: Path, staging: Path) -> None:
    """A fresh staging dir. Older staging and save dirs are leftovers of killed runs (the run-dir lock admits one
    writer at a time)."""
    for pattern in (f".{model_dir.name}.partial-*", f".{model_dir.name}.tmp-*"):
        for stale in model_dir.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise (write_failure(e, staging) or e) from e


def discard_staging(out_dir: str | Path, cfg) -> None:
    """After train() returns or fails: the staging dir is gone (renamed into place on success)."""
    shutil.rmtree(model_dirs(out_dir, cfg)[2], ignore_errors=True)


# Settings that do not change what is computed: changing them keeps the checkpoints (the resume key skips them).
_NOT_MATH = (
    "logging_steps",
    "report_to",
    "save_steps",
    "save_minutes",
    "save_total_limit",
    "resume",
    "save_dtype",
    "launcher",
    "hostfile",
)


def resume_key(cfg, **rest) -> str:
    """The checkpoints' key: the config minus the settings in _NOT_MATH, plus model, seed, world and data."""
    conf = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_MATH}
    return stable_hash({"cfg": conf, **rest})


_STEP = re.compile(r"step-(\d+)")


def scan_checkpoints(ckpt_dir: Path, run_key: str, note) -> tuple[list[Path], list[Path]]:
    """(this run's checkpoints newest first, other configs' checkpoints). Temp dirs of an interrupted save
    (`step-N.tmp`) are removed; a stray dir (`step-3.bak`) or an unreadable solopo.json is skipped with a note."""
    mine: list[tuple[int, Path]] = []
    foreign: list[Path] = []
    for p in sorted(ckpt_dir.glob("step-*")) if ckpt_dir.is_dir() else []:
        m = _STEP.fullmatch(p.name)
        if not p.is_dir():
            continue
        if m is None:
            if p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)  # an interrupted save; never marked done
            else:
                note(f"ignoring {p}: not a checkpoint solopo wrote (names are step-N)")
            continue
        try:
            meta = json.loads((p / "solopo.json").read_text())
            key = meta["run_key"]
        except (OSError, ValueError, TypeError, KeyError) as e:
            note(f"skipping damaged checkpoint {p}: solopo.json is unreadable ({type(e).__name__})")
            continue
        if key == run_key:
            mine.append((int(m.group(1)), p))
        else:
            foreign.append(p)
    return [p for _, p in sorted(mine, reverse=True)], foreign


def load_latest_checkpoint(backend, ckpt_dir: Path, run_key: str, rank: int, note) -> tuple[int, list[dict]]:
    """(step, history) of the newest checkpoint of this run that loads; a damaged one (truncated state.pt, ...)
    is skipped with a note and the next older one tried; none -> (0, []). Other configs' checkpoints are removed."""
    mine, foreign = scan_checkpoints(ckpt_dir, run_key, note if rank == 0 else lambda _m: None)
    for path in mine:
        try:
            client = backend.load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: an older one (or step 0) still works
            note(f"skipping damaged checkpoint {path} ({type(e).__name__}: {str(e)[:160]})")
            continue
        step = int(client.get("step", 0))
        note(f"resumed from checkpoint {path} at step {step}")
        return step, list(client.get("history", []))
    if foreign and not mine:
        note(f"checkpoints in {ckpt_dir} belong to another config/data; starting from step 0")
        if rank == 0:
            for p in foreign:
                shutil.rmtree(p, ignore_errors=True)
    elif mine:
        note(f"no checkpoint in {ckpt_dir} could be loaded; starting from step 0")
    return 0, []


class CheckpointClock:
    """When to checkpoint: every train.save_steps steps, or (save_steps unset, the default) after every
    train.save_minutes of training, so that a long run is resumable without being asked; save_steps=0 never.
    With several ranks the time-based decision is rank 0's, shared (every rank must join a DeepSpeed save)."""

    def __init__(self, cfg, world: int, device) -> None:
        self.cfg, self.world, self.device = cfg, world, device
        self.last = time.time()

    def due(self, step: int, total_steps: int) -> bool:
        every = self.cfg.save_steps
        if every == 0 or step >= total_steps:
            return False
        if every is not None:
            return step % every == 0
        due = time.time() - self.last >= self.cfg.save_minutes * 60
        if self.world > 1:  # ranks' clocks differ: save when any says so (nccl reduces CUDA tensors, gloo CPU ones)
            on = self.device if self.device.type == "cuda" else "cpu"
            due = bool(all_reduce(torch.tensor([float(due)], device=on), "max").item())
        if due:
            self.last = time.time()
        return due


def write_checkpoint(backend, ckpt_dir: Path, step: int, state: dict, run_key: str, rank: int, keep: int) -> None:
    """Save step-N (solopo.json, the marker resume reads, last), then drop this run's older checkpoints beyond
    `keep`. A failed save (a full disk) removes its partial directory and stops with the storage message."""
    path = ckpt_dir / f"step-{step}"
    try:
        backend.save_checkpoint(path, {**state, "step": step, "run_key": run_key})
        if rank == 0:
            write_json({"run_key": run_key, "step": step}, path / "solopo.json")
    except Exception as e:
        err = write_failure(e, path)  # before the cleanup: it may look at the free space
        if rank == 0:
            for p in (path, path.with_name(path.name + ".tmp")):
                shutil.rmtree(p, ignore_errors=True)
        if err is None:
            raise
        raise err from e
    if rank == 0 and keep > 0:
        mine, _ = scan_checkpoints(ckpt_dir, run_key, lambda _m: None)
        for old in mine[keep:]:
            shutil.rmtree(old, ignore_errors=True)


def save_model(
    lm,
    tokenizer,
    state_dict,
    model_dir: Path,
    dtype: torch.dtype,
    extra_json: dict[str, dict] | None = None,
    staging: Path | None = None,
) -> None:
    """The HF model, written next to this run's logs.jsonl (moved in from `staging`), then swapped in: the
    previous model stays whole until then; a full disk is a message and leaves no temp dir."""
    state_dict = dict(lm.state_dict() if state_dict is None else state_dict)
    # Tied tensors (embeddings = LM head) stay one tensor: cast each distinct storage once.
    cast: dict[tuple, torch.Tensor] = {}
    for k, v in state_dict.items():
        if v.is_floating_point() and v.dtype != dtype:
            key = (v.data_ptr(), v.shape, v.stride())
            cast[key] = cast[key] if key in cast else v.to(dtype)
            state_dict[k] = cast[key]

    def save(tmp: Path) -> None:
        _start_model_dir(tmp, staging)
        lm.save_pretrained(tmp, state_dict=state_dict)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained states the model's dtype
        write_json(config, tmp / "config.json")
        _finish_model_dir(tmp, tokenizer, extra_json)

    save_dir_atomic(model_dir, save)


def _start_model_dir(tmp: Path, staging: Path | None) -> None:
    """The save dir starts as this run's staging dir (logs.jsonl, curves, history come along)."""
    if staging is not None and staging.exists():
        os.replace(staging, tmp)
    tmp.mkdir(parents=True, exist_ok=True)


def _finish_model_dir(tmp: Path, tokenizer, extra_json: dict[str, dict] | None) -> None:
    """Tokenizer and HF trainer files into `tmp` (save_dir_atomic then swaps it in)."""
    tokenizer.save_pretrained(tmp)
    for name, obj in (extra_json or {}).items():
        write_json(obj, tmp / name)


def save_adapter_model(
    peft_model,
    tokenizer,
    adapter_sd: dict[str, torch.Tensor],
    model_dir: Path,
    dtype: torch.dtype,
    base_path: str,
    merge: bool,
    extra_json: dict[str, dict] | None = None,
    staging: Path | None = None,
) -> None:
    """A LoRA run's model dir. merge=True: the merged HF checkpoint at the top (what eval and AutoModelForCausalLM
    load) and the adapter in `adapter/`; merge=False: the adapter at the top (PeftModel.from_pretrained). Staged
    and swapped in like save_model."""
    from solopo.training import peft as lora

    def save(tmp: Path) -> None:
        _start_model_dir(tmp, staging)
        adapter_dir = tmp / lora.ADAPTER_SUBDIR if merge else tmp
        lora.save_adapter(peft_model, adapter_sd, adapter_dir, dtype)
        if merge:
            lora.merge(base_path, adapter_dir, tmp, dtype)
        _finish_model_dir(tmp, tokenizer, extra_json)

    save_dir_atomic(model_dir, save)


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
    with open(model_dir / "logs.jsonl", "a") as f:  # append-only, in the staging dir (swapped in at the end)
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
