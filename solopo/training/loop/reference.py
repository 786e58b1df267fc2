"""DPO reference log-probs: computed once before training with the initial weights, cached with the data."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import torch

from solopo.pipeline.io import (
    check_output,
    output_record,
    read_json,
    read_parquet,
    stable_hash,
    write_json,
    write_parquet,
)
from solopo.training.data import (
    Example,
)

from .distributed import all_reduce, gather_rows, rank_shard
from .step import micro_batch_logps

log = logging.getLogger("solopo")


# --- DPO reference log-probs: computed once before training, cached with the data ---------------------------------
REF_COLUMNS = ("ref_chosen", "ref_rejected", "ref_long_w")


@torch.no_grad()
def compute_ref_logps(
    forward,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    desc: str,
    device: torch.device,
    with_long: bool,
    shared_prefix: bool = False,
) -> dict[str, list]:
    from tqdm import tqdm

    out = {"id": [], "ref_chosen": [], "ref_rejected": [], "ref_long_w": []}
    rank0 = int(os.environ.get("RANK", 0)) == 0
    for s in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not rank0):
        chunk = examples[s : s + batch_size]
        batch, _ = micro_batch_logps(forward, chunk, pad_id, with_long, False, device, shared_prefix)
        out["id"] += [e.id for e in chunk]
        out["ref_chosen"] += batch.chosen.total.float().cpu().tolist()
        out["ref_rejected"] += batch.rejected.total.float().cpu().tolist()
        out["ref_long_w"] += (
            batch.long_w.total.float().cpu().tolist() if batch.long_w is not None else [None] * len(chunk)
        )
    return out


def examples_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        for s in (e.chosen, e.rejected, e.long_w):
            if s is not None:
                h.update(json.dumps([s.prompt, s.completion]).encode())
    return h.hexdigest()


def reference_logps(
    forward, module, examples, pad_id, cfg, out_dir: Path, model_path: str, rank: int, world: int, note, device, sp
):
    """pi_ref log-probs for every sequence the loss needs, computed once with the initial weights and cached in
    out_dir/ref_logps/<key>.parquet (the key covers the model, the tokenized data and the mode), with its size
    and sha256 in <key>.parquet.json: a cache that does not match its record is recomputed with a note.

    With several ranks each DP group computes an equal share (rank_shard; the ranks of an SP group compute the same
    share together), the shares are all-gathered, and rank 0 alone writes the cache. The cache is used only if every rank sees it, so all ranks take the same branch."""
    from solopo.pipeline.io import dir_fingerprint

    mp = Path(model_path)
    model_fp = dir_fingerprint(mp)["sha256"] if mp.is_dir() else model_path
    key = stable_hash(
        {
            "model": model_fp,
            "data": examples_digest(examples),
            "mode": cfg.mode,
            "ra_ref": cfg.ra_ref,
            "dtype": cfg.dtype,
            "attn": cfg.attn,
            # a 4-bit base (QLoRA) has other log-probs than the base's weights; LoRA's reference (the adapter
            # disabled) is the base itself and shares full fine-tuning's cache
            **({"base_4bit": True} if cfg.peft == "qlora" else {}),
        }
    )[:16]
    path = out_dir / "ref_logps" / f"{key}.parquet"
    on = device if device.type == "cuda" else "cpu"  # nccl reduces CUDA tensors, gloo CPU ones
    rows, problem = read_ref_cache(path, {e.id for e in examples})
    # Every rank must take the same branch: recompute when any rank cannot use the cache.
    if all_reduce(torch.tensor([float(rows is None)], device=on), "max").item() == 0:
        note(f"DPO reference log-probs loaded from the cache {path} (verified against {path.name}.json)")
    else:
        if problem is not None:
            note(f"DPO reference log-prob cache {path} is damaged ({problem}): recomputing it")
        was_training = module.training
        module.eval()
        # ra_ref=short reuses pi_ref(y_w | x_short): no long reference forward needed.
        with_long = examples[0].long_w is not None and cfg.ra_ref == "long"
        mine = [examples[i] for i in rank_shard(len(examples), sp.dp_rank, sp.dp_size)]
        n = sp.dp_size
        desc = "DPO reference log-probs" + (f" (DP group 0 of {n}, each 1/{n})" if n > 1 else "")
        cols = compute_ref_logps(
            forward, mine, pad_id, cfg.micro_batch_size, desc, device, with_long, cfg.shared_prefix
        )
        cols = gather_rows(cols, world)
        module.train(was_training)
        rows = pa.table(cols).to_pylist()
        if rank == 0:
            write_ref_cache(pa.table(cols), path)
    return {r["id"]: r for r in rows}


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_ref_cache(table: pa.Table, path: Path) -> None:
    """The cache, then its record (size and sha256, as a stage manifest keeps for its outputs): a cache without
    a matching record is never used."""
    write_parquet(table, path)
    write_json({"output": output_record(path, full=True), "rows": table.num_rows}, _record_path(path))


def read_ref_cache(path: Path, ids: set[str]) -> tuple[list[dict] | None, str | None]:
    """(rows, None) for an intact cache covering `ids`; (None, None) when there is none; (None, what is wrong)
    for a damaged one: edited or truncated, no record, unreadable, or missing examples."""
    if not path.exists():
        return None, None
    try:
        record = read_json(_record_path(path))["output"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its record {_record_path(path).name} is missing or unreadable ({type(e).__name__})"
    problem = check_output(path, record)
    if problem is not None:
        return None, problem
    try:
        rows = read_parquet(path).to_pylist()
    except (OSError, pa.ArrowException) as e:
        return None, f"unreadable ({type(e).__name__})"
    missing = ids - {r.get("id") for r in rows}
    if missing or any(r.get(c) is None for r in rows for c in REF_COLUMNS[:2]):
        return None, f"{len(missing)} example(s) or values missing"
    return rows, None
