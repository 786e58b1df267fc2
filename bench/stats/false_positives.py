"""False-positive rate of the eval report's "significant" flag, by simulation (seeded).

    python3 bench/stats/false_positives.py [--sims 2000] [--resamples 10000]

Two independent models, each right with the same probability on n questions (no true difference): how often
does each rule call them different? The report promises 5% (95% confidence). Rules: the paired percentile
bootstrap interval excludes 0; the exact McNemar p < 0.05; both (what report.md marks **significant**).
Writes results.json and results.md next to this file; also prints the questions needed for 80% power.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from solopo import stats  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sims", type=int, default=2000)
    ap.add_argument("--resamples", type=int, default=stats.BOOTSTRAP_RESAMPLES)
    ap.add_argument("--n", type=int, nargs="+", default=[8, 20, 50, 100])
    ap.add_argument("--rate", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    t0 = time.time()
    rows = [
        asdict(stats.simulate_false_positives(n, rate=r, sims=args.sims, seed=1, resamples=args.resamples))
        for n in args.n
        for r in args.rate
    ]
    power = {f"{d} points": stats.questions_needed(d / 100) for d in (10, 5, 2)} | {
        f"{d} points at 50% power": stats.questions_needed(d / 100, power=0.5) for d in (10, 5)
    }
    res = {
        "sims": args.sims,
        "resamples": args.resamples,
        "seed": 1,
        "rows": rows,
        "questions_needed_80pct_power": power,
        "seconds": round(time.time() - t0, 1),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    lines = [
        "# False positives of the report's significance rule (simulated)",
        "",
        f"{args.sims} simulated pairs of equally good, independent models per row (seed 1), bootstrap "
        f"{args.resamples:,} resamples. Promised: 5%.",
        "",
        "| n questions | accuracy of both | bootstrap interval excludes 0 | exact McNemar p < 0.05 | both (the rule) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['n']} | {r['rate']:.0%} | {r['bootstrap']:.1%} | {r['mcnemar']:.1%} | {r['both']:.1%} |")
    lines += [
        "",
        "Questions per cell to detect a true difference with 80% power at 95% confidence (worst case, 50% "
        "accuracy): " + ", ".join(f"{k}: {v}" for k, v in power.items()) + ".",
        "",
        f"{res['seconds']} s, load average {' '.join(res['loadavg'] or [])}.",
    ]
    (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
