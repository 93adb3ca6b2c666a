"""DPO / IPO losses: hand-computed numbers, the log 2 invariant, gradient signs."""

import math

import pytest
import torch

from ankus.losses.dpo import dpo_loss, sequence_logps


def softplus(x: float) -> float:
    """log(1 + e^x) = −log σ(−x), written out with the math module."""
    return math.log(1.0 + math.exp(x))


# Two preference pairs used by several tests.
#   pair 0: chosen −1, rejected −3, ref_chosen −2, ref_rejected −2
#           chosen log-ratio +1, rejected log-ratio −1, h = 1 − (−1) = 2
#   pair 1: chosen −4, rejected −5, ref_chosen −3, ref_rejected −3
#           chosen log-ratio −1, rejected log-ratio −2, h = −1 − (−2) = 1
CHOSEN = torch.tensor([-1.0, -4.0])
REJECTED = torch.tensor([-3.0, -5.0])
REF_CHOSEN = torch.tensor([-2.0, -3.0])
REF_REJECTED = torch.tensor([-2.0, -3.0])


def test_dpo_sigmoid_by_hand():
    beta = 0.5
    loss, stats = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta)
    # pair 0: β·h = 0.5·2 = 1   -> −log σ(1)   = log(1 + e^−1)   = 0.313261687...
    # pair 1: β·h = 0.5·1 = 0.5 -> −log σ(0.5) = log(1 + e^−0.5) = 0.474076984...
    expected = (softplus(-1.0) + softplus(-0.5)) / 2  # 0.393669335...
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.3936693358491648, abs=1e-6)
    # implicit rewards β·log-ratio: chosen [0.5, −0.5] (mean 0), rejected [−0.5, −1.0] (mean −0.75)
    assert stats["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-7)
    assert stats["rewards/rejected"].item() == pytest.approx(-0.75)
    # margins [1.0, 0.5] -> mean 0.75; both chosen > rejected -> accuracy 1
    assert stats["rewards/margins"].item() == pytest.approx(0.75)
    assert stats["rewards/accuracy"].item() == 1.0


def test_dpo_accuracy_counts_losing_pairs():
    # swap chosen and rejected of pair 1 only: its margin becomes −0.5
    loss, stats = dpo_loss(
        torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0]), REF_CHOSEN, REF_REJECTED, beta=0.5
    )
    assert stats["rewards/accuracy"].item() == 0.5
    # pair 1 now has β·h = −0.5 -> log(1 + e^0.5)
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(0.5)) / 2, abs=1e-6)


def test_dpo_label_smoothing_by_hand():
    # pair 0 only, β·h = 1, ε = 0.1:
    # 0.9·(−log σ(1)) + 0.1·(−log σ(−1)) = 0.9·log(1+e^−1) + 0.1·log(1+e)
    # and log(1+e) = 1 + log(1+e^−1), so the total is log(1+e^−1) + 0.1 = 0.413261687...
    loss, _ = dpo_loss(CHOSEN[:1], REJECTED[:1], REF_CHOSEN[:1], REF_REJECTED[:1], beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0), abs=1e-6)
    assert loss.item() == pytest.approx(softplus(-1.0) + 0.1, abs=1e-6)


def test_ipo_by_hand():
    beta = 0.1
    loss, stats = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta, loss_type="ipo")
    # target 1/(2β) = 5; pair 0: (2 − 5)² = 9; pair 1: (1 − 5)² = 16; mean 12.5
    assert loss.item() == pytest.approx(12.5, abs=1e-5)
    # rewards use the same β: chosen 0.1·[1, −1] -> mean 0; rejected 0.1·[−1, −2] -> mean −0.15
    assert stats["rewards/rejected"].item() == pytest.approx(-0.15)
    # β = 0.5 -> target 1: (2−1)² = 1, (1−1)² = 0, mean 0.5
    loss, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
def test_policy_equals_reference(beta):
    g = torch.Generator().manual_seed(0)
    c = -10 * torch.rand(8, generator=g)
    r = -10 * torch.rand(8, generator=g)
    loss, stats = dpo_loss(c, r, c.clone(), r.clone(), beta=beta)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["rewards/margins"].item() == 0.0
    # IPO at h = 0 is (1/(2β))²
    loss, _ = dpo_loss(c, r, c.clone(), r.clone(), beta=beta, loss_type="ipo")
    assert loss.item() == pytest.approx(1 / (4 * beta**2), rel=1e-6)


