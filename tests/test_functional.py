"""Unit tests for unlearn_search.methods.functional on tiny hand-made logits.

Expected values are computed independently of the code under test: plain Python loops over
``tolist()`` values with ``math.exp``/``math.log``, never by calling the function being checked.
"""

from __future__ import annotations

import math

import pytest
import torch

from unlearn_search.methods import functional as F

B, T, V = 2, 4, 5
IGN = -100

# Row 0: prompt token, two answer tokens, one padding position. Row 1: two prompt tokens, one
# answer token, one padding position. Unequal counts (2 vs 1) make the token mean and the row
# mean differ, so the tests can tell the conventions apart.
LABELS = torch.tensor([[IGN, 2, 4, IGN], [IGN, IGN, 1, IGN]])
# (row, shifted position, label) of every scored token: logits[b, t] predict labels[b, t + 1].
SCORED = [(0, 0, 2), (0, 1, 4), (1, 1, 1)]
UNSCORED = [(0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]  # (row, logit position) never used


def make_logits(seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=gen) * 2.0).to(dtype)


# ---- independent reference implementations (pure Python) --------------------------------------


def log_softmax_list(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def hand_logp(logits: torch.Tensor, b: int, t: int, v: int) -> float:
    return log_softmax_list(logits[b, t].tolist())[v]


def hand_kl(ref_row: list[float], student_row: list[float]) -> float:
    lr, ls = log_softmax_list(ref_row), log_softmax_list(student_row)
    return sum(math.exp(a) * (a - b) for a, b in zip(lr, ls))


# ---- shift / token_logprobs ---------------------------------------------------------------------


def test_shift_pairs_logit_t_with_label_t_plus_1():
    logits = make_logits(0)
    s_logits, s_labels = F.shift(logits, LABELS)
    assert s_logits.shape == (B, T - 1, V) and s_labels.shape == (B, T - 1)
    assert torch.equal(s_logits[:, 0], logits[:, 0]) and torch.equal(s_logits[:, -1], logits[:, T - 2])
    assert s_labels.tolist() == [[2, 4, IGN], [IGN, 1, IGN]]


def test_token_logprobs_values_and_mask():
    logits = make_logits(1)
    logp, mask = F.token_logprobs(logits, LABELS)
    assert logp.shape == (B, T - 1)
    assert mask.tolist() == [[True, True, False], [False, True, False]]
    for b, t, v in SCORED:
        assert logp[b, t].item() == pytest.approx(hand_logp(logits, b, t, v), abs=1e-10)
    assert logp[0, 2].item() == 0.0 and logp[1, 0].item() == 0.0 and logp[1, 2].item() == 0.0
    assert (logp[mask] < 0).all()


def test_token_logprobs_ignores_unscored_positions_but_not_scored_ones():
    logits = make_logits(2)
    base, _ = F.token_logprobs(logits, LABELS)
    noisy = logits.clone()
    for b, t in UNSCORED:
        noisy[b, t] += torch.tensor([9.0, -7.0, 3.0, 11.0, -5.0], dtype=logits.dtype)
    after, _ = F.token_logprobs(noisy, LABELS)
    assert torch.equal(base, after)
    changed = logits.clone()
    changed[1, 1, 0] += 3.0  # a scored position: the value must move
    moved, _ = F.token_logprobs(changed, LABELS)
    assert moved[1, 1].item() != pytest.approx(base[1, 1].item())


def test_token_logprobs_masked_position_with_minus_inf_logit_is_not_nan():
    logits = make_logits(3)
    logits[0, 2, 0] = -math.inf  # the placeholder id used under the mask
    logp, _ = F.token_logprobs(logits, LABELS)
    assert torch.isfinite(logp).all()


# ---- sequence_logprob ----------------------------------------------------------------------------


def test_sequence_logprob_sum_and_length_normalized():
    logits = make_logits(4)
    row0 = hand_logp(logits, 0, 0, 2) + hand_logp(logits, 0, 1, 4)
    row1 = hand_logp(logits, 1, 1, 1)
    total = F.sequence_logprob(logits, LABELS)
    mean = F.sequence_logprob(logits, LABELS, normalize=True)
    assert total.tolist() == pytest.approx([row0, row1], abs=1e-10)
    assert mean.tolist() == pytest.approx([row0 / 2, row1 / 1], abs=1e-10)
    assert (total < 0).all()


def test_sequence_logprob_row_without_scored_tokens_gives_zero():
    logits = make_logits(5)
    labels = LABELS.clone()
    labels[1] = IGN
    for normalize in (False, True):
        out = F.sequence_logprob(logits, labels, normalize=normalize)
        assert out[1].item() == 0.0
        assert torch.isfinite(out).all()


# ---- cross_entropy -------------------------------------------------------------------------------


def test_cross_entropy_is_token_mean_over_batch():
    logits = make_logits(6)
    nlls = [-hand_logp(logits, b, t, v) for b, t, v in SCORED]
    expected = sum(nlls) / 3  # 3 scored tokens in the batch, not the mean of 2 row means
    row_mean_average = ((nlls[0] + nlls[1]) / 2 + nlls[2]) / 2
    assert abs(expected - row_mean_average) > 1e-3  # the two conventions really differ here
    got = F.cross_entropy(logits, LABELS)
    assert got.dim() == 0 and got.item() > 0
    assert got.item() == pytest.approx(expected, abs=1e-10)
    # and the same as torch's own ignore_index cross-entropy on the shifted pair
    torch_ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), LABELS[:, 1:].reshape(-1), ignore_index=IGN
    )
    assert got.item() == pytest.approx(torch_ce.item(), abs=1e-10)


