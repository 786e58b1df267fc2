"""Hand-worked numbers for every reward, base loss and the SoLo-RA term (torchtune style)."""

from __future__ import annotations

import math

import pytest
import torch

from solopo.training.losses import (
    Batch,
    LossParams,
    SeqLogps,
    dpo_base_loss,
    dpo_reward,
    orpo_base_loss,
    orpo_log_odds,
    ra_term,
    simpo_base_loss,
    simpo_reward,
    solo_dpo,
    solo_orpo,
    solo_simpo,
)


def S(total, count):
    return SeqLogps(torch.tensor(total, dtype=torch.float64), torch.tensor(count, dtype=torch.float64))


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=tol)


def test_dpo_reward():
    # beta * (log pi - log pi_ref) = 0.1 * (-10 - -12) = 0.2
    assert close(dpo_reward(S([-10.0], [4]), torch.tensor([-12.0], dtype=torch.float64), 0.1), [0.2])


def test_simpo_reward_is_length_normalised():
    # (2 / 3) * -6 = -4; the same sum over 6 tokens gives -2
    assert close(simpo_reward(S([-6.0, -6.0], [3, 6]), 2.0), [-4.0, -2.0])


def test_orpo_log_odds():
    # mean log p = log 0.5 -> odds 1 -> 0;  log 0.8 -> log(0.8 / 0.2) = log 4
    r = orpo_log_odds(S([3 * math.log(0.5), 2 * math.log(0.8)], [3, 2]))
    assert close(r, [0.0, math.log(4.0)], tol=1e-5)


def test_base_losses():
    # DPO: -log sigmoid(0.2 - (-0.1)) = log(1 + e^-0.3)
    assert close(dpo_base_loss(torch.tensor([0.2]), torch.tensor([-0.1])), [math.log1p(math.exp(-0.3))], tol=1e-6)
    # SimPO: -log sigmoid(-4 - (-5) - 0.5) = log(1 + e^-0.5)
    assert close(simpo_base_loss(torch.tensor([-4.0]), torch.tensor([-5.0]), 0.5), [math.log1p(math.exp(-0.5))])
    # ORPO: nll 0.223144 + 0.1 * -log sigmoid(log 4) = 0.223144 + 0.1 * log(1.25)
    got = orpo_base_loss(torch.tensor([-math.log(0.8)]), torch.tensor([math.log(4.0)]), torch.tensor([0.0]), 0.1)
    assert close(got, [-math.log(0.8) + 0.1 * math.log(1.25)], tol=1e-6)


def test_ra_term():
    # alpha * |r_short - r_long| = 3 * |0.2 - (-0.1)| = 0.9 (symmetric)
    assert close(ra_term(torch.tensor([0.2]), torch.tensor([-0.1]), 3.0), [0.9])
    assert close(ra_term(torch.tensor([-0.1]), torch.tensor([0.2]), 3.0), [0.9])


def test_solo_dpo_total_and_parts():
    b = Batch(
        chosen=S([-10.0], [4]),
        rejected=S([-13.0], [4]),
        long_w=S([-11.0], [4]),
        ref_chosen=torch.tensor([-12.0], dtype=torch.float64),
        ref_rejected=torch.tensor([-12.0], dtype=torch.float64),
        ref_long_w=torch.tensor([-10.0], dtype=torch.float64),
    )
    out = solo_dpo(b, LossParams(alpha=3.0, beta=0.1))
    # r_w = 0.2, r_l = -0.1, r_long = -0.1 -> po = log(1+e^-0.3), ra = 3 * 0.3
    assert close(out.po_loss, [math.log1p(math.exp(-0.3))])
    assert close(out.ra_loss, [0.9])
    assert close(out.loss, [math.log1p(math.exp(-0.3)) + 0.9])
    assert close(out.reward_chosen, [0.2]) and close(out.reward_rejected, [-0.1]) and close(out.ra_distance, [0.3])


def test_solo_simpo_and_orpo_totals():
    p = LossParams(alpha=1.0, beta=2.0, gamma=0.5, orpo_lambda=0.1)
    out = solo_simpo(Batch(chosen=S([-6.0], [3]), rejected=S([-10.0], [4]), long_w=S([-9.0], [3])), p)
    # r_w -4, r_l -5, r_long -6 -> log(1+e^-0.5) + |(-4) - (-6)|
    assert close(out.loss, [math.log1p(math.exp(-0.5)) + 2.0])
    out = solo_orpo(
        Batch(chosen=S([2 * math.log(0.8)], [2]), rejected=S([3 * math.log(0.5)], [3]), long_w=S([math.log(0.5)], [1])),
        p,
    )
    # odds_w log 4, odds_l 0, odds_long 0 -> nll + 0.1 log 1.25 + 1 * log 4
    assert close(out.loss, [-math.log(0.8) + 0.1 * math.log(1.25) + math.log(4.0)], tol=1e-5)


def test_alpha_zero_and_no_long_give_plain_po():
    b = Batch(chosen=S([-6.0], [3]), rejected=S([-10.0], [4]), long_w=S([-30.0], [3]))
    out = solo_simpo(b, LossParams(alpha=0.0, beta=2.0))
    assert close(out.ra_loss, [0.0]) and close(out.loss, out.po_loss)
    out2 = solo_simpo(Batch(chosen=b.chosen, rejected=b.rejected), LossParams(alpha=1.0, beta=2.0))
    assert close(out2.loss, out.po_loss)


def test_ra_gradient_is_chosen_only():
    """SoLo-RA must not touch the rejected answer: its gradient equals the plain PO gradient."""
    tw, tl, tlong = (torch.tensor([v], requires_grad=True) for v in (-6.0, -10.0, -9.0))
    cnt = torch.tensor([3.0])
    p = LossParams(alpha=1.0, beta=2.0)
    solo_simpo(Batch(SeqLogps(tw, cnt), SeqLogps(tl, cnt), SeqLogps(tlong, cnt)), p).loss.sum().backward()
    g_rej_solo = tl.grad.clone()
    tl.grad = None
    solo_simpo(Batch(SeqLogps(tw.detach(), cnt), SeqLogps(tl, cnt)), p).loss.sum().backward()
    assert torch.allclose(g_rej_solo, tl.grad)
    assert tlong.grad is not None and tlong.grad.abs().item() > 0


def test_dpo_without_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="reference log-probs"):
        solo_dpo(Batch(chosen=S([-1.0], [1]), rejected=S([-2.0], [1])), LossParams())
