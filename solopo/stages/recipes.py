"""The paper's settings as presets (`--preset paper-qwen2.5-7b`, `--preset paper-llama3.1-8b`), offline: a preset
is config values only; nothing is fetched until a command runs.

Source: SoLoPO (ICLR 2026, arXiv 2505.11166), the experimental setup and its hyperparameter table. What the paper
states and these presets set: MuSiQue train; RULER-style long contexts of ~8K tokens (7.5K average); 32 CoT samples
per short prompt at T=0.85 with vLLM; chosen/rejected by sub-EM; alpha for Qwen2.5-7B-Instruct SoLo-DPO 3, SoLo-SimPO 1,
SoLo-ORPO 1 (solopo's per-algorithm default, so the Qwen preset leaves train.alpha unset) and for Llama-3.1-8B-Instruct
SoLo-ORPO 4. NOT set, because this recipe does not know the paper's values (the table number is not verified here
either): learning rate, epochs, batch size, beta, max length, the Llama alphas for DPO/SimPO. Those stay at solopo's
defaults (train.lr 5e-7, 1 epoch, micro 1 x accum 8 per rank, beta: DPO 0.1 / SimPO 2.0 / ORPO lambda 0.1);
`solopo config show --explain --preset NAME` prints them. Set them from the paper with --lr, --epochs, --set train.beta.
"""

from __future__ import annotations

from solopo.pipeline.config import register_preset

# What both models share: the paper's data pipeline on the full MuSiQue train set (the Hub copy of the release;
# --data musique_ans_v1.0_train.jsonl points at a local file instead).
_PAPER_DATA = {
    "load": {"source": "dgslibisey/MuSiQue", "dataset": "musique", "split": "train"},
    "synth": {"target_len": [8192]},  # paper: ~8K long contexts (7.5K average)
    "sample": {"n": 32, "temperature": 0.85},  # paper: 32 samples at T=0.85 (also solopo's defaults)
    "train": {"target_len": 8192, "mode": "solo"},
}

PAPER_PRESETS: dict[str, dict] = {
    "paper-qwen2.5-7b": {
        **_PAPER_DATA,
        "run": {"model": "Qwen/Qwen2.5-7B-Instruct"},
        # alpha unset: the paper's Qwen values are solopo's defaults per algorithm (DPO 3, SimPO 1, ORPO 1)
        "train": {**_PAPER_DATA["train"], "alpha": None},
    },
    "paper-llama3.1-8b": {
        **_PAPER_DATA,
        "run": {"model": "meta-llama/Llama-3.1-8B-Instruct"},
        # the paper states alpha for SoLo-ORPO only (4); for --algo dpo/simpo give --alpha yourself
        "train": {**_PAPER_DATA["train"], "algo": "orpo", "alpha": 4.0},
    },
}

for _name, _values in PAPER_PRESETS.items():
    register_preset(_name, _values)
