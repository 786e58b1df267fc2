"""Stage `sample`: chain-of-thought answers sampled on the short prompts (and optionally on the long ones).

Input: synth's rows, one per (id, target_len). The short prompt does not depend on target_len, so each
question is sampled once (deduplicated by id). With `on: both` every long prompt is sampled too (the
Long-PO baseline trains on pairs sampled on x_long); those land in `long_samples`, one entry per target_len.

Output, one row per question: id, question, answers, short_prompt, dataset, samples, finish_reasons,
sample_tokens, backend, seed, long_samples (list of {target_len, samples, finish_reasons, sample_tokens};
empty with `on: short`). Sharded by input rows: a crash after 3 of 10 shards loses nothing.

engine: local runs the backend in this process, one shard after another; ray (solopo.engines.ray_data) runs
`replicas` copies of it under Ray Data and gets every unfinished shard at once (`run_shards`), each written as
soon as its last prompt returns. Seeds are per prompt (`job_seed`). What that makes reproducible (README:
Reproducibility): the transformers backend in fp32 gives the same samples whatever the shards, batches or engine;
vLLM gives the same samples on a rerun only with reproducible=true (in-process engine, fp32, and the fixed
chunks of prompts below), and different ones when shard_size, n or the engine change the batches.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from solopo.chat import chat_format
from solopo.engines import EngineConfig
from solopo.pipeline.config import register_preset
from solopo.pipeline.errors import DataError, SolopoError
from solopo.pipeline.io import dir_fingerprint
from solopo.pipeline.stage import Stage

from . import register

log = logging.getLogger("solopo")

PAPER_N, PAPER_TEMPERATURE = 32, 0.85

_LONG_TYPE = pa.list_(
    pa.struct(
        [
            pa.field("target_len", pa.int64()),
            pa.field("samples", pa.list_(pa.string())),
            pa.field("finish_reasons", pa.list_(pa.string())),
            pa.field("sample_tokens", pa.list_(pa.int32())),
        ]
    )
)

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("question", pa.string()),
        pa.field("answers", pa.list_(pa.string())),
        pa.field("short_prompt", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("samples", pa.list_(pa.string())),
        pa.field("finish_reasons", pa.list_(pa.string())),
        pa.field("sample_tokens", pa.list_(pa.int32())),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("backend", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("long_samples", _LONG_TYPE),
    ]
)


class SampleConfig(EngineConfig):  # + engine: local | ray, ray_address, replicas (solopo.engines)
    backend: Literal["auto", "vllm", "transformers"] = Field(
        default="auto", description="auto = vLLM when importable, else transformers (announced)"
    )
    n: int = Field(default=PAPER_N, ge=1, description="samples per prompt (paper: 32)")
    temperature: float = Field(default=PAPER_TEMPERATURE, ge=0.0, description="0 = greedy (paper: 0.85)")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling; 1 = off")
    max_tokens: int = Field(default=1024, ge=1, description="max generated tokens per sample")
    on: Literal["short", "both"] = Field(
        default="short", description="both: also sample on x_long (the pairs that mode=long trains on)"
    )
    seed: int | None = Field(default=None, description="None = run.seed")
    shard_size: int = Field(default=64, ge=1, description="input rows per resumable shard")
    dtype: str = Field(default="auto", description="auto: bf16 on GPUs and bf16 CPUs, else fp32 (fp32 if reproducible)")
    reproducible: bool = Field(
        default=False,
        description="same samples on a rerun on this machine: fp32 (dtype auto), vLLM's engine in this process, "
        "fixed batches (README: Reproducibility)",
    )
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch / vLLM's OpenMP; None = the usable physical cores"
    )
    # transformers backend
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="transformers: sequences (prompts x n) per generate call; None = 32 on CPU, 512 on CUDA",
    )
    prefill: Literal["auto", "shared", "batched"] = Field(
        default="auto",
        description="transformers: shared = prefill a prompt once for its n samples (auto on CPU); "
        "batched = prompts x n rows in one generate call (auto on CUDA)",
    )
    # vLLM backend (tensor_parallel_size: in EngineConfig)
    enable_prefix_caching: bool = Field(default=True, description="vLLM: reuse the KV cache of shared prefixes")
    gpu_memory_utilization: float | None = Field(
        default=None, description="vLLM: fraction of GPU memory to use; None = vLLM's default"
    )
    max_model_len: int | None = Field(default=None, description="vLLM: context cap; None = the model's")
    enforce_eager: bool | None = Field(
        default=None, description="vLLM: skip torch.compile/graphs; None = eager on CPU, compiled on GPU"
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vLLM LLM(...) args")


# The embedded 135M model on 2 CPU cores: 8 samples of at most 192 tokens per question (paper: 32, no cap
# stated). The stage states the reduction in its log, manifest and the data card.
register_preset("cpu-demo", {"sample": {"n": 8, "max_tokens": 128, "shard_size": 16, "batch_size": 32}})


def job_seed(run_seed: int, qid: str, target_len: int | None) -> int:
    """Seed of one prompt: the question's, shifted by target_len for its long prompts."""
    return question_seed(run_seed, qid) + (target_len or 0)