def test_cross_entropy_with_weights_is_weighted_row_means_over_batch():
    logits = make_logits(7)
    row0 = -(hand_logp(logits, 0, 0, 2) + hand_logp(logits, 0, 1, 4)) / 2
    row1 = -hand_logp(logits, 1, 1, 1)
    weights = torch.tensor([0.5, -1.0])
    got = F.cross_entropy(logits, LABELS, weights=weights)
    assert got.item() == pytest.approx((0.5 * row0 - 1.0 * row1) / 2, abs=1e-10)


def test_cross_entropy_weight_minus_one_is_gradient_ascent_on_that_row():
    base = make_logits(8)
    grads = {}
    for w in (1.0, -1.0, 0.0):
        logits = base.clone().requires_grad_(True)
        F.cross_entropy(logits, LABELS, weights=torch.tensor([1.0, w])).backward()
        grads[w] = logits.grad.clone()
    assert grads[1.0][1].abs().sum() > 0
    torch.testing.assert_close(grads[-1.0][1], -grads[1.0][1])
    torch.testing.assert_close(grads[-1.0][0], grads[1.0][0])  # the other row is untouched
    assert grads[0.0][1].abs().sum() == 0


def test_cross_entropy_nothing_scored_is_zero_not_nan():
    logits = make_logits(9)
    labels = torch.full((B, T), IGN)
    assert F.cross_entropy(logits, labels).item() == 0.0
    assert F.cross_entropy(logits, labels, weights=torch.tensor([1.0, -1.0])).item() == 0.0


# ---- kl_full -------------------------------------------------------------------------------------


def test_kl_full_matches_hand_computation():
    student, ref_logits = make_logits(10), make_logits(11)
    ref_logprobs = torch.log_softmax(ref_logits, -1)
    expected = sum(hand_kl(ref_logits[b, t].tolist(), student[b, t].tolist()) for b, t, _ in SCORED) / 3
    got = F.kl_full(student, ref_logprobs, LABELS)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, abs=1e-10)


def test_kl_full_direction_is_reference_to_student():
    student, ref_logits = make_logits(12), make_logits(13)
    ref_logprobs = torch.log_softmax(ref_logits, -1)
    forward = sum(hand_kl(ref_logits[b, t].tolist(), student[b, t].tolist()) for b, t, _ in SCORED) / 3
    reverse = sum(hand_kl(student[b, t].tolist(), ref_logits[b, t].tolist()) for b, t, _ in SCORED) / 3
    assert abs(forward - reverse) > 1e-3
    assert F.kl_full(student, ref_logprobs, LABELS).item() == pytest.approx(forward, abs=1e-10)


def test_kl_full_zero_for_identical_and_positive_otherwise():
    logits = make_logits(14)
    assert F.kl_full(logits, torch.log_softmax(logits, -1), LABELS).item() == pytest.approx(0.0, abs=1e-12)
    assert F.kl_full(logits, torch.log_softmax(make_logits(15), -1), LABELS).item() > 0


def test_kl_full_ignores_unscored_positions():
    student, ref_logits = make_logits(16), make_logits(17)
    base = F.kl_full(student, torch.log_softmax(ref_logits, -1), LABELS)
    s2, r2 = student.clone(), ref_logits.clone()
    for b, t in UNSCORED:
        s2[b, t] = torch.tensor([10.0, -10.0, 0.0, 5.0, -3.0], dtype=s2.dtype)
        r2[b, t] = torch.tensor([-8.0, 9.0, 1.0, -2.0, 4.0], dtype=r2.dtype)
    after = F.kl_full(s2, torch.log_softmax(r2, -1), LABELS)
    assert after.item() == pytest.approx(base.item(), abs=1e-12)


