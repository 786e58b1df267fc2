"""Stage `synth`: short contexts (x_short) and RULER-style long contexts (x_long) of exact token lengths.

x_short = the gold documents (supporting paragraphs, or all of the question's own paragraphs) in the prompt
template; x_long = the same documents plus distractors until the chat-rendered prompt is within
[target * (1 - tolerance), target] tokens of the target model's tokenizer.

Speed: RULER re-tokenizes the whole prompt after every 10 added documents. Here every paragraph is
tokenized once (batch encoding) as it appears *in context*, i.e. followed by the separator and the
start of the next document, so that the merges a BPE tokenizer makes across the junction are counted
in the paragraph's own count. A prompt's length is then

    long_tokens = overhead(question) + sum(piece[doc]) + sum(index_delta[1..n])

where overhead comes from the exactly tokenized short prompt (chat template, instruction, question)
and index_delta[j] is the extra cost of the number j in "Document {i}". A random sample of prompts
is re-tokenized in full and the largest deviation goes to the manifest.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from solopo.chat import chat_format
from solopo.pipeline.config import register_preset
from solopo.pipeline.errors import DataError
from solopo.pipeline.stage import Stage

from . import register
from .contexts import ContextBuilder, SynthConfig


# --- the stage --------------------------------------------------------------------------------------
@register
class SynthStage(Stage):
    name = "synth"
    Config = SynthConfig
    after = "load"
    version = "1"
    reads = ("id", "question", "answer", "answer_aliases", "paragraphs")
    writes = (
        "id",
        "question",
        "answers",
        "short_prompt",
        "long_prompt",
        "short_tokens",
        "long_tokens",
        "target_len",
        "gold_positions",
        "n_docs",
        "rho",
        "dataset",
    )

    def shard_rows(self) -> int | None:
        return self.config.shard_size

    def _model_path(self) -> str:
        from solopo.models import resolve_model

        return resolve_model(self.ctx.run.model, self.ctx.run.trust_remote_code)

    def fingerprint(self) -> dict[str, Any]:
        # The tokenizer and the chat format decide every count: hash the tokenizer's files when it is a local
        # checkpoint; the chat format adds nothing when it is the default (run.chat_template/system_prompt None).
        from solopo.pipeline.io import stable_hash

        chat = chat_format(self.ctx.run).fingerprint()
        path = Path(self._model_path())
        if not path.exists():
            return {"tokenizer": str(path), **chat}
        files = {}
        for p in sorted(path.iterdir()):
            if p.is_file() and (
                p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
                or p.name in ("chat_template.jinja", "chat_template.json")
            ):
                files[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        return {"tokenizer": stable_hash(files), **chat}

    def setup(self) -> None:
        from transformers import AutoTokenizer

        from solopo.models import model_context_limit
        from solopo.pipeline.runner import load_output

        tok = AutoTokenizer.from_pretrained(self._model_path(), trust_remote_code=self.ctx.run.trust_remote_code)
        chat = chat_format(self.ctx.run)
        chat.check(tok)  # a template that cannot render is a config error now, not mid-run
        limit = model_context_limit(self._model_path())
        over = [t for t in self.config.target_len if limit is not None and t > limit]
        if over:
            self.ctx.note(
                f"synth.target_len {over} exceeds the model's context limit of {limit} tokens "
                f"(max_position_embeddings of {self._model_path()}): sampling and training drop or cannot use "
                "those prompts; use a long-context model or lengths <= the limit"
            )
        # The pool is the whole load output, whatever the shard: contexts do not depend on sharding.
        pool = load_output(self.ctx.run.run_dir, "load")
        self.builder = ContextBuilder(tok, self.config, seed=self.ctx.run.seed, pool=pool, chat=chat)
        self.ctx.stat("pool_paragraphs", int(len(self.builder.pool_ids)))

    def teardown(self) -> None:
        self.builder = None

    def run(self, data: pa.Table | None) -> pa.Table:
        assert data is not None
        return self.builder.build(data, drop=self.ctx.drop, stat=self.ctx.stat, note=self.ctx.note)

    def finalize(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            raise DataError("synth produced no rows", hint="see the drop counts in the log and the manifest")
        self.ctx.stat("short_docs", self.config.short_docs)
        for key, value in length_summary(table, self.config.tolerance).items():
            self.ctx.stat(key, value)
        plot_lengths(table, self.ctx.out_dir / "lengths.png", self.config.tolerance)
        return table


def length_summary(table: pa.Table, tolerance: float) -> dict[str, Any]:
    """Per target: rows, mean/min/max long tokens, mean rho, share inside the window (by the counts)."""
    out: dict[str, Any] = {}
    tl = np.asarray(table.column("target_len").to_pylist())
    lt = np.asarray(table.column("long_tokens").to_pylist())
    rho = np.asarray(table.column("rho").to_pylist())
    st = np.asarray(table.column("short_tokens").to_pylist())
    if len(st):
        out["short_tokens_mean"] = round(float(st.mean()), 1)
    for t in sorted(set(tl.tolist())):
        m = tl == t
        v = lt[m]
        out[f"target_{t}"] = {
            "rows": int(m.sum()),
            "long_tokens_mean": round(float(v.mean()), 1),
            "long_tokens_min": int(v.min()),
            "long_tokens_max": int(v.max()),
            "rho_mean": round(float(rho[m].mean()), 4),
            "in_window": round(float(((v >= math.ceil(t * (1 - tolerance))) & (v <= t)).mean()), 4),
        }
    return out


def plot_lengths(table: pa.Table, path: Path, tolerance: float) -> Path:
    """Histogram of long-prompt tokens per target (with the tolerance window) and of short prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted(set(table.column("target_len").to_pylist()))
    long_t = np.asarray(table.column("long_tokens").to_pylist())
    tl = np.asarray(table.column("target_len").to_pylist())
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(4 * (len(targets) + 1), 3.2))
    axes = np.atleast_1d(axes)
    short = np.asarray(table.column("short_tokens").to_pylist())[tl == targets[0]]
    axes[0].hist(short, bins=30, color="tab:green")
    axes[0].set_title(f"short prompts (mean {short.mean():.0f})")
    axes[0].set_xlabel("tokens")
    for ax, t in zip(axes[1:], targets, strict=True):
        v = long_t[tl == t]
        ax.hist(v, bins=30, color="tab:blue")
        ax.axvspan(math.ceil(t * (1 - tolerance)), t, color="tab:orange", alpha=0.2, label="tolerance window")
        ax.set_title(f"long prompts, target {t}")
        ax.set_xlabel("tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from solopo.pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


register_preset("cpu-demo", {"synth": {"target_len": [2048]}})
