"""Random-weight models of real shapes for the training benches (no weights downloaded; the cost of a step
depends on the shapes only). Qwen2.5 shapes are copied from the published config.json files."""

from __future__ import annotations

from typing import Any

# name -> (architecture, config kwargs). `embedded` is the packaged SmolLM2-135M (real weights, from disk).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # CPU-sized: the Qwen2 architecture at a width that trains in seconds (dry runs, CPU throughput rows)
    "qwen2-tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50000,
        tie_word_embeddings=True,
    ),
}
NAMES = ("embedded", *SHAPES)


def build(shape: str, device, dtype, attn: str = "sdpa", max_positions: int = 131072):
    """The model of `shape` on `device` (initialised there: a 7B model on a GPU in seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if shape == "embedded":
        from solopo.models import resolve_model

        lm = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=dtype, attn_implementation=attn)
        return lm.to(device)
    if shape not in SHAPES:
        raise SystemExit(f"--shape: one of {NAMES}")
    cfg = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=max_positions,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return lm


def counts(lm) -> dict[str, int]:
    """Parameters, split into the embedding table, the LM head (applied only at target positions here) and the
    body (every token goes through it): what the FLOP count needs."""
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    total = sum(p.numel() for p in lm.parameters())
    tied = head is emb
    return {
        "total": total,
        "embedding": emb.numel(),
        "head": head.numel(),
        "body": total - emb.numel() - (0 if tied else head.numel()),
        "tied": int(tied),
    }


def attended_pairs(seq_lens: list[int], segments: list[tuple[int, int, int]] = ()) -> float:
    """Query-key pairs attended: s^2/2 per causal sequence of length s; for a shared-prefix row (P, W, L),
    (P+W)^2/2 for [prompt, chosen] plus L*P + L^2/2 for the rejected branch."""
    pairs = sum(s * s / 2 for s in seq_lens)
    return pairs + sum((p + w) ** 2 / 2 + lo * p + lo * lo / 2 for p, w, lo in segments)


def train_flops(cfg, n_body: int, n_head: int, tokens: int, target_tokens: int, pairs: float) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward; gradient-checkpointing recompute is not
    counted, as in MFU): 6 N_body per token, 6 N_head per target token (the LM head runs on targets only), and
    attention 3 x 4 x heads*head_dim FLOPs per attended query-key pair per layer (QK^T and AV, 2 FLOPs per
    multiply-add)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    return 6 * n_body * tokens + 6 * n_head * target_tokens + 12 * d_attn * cfg.num_hidden_layers * pairs