def test_kl_full_zero_reference_probability_entries_are_finite():
    student = make_logits(18)
    ref_logits = make_logits(19)
    ref_logits[:, :, 3] = -math.inf  # the reference rules a token out entirely
    ref_logprobs = torch.log_softmax(ref_logits, -1)
    expected = 0.0
    for b, t, _ in SCORED:
        lr = log_softmax_list([x for x in ref_logits[b, t].tolist() if x != -math.inf])
        lr.insert(3, None)
        ls = log_softmax_list(student[b, t].tolist())
        expected += sum(math.exp(a) * (a - c) for a, c in zip(lr, ls) if a is not None)
    got = F.kl_full(student.requires_grad_(True), ref_logprobs, LABELS)
    assert got.item() == pytest.approx(expected / 3, abs=1e-10)
    got.backward()
    assert torch.isfinite(student.grad).all()


# ---- topk_reference / kl_topk --------------------------------------------------------------------


def test_topk_reference_keeps_largest_log_probs_in_order():
    ref_logits = make_logits(20)
    ids, logprobs = F.topk_reference(ref_logits, 2)
    assert ids.shape == (B, T, 2) and logprobs.shape == (B, T, 2)
    for b in range(B):
        for t in range(T):
            lp = log_softmax_list(ref_logits[b, t].tolist())
            order = sorted(range(V), key=lambda v: -lp[v])[:2]
            assert ids[b, t].tolist() == order
            assert logprobs[b, t].tolist() == pytest.approx([lp[v] for v in order], abs=1e-10)


def test_kl_topk_equals_kl_full_when_k_is_vocab():
    student, ref_logits = make_logits(21), make_logits(22)
    ids, logprobs = F.topk_reference(ref_logits, V)
    full = F.kl_full(student, torch.log_softmax(ref_logits, -1), LABELS)
    topk = F.kl_topk(student, ids, logprobs, LABELS)
    assert topk.item() == pytest.approx(full.item(), abs=1e-10)


def test_kl_topk_equals_kl_full_when_k_is_vocab_in_float32():
    # In float32 the K kept reference probabilities often sum to 1 - 1e-7 rather than 1; that
    # rounding must not be read as reference mass outside the (empty) remainder bucket.
    for seed in range(10):
        student, ref_logits = make_logits(100 + seed, torch.float32), make_logits(200 + seed, torch.float32)
        ids, logprobs = F.topk_reference(ref_logits, V)
        full = F.kl_full(student, torch.log_softmax(ref_logits, -1), LABELS)
        topk = F.kl_topk(student, ids, logprobs, LABELS)
        assert topk.item() == pytest.approx(full.item(), abs=1e-5)


def test_kl_topk_student_confident_on_kept_ids_float32():
    # The student puts all but ~1e-12 of its mass on the kept ids while the reference leaves 10%
    # outside them: 1 - sum(student kept) rounds to 0 in float32, but log S must stay accurate
    # because the remainder term R log(R / S) is large.
    ref_row = [math.log(0.6), math.log(0.3), math.log(0.05), math.log(0.03), math.log(0.02)]
    student_row = [30.0, 29.0, 0.0, 0.0, 0.0]
    ref_logits = torch.tensor(ref_row).expand(B, T, V).clone()
    student = torch.tensor(student_row).expand(B, T, V).clone().requires_grad_(True)
    ids, logprobs = F.topk_reference(ref_logits, 2)
    loss = F.kl_topk(student, ids, logprobs, LABELS)
    loss.backward()
    lr, ls = log_softmax_list(ref_row), log_softmax_list(student_row)
    expected = sum(math.exp(lr[v]) * (lr[v] - ls[v]) for v in (0, 1))
    r_rest = sum(math.exp(lr[v]) for v in (2, 3, 4))
    s_rest = sum(math.exp(ls[v]) for v in (2, 3, 4))
    expected += r_rest * math.log(r_rest / s_rest)
    assert expected > 1.0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(student.grad).all()


def test_kl_topk_matches_hand_bucketed_kl():
    student, ref_logits = make_logits(23), make_logits(24)
    k = 2
    ids, logprobs = F.topk_reference(ref_logits, k)
    expected = 0.0
    for b, t, _ in SCORED:
        lr = log_softmax_list(ref_logits[b, t].tolist())
        ls = log_softmax_list(student[b, t].tolist())
        kept = sorted(range(V), key=lambda v: -lr[v])[:k]
        value = sum(math.exp(lr[v]) * (lr[v] - ls[v]) for v in kept)
        r_rest = 1.0 - sum(math.exp(lr[v]) for v in kept)
        s_rest = 1.0 - sum(math.exp(ls[v]) for v in kept)
        value += r_rest * math.log(r_rest / s_rest)
        expected += value
    got = F.kl_topk(student, ids, logprobs, LABELS)
    assert got.item() == pytest.approx(expected / 3, abs=1e-10)
    # bucketing can only lose information: never above the full KL, and not trivially zero
    full = F.kl_full(student, torch.log_softmax(ref_logits, -1), LABELS).item()
    assert 0 < got.item() <= full + 1e-12


