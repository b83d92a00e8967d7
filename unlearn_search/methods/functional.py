"""Pure loss pieces over causal-LM logits.

Everything here is a small function of tensors: no model calls, no I/O, no state. The unlearning
methods in ``unlearn_search.methods.losses`` wire these to the batches of a step.

Conventions shared by every function:

* ``logits`` are ``[B, T, V]`` and ``labels`` are ``[B, T]`` with ``-100`` where a token is not
  scored (prompt, padding). As in Hugging Face causal LMs, the logits at position ``t`` predict
  the label at ``t + 1``; each function shifts internally, so callers pass both unshifted.
* A "scored token" is a shifted label ``!= -100``. Sequence log-probs sum ``log p`` over the
  scored tokens of a row; "mean" versions divide by that row's count (a row with none gives 0).
* Losses are computed in at least float32 (half-precision logits are upcast) and backpropagate
  to the student logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF

from unlearn_search.data.tokenize import IGNORE_INDEX  # the label of a token no loss scores

__all__ = [
    "IGNORE_INDEX",
    "FLAT_DIVERGENCES",
    "shift",
    "token_logprobs",
    "sequence_logprob",
    "cross_entropy",
    "kl_full",
    "kl_topk",
    "topk_reference",
    "npo_loss",
    "simnpo_loss",
    "mean_token_prob",
    "flat_loss",
    "adversarial_targets",
    "activation_mse",
    "steering_direction",
]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # log-softmax over a large vocabulary in bf16/fp16 loses the small probabilities the KL and
    # NPO terms depend on; float64 inputs (tests, analysis) are left at full precision.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align predictions with targets: ``(logits[:, :-1], labels[:, 1:])``.

    Position ``t`` of the result pairs the distribution predicted after reading token ``t`` with
    the label of token ``t + 1``.
    """
    return logits[:, :-1], labels[:, 1:]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token under ``logits``.

    Returns ``(logp, mask)``, both ``[B, T-1]`` (shifted layout): ``logp[b, t]`` is
    ``log softmax(logits[b, t])[labels[b, t+1]]``, set to 0 where the label is ``-100``;
    ``mask`` is True at the scored positions.
    """
    logits, labels = shift(logits, labels)
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(_upcast(logits), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    # where, not multiply: a masked position whose placeholder id has -inf log-prob would give
    # -inf * 0 = nan.
    return torch.where(mask, logp, torch.zeros_like(logp)), mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Per-row ``sum_t log p(y_t)`` over the scored tokens, ``[B]``.

    With ``normalize`` the sum is divided by the row's number of scored tokens (the
    length-normalized log-likelihood of SimNPO); a row with no scored token gives 0.
    """
    logp, mask = token_logprobs(logits, labels)
    total = logp.sum(-1)
    if normalize:
        total = total / mask.sum(-1).clamp(min=1)
    return total


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token negative log-likelihood, a scalar.

    Without ``weights``: the mean NLL over all scored tokens of the batch (the Hugging Face
    ``model(..., labels=...).loss`` convention, so long rows weigh more); 0 if nothing is scored.

    With per-row ``weights [B]``: ``sum_i w_i * NLL_i / B`` where ``NLL_i`` is row ``i``'s mean
    NLL over its scored tokens. A weight of -1 turns that row into gradient ascent, so one call
    can mix descent and ascent rows.
    """
    logp, mask = token_logprobs(logits, labels)
    if weights is None:
        return -logp.sum() / mask.sum().clamp(min=1)
    per_row = -logp.sum(-1) / mask.sum(-1).clamp(min=1)
    weights = weights.to(device=per_row.device, dtype=per_row.dtype)
    return (weights * per_row).sum() / per_row.shape[0]


def _masked_position_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = torch.where(mask, values, torch.zeros_like(values))
    return values.sum() / mask.sum().clamp(min=1)


def kl_full(student_logits: torch.Tensor, reference_logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(reference || student)`` averaged over the scored positions, a scalar.

    ``reference_logprobs`` is the frozen model's log-softmax ``[B, T, V]`` in the same unshifted
    layout as ``student_logits``. A position counts when the label it predicts is scored
    (``labels[:, t+1] != -100``); at each such position
    ``sum_v p_ref(v) * (log p_ref(v) - log p_student(v))`` is taken, then averaged over positions.
    Vocabulary entries with ``p_ref = 0`` contribute 0.
    """
    student, labels_s = shift(student_logits, labels)
    ref = _upcast(reference_logprobs[:, :-1]).to(student.device)
    mask = labels_s != IGNORE_INDEX
    student_logp = torch.log_softmax(_upcast(student), dim=-1)
    terms = torch.where(ref > -math.inf, ref.exp() * (ref - student_logp), torch.zeros_like(student_logp))
    return _masked_position_mean(terms.sum(-1), mask)


