"""The per-example losses against hand-computed references (pure maths, no model)."""

import math

import pytest
import torch

from trl_u2a.core.losses import (
    completion_logps,
    ga_loss,
    kl_to_reference,
    nll_loss,
    npo_loss,
    simnpo_loss,
    unlearning_loss,
    weight_coefficients,
    weighted_mean,
)


@pytest.fixture
def batch():
    # Three rows of different lengths: prompt tokens (mask 0), completion tokens (mask 1), right padding (mask 0)
    completion_mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 1],
        ]
    )
    torch.manual_seed(0)
    per_token = -torch.rand(3, 5) * 3  # (B, T-1) log-probs of tokens 1..T-1
    return per_token, completion_mask


def test_completion_logps_masks_prompt_and_padding(batch):
    per_token, mask = batch
    logps, lengths = completion_logps(per_token, mask)
    for i in range(3):
        expected = sum(per_token[i, t - 1].item() for t in range(1, 6) if mask[i, t] == 1)
        assert logps[i].item() == pytest.approx(expected, rel=1e-6)
        assert lengths[i].item() == mask[i].sum().item()


def test_losses_match_formulas(batch):
    per_token, mask = batch
    logps, lengths = completion_logps(per_token, mask)
    ref = logps.detach() + torch.tensor([0.3, -0.2, 0.0])
    beta, gamma = 0.1, 0.5
    for i in range(3):
        lp, n, r = logps[i].item(), lengths[i].item(), ref[i].item()
        assert ga_loss(logps, lengths)[i].item() == pytest.approx(lp / n, rel=1e-6)
        assert ga_loss(logps, lengths, "sum")[i].item() == pytest.approx(lp, rel=1e-6)
        ratio = math.exp(lp - r)
        assert npo_loss(logps, ref, beta)[i].item() == pytest.approx(2 / beta * math.log(1 + ratio**beta), rel=1e-5)
        sig = 1 / (1 + math.exp(-(-(4.5 / n) * lp - gamma)))
        assert simnpo_loss(logps, lengths, 4.5, gamma)[i].item() == pytest.approx(-2 / 4.5 * math.log(sig), rel=1e-5)
        assert nll_loss(logps, lengths)[i].item() == pytest.approx(-lp / n, rel=1e-6)


def test_npo_at_reference_is_2_ln2_over_beta():
    logps = torch.tensor([-5.0, -12.0])
    assert torch.allclose(npo_loss(logps, logps, 0.1), torch.full((2,), 2 / 0.1 * math.log(2)))


def test_unlearning_loss_dispatch_and_errors():
    logps, lengths = torch.tensor([-4.0]), torch.tensor([2.0])
    assert unlearning_loss("graddiff", logps, lengths).item() == -2.0
    with pytest.raises(ValueError, match="ref_logps"):
        unlearning_loss("npo", logps, lengths)
    with pytest.raises(ValueError, match="loss_type='dpo'"):
        unlearning_loss("dpo", logps, lengths)


def test_weighted_mean_and_zero_weights():
    losses = torch.tensor([1.0, 2.0, 4.0])
    weights = torch.tensor([1.0, 0.0, 3.0])
    assert weighted_mean(losses, weights).item() == pytest.approx((1 + 12) / 4)
    assert weighted_mean(losses, torch.zeros(3)).item() == 0.0
    # A weight-0 row adds nothing even when its loss is not finite (an unselected negative, a retain row)
    assert weighted_mean(torch.tensor([1.0, float("inf"), 4.0]), weights).item() == pytest.approx(13 / 4)
    assert weighted_mean(torch.tensor([1.0, float("nan"), 4.0]), weights, torch.tensor(2.0)).item() == 6.5
    assert weight_coefficients(weights, torch.tensor(2.0)).tolist() == [0.5, 0.0, 1.5]


def test_kl_to_reference_zero_at_reference_and_positive_elsewhere():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    assert torch.allclose(kl_to_reference(logits, logits, mask), torch.zeros(2), atol=1e-6)
    kl = kl_to_reference(logits, logits + torch.randn(2, 4, 7), mask)
    assert (kl > 0).all()
    # Hand-computed for row 0: positions 0 and 1 predict the completion tokens 1 and 2
    other = logits + 1.0 * torch.arange(7)
    p, q = logits[0, :2].log_softmax(-1), other[0, :2].log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1).mean()
    assert kl_to_reference(logits, other, mask)[0].item() == pytest.approx(expected.item(), rel=1e-5)
