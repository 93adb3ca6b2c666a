"""SFT cross-entropy masking and the Bradley–Terry reward loss, by hand."""

import math

import pytest
import torch

from ankus.losses.reward import bradley_terry_loss
from ankus.losses.sft import sft_loss


def _logits_from_probs(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


# V = 4, B = 2, T = 4. labels = input_ids; logits[:, t] predicts labels[:, t+1].
#   seq 0: labels [0, 1, 3, 2], loss_mask [0, 0, 1, 1] (2 prompt tokens, 2 completion tokens)
#          targets labels[1:] = [1, 3, 2] with mask[1:] = [0, 1, 1]
#          logits[0,1] = log[1,2,3,4] -> p(3) = 4/10 -> CE = log 2.5
#          logits[0,2] = log[1,1,1,1] -> p(2) = 1/4  -> CE = log 4
#   seq 1: labels [2, 1, 0, −100], loss_mask [0, 1, 1, 0]
#          targets [1, 0, −100] with mask [1, 1, 0]
#          logits[1,0] = log[1,2,3,4] -> p(1) = 2/10 -> CE = log 5
#          logits[1,1] = log[1,3,3,3] -> p(0) = 1/10 -> CE = log 10
#   mean over 4 tokens = (log 2.5 + log 4 + log 5 + log 10)/4 = log(500)/4
LOGITS = torch.stack(
    [
        _logits_from_probs([[5, 1, 1, 1], [1, 2, 3, 4], [1, 1, 1, 1], [1, 1, 1, 9]]),
        _logits_from_probs([[1, 2, 3, 4], [1, 3, 3, 3], [7, 1, 1, 1], [1, 1, 2, 1]]),
    ]
)
LABELS = torch.tensor([[0, 1, 3, 2], [2, 1, 0, -100]])
LOSS_MASK = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])


def test_sft_loss_by_hand():
    loss, stats = sft_loss(LOGITS, LABELS, LOSS_MASK)
    assert loss.item() == pytest.approx(math.log(500) / 4, abs=1e-12)
    assert stats["tokens"].item() == 4
    assert stats["loss/sft"].item() == pytest.approx(loss.item())


def test_sft_loss_ignores_masked_positions():
    logits = LOGITS.clone().requires_grad_()
    loss, _ = sft_loss(logits, LABELS, LOSS_MASK)
    loss.backward()
    # positions whose prediction is not scored: seq 0 t=0 (target masked) and t=3 (no target),
    # seq 1 t=2 (target masked) and t=3
    unused = [(0, 0), (0, 3), (1, 2), (1, 3)]
    for b, t in unused:
        assert torch.all(logits.grad[b, t] == 0)
    changed = LOGITS.clone()
    for b, t in unused:
        changed[b, t] = torch.tensor([1e4, -1e4, float("inf"), 3.0], dtype=torch.float64)
    loss2, _ = sft_loss(changed, LABELS, LOSS_MASK)
    assert loss2.item() == loss.item()
    # labels at masked positions do not matter either
    labels = LABELS.clone()
    labels[0, 1] = 3
    labels[0, 0] = -100
    assert sft_loss(LOGITS, labels, LOSS_MASK)[0].item() == loss.item()
    # loss_mask[:, 0] is never used (there is no prediction of the first token)
    mask = LOSS_MASK.clone()
    mask[:, 0] = 1
    assert sft_loss(LOGITS, LABELS, mask)[0].item() == loss.item()


def test_sft_token_mean_not_sequence_mean():
    # Only seq 0's 2 tokens + seq 1's first token: (log 2.5 + log 4 + log 5)/3 = log(50)/3
    mask = LOSS_MASK.clone()
    mask[1, 2] = 0
    loss, stats = sft_loss(LOGITS, LABELS, mask)
    assert loss.item() == pytest.approx(math.log(50) / 3, abs=1e-12)
    assert stats["tokens"].item() == 3


def test_sft_empty_mask_is_zero_not_nan():
    loss, stats = sft_loss(LOGITS, LABELS, torch.zeros_like(LOSS_MASK))
    assert loss.item() == 0.0 and stats["tokens"].item() == 0


def test_sft_bf16_logits_float32_loss():
    loss, _ = sft_loss(LOGITS.to(torch.bfloat16), LABELS, LOSS_MASK)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(500) / 4, abs=0.05)


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def test_bradley_terry_by_hand():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 1.0])
    # diffs [1, −1]: −log σ(1) = log(1+e^−1), −log σ(−1) = log(1+e)
    loss, stats = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((softplus(-1) + softplus(1)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * math.log(2 + math.e + 1 / math.e), abs=1e-6)
    assert stats["reward/accuracy"].item() == 0.5
    assert stats["reward/chosen"].item() == 1.0
    assert stats["reward/rejected"].item() == 1.0
    assert stats["reward/margin"].item() == 0.0
    # margin 1 everywhere: logits [0, −2] -> (log 2 + log(1+e²))/2
    loss, stats = bradley_terry_loss(chosen, rejected, margin=1.0)
    assert loss.item() == pytest.approx((math.log(2) + softplus(2)) / 2, abs=1e-6)
    assert stats["reward/accuracy"].item() == 0.5  # accuracy ignores the margin
    # per-pair margins [0, 2]: logits [1, −3]
    loss, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.0, 2.0]))
    assert loss.item() == pytest.approx((softplus(-1) + softplus(3)) / 2, abs=1e-6)


def test_bradley_terry_gradients_and_invariance():
    chosen = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    rejected = torch.tensor([0.1, 0.5, 2.5], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # d/dr_c of mean −log σ(r_c − r_r) = −σ(−(r_c − r_r))/B
    expected = [-sig(-(c - r)) / 3 for c, r in zip([0.3, -1.2, 2.0], [0.1, 0.5, 2.5])]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(rejected.grad, -chosen.grad)
    # only differences matter: shifting both rewards by a constant changes nothing
    a, _ = bradley_terry_loss(chosen.detach(), rejected.detach())
    b, _ = bradley_terry_loss(chosen.detach() + 7.0, rejected.detach() + 7.0)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    # equal rewards give log 2
    assert bradley_terry_loss(torch.zeros(4), torch.zeros(4))[0].item() == pytest.approx(math.log(2))