def topk_reference(reference_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress reference logits to their top-k: ``(topk_ids, topk_logprobs)``, each ``[B, T, k]``.

    ``topk_logprobs`` are log-softmax values over the full vocabulary (not renormalized over the
    k kept ids), sorted in decreasing order, so ``1 - sum(exp(topk_logprobs))`` is the reference
    mass left out, which ``kl_topk`` keeps as one extra bucket.
    """
    logprobs = torch.log_softmax(_upcast(reference_logits), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    # log(1 - exp(x)) for x <= 0 without cancellation (Maechler 2012): expm1 near 0, log1p far.
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kl_topk(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``KL(reference || student)`` when the reference kept only its top-k log-probs, a scalar.

    ``topk_ids``/``topk_logprobs`` are ``[B, T, K]`` in the unshifted layout (see
    ``topk_reference``). The distributions are compared on K + 1 buckets: the K kept ids, and
    "everything else", holding ``R = 1 - sum_k p_ref(k)`` for the reference and
    ``S = 1 - sum_k p_student(k)`` for the student:

        sum_k p_ref(k) (log p_ref(k) - log p_student(k)) + R (log R - log S)

    averaged over the scored positions as in ``kl_full``. This is the exact KL between the two
    bucketed distributions (a lower bound on the full KL by data processing), and equals
    ``kl_full`` when K = V.
    """
    student, labels_s = shift(student_logits, labels)
    ids = topk_ids[:, :-1].to(student.device)
    ref = _upcast(topk_logprobs[:, :-1]).to(student.device)
    mask = labels_s != IGNORE_INDEX
    vocab, k = student.shape[-1], ids.shape[-1]

    student_logp = torch.log_softmax(_upcast(student), dim=-1)
    student_kept = student_logp.gather(-1, ids)
    kept = torch.where(ref > -math.inf, ref.exp() * (ref - student_kept), torch.zeros_like(student_kept)).sum(-1)
    if k >= vocab:
        return _masked_position_mean(kept, mask)

    # Reference remainder from its kept mass; rounding can push logsumexp a hair above 0.
    log_r = _log1mexp(torch.logsumexp(ref, dim=-1).clamp(max=0.0))
    # Student remainder summed directly over the ids not kept, rather than 1 - sum(kept), so a
    # student that puts almost all its mass on the kept ids still gets an accurate log S. The
    # kept ids are filled with the most negative finite value, not -inf, so no row is all -inf
    # (logsumexp's backward would produce nan there).
    floor = torch.finfo(student_logp.dtype).min
    log_s = torch.logsumexp(student_logp.scatter(-1, ids, floor), dim=-1)
    has_rest = log_r > -math.inf
    # Double where: the unselected branch must be finite too, or its nan leaks into the gradient.
    log_r_safe = torch.where(has_rest, log_r, torch.zeros_like(log_r))
    log_s_safe = torch.where(has_rest, log_s, torch.zeros_like(log_s))
    rest = torch.where(has_rest, log_r_safe.exp() * (log_r_safe - log_s_safe), torch.zeros_like(log_r))
    return _masked_position_mean(kept + rest, mask)


def npo_loss(student_seq_logprob: torch.Tensor, reference_seq_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868), a scalar.

    ``mean_i  -(2/beta) * logsigmoid(-beta * (log pi_theta(y_i|x_i) - log pi_ref(y_i|x_i)))``

    with sequence log-probs (sums over the answer tokens, ``sequence_logprob``). As in the
    authors' code (licong-lin/negative-preference-optimization, TOFU/dataloader.py, ``npo``:
    ``-F.logsigmoid(beta * (nll_cur - nll_ref)).mean() * 2 / beta``). Minimizing lowers the
    student's likelihood; its gradient is GA's scaled by ``2 * sigmoid(beta * log-ratio)``, which
    is 1 at the start (log-ratio 0) and fades as the answer becomes less likely than under the
    reference.
    """
    log_ratio = student_seq_logprob - reference_seq_logprob.to(student_seq_logprob.device)
    return (-(2.0 / beta) * TF.logsigmoid(-beta * log_ratio)).mean()


def dpo_loss(
    chosen_logprob: torch.Tensor,
    chosen_reference_logprob: torch.Tensor,
    rejected_logprob: torch.Tensor,
    rejected_reference_logprob: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Direct preference optimization (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), a scalar.

    ``mean_i  -(2/beta) * logsigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))``

    with sequence log-probs (``sequence_logprob``) of the chosen answer ``y_w`` and the rejected
    ``y_l`` to the same prompt. The paper's loss has no ``2/beta``; the factor is open-unlearning's
    (``compute_dpo_loss``), which puts DPO on NPO's scale: without the chosen side this is NPO.
    """
    chosen = chosen_logprob - chosen_reference_logprob.to(chosen_logprob.device)
    rejected = rejected_logprob - rejected_reference_logprob.to(rejected_logprob.device)
    return (-(2.0 / beta) * TF.logsigmoid(beta * (chosen - rejected))).mean()


