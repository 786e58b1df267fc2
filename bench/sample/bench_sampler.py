"""The transformers backend's seeded sampler before and after issue 22.1, on real logits, in one run.

    PYTHONPATH=. python3 bench/sample/bench_sampler.py [--rows 8192]

Before: the Gumbel-max sampler of commit 007ef54 (its source is read from git), float32 uniforms that round to
1.0 (noise +inf) once in 2^24 tokens. After: solopo.backends.hf._SeededSampler (one float64 uniform per row and
step, inverse CDF). Logits: the embedded SmolLM2-135M-Instruct at 4 positions of an answer (49,152 tokens),
T = 0.85, top_p = 0.9, as generate applies them. Counted: draws of a token that top-p removed (probability 0),
the share of 128-token samples that would hold one (1 - (1 - rate)^128), and the time of one decode step of 32
rows (median of 5). The 1-minute load average is printed beside the timings. Writes sampler.json next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OLD_COMMIT = "007ef54"


def old_sampler_class() -> type:
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:solopo/backends/hf.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ns: dict = {"__name__": "old_hf"}
    exec(compile(src, f"{OLD_COMMIT}:solopo/backends/hf.py", "exec"), ns)
    return ns["_GumbelSampler"]


def answer_logits():
    """Next-token logits (4, 49152) of the embedded SmolLM2-135M-Instruct at 4 positions of a chain-of-thought
    answer, float32: 10, 4, 12 and 2 tokens hold 90% of the mass at T = 0.85 (tests/test_sample.py uses them too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solopo.backends import render_chat_ids
    from solopo.models import prepare_embedded_model
    from solopo.prompts import render_document, render_prompt

    path = prepare_embedded_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = render_chat_ids(tok, render_prompt([render_document(1, "Paris", "Paris is in France.")], "Where is Paris?"))
    ids += tok("Document 1 says that Paris is in France.\nThe answer is: France", add_special_tokens=False).input_ids
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, [-17, -13, -7, -1]].float()


def real_scores(top_p: float):
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(0.85)(None, answer_logits())
    return TopPLogitsWarper(top_p)(None, scores) if top_p < 1 else scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192, help="row-steps per sampler (split over the 4 positions)")
    args = ap.parse_args()
    import torch

    from solopo.backends.hf import _SeededSampler, sample_key

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    old_cls = old_sampler_class()
    scores = real_scores(0.9)  # (4, vocab)
    allowed = torch.isfinite(scores)
    out: dict = {"rows": args.rows, "top_p": 0.9, "temperature": 0.85, "vocab": scores.shape[-1]}
    chunk = 256
    for name, cls in (("before (Gumbel, float32 uniforms)", old_cls), ("after (inverse CDF, float64)", _SeededSampler)):
        bad = total = 0
        for pos in range(scores.shape[0]):
            for start in range(0, args.rows // scores.shape[0], chunk):
                rows = scores[pos][None].repeat(chunk, 1)
                s = cls([sample_key(pos, start + j) for j in range(chunk)], prompt_width=0, device="cpu")
                with torch.inference_mode():
                    picks = s(torch.zeros((chunk, 0), dtype=torch.long), rows).argmax(-1)
                bad += int((~allowed[pos][picks]).sum())
                total += chunk
        rate = bad / total
        step32 = scores[0][None].repeat(32, 1)
        s = cls([sample_key(9, j) for j in range(32)], prompt_width=0, device="cpu")
        times = []
        for k in range(5):
            t0 = time.perf_counter()
            s(torch.zeros((32, k), dtype=torch.long), step32)
            times.append(time.perf_counter() - t0)
        load = os.getloadavg()[0]
        out[name] = {
            "draws": total,
            "filtered_token_draws": bad,
            "rate": rate,
            "share_of_128_token_samples_with_one": 1 - (1 - rate) ** 128,
            "step_32_rows_s": statistics.median(times),
            "load_avg_1m": load,
        }
        print(
            f"{name}: {bad}/{total} draws were filtered tokens ({rate:.3%}; 128-token samples holding one: "
            f"{1 - (1 - rate) ** 128:.1%}); one decode step of 32 rows {statistics.median(times) * 1000:.0f} ms "
            f"(load avg {load:.1f})",
            flush=True,
        )
    b, a = (out[k]["step_32_rows_s"] for k in list(out)[-2:])
    out["step_time_ratio_before_over_after"] = b / a
    print(f"decode-step sampler time before/after: {b / a:.1f}x (same run)")
    (HERE / "sampler.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
