"""The divergences and the loss of one position: pure functions of tensors that return a per-token loss.

Conventions (``docs/methods.md``):

* ``p`` is the teacher distribution, ``q`` the student's, both at temperature ``T``.
* Every divergence is summed over the class axis and returned per position (``loss_BT``); nothing here
  reduces over tokens. :func:`reduce_loss` is the one reduction: the sum over supervised tokens divided
  by the number of supervised tokens in the whole optimizer step.
* Everything is computed in fp32 from ``log_softmax``.
* Positions are already aligned: ``logits[..., t, :]`` scores ``labels[..., t]`` (callers shift).

A teacher signal is either dense logits ``(..., V)`` or a :class:`SparseTarget` (ids + probabilities,
optionally the tail mass of everything else). Both reduce to a pair of log-probability tensors over a
common class axis, and :func:`divergence_from_logprobs` works on that pair, so every divergence works
with every teacher signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "jeffreys"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
# The objectives a loss can train with: every divergence between the two distributions, and the sampled-token
# estimate of reverse KL, which reads only the teacher's probability of the token in the labels.
Objective = Literal[Divergence, "sampled_reverse_kl"]
OBJECTIVES: tuple[str, ...] = (*DIVERGENCES, "sampled_reverse_kl")


@dataclass(frozen=True)
class LossSpec:
    """The loss of one position: ``alpha * CE + (1 - alpha) * s * D(p_T || q_T)``, ``s = T^2`` if ``t2_scale``.

    divergence: which D; temperature: T (> 0), applied to teacher and student; alpha: the CE weight in
    [0, 1]; beta: the JSD interpolation in [0, 1] (0 = forward KL, 1 = reverse KL); skew: the skew-KL
    mixing weight in [0, 1); baseline: ``sampled_reverse_kl`` only, the constant b subtracted from each
    token's reward f in the surrogate ``stopgrad(f - b) * log q(x)`` (docs/methods.md §8; it keeps the
    gradient unbiased only if it does not depend on the sampled tokens: the training run passes a running
    mean of f over earlier steps). Passed whole through the losses, the chunked path and the commands (the
    train config's ``loss`` section builds one with ``LossConfig.spec()``). The default is pure forward KL.
    """

    divergence: Objective = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.0
    t2_scale: bool = True
    beta: float = 0.5
    skew: float = 0.1
    baseline: float = 0.0

    def __post_init__(self):
        if self.divergence not in OBJECTIVES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {', '.join(OBJECTIVES)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew must be in [0, 1), got {self.skew}")
        if not math.isfinite(self.baseline):
            raise ValueError(f"baseline must be finite, got {self.baseline}")

    @property
    def scale(self) -> float:
        """The factor on the divergence: T^2 (or 1 without ``t2_scale``)."""
        return self.temperature**2 if self.t2_scale else 1.0

    @property
    def is_forward_kl(self) -> bool:
        """D is exactly KL(p || q) (so the logged KL is the divergence itself)."""
        return self.divergence == "forward_kl" or (self.divergence == "jsd" and self.beta == 0.0)

    @property
    def tolerates_zero_teacher_mass(self) -> bool:
        """D stays finite where the teacher puts zero mass on a class the student does not (sampled
        targets: no mass outside the drawn ids). Reverse KL, Jeffreys, JSD at beta = 1 and skew reverse
        KL at skew = 0 all contain KL(q || p) and are infinite there."""
        d = self.divergence
        return d in ("forward_kl", "skew_kl", "tvd") or (d == "jsd" and self.beta < 1.0) or (
            d == "skew_reverse_kl" and self.skew > 0.0
        )

    def describe(self) -> str:
        extra = {"jsd": f", beta={self.beta:g}", "skew_kl": f", skew={self.skew:g}",
                 "skew_reverse_kl": f", skew={self.skew:g}"}.get(self.divergence, "")
        return (f"{self.alpha:g}*CE + {1 - self.alpha:g}*{'T^2*' if self.t2_scale else ''}{self.divergence}"
                f"(T={self.temperature:g}{extra})")


@dataclass
class SparseTarget:
    """A compact teacher target per position.

    ids:   (..., K) long, token ids. Entries with ``probs == 0`` are padding and are ignored.
    probs: (..., K) float, teacher probabilities of ``ids`` (at the temperature they were captured at).
    tail:  (...) float or None. Teacher mass outside ``ids``; the student's tail class is then
           ``1 - sum(q[ids])`` and the divergence runs over K + 1 classes. ``None`` renormalizes both
           teacher and student over ``ids`` (the biased top-k convention). Sampled targets are
           ``probs = counts / N`` with ``tail = 0``: forward KL over K + 1 classes then equals the
           exact KL(p_hat || q) and its gradient the unbiased sampled cross-entropy.
    """

    ids: torch.Tensor
    probs: torch.Tensor
    tail: torch.Tensor | None = None

    def __getitem__(self, index) -> SparseTarget:
        """Index the leading (position) dimensions, e.g. ``target[mask]`` or ``target[:, :-1]``."""
        return SparseTarget(self.ids[index], self.probs[index], None if self.tail is None else self.tail[index])

    def to(self, device) -> SparseTarget:
        return SparseTarget(
            self.ids.to(device), self.probs.to(device), None if self.tail is None else self.tail.to(device)
        )


FORWARD_KL = LossSpec()  # pure forward KL at T = 1: the default of the loss functions

TeacherSignal = torch.Tensor | SparseTarget


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, which gradient checks use)."""
    return x if x.dtype == torch.float64 else x.float()


def _kl_terms(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Per-class ``a * (log a - log b)``, exactly 0 where a == 0, with NaN-free gradients."""
    if logp_a.numel() and not bool(logp_a.detach().amin() == -math.inf):
        # No zero-mass class (the usual dense case): no masking needed. A NaN makes amin NaN and stays NaN.
        return logp_a.exp() * (logp_a - logp_b)
    pos = logp_a != -math.inf  # NaN stays NaN: a broken teacher must not look like zero mass
    la = torch.where(pos, logp_a, torch.zeros_like(logp_a))
    return torch.where(pos, la.exp() * (la - logp_b), torch.zeros_like(la))


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, w_p: float) -> torch.Tensor:
    """log(w_p * p + (1 - w_p) * q) for 0 < w_p < 1; -inf (with finite gradients) where p = q = 0."""
    both = (logp == -math.inf) & (logq == -math.inf)  # logaddexp(-inf, -inf) has a NaN gradient
    out = torch.logaddexp(logp.masked_fill(both, 0.0) + math.log(w_p), logq.masked_fill(both, 0.0) + math.log1p(-w_p))
    return out.masked_fill(both, -math.inf)


def _scaled_jsd_terms(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-class ``[beta KL(p||M) + (1-beta) KL(q||M)] / (beta (1-beta))``, M = beta p + (1-beta) q.

    Written as ``KL(p||M) / (1-beta) + KL(q||M) / beta`` with ``log M`` taken *relative* to ``log p``
    and ``log q`` (``log M - log q = log(1 - beta + beta e^d)``, d = log p - log q). Forming ``log M``
    first and subtracting loses ~1e-7 * |log q| absolutely, which the 1/beta factor blows up near the
    ends; the relative form keeps the result accurate for beta down to 1e-6 in fp32.
    """
    # Floor zero-mass classes so that d stays finite; their own terms are zeroed by the weights below.
    d = lp.clamp_min(-1e4) - lq.clamp_min(-1e4)
    log_m_minus_q = torch.logaddexp(torch.full_like(d, math.log1p(-beta)), math.log(beta) + d)
    log_m_minus_p = torch.logaddexp(torch.full_like(d, math.log(beta)), math.log1p(-beta) - d)
    p_pos, q_pos = lp != -math.inf, lq != -math.inf
    p = torch.where(p_pos, lp, torch.zeros_like(lp)).exp()
    q = torch.where(q_pos, lq, torch.zeros_like(lq)).exp()
    term_p = torch.where(p_pos, p * -log_m_minus_p, torch.zeros_like(p)) / (1.0 - beta)
    term_q = torch.where(q_pos, q * -log_m_minus_q, torch.zeros_like(q)) / beta
    return term_p + term_q


def divergence_from_logprobs(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    kind: Divergence,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence between two distributions given as log-probabilities, summed over the last axis.

    student_logp, teacher_logp: (..., C) fp32 log-probabilities (``-inf`` allowed for zero mass).
    valid: optional (..., C) bool; classes where it is False are left out entirely.
    Returns (...).

    * forward_kl: KL(p || q)          * reverse_kl: KL(q || p)       * jeffreys: (fwd + rev) / 2
    * jsd: generalized JSD with M = beta p + (1 - beta) q, scaled by 1 / (beta (1 - beta)) so that it is
      continuous in beta and tends to forward KL as beta -> 0 and reverse KL as beta -> 1 (the end points
      are computed as those limits). Note the scale: at beta = 0.5 this is 4x the unscaled JSD.
    * skew_kl: KL(p || skew p + (1 - skew) q)     * skew_reverse_kl: KL(q || (1 - skew) p + skew q)
    * tvd: 0.5 * sum |p - q|
    """
    lq, lp = student_logp, teacher_logp
    if valid is not None:
        # Neutral values keep invalid classes finite; their terms are zeroed below.
        lq = lq.masked_fill(~valid, 0.0)
        lp = lp.masked_fill(~valid, 0.0)

    if kind == "forward_kl":
        terms = _kl_terms(lp, lq)
    elif kind == "reverse_kl":
        terms = _kl_terms(lq, lp)
    elif kind == "jeffreys":
        terms = 0.5 * (_kl_terms(lp, lq) + _kl_terms(lq, lp))
    elif kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            terms = _kl_terms(lp, lq)
        elif beta == 1.0:
            terms = _kl_terms(lq, lp)
        else:
            terms = _scaled_jsd_terms(lp, lq, beta)
    elif kind == "skew_kl":
        if not 0.0 <= skew < 1.0:
            raise ValueError(f"skew must be in [0, 1), got {skew}")
        lm = lq if skew == 0.0 else _log_mix(lp, lq, skew)
        terms = _kl_terms(lp, lm)
    elif kind == "skew_reverse_kl":
        if not 0.0 <= skew < 1.0:
            raise ValueError(f"skew must be in [0, 1), got {skew}")
        lm = lp if skew == 0.0 else _log_mix(lp, lq, 1.0 - skew)
        terms = _kl_terms(lq, lm)
    elif kind == "tvd":
        terms = 0.5 * (lp.exp() - lq.exp()).abs()
    else:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")

    if valid is not None:
        terms = terms.masked_fill(~valid, 0.0)
    return terms.sum(-1)


def _members(shape, ids: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(..., V) bool: which ids are members. An id may also appear as padding (or as a gathered label): a
    maximum, not an overwrite, so that a padded duplicate never unsets a member."""
    member = torch.zeros(shape, dtype=torch.uint8, device=ids.device)
    return member.scatter_reduce_(-1, ids, present.to(torch.uint8), "amax").bool()


class _SparseTailLogprobs(torch.autograd.Function):
    """Student log-probabilities of the target ids and of the tail (every id not in the target).

    ``z`` (..., V) logits (already / T), ``ids`` (..., K), ``present`` (..., K) (False: padding, not a
    member; present ids are distinct). Returns (..., K + 1): ``z[ids] - lse(z)`` and
    ``log sum_{j not in ids} exp(z_j) - lse(z)`` (``-inf`` when the ids cover the vocabulary).

    One exp pass serves both normalizers and the analytic backward, and what is kept for backward is one
    V-sized tensor: the exps with the members' set to 0 (``outside``; a minimum, so that a padded duplicate of
    a member never restores it). The tail is summed directly over it, not as the total minus the members'
    share, and backward keeps the members' and the other ids' terms apart: every sum is of terms >= 0 and
    nothing cancels, so value and gradient are exact to the dtype's rounding however small the tail, with
    no float64 pass over V. Rows whose tail terms underflow next to the row maximum get an exact logsumexp
    over their non-member ids instead.
    """

    @staticmethod
    def forward(ctx, z, ids, present):
        m = z.amax(-1, keepdim=True)
        m = m.masked_fill(~torch.isfinite(m), 0.0)
        e = torch.exp(z - m)
        s_all = e.sum(-1, keepdim=True)  # relative to exp(m), like rest
        e_ids = e.gather(-1, ids)
        outside = e.scatter_reduce_(-1, ids, e_ids.masked_fill(present, 0.0), "amin")  # in place: members -> 0
        del e
        rest = outside.sum(-1, keepdim=True)
        weak = (rest < torch.finfo(z.dtype).tiny * math.exp(20.0)).squeeze(-1)
        log_rest = rest.log()
        rows = None
        if bool(weak.any()):
            rows = weak.nonzero(as_tuple=True)
            member = _members(z[rows].shape, ids[rows], present[rows])
            # -inf when the ids cover the vocabulary; exact however far below the maximum the tail lies.
            log_rest[rows] = torch.logsumexp(z[rows].masked_fill(member, -math.inf), dim=-1, keepdim=True) - m[rows]
        log_all = s_all.log()
        out = torch.cat([z.gather(-1, ids) - m - log_all, log_rest - log_all], dim=-1)
        ctx.save_for_backward(z, outside, e_ids, s_all, log_rest, ids, present)
        ctx.rows = rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, outside, e_ids, s_all, log_rest, ids, present = ctx.saved_tensors
        k = ids.shape[-1]
        g_ids, g_tail = g[..., :k], g[..., k:]
        # d/dz_j of (z_id - lse) = [j = id] - softmax_j; of (log rest - lse) = [j not in ids] e_j / rest - softmax_j.
        finite = torch.isfinite(log_rest)
        coef = torch.where(finite, g_tail * torch.exp(-log_rest.masked_fill(~finite, 0.0)), 0.0)  # g_tail / rest
        rows = ctx.rows
        if rows is not None:
            coef[rows] = 0.0  # handled exactly below
        per_total = g.sum(-1, keepdim=True) / s_all  # softmax_j = e_j / total
        # One V-sized pass over the other ids: e_j * (g_tail / rest - sum(g) / total); the members' own terms,
        # g_id - e_id * sum(g) / total, are added at their ids (a padding entry adds its g, which is 0).
        grad = outside * (coef - per_total)
        back = g_ids - (e_ids * per_total).masked_fill(~present, 0.0)
        grad.scatter_add_(-1, ids, back)
        if rows is not None:
            member = _members(z[rows].shape, ids[rows], present[rows])
            soft_rest = torch.softmax(z[rows].masked_fill(member, -math.inf), dim=-1).nan_to_num_(0.0)
            grad[rows] += g_tail[rows] * soft_rest
        return grad, None, None


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` in at least fp32 (no copy at T = 1 when the logits are fp32 already)."""
    z = upcast(logits)
    return z if temperature == 1.0 else z / temperature


def sparse_logprobs(
    student_logits: torch.Tensor, target: SparseTarget, temperature: float = 1.0, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities over the sparse target's classes.

    student_logits: (..., V). Returns ``(student_logp, teacher_logp, valid)``, each (..., C) with
    C = K + 1 (the last class is the tail) when ``target.tail`` is given, else C = K (renormalized).
    With ``labels`` (..., and a tail) also the student's log-probability of each label (..., 0 where the
    label is IGNORE_INDEX), from the same normalizer: the hard-label CE at this temperature for free.
    """
    z = tempered(student_logits, temperature)
    ids = target.ids
    present = target.probs > 0  # (..., K); zero-probability entries are padding
    teacher_logp = upcast(target.probs).log()
    if target.tail is None:
        # Renormalize both distributions over the kept ids.
        z_ids = z.gather(-1, ids)
        student_logp = torch.log_softmax(z_ids.masked_fill(~present, -math.inf), dim=-1)
        student_logp = student_logp.masked_fill(~present, 0.0)
        teacher_logp = torch.log_softmax(teacher_logp, dim=-1)
        return student_logp, teacher_logp, present

    k = ids.shape[-1]
    if labels is not None:  # the label rides along as one more gathered id that is not a member
        ids = torch.cat([ids, labels.clamp_min(0).unsqueeze(-1)], dim=-1)
        present = torch.cat([present, torch.zeros_like(present[..., :1])], dim=-1)
    out = _SparseTailLogprobs.apply(z, ids, present)
    student_logp = torch.cat([out[..., :k], out[..., -1:]], dim=-1) if labels is not None else out
    teacher_tail = upcast(target.tail).clamp_min(0.0).log().unsqueeze(-1)
    teacher_logp = torch.cat([teacher_logp, teacher_tail], dim=-1)
    valid = torch.cat([present[..., :k], torch.ones_like(present[..., :1])], dim=-1)
    if labels is None:
        return student_logp, teacher_logp, valid
    label_logp = out[..., k].masked_fill(labels == IGNORE_INDEX, 0.0)
    return student_logp, teacher_logp, valid, label_logp


def token_divergence(
    student_logits: torch.Tensor,
    teacher: TeacherSignal,
    kind: Divergence,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-position divergence between the student and a teacher signal at temperature T.

    student_logits: (..., V); teacher: dense logits (..., V) or a SparseTarget. Returns (...) fp32.
    No T^2 factor here (see :func:`kd_loss_per_token`).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher, SparseTarget):
        _check_sparse(student_logits, teacher)
        lq, lp, valid = sparse_logprobs(student_logits, teacher, temperature)
        return divergence_from_logprobs(lq, lp, kind, beta=beta, skew=skew, valid=valid)
    lq, lp = _dense_logprobs(student_logits, teacher, temperature)
    return divergence_from_logprobs(lq, lp, kind, beta=beta, skew=skew)


def _check_sparse(student_logits: torch.Tensor, teacher: SparseTarget) -> None:
    if teacher.ids.shape[:-1] != student_logits.shape[:-1] or teacher.probs.shape != teacher.ids.shape:
        raise ValueError(
            f"sparse target positions {tuple(teacher.ids.shape[:-1])} (probs {tuple(teacher.probs.shape)}) and "
            f"student logits positions {tuple(student_logits.shape[:-1])} differ"
        )
    if teacher.tail is not None and teacher.tail.shape != teacher.ids.shape[:-1]:
        raise ValueError(f"sparse target tail {tuple(teacher.tail.shape)} does not match ids {tuple(teacher.ids.shape)}")


def _dense_logprobs(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float):
    if teacher.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student_logits.shape)} differ; "
            "slice both to the tokenizer's vocabulary first"
        )
    lq = torch.log_softmax(tempered(student_logits, temperature), dim=-1)
    lp = torch.log_softmax(tempered(teacher, temperature), dim=-1)
    return lq, lp


def cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label cross-entropy per position (T = 1), 0 where ``labels == IGNORE_INDEX``.

    logits: (..., V); labels: (...). Returns (...) fp32.
    """
    flat = F.cross_entropy(
        upcast(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return flat.reshape(labels.shape)


def kd_loss_per_token(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherSignal | None,
    spec: LossSpec = FORWARD_KL,
) -> dict[str, torch.Tensor]:
    """``alpha * CE + (1 - alpha) * s * D_T`` per position (see :class:`LossSpec`).

    student_logits: (B, T, V); labels: (B, T) with IGNORE_INDEX for unsupervised positions.
    Returns per-position tensors (B, T): ``loss`` (what to reduce and backpropagate), ``ce`` and
    ``div`` (the unscaled divergence). With ``teacher=None`` the loss is the plain CE.
    Positions with IGNORE_INDEX still get values here; :func:`reduce_loss` masks them (callers that
    backpropagate should drop those rows first: a zero-mass teacher row can make their divergence
    infinite, and ``0 * inf`` in the backward of a mask is NaN).
    """
    if spec.divergence == "sampled_reverse_kl":
        return _sampled_reverse_kl(student_logits, labels, teacher, spec)
    if isinstance(teacher, torch.Tensor) and spec.temperature == 1.0:
        # Dense teacher at T = 1: the CE reads the student's log-softmax that the divergence needs anyway.
        lq, lp = _dense_logprobs(student_logits, teacher, 1.0)
        ce = -lq.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        ce = ce.masked_fill(labels == IGNORE_INDEX, 0.0)
        div = divergence_from_logprobs(lq, lp, spec.divergence, beta=spec.beta, skew=spec.skew)
    elif isinstance(teacher, SparseTarget) and teacher.tail is not None and spec.temperature == 1.0:
        # Sparse with a tail at T = 1: the label is gathered beside the ids, under the same normalizer.
        _check_sparse(student_logits, teacher)
        lq, lp, valid, label_logp = sparse_logprobs(student_logits, teacher, 1.0, labels=labels)
        ce = -label_logp
        div = divergence_from_logprobs(lq, lp, spec.divergence, beta=spec.beta, skew=spec.skew, valid=valid)
    else:
        ce = cross_entropy_per_token(student_logits, labels)
        if teacher is None:
            return {"loss": ce, "ce": ce}
        div = token_divergence(student_logits, teacher, spec.divergence, temperature=spec.temperature,
                               beta=spec.beta, skew=spec.skew)
    if spec.alpha == 1.0:
        loss = ce  # not 0 * div: an infinite divergence must not turn the CE into NaN
    else:
        loss = (1.0 - spec.alpha) * spec.scale * div
        if spec.alpha > 0:
            loss = loss + spec.alpha * ce
    return {"loss": loss, "ce": ce, "div": div}


def teacher_label_logprob(teacher: TeacherSignal, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's log-probability of each label (at temperature T), from dense logits or a sparse target
    that holds the label (a server teacher always returns the sequence's own token)."""
    lab = labels.clamp_min(0).unsqueeze(-1)
    if isinstance(teacher, SparseTarget):
        hit = teacher.ids == lab
        found = (hit & (teacher.probs > 0)).any(-1)
        if not bool(found[labels != IGNORE_INDEX].all()):
            raise ValueError(
                "loss.divergence=sampled_reverse_kl needs the teacher's probability of every sampled token; this "
                "sparse target lacks some (a top-k cache): use a live teacher or a server teacher"
            )
        p = torch.where(hit, upcast(teacher.probs), torch.zeros_like(upcast(teacher.probs))).sum(-1)
        return p.clamp_min(torch.finfo(p.dtype).tiny).log()
    return torch.log_softmax(tempered(teacher, temperature), dim=-1).gather(-1, lab).squeeze(-1)


def _sampled_reverse_kl(student_logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherSignal | None,
                        spec: LossSpec) -> dict[str, torch.Tensor]:
    """The sampled-token estimate of reverse KL on tokens the student sampled itself (``labels``).

    Per token x: ``f = log q_T(x) - log p_T(x)``, an unbiased one-sample estimate of KL(q || p) at that
    position when x ~ q_T. The loss is the surrogate ``stopgrad(f - b) * log q_T(x)`` with b =
    ``spec.baseline``: its gradient ``(f - b) * grad log q(x)`` is, for x ~ q_T and any b that does not
    depend on x, an unbiased estimate of the gradient of KL(q_T || p_T) at that position (E[grad log q(x)]
    = 0), i.e. of the per-token reverse KL with the prefix held fixed (each token's own term: no credit to
    earlier tokens for later positions' KL; docs/methods.md §8). b moves only the variance. ``div`` is f
    itself. Only the teacher's probability of x is needed.
    """
    if teacher is None:
        raise ValueError("loss.divergence=sampled_reverse_kl needs a teacher")
    lq_all = torch.log_softmax(tempered(student_logits, spec.temperature), dim=-1)
    lq = lq_all.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    lp = teacher_label_logprob(teacher, labels, spec.temperature)
    f = lq - lp
    ce = -lq if spec.temperature == 1.0 else cross_entropy_per_token(student_logits, labels)
    ce = ce.masked_fill(labels == IGNORE_INDEX, 0.0)
    surrogate = (f.detach() - spec.baseline) * lq
    loss = ce if spec.alpha == 1.0 else (1.0 - spec.alpha) * spec.scale * surrogate + spec.alpha * ce
    return {"loss": loss, "ce": ce, "div": f.detach()}


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    return labels != IGNORE_INDEX


def reduce_loss(loss_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: int | float | torch.Tensor) -> torch.Tensor:
    """The one reduction: sum of ``loss_BT`` over supervised positions / ``num_tokens``.

    ``num_tokens`` is the number of supervised tokens in the whole optimizer step (all micro-batches,
    all ranks), so accumulated micro-batch losses add up to the loss of the full step. An all-masked
    input gives 0 (with a gradient of 0), never NaN.
    """
    total = torch.where(mask_BT, loss_BT, torch.zeros_like(loss_BT)).sum()
    if isinstance(num_tokens, torch.Tensor):
        num_tokens = num_tokens.clamp_min(1).to(total.dtype)
    else:
        num_tokens = max(float(num_tokens), 1.0)
    return total / num_tokens
