"""ILQL: heads, Polyak sync, each loss term by hand, property tests, sampling scores."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ankus.losses.ilql import expectile_loss, ilql_loss, ilql_sample_scores, topk_mask
from ankus.models.heads import ILQLHeads, ValueHead

D = torch.float64


# ---------------------------------------------------------------- heads


def test_value_head_shape_and_layers():
    head = ValueHead(8)
    lin1, act, lin2 = head.head
    assert (lin1.in_features, lin1.out_features) == (8, 16)
    assert isinstance(act, torch.nn.ReLU)
    assert (lin2.in_features, lin2.out_features) == (16, 1)
    out = head(torch.randn(3, 5, 8, dtype=torch.bfloat16))
    assert out.shape == (3, 5) and out.dtype == torch.float32


def test_ilql_heads_shapes_targets_and_gather():
    torch.manual_seed(0)
    heads = ILQLHeads(hidden_size=4, vocab_size=7, two_qs=True)
    assert len(heads.q_heads) == 2 and len(heads.target_q_heads) == 2
    assert len(ILQLHeads(4, 7, two_qs=False).q_heads) == 1
    # Linear(4, 8) + Linear(8, 7) per Q head
    assert sum(p.numel() for p in heads.q_heads[0].parameters()) == 4 * 8 + 8 + 8 * 7 + 7
    assert all(not p.requires_grad for p in heads.target_q_heads.parameters())
    assert all(p.requires_grad for p in heads.q_heads.parameters())

    hs = torch.randn(2, 5, 4, requires_grad=True)
    qs, target_qs, vs = heads(hs)
    assert [q.shape for q in qs] == [(2, 5, 7)] * 2
    assert [q.shape for q in target_qs] == [(2, 5, 7)] * 2
    assert vs.shape == (2, 5)
    # targets start as exact copies and carry no graph
    for q, tq in zip(qs, target_qs):
        assert torch.equal(q, tq) and not tq.requires_grad
    # the two online heads are initialised independently
    assert not torch.equal(qs[0], qs[1])

    actions_ixs = torch.tensor([[0, 2], [3, 4]])
    states_ixs = torch.tensor([[0, 2, 3], [1, 3, 4]])
    qs_g, tqs_g, vs_g = heads(hs, states_ixs=states_ixs, actions_ixs=actions_ixs)
    assert torch.allclose(qs_g[1][1], qs[1][1, [3, 4]])
    assert torch.allclose(tqs_g[0][0], target_qs[0][0, [0, 2]])
    assert torch.allclose(vs_g[1], vs[1, [1, 3, 4]])

    (sum(q.sum() for q in qs) + vs.sum()).backward()
    assert all(p.grad is None for p in heads.target_q_heads.parameters())
    assert hs.grad is not None


def test_polyak_sync_by_hand():
    heads = ILQLHeads(hidden_size=2, vocab_size=3, two_qs=True, alpha=0.25)
    with torch.no_grad():
        for q in heads.q_heads:
            for p in q.parameters():
                p.copy_(torch.arange(p.numel(), dtype=p.dtype).view_as(p))
        for tq in heads.target_q_heads:
            for p in tq.parameters():
                p.fill_(4.0)
    w = heads.q_heads[0][2].weight.detach().clone()  # (3, 4), values 0..11
    heads.sync_target_q_heads()
    # target ← 0.25·online + 0.75·target: entry k becomes 0.25·k + 3
    expected1 = 0.25 * w + 3.0
    assert torch.allclose(heads.target_q_heads[0][2].weight, expected1)
    assert heads.target_q_heads[1][2].weight[2, 3].item() == pytest.approx(0.25 * 11 + 3.0)
    # second sync: 0.25·k + 0.75·(0.25·k + 3) = 0.4375·k + 2.25
    heads.sync_target_q_heads()
    assert torch.allclose(heads.target_q_heads[0][2].weight, 0.4375 * w + 2.25)
    assert heads.target_q_heads[0][0].bias[3].item() == pytest.approx(0.4375 * 3 + 2.25)
    # online heads are untouched; alpha = 1 copies them
    assert torch.equal(heads.q_heads[0][2].weight, w)
    heads.sync_target_q_heads(alpha=1.0)
    assert torch.equal(heads.target_q_heads[1][2].weight, w)
    assert all(not p.requires_grad for p in heads.target_q_heads.parameters())


# ---------------------------------------------------------------- terms by hand


def test_expectile_by_hand():
    u = torch.tensor([2.0, -2.0, 0.0, -0.5])
    # τ = 0.7: u ≥ 0 -> 0.7·u²; u < 0 -> 0.3·u²
    # [0.7·4, 0.3·4, 0, 0.3·0.25] = [2.8, 1.2, 0, 0.075]
    assert expectile_loss(u, 0.7).tolist() == pytest.approx([2.8, 1.2, 0.0, 0.075])
    # τ = 0.5 is half the squared error
    assert expectile_loss(u, 0.5).tolist() == pytest.approx([2.0, 2.0, 0.0, 0.125])


def _hand_batch():
    """B=1, T=3, V=3. Step 0 is a prompt step (masked); steps 1, 2 are trained; step 2 is terminal.

    actions [0, 2, 1], rewards [0, 0, 2], dones [0, 0, 1], vs = V(s_t) = [10, 1, 3].
    Step-0 rows hold garbage that must not matter.
    """
    actions = torch.tensor([[0, 2, 1]])
    rewards = torch.tensor([[5.0, 0.0, 2.0]], dtype=D)
    dones = torch.tensor([[0, 0, 1]])
    mask = torch.tensor([[0, 1, 1]])
    vs = torch.tensor([[10.0, 1.0, 3.0]], dtype=D)
    l2 = math.log(2)
    # online Q, step 1: [4 − log 2, 4 − log 2, 4] -> Q(s1, a=2) = 4, softmax [1/4, 1/4, 1/2]
    #           step 2: [1, 1, 1]                 -> Q(s2, a=1) = 1, softmax uniform
    q = torch.tensor([[[9.0, -9.0, 3.0], [4 - l2, 4 - l2, 4.0], [1.0, 1.0, 1.0]]], dtype=D)
    # target Q: Q̂(s1, 2) = 3, Q̂(s2, 1) = 1
    tq = torch.tensor([[[7.0, 7.0, 7.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]]], dtype=D)
    # LM logits: step 1 log[1,2,7] -> p(2) = 0.7; step 2 log[1,1,2] -> p(1) = 1/4
    logits = torch.log(torch.tensor([[[1.0, 1.0, 1.0], [1.0, 2.0, 7.0], [1.0, 1.0, 2.0]]], dtype=D))
    return dict(logits=logits, qs=(q,), target_qs=(tq,), vs=vs, actions=actions, rewards=rewards, dones=dones, mask=mask)


def test_ilql_terms_by_hand():
    batch = _hand_batch()
    loss, stats = ilql_loss(**batch, gamma=0.5, tau=0.7, cql_scale=0.1, awac_scale=1.0)
    # Q targets: step 1: r + γ·V(s2) = 0 + 0.5·3 = 1.5; step 2 (done): r = 2
    # Q loss: ((4 − 1.5)² + (1 − 2)²)/2 = (6.25 + 1)/2 = 3.625
    assert stats["loss/q"].item() == pytest.approx(3.625)
    # V loss: u1 = Q̂ − V = 3 − 1 = 2 -> 0.7·4 = 2.8; u2 = 1 − 3 = −2 -> 0.3·4 = 1.2; mean 2.0
    assert stats["loss/v"].item() == pytest.approx(2.0)
    # CQL: CE of Q rows on the actions: step 1 −log(1/2) = log 2; step 2 −log(1/3) = log 3
    assert stats["loss/cql"].item() == pytest.approx(math.log(6) / 2)
    # AWAC: −log 0.7 and −log(1/4)
    awac = (-math.log(0.7) + math.log(4)) / 2
    assert stats["loss/awac"].item() == pytest.approx(awac)
    assert loss.item() == pytest.approx(3.625 + 2.0 + 0.1 * math.log(6) / 2 + awac)
    assert stats["values/q"].item() == pytest.approx((4 + 1) / 2)
    assert stats["values/target_q"].item() == pytest.approx((3 + 1) / 2)
    assert stats["values/v"].item() == pytest.approx((1 + 3) / 2)
    assert stats["values/advantage"].item() == pytest.approx((2 - 2) / 2)

    # the advantage-weighted AWAC variant: weights exp(β(Q̂ − V)) = e², e⁻² with β = 1
    _, stats = ilql_loss(**batch, gamma=0.5, tau=0.7, awac_beta=1.0)
    weighted = (math.exp(2) * -math.log(0.7) + math.exp(-2) * math.log(4)) / 2
    assert stats["loss/awac"].item() == pytest.approx(weighted)


def test_ilql_vs_with_final_state():
    batch = _hand_batch()
    # V of the state after the last action is given; the terminal step ignores it ...
    batch["vs"] = torch.tensor([[10.0, 1.0, 3.0, 100.0]], dtype=D)
    _, stats = ilql_loss(**batch, gamma=0.5)
    assert stats["loss/q"].item() == pytest.approx(3.625)
    # ... unless the step is not terminal: target 2 + 0.5·100 = 52 -> ((4−1.5)² + (1−52)²)/2
    batch["dones"] = torch.zeros(1, 3, dtype=torch.long)
    _, stats = ilql_loss(**batch, gamma=0.5)
    assert stats["loss/q"].item() == pytest.approx((6.25 + 51**2) / 2)
    with pytest.raises(ValueError):
        batch["vs"] = torch.zeros(1, 5, dtype=D)
        ilql_loss(**batch)


def test_ilql_two_qs_min_and_sums():
    batch = _hand_batch()
    q = batch["qs"][0]
    tq = batch["target_qs"][0]
    # second target head: larger at step 1 (5 > 3), smaller at step 2 (−1 < 1)
    tq2 = tq.clone()
    tq2[0, 1, 2] = 5.0
    tq2[0, 2, 1] = -1.0
    batch["qs"] = (q, q + 1.0)
    batch["target_qs"] = (tq, tq2)
    _, stats = ilql_loss(**batch, gamma=0.5, tau=0.7)
    # V target is the elementwise min: step 1 min(3, 5) = 3 -> u = 2 -> 2.8
    #                                  step 2 min(1, −1) = −1 -> u = −4 -> 0.3·16 = 4.8
    assert stats["loss/v"].item() == pytest.approx((2.8 + 4.8) / 2)
    # Q loss sums the heads: head 2 is head 1 + 1: ((5 − 1.5)² + (2 − 2)²)/2 = 6.125
    assert stats["loss/q"].item() == pytest.approx(3.625 + 6.125)
    # CQL sums the heads too; a constant shift of a Q row leaves its softmax unchanged
    assert stats["loss/cql"].item() == pytest.approx(math.log(6))


def test_ilql_gradients_flow_where_they_should():
    batch = _hand_batch()
    vs = batch["vs"].clone().requires_grad_()
    q = batch["qs"][0].clone().requires_grad_()
    tq = batch["target_qs"][0].clone().requires_grad_()
    logits = batch["logits"].clone().requires_grad_()
    batch.update(vs=vs, qs=(q,), target_qs=(tq,), logits=logits)
    loss, _ = ilql_loss(**batch, gamma=0.5, tau=0.7)
    loss.backward()
    # V gets gradient only from the V loss (the Q target's V(s') is detached):
    # d/dV1 [0.7·(3 − V1)²]/2 = −0.7·2·2/2 = −1.4; d/dV2 [0.3·(1 − V2)²]/2 = 0.3·2·2/2 = 0.6
    assert vs.grad[0].tolist() == pytest.approx([0.0, -1.4, 0.6])
    assert tq.grad is None or torch.all(tq.grad == 0)
    # masked step 0 gets nothing anywhere
    assert torch.all(q.grad[0, 0] == 0) and torch.all(logits.grad[0, 0] == 0)
    # d loss_q / d Q(s1, 2) = 2·(4 − 1.5)/2 = 2.5, plus CQL: 0.1·(softmax − onehot)/2 = 0.1·(0.5 − 1)/2
    assert q.grad[0, 1, 2].item() == pytest.approx(2.5 + 0.1 * (0.5 - 1) / 2)


# ---------------------------------------------------------------- properties


def _naive_ilql(logits, qs, target_qs, vs, actions, rewards, dones, mask, gamma, tau, cql_scale, awac_scale):
    """Explicit loop over (b, t), plain Python floats."""
    B, T = actions.shape
    lse = lambda row: math.log(sum(math.exp(x) for x in row))  # noqa: E731
    n = max(1, int(mask.sum()))
    lq = lv = lc = la = 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            a = int(actions[b, t])
            v = float(vs[b, t])
            if t + 1 < vs.shape[1]:
                v_next = float(vs[b, t + 1])
            else:
                v_next = 0.0
            y = float(rewards[b, t]) + gamma * v_next * (1 - float(dones[b, t]))
            for q in qs:
                lq += (float(q[b, t, a]) - y) ** 2
                lc += lse(q[b, t].tolist()) - float(q[b, t, a])
            u = min(float(tq[b, t, a]) for tq in target_qs) - v
            lv += (tau if u >= 0 else 1 - tau) * u * u
            la += lse(logits[b, t].tolist()) - float(logits[b, t, a])
    lq, lv, lc, la = lq / n, lv / n, lc / n, la / n
    return lq + lv + cql_scale * lc + awac_scale * la, (lq, lv, lc, la)


def _random_batch(seed, B, T, V, n_heads, vs_extra):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D)  # noqa: E731
    mask = torch.zeros(B, T, dtype=torch.long)
    dones = (torch.rand(B, T, generator=g) < 0.2).long()
    for b in range(B):
        # a contiguous response segment [start, end) whose last action is terminal,
        # the layout data prep produces (prompt steps before, padding after)
        start = int(torch.randint(0, T, (1,), generator=g))
        end = int(torch.randint(start, T + 1, (1,), generator=g))
        mask[b, start:end] = 1
        if end > start:
            dones[b, end - 1] = 1
    return dict(
        logits=3 * r(B, T, V),
        qs=tuple(r(B, T, V) for _ in range(n_heads)),
        target_qs=tuple(r(B, T, V) for _ in range(n_heads)),
        vs=r(B, T + vs_extra),
        actions=torch.randint(0, V, (B, T), generator=g),
        rewards=r(B, T),
        dones=dones,
        mask=mask,
    )


shapes = dict(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    T=st.integers(1, 6),
    V=st.integers(2, 6),
    n_heads=st.sampled_from([1, 2]),
    vs_extra=st.sampled_from([0, 1]),
    gamma=st.floats(0.0, 1.0),
    tau=st.floats(0.05, 0.95),
)


@settings(max_examples=60, deadline=None)
@given(**shapes)
def test_ilql_matches_naive_loop_and_is_well_formed(seed, B, T, V, n_heads, vs_extra, gamma, tau):
    batch = _random_batch(seed, B, T, V, n_heads, vs_extra)
    scales = dict(cql_scale=0.3, awac_scale=0.7)
    loss, stats = ilql_loss(**batch, gamma=gamma, tau=tau, **scales)
    assert torch.isfinite(loss)
    for k in ("loss/q", "loss/v", "loss/cql", "loss/awac"):
        assert stats[k].item() >= 0.0
    assert loss.item() == pytest.approx(
        (stats["loss/q"] + stats["loss/v"] + 0.3 * stats["loss/cql"] + 0.7 * stats["loss/awac"]).item(), abs=1e-9
    )
    naive, parts = _naive_ilql(**batch, gamma=gamma, tau=tau, **scales)
    assert loss.item() == pytest.approx(naive, rel=1e-9, abs=1e-9)
    assert [stats[k].item() for k in ("loss/q", "loss/v", "loss/cql", "loss/awac")] == pytest.approx(
        list(parts), rel=1e-9, abs=1e-9
    )


@settings(max_examples=60, deadline=None)
@given(**shapes)
def test_ilql_ignores_masked_steps(seed, B, T, V, n_heads, vs_extra, gamma, tau):
    batch = _random_batch(seed, B, T, V, n_heads, vs_extra)
    loss, _ = ilql_loss(**batch, gamma=gamma, tau=tau)
    g = torch.Generator().manual_seed(seed + 1)
    off = batch["mask"] == 0  # (B, T)
    noisy = dict(batch)
    big = lambda x: torch.where(off.unsqueeze(-1) if x.dim() == 3 else off, 1e6 * torch.randn(x.shape, generator=g, dtype=D), x)  # noqa: E731
    noisy["logits"] = big(batch["logits"])
    noisy["qs"] = tuple(big(q) for q in batch["qs"])
    noisy["target_qs"] = tuple(big(q) for q in batch["target_qs"])
    noisy["rewards"] = big(batch["rewards"])
    noisy["actions"] = torch.where(off, torch.full_like(batch["actions"], -100), batch["actions"])
    noisy["dones"] = torch.where(off, 1 - batch["dones"], batch["dones"])
    vs = batch["vs"].clone()
    vs[:, :T] = big(vs[:, :T])
    if vs_extra:  # V after the last action: only used to bootstrap a non-terminal last step
        vs[:, T] = 1e6
    noisy["vs"] = vs
    loss2, _ = ilql_loss(**noisy, gamma=gamma, tau=tau)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(**shapes)
def test_ilql_v_target_is_min_over_target_heads(seed, B, T, V, n_heads, vs_extra, gamma, tau):
    batch = _random_batch(seed, B, T, V, 2, vs_extra)
    _, stats = ilql_loss(**batch, gamma=gamma, tau=tau)
    lo = torch.minimum(*batch["target_qs"])
    hi = torch.maximum(*batch["target_qs"])
    _, with_min = ilql_loss(**{**batch, "target_qs": (lo,)}, gamma=gamma, tau=tau)
    assert stats["loss/v"].item() == pytest.approx(with_min["loss/v"].item(), rel=1e-12, abs=1e-12)
    # the target heads feed nothing but the V loss (AWAC weight is 1 at awac_beta = 0)
    _, with_max = ilql_loss(**{**batch, "target_qs": (hi, hi)}, gamma=gamma, tau=tau)
    for k in ("loss/q", "loss/cql", "loss/awac"):
        assert stats[k].item() == with_max[k].item()


def test_ilql_empty_mask_is_zero():
    batch = _random_batch(3, 2, 4, 5, 2, 0)
    batch["mask"] = torch.zeros_like(batch["mask"])
    loss, _ = ilql_loss(**batch)
    assert loss.item() == 0.0


def test_ilql_end_to_end_tiny_model():
    """Tiny LM + ILQL heads: finite loss, gradients reach body and online heads, not targets."""
    from ankus import load_model

    model, _ = load_model("tiny-gpt2", seed=0)
    cfg = model.config
    heads = ILQLHeads(cfg.hidden_size, cfg.vocab_size, two_qs=True, alpha=0.001)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
    out = model(ids, output_hidden_states=True)
    hs = out.hidden_states[-1][:, :-1]  # (2, 5, H): states before each action
    qs, target_qs, vs = heads(hs)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]])
    dones = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 1, 0]])
    rewards = torch.tensor([[0, 0, 0, 0, 1.0], [0, 0, 0, -1.0, 0]])
    loss, stats = ilql_loss(out.logits[:, :-1], qs, target_qs, vs, ids[:, 1:], rewards, dones, mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.transformer.wte.weight.grad is not None
    assert all(p.grad is not None for p in heads.q_heads.parameters())
    assert all(p.grad is None for p in heads.target_q_heads.parameters())
    assert stats["loss/awac"].item() == pytest.approx(math.log(cfg.vocab_size), rel=0.1)  # random init


# ---------------------------------------------------------------- sampling


def test_sample_scores_by_hand():
    logits = torch.zeros(1, 2, dtype=D)  # log_softmax = [−log 2, −log 2]
    qs_min = torch.tensor([[1.0, 3.0]], dtype=D)
    vs = torch.tensor([2.0], dtype=D)
    # β = 0.5: β(Q − V) = [−0.5, 0.5]
    out = ilql_sample_scores(logits, qs_min, vs, beta=0.5)
    assert out[0].tolist() == pytest.approx([-math.log(2) - 0.5, -math.log(2) + 0.5])
    # β = 0 gives the LM's log-probs; the softmax of the scores is π_LM·exp(β·A), normalised
    assert ilql_sample_scores(logits, qs_min, vs, beta=0.0)[0].tolist() == pytest.approx([-math.log(2)] * 2)
    probs = torch.softmax(ilql_sample_scores(logits, qs_min, vs, beta=1.0), -1)
    assert probs[0].tolist() == pytest.approx([1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)])
    # bf16 in, float32 out
    assert ilql_sample_scores(logits.bfloat16(), qs_min.bfloat16(), vs.bfloat16(), 1.0).dtype == torch.float32


def test_topk_mask_by_hand():
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0], [0.0, -1.0, 5.0, 4.0]])
    ninf = float("-inf")
    assert topk_mask(x, 1).tolist() == [[ninf, 3.0, ninf, 3.0], [ninf, ninf, 5.0, ninf]]  # ties kept
    assert topk_mask(x, 2).tolist() == [[ninf, 3.0, ninf, 3.0], [ninf, ninf, 5.0, 4.0]]
    assert topk_mask(x, 3).tolist() == [[ninf, 3.0, 2.0, 3.0], [0.0, ninf, 5.0, 4.0]]
    assert torch.equal(topk_mask(x, 0), x) and torch.equal(topk_mask(x, 4), x)


def test_ilql_precomputed_lm_ce_equals_logits():
    torch.manual_seed(7)
    B, T, V = 2, 4, 6
    logits = torch.randn(B, T, V)
    qs = [torch.randn(B, T, V) for _ in range(2)]
    tqs = [torch.randn(B, T, V) for _ in range(2)]
    vs, actions = torch.randn(B, T + 1), torch.randint(0, V, (B, T))
    rewards, dones = torch.zeros(B, T), torch.zeros(B, T)
    rewards[:, -1], dones[:, -1] = torch.tensor([0.5, -1.0]), 1
    mask = torch.ones(B, T)
    mask[0, 0] = 0
    ce = -torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]
    a, sa = ilql_loss(logits, qs, tqs, vs, actions, rewards, dones, mask, awac_beta=0.5)
    b, sb = ilql_loss(None, qs, tqs, vs, actions, rewards, dones, mask, awac_beta=0.5, lm_ce=ce)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(sa["loss/awac"], sb["loss/awac"])


def test_ilql_q_at_the_taken_tokens_only():
    # (B, T) Q values at the data tokens give the same loss (without CQL) as the full (B, T, V)
    torch.manual_seed(8)
    B, T, V = 2, 3, 5
    logits, vs = torch.randn(B, T, V), torch.randn(B, T + 1)
    qs = [torch.randn(B, T, V, requires_grad=True) for _ in range(2)]
    tqs = [torch.randn(B, T, V) for _ in range(2)]
    actions = torch.randint(0, V, (B, T))
    rewards, dones, mask = torch.zeros(B, T), torch.zeros(B, T), torch.ones(B, T)
    rewards[:, -1], dones[:, -1] = 1.0, 1
    at = lambda q: q.gather(-1, actions[..., None])[..., 0]  # noqa: E731
    full, s_full = ilql_loss(logits, qs, tqs, vs, actions, rewards, dones, mask, cql_scale=0.0)
    taken, s_taken = ilql_loss(logits, [at(q) for q in qs], [at(q) for q in tqs], vs, actions, rewards, dones, mask,
                               cql_scale=0.0)
    torch.testing.assert_close(full, taken)
    assert "loss/cql" in s_full and "loss/cql" not in s_taken
    g_full = torch.autograd.grad(full, qs)
    g_taken = torch.autograd.grad(taken, qs)
    for a, b in zip(g_full, g_taken):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="CQL"):
        ilql_loss(logits, [at(q) for q in qs], tqs, vs, actions, rewards, dones, mask, cql_scale=0.1)