def simnpo_loss(student_mean_logprob: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, arXiv 2410.07163), a scalar.

    ``mean_i  -(2/beta) * logsigmoid(-beta * mean_logp_i - gamma)``

    where ``mean_logp_i = log pi_theta(y_i|x_i) / |y_i|`` (``sequence_logprob(normalize=True)``),
    the paper's form with reward margin ``gamma`` outside the ``beta`` scaling. Note the authors'
    code (OPTML-Group/Unlearn-Simple, TOFU/dataloader.py, ``simnpo``) computes
    ``logsigmoid(beta * (nll / |y| - gamma))``, i.e. its gamma equals this gamma / beta; the two
    agree at gamma = 0.
    """
    return (-(2.0 / beta) * TF.logsigmoid(-beta * student_mean_logprob - gamma)).mean()


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Weighted gradient ascent (WGA; Wang et al. 2025, arXiv 2502.19301), a scalar.

    ``-(1/N) sum_t sg[p(y_t)^beta] * NLL_t`` over the batch's N scored tokens, where ``sg`` stops
    the gradient: ascent on each token's NLL, weighted by how likely the token still is, so
    tokens already forgotten stop pulling and the ascent does not run away. As the authors'
    code (open-unlearning ``compute_wga_loss``: the weight ``exp(-NLL)^beta``, detached, and a
    mean over scored tokens); beta 0 is plain gradient ascent.
    """
    logp, mask = token_logprobs(logits, labels)
    weights = logp.detach().exp() ** beta
    return (weights * logp * mask).sum() / mask.sum().clamp(min=1)