def test_kl_topk_ignores_unscored_positions():
    student, ref_logits = make_logits(25), make_logits(26)
    ids, logprobs = F.topk_reference(ref_logits, 3)
    base = F.kl_topk(student, ids, logprobs, LABELS)
    s2 = student.clone()
    for b, t in UNSCORED:
        s2[b, t] = torch.tensor([10.0, -10.0, 0.0, 5.0, -3.0], dtype=s2.dtype)
    assert F.kl_topk(s2, ids, logprobs, LABELS).item() == pytest.approx(base.item(), abs=1e-12)


@pytest.mark.parametrize("k", [2, V])
def test_kl_topk_is_finite_for_peaked_float32_distributions(k):
    # The reference puts all but ~1e-17 of its mass on one token, so 1 - sum(kept) cancels to 0
    # in float32: the regime the log1p/logsumexp forms and the K = V branch are for.
    ref_logits = torch.zeros(B, T, V)
    ref_logits[..., 0] = 40.0
    student = torch.zeros(B, T, V)
    student[..., 0] = 5.0
    student.requires_grad_(True)
    ids, logprobs = F.topk_reference(ref_logits, k)
    loss = F.kl_topk(student, ids, logprobs, LABELS)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()
    # Hand value in double: every scored position is the same, so one position suffices.
    lr = log_softmax_list([40.0, 0.0, 0.0, 0.0, 0.0])
    ls = log_softmax_list([5.0, 0.0, 0.0, 0.0, 0.0])
    kept = [0, 1] if k == 2 else list(range(V))
    expected = sum(math.exp(lr[v]) * (lr[v] - ls[v]) for v in kept)
    r_rest = sum(math.exp(lr[v]) for v in range(V) if v not in kept)
    s_rest = sum(math.exp(ls[v]) for v in range(V) if v not in kept)
    if r_rest > 0:
        expected += r_rest * math.log(r_rest / s_rest)
    assert expected > 1e-3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---- NPO / SimNPO --------------------------------------------------------------------------------


def test_npo_loss_matches_hand_formula():
    student = torch.tensor([-3.0, -1.5], dtype=torch.float64)
    reference = torch.tensor([-2.0, -2.5], dtype=torch.float64)
    beta = 0.5
    # -(2/beta) * log sigmoid(-beta * d) = (2/beta) * log(1 + exp(beta * d))
    per = [(2 / beta) * math.log(1 + math.exp(beta * (s - r))) for s, r in zip(student.tolist(), reference.tolist())]
    assert F.npo_loss(student, reference, beta).item() == pytest.approx(sum(per) / 2, abs=1e-12)


def test_dpo_loss_matches_hand_formula_and_is_npo_without_the_chosen_side():
    chosen, chosen_ref = (
        torch.tensor([-2.0, -4.0], dtype=torch.float64),
        torch.tensor([-3.0, -3.5], dtype=torch.float64),
    )
    rejected = torch.tensor([-1.0, -6.0], dtype=torch.float64)
    rejected_ref = torch.tensor([-1.5, -5.0], dtype=torch.float64)
    beta = 0.5
    # -(2/beta) log sigmoid(beta * margin) = (2/beta) log(1 + exp(-beta * margin))
    margins = [
        (c - cr) - (r - rr) for c, cr, r, rr in zip(*(t.tolist() for t in (chosen, chosen_ref, rejected, rejected_ref)))
    ]
    per = [(2 / beta) * math.log(1 + math.exp(-beta * m)) for m in margins]
    assert F.dpo_loss(chosen, chosen_ref, rejected, rejected_ref, beta).item() == pytest.approx(sum(per) / 2, abs=1e-12)
    same = F.dpo_loss(chosen_ref, chosen_ref, rejected, rejected_ref, beta).item()
    assert same == pytest.approx(F.npo_loss(rejected, rejected_ref, beta).item(), abs=1e-12)


def test_dpo_raises_the_chosen_and_lowers_the_rejected_likelihood():
    chosen = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    F.dpo_loss(chosen, chosen.detach(), rejected, rejected.detach(), beta=1.0).backward()
    # At the reference the margin is 0: d/dc = -(2/beta) * beta * sigmoid(0) = -1, d/dr = +1.
    assert chosen.grad.item() == pytest.approx(-1.0) and rejected.grad.item() == pytest.approx(1.0)