def test_gradient_signs_and_values():
    beta = 0.5
    chosen = CHOSEN.clone().requires_grad_()
    rejected = REJECTED.clone().requires_grad_()
    ref_c = REF_CHOSEN.clone().requires_grad_()
    loss, _ = dpo_loss(chosen, rejected, ref_c, REF_REJECTED, beta=beta)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # d/dc of mean_i −log σ(β h_i) = −β σ(−β h_i) / B; pair 0: −0.5·σ(−1)/2
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert chosen.grad[0].item() == pytest.approx(-0.5 * sig(-1.0) / 2, abs=1e-6)
    assert rejected.grad[1].item() == pytest.approx(0.5 * sig(-0.5) / 2, abs=1e-6)
    # the reference is a constant
    assert ref_c.grad is None or (ref_c.grad == 0).all()

    # a step that raises the chosen log-prob lowers the loss
    base, _ = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta)
    up, _ = dpo_loss(CHOSEN + 0.1, REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta)
    down, _ = dpo_loss(CHOSEN, REJECTED + 0.1, REF_CHOSEN, REF_REJECTED, beta=beta)
    assert up < base < down


def test_ipo_gradient_points_to_target():
    # β = 0.1 -> target h* = 5; both pairs have h < 5, so raising chosen log-probs helps
    chosen = CHOSEN.clone().requires_grad_()
    loss, _ = dpo_loss(chosen, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1, loss_type="ipo")
    loss.backward()
    # d/dc_i of mean (h_i − 5)² = 2(h_i − 5)/B: pair 0 -> 2·(−3)/2 = −3; pair 1 -> 2·(−4)/2 = −4
    assert chosen.grad.tolist() == pytest.approx([-3.0, -4.0])
    # overshooting the target (h = 7 > 5) reverses the sign
    c = torch.tensor([1.0], requires_grad=True)
    loss, _ = dpo_loss(c, torch.tensor([-6.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.1, loss_type="ipo")
    loss.backward()
    assert c.grad.item() == pytest.approx(2 * (7 - 5))


def test_bad_options_raise():
    with pytest.raises(ValueError):
        dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, loss_type="hinge")
    with pytest.raises(ValueError):
        dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, loss_type="ipo", label_smoothing=0.1)


def _logits_from_probs(rows):
    """Logits whose softmax is the given (unnormalised) probability rows."""
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def test_sequence_logps_by_hand():
    # V = 3. softmax(log[1,2,3]) = [1/6, 2/6, 3/6]; softmax(0) = 1/3 each; softmax(log[1,1,2]) = [1/4,1/4,1/2]
    logits = torch.stack(
        [
            _logits_from_probs([[1, 2, 3], [1, 1, 1], [1, 1, 2]]),
            _logits_from_probs([[1, 1, 1], [1, 2, 3], [1, 1, 2]]),
        ]
    )  # (2, 3, 3)
    labels = torch.tensor([[2, 0, 1], [-100, 0, 2]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    # seq 0: log(3/6) + log(1/3) = log(1/6)       (last position masked)
    # seq 1: log(1/6) + log(2/4) = log(1/12)      (first position masked, label −100 ignored)
    out = sequence_logps(logits, labels, mask)
    assert out.tolist() == pytest.approx([math.log(1 / 6), math.log(1 / 12)], abs=1e-12)
    avg = sequence_logps(logits, labels, mask, average=True)
    assert avg.tolist() == pytest.approx([math.log(1 / 6) / 2, math.log(1 / 12) / 2], abs=1e-12)

    # values at masked positions do not matter
    logits2 = logits.clone()
    logits2[0, 2] = torch.tensor([100.0, -3.0, 7.0], dtype=torch.float64)
    logits2[1, 0] = torch.tensor([-50.0, 2.0, 9.0], dtype=torch.float64)
    assert torch.equal(sequence_logps(logits2, labels, mask), out)


def test_sequence_logps_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 5, 7
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.4).long()
    expected = []
    for b in range(B):
        total = 0.0
        for t in range(T):
            if mask[b, t]:
                row = logits[b, t].tolist()
                total += row[labels[b, t]] - math.log(sum(math.exp(x) for x in row))
        expected.append(total)
    assert sequence_logps(logits, labels, mask).tolist() == pytest.approx(expected, abs=1e-10)
    # half precision inputs are upcast, giving close numbers
    out16 = sequence_logps(logits.to(torch.bfloat16), labels, mask)
    assert out16.dtype == torch.float32
    assert out16.tolist() == pytest.approx(expected, abs=0.1)


def test_dpo_end_to_end_with_tiny_model():
    """A tiny model as policy and reference: log 2 at the start, loss drops after a few steps."""
    from ankus import load_model

    model, tok = load_model("tiny-llama", seed=0)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (2, 4), generator=g)
    chosen_ids = torch.cat([prompt, torch.randint(0, vocab, (2, 3), generator=g)], 1)
    rejected_ids = torch.cat([prompt, torch.randint(0, vocab, (2, 3), generator=g)], 1)
    ids = torch.cat([chosen_ids, rejected_ids])  # one forward for both
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1

    def logps_of(m):
        logits = m(ids).logits
        lp = sequence_logps(logits[:, :-1], ids[:, 1:], completion[:, 1:])
        return lp[:2], lp[2:]

    with torch.no_grad():
        ref_c, ref_r = logps_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(4):
        c, r = logps_of(model)
        loss, _ = dpo_loss(c, r, ref_c, ref_r, beta=0.5)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < losses[0]