def satimp_loss(logits: torch.Tensor, labels: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp (Yang et al. 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM
    Unlearning", arXiv 2505.11953), a scalar.

    ``-(1/N) sum_t sg[p_t^beta1 (1 - p_t)^beta2] * NLL_t`` over the batch's N scored tokens,
    ``p_t = p(y_t)`` and ``sg`` stopping the gradient: WGA's saturation weight ``p^beta1`` (tokens
    already forgotten stop pulling) times an importance weight ``(1 - p)^beta2`` that also damps
    the tokens the model is sure of. As the authors' code (open-unlearning ``SatImp``:
    ``weight_sat = exp(-NLL)^beta1``, ``weight_imp = (1 - exp(-NLL))^beta2``, both detached, a
    mean over scored tokens); beta2 0 is WGA with beta = beta1.
    """
    logp, mask = token_logprobs(logits, labels)
    p = logp.detach().exp()
    weights = p**beta1 * (1 - p) ** beta2
    return (weights * logp * mask).sum() / mask.sum().clamp(min=1)


def undial_loss(
    student_logits: torch.Tensor, reference_logprobs: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """UNDIAL (Dong et al. 2024, "Unlearning via Self-Distillation with Adjusted Logits",
    arXiv 2402.10052, eq. 3), a scalar.

    ``mean_t CE(softmax(z_t - beta * onehot(y_t)), p_student(. | x_<t))`` over the scored
    positions, ``z_t`` the frozen model's logits (here its log-softmax, which differs by a
    constant per position and gives the same softmax): the student is distilled towards the
    original's distribution with the memorized token made ``e^beta`` times less likely, so it
    forgets that token while keeping the rest of the distribution, rather than ascending without
    bound. As the authors' code (open-unlearning ``compute_undial_loss``: the teacher's shifted
    logits, the label's logit lowered by beta, soft-label cross-entropy, mean over scored tokens).
    """
    student, labels_s = shift(student_logits, labels)
    mask = labels_s != IGNORE_INDEX
    safe = labels_s.masked_fill(~mask, 0)
    reference = _upcast(reference_logprobs[:, :-1]).to(student.device)
    lowered = reference - beta * TF.one_hot(safe, reference.shape[-1]).to(reference.dtype)
    target = torch.softmax(lowered, dim=-1)
    ce = -(target * torch.log_softmax(_upcast(student), dim=-1)).sum(-1)
    return _masked_position_mean(ce, mask)


def undial_loss_topk(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    label_logprobs: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """``undial_loss`` when the frozen model kept only its top-k log-probs (``topk_reference``)
    and each label's exact log-prob (``label_logprobs``, ``[B, T-1]`` shifted), a scalar.

    On three kinds of bucket: each kept id but the label, the label, and everything else (the
    reference mass ``1 - sum kept - p(y)``, the student's summed over the ids in it). The label's
    mass is lowered by ``e^-beta``, the buckets renormalized, and the student's cross-entropy to
    them taken. Exact for the bucketed distributions; equal to ``undial_loss`` when K = V.
    """
    student, labels_s = shift(student_logits, labels)
    mask = labels_s != IGNORE_INDEX
    safe = labels_s.masked_fill(~mask, 0)
    ids = topk_ids[:, :-1].to(student.device)
    is_label = ids == safe.unsqueeze(-1)
    student_logp = torch.log_softmax(_upcast(student), dim=-1)
    p_kept = torch.where(is_label, 0.0, _upcast(topk_logprobs[:, :-1]).to(student.device).exp())
    p_label = _upcast(label_logprobs).to(student.device).exp()
    q_label = p_label * math.exp(-beta)
    # The rest: ids neither kept nor the label. The most negative finite value, not -inf, marks
    # the removed ids, so no row is all -inf (logsumexp's backward would give nan).
    floor = torch.finfo(student_logp.dtype).min
    removed = student_logp.scatter(-1, ids, floor).scatter(-1, safe.unsqueeze(-1), floor)
    rest_ids = student.shape[-1] - ids.shape[-1] - (~is_label.any(-1)).long()
    has_rest = rest_ids > 0
    p_rest = torch.where(has_rest, (1 - p_kept.sum(-1) - p_label).clamp(min=0.0), 0.0)
    # Double where: the unselected branch must be finite too, or its nan leaks into the gradient.
    s_rest = torch.where(has_rest, torch.logsumexp(removed, dim=-1), 0.0)
    s_kept = torch.where(is_label, 0.0, student_logp.gather(-1, ids))
    s_label = student_logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    total = p_kept.sum(-1) + q_label + p_rest
    ce = -((p_kept * s_kept).sum(-1) + q_label * s_label + p_rest * s_rest) / total
    return _masked_position_mean(ce, mask)


def mean_token_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row average probability of the label tokens, ``[B]``: ``mean_t p(y_t)`` over the
    scored tokens (probabilities, not log-probs, as FLAT uses); 0 for a row with none."""
    logp, mask = token_logprobs(logits, labels)
    probs = torch.where(mask, logp.exp(), torch.zeros_like(logp))
    return probs.sum(-1) / mask.sum(-1).clamp(min=1)


# f-GAN (Nowozin et al. 2016, Table 6) activation g*(v) and conjugate f*(t), as listed in the FLAT
# paper's table of f-divergences. Each entry is (g*, f* o g*); the composition is written out in
# closed form where composing the two separately is less stable (JS:
# -log(2 - exp(log 2 - softplus(-v))) simplifies to softplus(v) - log 2).
#   kl:      g*(v) = v                       f*(t) = exp(t - 1)
#   js:      g*(v) = log 2 - log(1 + e^-v)   f*(t) = -log(2 - exp(t))
#   tv:      g*(v) = tanh(v) / 2             f*(t) = t
#   pearson: g*(v) = v                       f*(t) = t^2 / 4 + t
FLAT_DIVERGENCES = {
    "kl": (lambda v: v, lambda v: torch.exp(v - 1.0)),
    "js": (lambda v: math.log(2.0) - TF.softplus(-v), lambda v: TF.softplus(v) - math.log(2.0)),
    "tv": (lambda v: 0.5 * torch.tanh(v), lambda v: 0.5 * torch.tanh(v)),
    "pearson": (lambda v: v, lambda v: v * v / 4.0 + v),
}


def flat_loss(template_mean_prob: torch.Tensor, forget_mean_prob: torch.Tensor, divergence: str) -> torch.Tensor:
    """FLAT (Wang et al. 2024, "LLM Unlearning via Loss Adjustment with only Forget Data",
    arXiv 2410.11143), a scalar.

    ``mean_i  -g*(P_e,i) + f*(g*(P_f,i))``

    where ``P_e`` is the average per-token probability (``mean_token_prob``) of the template
    (preferred, e.g. refusal) answer and ``P_f`` that of the forget answer, both given the forget
    prompt. Minimizing it maximizes the variational f-divergence estimate between the two, i.e.
    raises ``P_e`` and lowers ``P_f`` (g* and f* o g* are increasing). ``divergence`` is one of
    ``FLAT_DIVERGENCES``: "kl", "js", "tv", "pearson".

    The authors' code (UCSC-REAL/FLAT, dataloader.py, ``get_contrastive_loss`` with
    ``ProbLossStable``) applies g* and f* o g* to the probability averaged over the whole batch
    (masked positions counted as 0); here they are applied per example and then averaged, which
    matches for the affine parts and keeps each example's weight independent of padding.
    """
    if divergence not in FLAT_DIVERGENCES:
        raise ValueError(f"divergence {divergence!r}: expected one of {', '.join(FLAT_DIVERGENCES)}")
    activation, conjugate_of_activation = FLAT_DIVERGENCES[divergence]
    forget_mean_prob = forget_mean_prob.to(template_mean_prob.device)
    return (-activation(template_mean_prob) + conjugate_of_activation(forget_mean_prob)).mean()


@torch.no_grad()
def adversarial_targets(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels for the "adversarial samples" method (Yao et al. 2024, "Machine Unlearning of
    Pre-trained LLMs", arXiv 2402.15159): at each scored position, the model's own most likely
    token other than the true one.

    Returns a tensor in the same unshifted layout as ``labels``, ready for ``cross_entropy``:
    ``out[:, t] = argmax_{v != labels[:, t]} logits[:, t-1, v]`` where ``labels[:, t]`` is
    scored, ``-100`` where it is not, and ``labels[:, 0]`` unchanged (it is never predicted).
    Fine-tuning towards these targets replaces each memorized token by the model's best
    plausible alternative. No gradient flows through the targets.

    The authors' code (yaojin17/Unlearning_LLM, utils/save_tokenized_dataset.py: "adversarial
    sample tokenization ... In our paper we just use top_k = 1" with ``rm_groundtruth=True``;
    utils/top_kp_sample.py) builds them once, offline, from the original model: it sets the
    logit of the ground-truth token to -inf and takes the top-1 token. Two details differ here:
    the targets come from whatever logits the caller passes (the caller decides whether those are
    the original model's or the current student's), and the excluded token and the argmax are
    taken from the same prediction. In the released code the argmax is taken over the unshifted
    logits, so the replacement for token t is the model's guess for token t + 1 (with token t
    excluded); we read that as an off-by-one rather than part of the method, since it does not
    match "the most likely wrong token" at the position being trained.
    """
    if logits.shape[-1] < 2:
        raise ValueError("adversarial_targets needs a vocabulary of at least 2 tokens")
    pred, labels_s = shift(logits, labels)
    scored = labels_s != IGNORE_INDEX
    safe = labels_s.masked_fill(~scored, 0)
    excluded = _upcast(pred.detach()).scatter(-1, safe.unsqueeze(-1), -math.inf)
    wrong = excluded.argmax(-1)
    out = labels.clone()
    out[:, 1:] = torch.where(scored, wrong, labels_s)
    return out


def activation_mse(activations: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RMU's activation distance (Li et al. 2024, "The WMDP Benchmark", arXiv 2403.03218, eq. 1
    and 2), a scalar: ``mean_b mean_t mean_d (h[b, t, d] - target[b, t, d])^2`` over each row's
    scored positions, ``activations [B, T, D]`` one layer's hidden states and ``target`` the same
    shape or broadcastable to it (the steering vector ``c * u``).

    The positions are the answer tokens themselves (``labels != -100``, unshifted: a hidden state
    is the token's own, not a prediction of the next). As the authors' code in open-unlearning
    (``compute_activation_loss``: the squared difference's mean over the hidden size, summed over
    a row's scored positions and divided by their count, then the mean over rows); the paper
    writes the squared L2 norm, which is this times the hidden size. A row with no scored token
    gives 0 here (0/0 there).
    """
    mask = (labels != IGNORE_INDEX).to(torch.float32)
    squared = (_upcast(activations) - _upcast(target).to(activations.device)).pow(2).mean(-1)
    per_row = (squared * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_row.mean()


def steering_direction(hidden_size: int, coefficient: float, seed: int = 0) -> torch.Tensor:
    """RMU's control vector ``c * u``, ``[hidden_size]``: ``u`` drawn uniformly from ``[0, 1)^D`` and
    scaled to unit norm, as the authors draw it (``torch.rand`` then ``/ norm``). Drawn from its
    own seeded generator, so every rank of a trial and a resumed trial steer towards the same one."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=generator, dtype=torch.float64)
    return (coefficient * u / u.norm()).to(torch.float32)