def test_npo_pushes_student_likelihood_down_like_ga_at_start():
    student = torch.tensor([-4.0, -7.0], dtype=torch.float64, requires_grad=True)
    reference = student.detach().clone()
    loss = F.npo_loss(student, reference, beta=0.1)
    loss.backward()
    # d/ds of (2/beta) log(1 + e^{beta (s - r)}) / B = 2 sigmoid(beta (s - r)) / B = 1/B at s = r
    assert student.grad.tolist() == pytest.approx([0.5, 0.5], abs=1e-12)
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2), abs=1e-12)


def test_npo_gradient_shrinks_once_student_is_below_reference():
    reference = torch.tensor([-2.0], dtype=torch.float64)
    grads = []
    for s in (-2.0, -12.0):
        student = torch.tensor([s], dtype=torch.float64, requires_grad=True)
        F.npo_loss(student, reference, beta=0.5).backward()
        grads.append(student.grad.item())
    assert grads[0] > grads[1] > 0


def test_simnpo_loss_matches_hand_formula():
    mean_logp = torch.tensor([-0.8, -2.2], dtype=torch.float64)
    beta, gamma = 2.5, 0.7
    # -(2/beta) * log sigmoid(-beta * m - gamma) = (2/beta) * log(1 + exp(beta * m + gamma))
    per = [(2 / beta) * math.log(1 + math.exp(beta * m + gamma)) for m in mean_logp.tolist()]
    assert F.simnpo_loss(mean_logp, beta, gamma).item() == pytest.approx(sum(per) / 2, abs=1e-12)


def test_simnpo_gradient_lowers_likelihood():
    mean_logp = torch.tensor([-0.5, -3.0], requires_grad=True)
    F.simnpo_loss(mean_logp, beta=2.5, gamma=0.0).backward()
    assert (mean_logp.grad > 0).all()


# ---- WGA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5])
def test_wga_loss_matches_hand_formula(beta):
    logits = make_logits(31)
    # -(1/N) sum_t p_t^beta * NLL_t = (1/N) sum_t p_t^beta * log p_t over the scored tokens
    logps = [hand_logp(logits, b, t, v) for b, t, v in SCORED]
    expected = sum(math.exp(lp) ** beta * lp for lp in logps) / len(SCORED)
    assert F.wga_loss(logits, LABELS, beta).item() == pytest.approx(expected, abs=1e-12)
    if beta == 0.0:  # no weighting: plain gradient ascent
        assert F.wga_loss(logits, LABELS, 0.0).item() == pytest.approx(-F.cross_entropy(logits, LABELS).item())


def test_wga_weights_carry_no_gradient_and_ascent_lowers_likelihood():
    logits = make_logits(32).requires_grad_(True)
    F.wga_loss(logits, LABELS, 1.0).backward()
    # d/dz of sg[p] * log p: sg[p] * (onehot - softmax), the weight detached; descent lowers log p.
    for b, t, v in SCORED:
        probs = torch.softmax(logits[b, t].detach(), -1)
        onehot = torch.zeros_like(probs)
        onehot[v] = 1.0
        expected = probs[v] * (onehot - probs) / len(SCORED)
        assert torch.allclose(logits.grad[b, t], expected, atol=1e-12)
        assert logits.grad[b, t, v] > 0  # a step against the gradient lowers the label's logit


# ---- mean_token_prob / FLAT ---------------------------------------------------------------------


def test_mean_token_prob_matches_hand_and_empty_row_is_zero():
    logits = make_logits(27)
    row0 = (math.exp(hand_logp(logits, 0, 0, 2)) + math.exp(hand_logp(logits, 0, 1, 4))) / 2
    row1 = math.exp(hand_logp(logits, 1, 1, 1))
    assert F.mean_token_prob(logits, LABELS).tolist() == pytest.approx([row0, row1], abs=1e-10)
    labels = LABELS.clone()
    labels[0] = IGN
    out = F.mean_token_prob(logits, labels)
    assert out[0].item() == 0.0 and out[1].item() == pytest.approx(row1, abs=1e-10)


# f-GAN table (Nowozin et al. 2016), written out independently of the module.
HAND_G = {
    "kl": lambda v: v,
    "js": lambda v: math.log(2) - math.log(1 + math.exp(-v)),
    "tv": lambda v: 0.5 * math.tanh(v),
    "pearson": lambda v: v,
}
HAND_F_STAR = {
    "kl": lambda t: math.exp(t - 1),
    "js": lambda t: -math.log(2 - math.exp(t)),
    "tv": lambda t: t,
    "pearson": lambda t: t * t / 4 + t,
}