class TokenBar:
    """Progress over prompts with the running tok/s; called as a backend's `progress(prompts_done, tokens)`.
    One bar for the whole stage (issue 26.2): `initial` counts the prompts of shards finished before a resume."""

    def __init__(self, total: int, desc: str, initial: int = 0):
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="prompt", dynamic_ncols=True)
        # While the bar is open, log lines (the runner's "shard 2/2") print above it instead of onto its line.
        self._logs = logging_redirect_tqdm()
        self._logs.__enter__()
        self.t0, self.tokens = time.time(), 0

    def __call__(self, done: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(done)
        self.bar.set_postfix_str(f"{self.tokens / max(time.time() - self.t0, 1e-9):.0f} tok/s")

    def close(self) -> None:
        self.bar.close()
        self._logs.__exit__(None, None, None)


def question_seed(run_seed: int, qid: str) -> int:
    """Seed of one question's samples: depends on the run seed and the id only, not on batch or shard."""
    h = hashlib.sha256(f"{run_seed}:{qid}".encode()).digest()
    return int.from_bytes(h[:4], "little")


@register
class SampleStage(Stage):
    name = "sample"
    expensive = True  # hours of GPU time: never redone unasked (--rerun)
    Config = SampleConfig
    after = "synth"
    version = "2"  # 2: the transformers sampler no longer emits filtered tokens (issue 22.1)
    reads = ("id", "question", "answers", "short_prompt", "long_prompt", "target_len")
    writes = (
        "id",
        "question",
        "answers",
        "short_prompt",
        "samples",
        "finish_reasons",
        "sample_tokens",
        "backend",
        "long_samples",
    )

    def shard_rows(self) -> int | None:
        return self.config.shard_size

    def _seed(self) -> int:
        return self.ctx.run.seed if self.config.seed is None else self.config.seed

    def fingerprint(self) -> dict[str, Any]:
        from solopo.backends import resolve_backend_name
        from solopo.models import resolve_model

        path = resolve_model(self.ctx.run.model, self.ctx.run.trust_remote_code)
        model = dir_fingerprint(path) if not _is_hub_id(path) else {"hub_id": path}
        # 'auto' resolves by what is installed: a machine with vLLM must not reuse transformers' samples.
        # The chat format shapes every prompt's ids (nothing added for the defaults: old keys hold).
        return {
            "model": model,
            "backend": resolve_backend_name(self.config.backend),
            **chat_format(self.ctx.run).fingerprint(),
        }

    def setup(self) -> None:
        from solopo.engines import open_backend
        from solopo.models import resolve_model

        c = self.config
        if c.n != PAPER_N or c.temperature != PAPER_TEMPERATURE:
            preset = self.ctx.run.preset
            self.ctx.note(
                f"sampling n={c.n} at T={c.temperature}, max_tokens={c.max_tokens} "
                f"(paper: n={PAPER_N}, T={PAPER_TEMPERATURE})" + (f" from preset {preset}" if preset else "")
            )
        if c.reproducible and c.engine == "ray":
            self.ctx.note(
                "reproducible=true with engine=ray: transformers replicas in fp32 give the same samples; vLLM "
                "replicas do not (which replica gets which batch, and its prefix cache, vary between runs)"
            )
        log_file = self.ctx.out_dir / "vllm.log"
        log_file.unlink(missing_ok=True)  # this run's engine output only
        self.backend = open_backend(
            c,
            c.backend,
            resolve_model(self.ctx.run.model, self.ctx.run.trust_remote_code),
            ctx_note=self.ctx.note,
            trust_remote_code=self.ctx.run.trust_remote_code,
            log_file=log_file,
            reproducible=c.reproducible,
            dtype=c.dtype,
            threads=c.threads,
            batch_size=c.batch_size,
            prefill=c.prefill,
            tensor_parallel_size=c.tensor_parallel_size,
            enable_prefix_caching=c.enable_prefix_caching,
            gpu_memory_utilization=c.gpu_memory_utilization,
            max_model_len=c.max_model_len,
            enforce_eager=c.enforce_eager,
            engine_kwargs=dict(c.engine_kwargs),
            seed=self._seed(),
            chat=chat_format(self.ctx.run),
        )
        self.ctx.stat("backend", self.backend.name)
        self.ctx.stat("engine", c.engine)
        # What ran (issue 22.3), not the "auto" asked for; the eval stage reads the same attribute.
        self.ctx.stat("dtype", getattr(self.backend, "effective_dtype", "not reported by the backend"))
        self.ctx.stat("reproducible", c.reproducible)
        if log_file.exists():
            self.ctx.stat("vllm_log", log_file.name)
        for k, v in getattr(self.backend, "settings", {}).items():
            self.ctx.stat(f"backend_{k}", v)

    def _stage_prompts(self) -> tuple[int, int]:
        """(prompts of the whole input, prompts of shards already finished), from the upstream table's ids and
        target lengths and the shard metas; before drops of over-long prompts, which the bar then never reaches."""
        import pyarrow.parquet as pq

        from solopo.pipeline.io import read_json
        from solopo.pipeline.runner import stage_dir

        try:
            t = pq.read_table(stage_dir(self.ctx.run.run_dir, self.after) / "data.parquet", columns=["id"])
        except (OSError, pa.ArrowInvalid):
            return 0, 0
        total = len(set(t.column("id").to_pylist())) + (t.num_rows if self.config.on == "both" else 0)
        done = 0
        for meta in sorted((self.ctx.out_dir / "shards").glob("part-*.json")):
            try:
                done += int(read_json(meta)["stats"].get("prompts", [0])[0])
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                pass
        return total, done

    def teardown(self) -> None:
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.close()
            self._bar = None
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()
            self.backend = None

    # ------------------------------------------------------------------------------------------------
    def run(self, data: pa.Table) -> pa.Table:
        if self.config.engine == "ray":  # one shard: one Ray Data run (the runner streams several through run_shards)
            (table,) = [t for _, t in self.run_shards([(0, data)], lambda i: nullcontext())]
            return table

        c = self.config
        questions, longs, jobs, prompt_len = self._plan(data)
        seed = self._seed()
        progress = self._stage_bar(len(jobs))
        t0, tokens0 = time.time(), progress.tokens
        # Chunks of prompts per backend call keep the bar moving on vLLM too; vLLM batches inside a call. The
        # chunks are fixed by the shard's job order, so a rerun (or a resume) feeds vLLM the same batches.
        per_call = getattr(self.backend, "batch_size", 256)
        chunk = max(1, 256 // c.n) if self.backend.name == "vllm" else max(1, per_call // c.n) * 4
        gens: dict[tuple[str, int | None], list] = {}
        for start in range(0, len(jobs), chunk):
            part = jobs[start : start + chunk]
            outs = self.backend.generate(
                [p for _, _, p in part],
                n=c.n,
                temperature=c.temperature,
                top_p=c.top_p,
                max_tokens=c.max_tokens,
                seed=[job_seed(seed, qid, tl) for qid, tl, _ in part],
                progress=progress,
            )
            for (qid, tl, _), g in zip(part, outs, strict=True):
                gens[(qid, tl)] = g
        return self._assemble(questions, longs, jobs, prompt_len, gens, progress.tokens - tokens0, time.time() - t0)

    def _stage_bar(self, shard_jobs: int, desc: str | None = None) -> TokenBar:
        """The stage's one bar, made at its first shard and closed by teardown: its total counts every prompt of
        the input (short prompts once per question, long ones with on=both), less shards finished before a
        resume."""
        bar = getattr(self, "_bar", None)
        if bar is None:
            total, done = self._stage_prompts()
            desc = desc or f"sample[{self.backend.name}]"
            bar = self._bar = TokenBar(max(total, done + shard_jobs), desc, initial=done)
        return bar

    def streams_shards(self) -> bool:
        return self.config.engine == "ray"

    def run_shards(
        self,
        parts: list[tuple[int, pa.Table]],
        scope: Callable[[int], AbstractContextManager[Any]],
    ) -> Iterator[tuple[int, pa.Table]]:
        """engine=ray: every unfinished shard in one Ray Data run, so replicas load the model once and stay
        busy across shard boundaries; a shard is yielded as soon as its last prompt returns, and the runner
        writes it then (a killed job keeps it). `scope(i)` gives shard i its own drop/stat counters."""

        c, seed = self.config, self._seed()
        plans: dict[int, tuple] = {}
        owner: dict[int, tuple[int, str, int | None]] = {}  # job key -> (shard, id, target_len)
        jobs: list[tuple[int, str, int]] = []
        for i, part in parts:
            with scope(i):
                plans[i] = self._plan(part)
            for qid, tl, p in plans[i][2]:
                owner[len(jobs)] = (i, qid, tl)
                jobs.append((len(jobs), p, job_seed(seed, qid, tl)))
        left = {i: len(plan[2]) for i, plan in plans.items()}
        got: dict[int, dict[tuple[str, int | None], list]] = {i: {} for i in plans}
        shard_tokens = dict.fromkeys(plans, 0)
        t_last = time.time()

        def finish(i: int) -> pa.Table:
            nonlocal t_last
            now = time.time()
            with scope(i):  # shards overlap: each is charged the wall time since the previous one finished
                table = self._assemble(*plans[i], got.pop(i), shard_tokens[i], now - t_last)
            t_last = now
            return table

        for i in [i for i, k in left.items() if k == 0]:
            yield i, finish(i)  # every prompt of the shard was dropped
        progress = self._stage_bar(len(jobs), f"sample[ray {c.replicas}x {self.backend.name}]")
        gen = dict(n=c.n, temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens)
        for key, g in self.backend.stream(jobs, progress=progress, **gen):  # type: ignore[attr-defined]
            i, qid, tl = owner[key]
            got[i][(qid, tl)] = g
            shard_tokens[i] += sum(x.num_tokens for x in g)
            left[i] -= 1
            if left[i] == 0:
                yield i, finish(i)
        if got:
            raise SolopoError(f"engine ray: shards {sorted(got)} did not get all their prompts back (a bug)")

    def _plan(self, data: pa.Table) -> tuple[dict, dict, list, dict]:
        """Questions (deduplicated by id), long prompts per id, the jobs (id, target_len | None, prompt)
        left after dropping prompts that do not fit the context, and the prompt lengths."""
        c = self.config
        questions: dict[str, dict[str, Any]] = {}  # id -> first row (insertion order = input order)
        longs: dict[str, list[tuple[int, str]]] = {}
        for r in data.to_pylist():
            qid = r["id"]
            if qid not in questions:
                questions[qid] = r
            elif r["short_prompt"] != questions[qid]["short_prompt"]:
                raise DataError(
                    f"question {qid} has different short prompts at target_len {questions[qid]['target_len']} "
                    f"and {r['target_len']}; the short prompt must not depend on the long length",
                    field="short_prompt",
                    hint="rerun synth",
                )
            if c.on == "both":
                longs.setdefault(qid, []).append((int(r["target_len"]), r["long_prompt"]))

        # Jobs: (id, target_len or None for the short prompt, prompt text).
        jobs = [(qid, None, q["short_prompt"]) for qid, q in questions.items()]
        for qid, items in longs.items():
            jobs.extend((qid, tl, p) for tl, p in sorted(items))
        jobs = self._drop_too_long(jobs)
        return questions, longs, jobs, self._prompt_len

    def _assemble(
        self,
        questions: dict[str, dict[str, Any]],
        longs: dict[str, list[tuple[int, str]]],
        jobs: list,
        prompt_len: dict[tuple[str, int | None], int],
        gens: dict[tuple[str, int | None], list],
        tokens: int,
        seconds: float,
    ) -> pa.Table:
        c = self.config
        seed = self._seed()
        out = []
        n_short = n_trunc = 0
        for qid, q in questions.items():
            g = gens.get((qid, None))
            if g is None:
                continue  # dropped: prompt longer than the context
            n_short += 1
            n_trunc += sum(x.finish_reason == "length" for x in g)
            long_entries = []
            for tl, _ in sorted(longs.get(qid, [])):
                lg = gens.get((qid, tl))
                if lg is None:
                    continue
                long_entries.append(
                    {
                        "target_len": tl,
                        "samples": [x.text for x in lg],
                        "finish_reasons": [x.finish_reason for x in lg],
                        "sample_tokens": [x.num_tokens for x in lg],
                    }
                )
            out.append(
                {
                    "id": qid,
                    "question": q["question"],
                    "answers": list(q["answers"]),
                    "short_prompt": q["short_prompt"],
                    "dataset": q.get("dataset"),
                    "samples": [x.text for x in g],
                    "finish_reasons": [x.finish_reason for x in g],
                    "sample_tokens": [x.num_tokens for x in g],
                    "prompt_tokens": prompt_len.get((qid, None)),
                    "backend": self.backend.name,
                    "seed": question_seed(seed, qid),
                    "long_samples": long_entries,
                }
            )
        self._check_outputs(gens)
        self.ctx.stat("questions", n_short, "sum")
        self.ctx.stat("prompts", len(jobs), "sum")
        self.ctx.stat("generated_tokens", tokens, "sum")
        self.ctx.stat("generation_seconds", round(seconds, 3), "sum")
        self.ctx.stat("short_samples", n_short * c.n, "sum")
        self.ctx.stat("short_samples_truncated", n_trunc, "sum")
        return pa.Table.from_pylist(out, schema=SAMPLE_SCHEMA)

    def _check_outputs(self, gens: dict[tuple[str, int | None], list]) -> None:
        """Issue 21.9: a model whose logits are NaN decodes nothing but EOS (vLLM) or noise (transformers flags the
        rows): count empty and non-finite samples, and stop when a whole shard has nothing else."""
        every = [g for gs in gens.values() for g in gs]
        empty = sum(not g.text.strip() for g in every)
        nonfinite = sum(not getattr(g, "finite", True) for g in every)
        self.ctx.stat("empty_samples", empty, "sum")
        self.ctx.stat("nonfinite_logit_samples", nonfinite, "sum")
        bad = sum((not g.text.strip()) or not getattr(g, "finite", True) for g in every)
        if every and bad == len(every):
            why = (
                f"{nonfinite} of them met NaN/inf logits"
                if nonfinite
                else "the model ends every answer at once; NaN/inf logits do that in vLLM"
            )
            raise SolopoError(
                f"all {len(every)} samples of this shard are empty or come from non-finite logits ({why}). "
                f"Check the model's weights (e.g. load it in transformers and look at the logits of one prompt), "
                f"or try sample.dtype=float32 if a reduced precision overflows"
            )

    def _drop_too_long(self, jobs: list[tuple[str, int | None, str]]) -> list[tuple[str, int | None, str]]:
        """Drop prompts that leave no room for max_tokens in the model's context (vLLM would refuse them)."""
        lengths = self.backend.prompt_lengths([p for _, _, p in jobs])
        self._prompt_len = {(qid, tl): n for (qid, tl, _), n in zip(jobs, lengths, strict=True)}
        limit = self.backend.max_context
        if limit is None:
            return jobs
        keep = []
        short_dropped = set()
        for (qid, tl, p), n in zip(jobs, lengths, strict=True):
            if n + self.config.max_tokens > limit:
                reason = "prompt_exceeds_context" if tl is None else "long_prompt_exceeds_context"
                self.ctx.drop(reason, example=qid if tl is None else f"{qid}@{tl}")
                if tl is None:
                    short_dropped.add(qid)
                continue
            keep.append((qid, tl, p))
        if short_dropped or len(keep) < len(jobs):
            self.ctx.note(
                f"prompts of more than {limit} - max_tokens ({self.config.max_tokens}) tokens are skipped "
                f"(model context {limit}); counted under drops"
            )
        return [j for j in keep if j[0] not in short_dropped]

    def finalize(self, table: pa.Table) -> pa.Table:
        # An id split across two shards (input not grouped by id) is sampled twice: keep its first row.
        ids = table.column("id").to_pylist()
        seen: set[str] = set()
        keep = []
        for i, qid in enumerate(ids):
            if qid not in seen:
                seen.add(qid)
                keep.append(i)
        if len(keep) < len(ids):
            self.ctx.note(
                f"{len(ids) - len(keep)} question(s) appeared in two shards and were sampled twice; kept the "
                "first (group synth rows by id to avoid the extra work)"
            )
            table = table.take(keep)
        if getattr(self, "backend", None) is not None and hasattr(self.backend, "effective_dtype"):
            self.ctx.stat("dtype", self.backend.effective_dtype)  # engine=ray: known once replicas have answered
        stats = self.ctx.stats
        total = stats.get("short_samples", 0) + sum(
            len(x["samples"]) for r in table.column("long_samples").to_pylist() for x in r
        )
        for key, what in (("empty_samples", "empty"), ("nonfinite_logit_samples", "from NaN/inf logits")):
            if stats.get(key):
                msg = f"{stats[key]} of {total} samples are {what} (they select no pair)"
                log.warning("%s", msg)
                self.ctx.note(msg)
        if stats.get("generation_seconds"):
            self.ctx.stat("tokens_per_second", round(stats["generated_tokens"] / stats["generation_seconds"], 1))
            self.ctx.stat("questions_per_second", round(stats["questions"] / stats["generation_seconds"], 4))
        return table


def _is_hub_id(path: str) -> bool:
    from pathlib import Path

    return not Path(path).exists()
