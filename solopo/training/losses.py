"""SoLoPO losses as pure functions (torchtune style): per-sequence log-probs in, per-example losses out.

Every input is a `SeqLogps`: the sum of the completion's token log-probs and its token count, one value per
example. Rewards and base losses are small separate functions; `OBJECTIVES` composes them per algorithm:

    L = L_PO(x_short, y_w, y_l) + alpha * |r(x_short, y_w) - r(x_long, y_w)|     (chosen-only SoLo-RA)

Rewards (paper, section 3):
    DPO    r = beta * (log pi(y|x) - log pi_ref(y|x))
    SimPO  r = beta / |y| * log pi(y|x)
    ORPO   r = log odds of the length-averaged prob = log p - log(1 - p),  log p = mean token log-prob
Base losses:
    DPO    -log sigmoid(r_w - r_l)
    SimPO  -log sigmoid(r_w - r_l - gamma)
    ORPO   NLL(y_w | x) + lambda * -log sigmoid(r_w - r_l)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Paper defaults (Qwen2.5-7B: SoLo-DPO 3, SoLo-SimPO 1, SoLo-ORPO 1).
DEFAULT_ALPHA = {"dpo": 3.0, "simpo": 1.0, "orpo": 1.0}
# beta: TRL's DPOConfig default 0.1; SimPO 2.0 (the SimPO paper's range is 2.0-2.5: with TRL's CPO default of 0.1
# the length-normalised reward margin is too small to learn from); ORPO has no beta.
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.0}
DEFAULT_GAMMA = 0.5  # SimPO target margin (paper and TRL's simpo_gamma)
DEFAULT_ORPO_LAMBDA = 0.1  # ORPO paper's lambda (TRL's ORPOConfig.beta)


@dataclass
class SeqLogps:
    """Per-example sequence log-probs: `total` = sum of completion token log-probs (b,), `count` = tokens (b,)."""

    total: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


@dataclass
class LossOutput:
    """Per-example values (b,). `loss` carries the gradient; the rest is detached for logging."""

    loss: torch.Tensor
    po_loss: torch.Tensor
    ra_loss: torch.Tensor
    reward_chosen: torch.Tensor
    reward_rejected: torch.Tensor
    ra_distance: torch.Tensor  # |r(x_short, y_w) - r(x_long, y_w)| (zeros when there is no long sequence)


@dataclass(frozen=True)
class LossParams:
    alpha: float = 0.0
    beta: float = 0.1
    gamma: float = DEFAULT_GAMMA
    orpo_lambda: float = DEFAULT_ORPO_LAMBDA


# --- rewards --------------------------------------------------------------------------------------------
def dpo_reward(policy: SeqLogps, ref_total: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * log(pi(y|x) / pi_ref(y|x)); `ref_total` is the precomputed reference sum log-prob (b,)."""
    return beta * (policy.total - ref_total)


def simpo_reward(policy: SeqLogps, beta: float) -> torch.Tensor:
    """(beta / |y|) * log pi(y|x): the length-normalised log-prob."""
    return beta * policy.mean


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(policy: SeqLogps) -> torch.Tensor:
    """log(p / (1 - p)) with log p the mean token log-prob (computed in fp32: p is close to 1 late in training)."""
    mean = policy.mean.float()
    return mean - log1mexp(mean)


# --- base losses ------------------------------------------------------------------------------------------
def dpo_base_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_w - r_l)


def simpo_base_loss(r_w: torch.Tensor, r_l: torch.Tensor, gamma: float) -> torch.Tensor:
    return -F.logsigmoid(r_w - r_l - gamma)


def orpo_base_loss(nll_w: torch.Tensor, odds_w: torch.Tensor, odds_l: torch.Tensor, lam: float) -> torch.Tensor:
    """NLL of y_w (mean per token) + lambda * -log sigmoid(log odds ratio)."""
    return nll_w - lam * F.logsigmoid(odds_w - odds_l)


def ra_term(r_short_w: torch.Tensor, r_long_w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SoLo-RA: alpha * |r(x_short, y_w) - r(x_long, y_w)| (chosen only: y_l never sees x_long)."""
    return alpha * (r_short_w - r_long_w).abs()


# --- objectives: one small function per algorithm -------------------------------------------------------------
@dataclass
class Batch:
    """Log-probs of one micro-batch. `long_w` is None when the mode has no RA term (or alpha is 0).

    `nll_w` is what ORPO's NLL averages over: the chosen completion by default (paper), or the whole
    prompt+completion sequence (TRL's ORPOTrainer convention) when `train.orpo_nll=sequence`.
    """

    chosen: SeqLogps
    rejected: SeqLogps
    long_w: SeqLogps | None = None
    ref_chosen: torch.Tensor | None = None  # DPO reference sums for the PO pair
    ref_rejected: torch.Tensor | None = None
    ref_long_w: torch.Tensor | None = None  # pi_ref(y_w | x_long), or pi_ref(y_w | x_short) with ra_ref=short
    nll_w: SeqLogps | None = None


def _finish(po: torch.Tensor, r_w, r_l, r_long_w, alpha: float) -> LossOutput:
    if r_long_w is None or alpha == 0.0:
        ra = torch.zeros_like(po)
        dist = torch.zeros_like(po) if r_long_w is None else (r_w - r_long_w).abs().detach()
    else:
        ra = ra_term(r_w, r_long_w, alpha)
        dist = (r_w - r_long_w).abs().detach()
    return LossOutput(
        loss=po + ra,
        po_loss=po.detach(),
        ra_loss=ra.detach(),
        reward_chosen=r_w.detach(),
        reward_rejected=r_l.detach(),
        ra_distance=dist,
    )


def _need(x, what: str):
    if x is None:
        raise ValueError(f"DPO needs precomputed reference log-probs ({what}); compute them before training")
    return x


def solo_dpo(b: Batch, p: LossParams) -> LossOutput:
    r_w = dpo_reward(b.chosen, _need(b.ref_chosen, "ref_chosen"), p.beta)
    r_l = dpo_reward(b.rejected, _need(b.ref_rejected, "ref_rejected"), p.beta)
    r_long = None if b.long_w is None else dpo_reward(b.long_w, _need(b.ref_long_w, "ref_long_w"), p.beta)
    return _finish(dpo_base_loss(r_w, r_l), r_w, r_l, r_long, p.alpha)


def solo_simpo(b: Batch, p: LossParams) -> LossOutput:
    r_w, r_l = simpo_reward(b.chosen, p.beta), simpo_reward(b.rejected, p.beta)
    r_long = None if b.long_w is None else simpo_reward(b.long_w, p.beta)
    return _finish(simpo_base_loss(r_w, r_l, p.gamma), r_w, r_l, r_long, p.alpha)


def solo_orpo(b: Batch, p: LossParams) -> LossOutput:
    odds_w, odds_l = orpo_log_odds(b.chosen), orpo_log_odds(b.rejected)
    nll_w = -(b.nll_w if b.nll_w is not None else b.chosen).mean.float()
    odds_long = None if b.long_w is None else orpo_log_odds(b.long_w)
    return _finish(orpo_base_loss(nll_w, odds_w, odds_l, p.orpo_lambda), odds_w, odds_l, odds_long, p.alpha)


OBJECTIVES: dict[str, Callable[[Batch, LossParams], LossOutput]] = {
    "dpo": solo_dpo,
    "simpo": solo_simpo,
    "orpo": solo_orpo,
}