@pytest.mark.parametrize("divergence", ["kl", "js", "tv", "pearson"])
def test_flat_loss_matches_hand_formula(divergence):
    p_e = torch.tensor([0.3, 0.6], dtype=torch.float64)
    p_f = torch.tensor([0.5, 0.2], dtype=torch.float64)
    g, f_star = HAND_G[divergence], HAND_F_STAR[divergence]
    per = [-g(e) + f_star(g(f)) for e, f in zip(p_e.tolist(), p_f.tolist())]
    assert F.flat_loss(p_e, p_f, divergence).item() == pytest.approx(sum(per) / 2, abs=1e-12)


@pytest.mark.parametrize("divergence", ["kl", "js", "tv", "pearson"])
def test_flat_loss_raises_template_and_lowers_forget_probability(divergence):
    p_e = torch.tensor([0.3, 0.6], requires_grad=True)
    p_f = torch.tensor([0.5, 0.2], requires_grad=True)
    F.flat_loss(p_e, p_f, divergence).backward()
    assert (p_e.grad < 0).all()  # gradient descent increases the template probability
    assert (p_f.grad > 0).all()  # and decreases the forget probability


def test_flat_loss_unknown_divergence_names_the_allowed_ones():
    with pytest.raises(ValueError) as err:
        F.flat_loss(torch.tensor([0.5]), torch.tensor([0.5]), "hellinger")
    for name in ("kl", "js", "tv", "pearson"):
        assert repr(name)[1:-1] in str(err.value)
    assert "hellinger" in str(err.value)


def test_flat_from_logits_end_to_end():
    template_logits, forget_logits = make_logits(28), make_logits(29)
    p_e = F.mean_token_prob(template_logits, LABELS)
    p_f = F.mean_token_prob(forget_logits, LABELS)
    expected = (
        sum(-HAND_G["js"](e) + HAND_F_STAR["js"](HAND_G["js"](f)) for e, f in zip(p_e.tolist(), p_f.tolist())) / 2
    )
    assert F.flat_loss(p_e, p_f, "js").item() == pytest.approx(expected, abs=1e-12)


# ---- adversarial_targets -------------------------------------------------------------------------


def test_adversarial_targets_are_the_most_likely_wrong_tokens():
    logits = make_logits(30)
    # Make the true label the argmax at one scored position, so "other than the label" matters.
    logits[0, 0, 2] = 20.0
    labels = LABELS.clone()
    out = F.adversarial_targets(logits, labels)
    assert out.shape == labels.shape and out.dtype == labels.dtype
    expected = labels.tolist()
    for b, t, v in SCORED:
        row = logits[b, t].tolist()
        expected[b][t + 1] = max((i for i in range(V) if i != v), key=lambda i: row[i])
    assert out.tolist() == expected
    assert out[0, 1].item() != 2  # the label was the model's top token there
    for b, t, v in SCORED:
        assert out[b, t + 1].item() != v
    assert (out[labels == IGN] == IGN).all()
    assert torch.equal(labels, LABELS)  # input not modified


def test_adversarial_targets_feed_cross_entropy_in_unshifted_layout():
    logits = make_logits(31)
    targets = F.adversarial_targets(logits, LABELS)
    expected = 0.0
    for b, t, v in SCORED:
        lp = log_softmax_list(logits[b, t].tolist())
        wrong = max((i for i in range(V) if i != v), key=lambda i: lp[i])
        expected += -lp[wrong]
    assert F.cross_entropy(logits, targets).item() == pytest.approx(expected / 3, abs=1e-10)


def test_adversarial_targets_carry_no_gradient():
    logits = make_logits(32).requires_grad_(True)
    out = F.adversarial_targets(logits, LABELS)
    assert not out.requires_grad


# ---- SatImp -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta1", "beta2"), [(5.0, 1.0), (1.0, 0.0), (0.0, 2.0)])
def test_satimp_loss_matches_hand_formula(beta1, beta2):
    logits = make_logits(33)
    # (1/N) sum_t p_t^beta1 (1 - p_t)^beta2 * log p_t over the scored tokens
    logps = [hand_logp(logits, b, t, v) for b, t, v in SCORED]
    weight = [math.exp(lp) ** beta1 * (1 - math.exp(lp)) ** beta2 for lp in logps]
    expected = sum(w * lp for w, lp in zip(weight, logps)) / len(SCORED)
    assert F.satimp_loss(logits, LABELS, beta1, beta2).item() == pytest.approx(expected, abs=1e-12)
    if beta2 == 0.0:  # no importance weight: WGA
        assert F.satimp_loss(logits, LABELS, beta1, 0.0).item() == pytest.approx(
            F.wga_loss(logits, LABELS, beta1).item()
        )


def test_satimp_weights_carry_no_gradient():
    logits = make_logits(34).requires_grad_(True)
    F.satimp_loss(logits, LABELS, 2.0, 1.0).backward()
    for b, t, v in SCORED:
        probs = torch.softmax(logits[b, t].detach(), -1)
        p = probs[v].item()
        onehot = torch.zeros_like(probs)
        onehot[v] = 1.0
        expected = p**2 * (1 - p) * (onehot - probs) / len(SCORED)
        torch.testing.assert_close(logits.grad[b, t], expected, atol=1e-12, rtol=0)


# ---- UNDIAL -------------------------------------------------------------------------------------


def hand_undial(ref_row: list[float], student_row: list[float], label: int, beta: float) -> float:
    """CE(softmax(ref - beta * onehot(label)), softmax(student)) at one position."""
    lowered = [x - beta * (i == label) for i, x in enumerate(ref_row)]
    target = [math.exp(v) for v in log_softmax_list(lowered)]
    return -sum(q * s for q, s in zip(target, log_softmax_list(student_row)))


@pytest.mark.parametrize("beta", [0.0, 1.0, 10.0])
def test_undial_loss_matches_hand_formula(beta):
    student, ref = make_logits(35), make_logits(36)
    expected = sum(hand_undial(ref[b, t].tolist(), student[b, t].tolist(), v, beta) for b, t, v in SCORED)
    ref_logprobs = torch.log_softmax(ref, -1)
    assert F.undial_loss(student, ref_logprobs, LABELS, beta).item() == pytest.approx(expected / 3, abs=1e-12)
    if beta == 0.0:  # plain distillation: the cross-entropy is the KL plus the reference's entropy
        entropy = sum(-sum(math.exp(a) * a for a in log_softmax_list(ref[b, t].tolist())) for b, t, _ in SCORED) / 3
        kl = F.kl_full(student, ref_logprobs, LABELS).item()
        assert F.undial_loss(student, ref_logprobs, LABELS, 0.0).item() == pytest.approx(kl + entropy, abs=1e-12)


def hand_undial_buckets(ref_row, student_row, label, beta, kept):
    """The top-k form by hand: buckets are each kept id but the label, the label, and the rest."""
    ref_p = [math.exp(v) for v in log_softmax_list(ref_row)]
    student_p = [math.exp(v) for v in log_softmax_list(student_row)]
    others = [i for i in kept if i != label]
    rest = [i for i in range(len(ref_row)) if i not in others and i != label]
    q = [ref_p[i] for i in others] + [ref_p[label] * math.exp(-beta)] + [sum(ref_p[i] for i in rest)] * bool(rest)
    s = [student_p[i] for i in others] + [student_p[label]] + [sum(student_p[i] for i in rest)] * bool(rest)
    return -sum(qi * math.log(si) for qi, si in zip(q, s)) / sum(q)


@pytest.mark.parametrize("k", [1, 2, 3, V])
def test_undial_topk_is_the_bucketed_cross_entropy_and_exact_at_full_vocabulary(k):
    student, ref = make_logits(37), make_logits(38)
    ids, top = F.topk_reference(ref, k)
    label_logprobs, _ = F.token_logprobs(ref, LABELS)
    value = F.undial_loss_topk(student, ids, top, label_logprobs, LABELS, 2.0).item()
    expected = sum(
        hand_undial_buckets(ref[b, t].tolist(), student[b, t].tolist(), v, 2.0, ids[b, t].tolist())
        for b, t, v in SCORED
    )
    assert value == pytest.approx(expected / 3, abs=1e-10)
    if k == V:
        assert value == pytest.approx(F.undial_loss(student, torch.log_softmax(ref, -1), LABELS, 2.0).item(), abs=1e-10)


def test_undial_lowers_the_forget_token_and_keeps_the_rest_of_the_distribution():
    # Starting from the reference itself, one descent step moves mass off the label and onto the others.
    ref = make_logits(39)
    student = ref.clone().requires_grad_(True)
    F.undial_loss(student, torch.log_softmax(ref, -1), LABELS, 5.0).backward()
    for b, t, v in SCORED:
        assert student.grad[b, t, v] > 0  # descent lowers the label's logit
        assert (student.grad[b, t, [i for i in range(V) if i != v]] <= 0).all()


# ---- gradients reach the student logits ----------------------------------------------------------


def _all_losses(student: torch.Tensor) -> dict[str, torch.Tensor]:
    ref_logits = make_logits(40)
    ref_logprobs = torch.log_softmax(ref_logits, -1)
    ids, top = F.topk_reference(ref_logits, 2)
    seq = F.sequence_logprob(student, LABELS)
    mean = F.sequence_logprob(student, LABELS, normalize=True)
    prob = F.mean_token_prob(student, LABELS)
    return {
        "cross_entropy": F.cross_entropy(student, LABELS),
        "cross_entropy_weighted": F.cross_entropy(student, LABELS, weights=torch.tensor([1.0, -1.0])),
        "kl_full": F.kl_full(student, ref_logprobs, LABELS),
        "kl_topk": F.kl_topk(student, ids, top, LABELS),
        "npo": F.npo_loss(seq, F.sequence_logprob(ref_logits, LABELS), 0.1),
        "simnpo": F.simnpo_loss(mean, 2.5, 0.0),
        "flat": F.flat_loss(prob, prob.flip(0), "kl"),
        "adversarial_ce": F.cross_entropy(student, F.adversarial_targets(student, LABELS)),
        "wga": F.wga_loss(student, LABELS, 1.0),
        "satimp": F.satimp_loss(student, LABELS, 2.0, 1.0),
        "undial": F.undial_loss(student, ref_logprobs, LABELS, 3.0),
        "undial_topk": F.undial_loss_topk(student, ids, top, F.token_logprobs(ref_logits, LABELS)[0], LABELS, 3.0),
    }


@pytest.mark.parametrize(
    "name",
    [
        "cross_entropy",
        "cross_entropy_weighted",
        "kl_full",
        "kl_topk",
        "npo",
        "simnpo",
        "flat",
        "adversarial_ce",
        "wga",
        "satimp",
        "undial",
        "undial_topk",
    ],
)
def test_losses_backpropagate_to_student_logits_only_at_scored_positions(name):
    student = make_logits(41).requires_grad_(True)
    loss = _all_losses(student)[name]
    assert loss.dim() == 0
    loss.backward()
    grad = student.grad
    assert torch.isfinite(grad).all()
    for b, t, _ in SCORED:
        assert grad[b, t].abs().sum() > 0
    for b, t in UNSCORED:
        assert grad[b, t].abs().sum() == 0


def test_half_precision_logits_are_upcast():
    logits64 = make_logits(42)
    logits16 = logits64.to(torch.bfloat16)
    out = F.sequence_logprob(logits16, LABELS)
    assert out.dtype == torch.float32
    expected = F.sequence_logprob(logits16.to(torch.float64), LABELS)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


# ---- RMU: activation distance and steering vector -----------------------------------------------


def test_activation_mse_is_each_rows_mean_over_its_answer_tokens_then_the_rows_mean():
    gen = torch.Generator().manual_seed(50)
    hidden = torch.randn(B, T, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    target = torch.randn(B, T, 3, generator=gen, dtype=torch.float64)
    # The positions scored are the answer tokens themselves (unshifted labels): row 0's 1 and 2, row 1's 2.
    rows = []
    for b, positions in ((0, (1, 2)), (1, (2,))):
        per_token = [
            sum((hidden[b, t, d].item() - target[b, t, d].item()) ** 2 for d in range(3)) / 3 for t in positions
        ]
        rows.append(sum(per_token) / len(per_token))
    value = F.activation_mse(hidden, target, LABELS)
    assert value.item() == pytest.approx(sum(rows) / 2, abs=1e-12)
    value.backward()
    assert (
        hidden.grad[0, 0].abs().sum() == 0 and hidden.grad[1, 1].abs().sum() == 0 and hidden.grad[0, 3].abs().sum() == 0
    )
    assert hidden.grad[0, 1].abs().sum() > 0 and hidden.grad[1, 2].abs().sum() > 0
    # A target vector broadcasts over rows and positions (the steering vector); no scored token gives 0.
    vector = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    expected = sum((hidden[0, 1, d].item() - vector[d].item()) ** 2 for d in range(3)) / 3
    only = torch.tensor([[IGN, 7, IGN, IGN], [IGN, IGN, IGN, IGN]])
    assert F.activation_mse(hidden, vector, only).item() == pytest.approx(expected / 2, abs=1e-12)


def test_steering_direction_has_the_coefficient_as_norm_and_is_the_same_every_time():
    vector = F.steering_direction(64, 6.5)
    assert vector.shape == (64,) and vector.norm().item() == pytest.approx(6.5, rel=1e-6)
    assert (vector >= 0).all()  # drawn from [0, 1) before scaling, as the authors draw it
    assert torch.equal(vector, F.steering_direction(64, 6.5))
    assert not torch.equal(vector, F.steering_direction(64, 6.5, seed=1))
