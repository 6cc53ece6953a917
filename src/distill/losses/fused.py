"""Forward KL and cross-entropy of a loss chunk in closed form: value and gradient without autograd.

For ``loss = alpha * CE + (1 - alpha) * s * KL(p_T || q_T)`` (``q_T = softmax(z / T)``, ``s`` = T^2 or 1) the
gradient with respect to the student logits is known in closed form:

    d loss / d z = (1 - alpha) * s / T * (q_T - p_T)  +  alpha * (q_1 - onehot(label))

and for a sparse target with a tail (teacher probabilities ``p_i`` on ids S and the rest ``r`` on every other
id, docs/methods.md §2) the tail class contributes ``-r * e_j / rest`` at every id j outside S (``e_j`` the
exponentials, ``rest`` their sum outside S), so that

    d KL / d z_j = M q_j - p_j  (j in S),    M q_j - r * e_j / rest  (j not in S),

M the target's mass (sum of the p_i and r: 1 up to the target's rounding, kept so that this is the gradient of
the value computed).

:func:`loss_chunk` computes this straight into the chunk's logit buffer (which then holds ``d loss_sum / d
raw logits``), a few V-wide passes with no graph, where autograd through
:func:`distill.losses.kd_loss_per_token` keeps about twice as many V-sized temporaries and runs the backward of
every op. It is the chunked loss's path for the default objective (bf16 / fp16 logit buffers are read into fp32
and the gradient written back); every other divergence and a sparse target renormalized over its ids (no
tail) take the autograd path, which stays the reference (tests/test_fused.py checks this module against it,
tests/test_chunked.py both paths against materialized logits).

Exactness is the autograd path's: the tail sum is taken directly over the exponentials outside S (never the
total minus the members' share), so value and gradient stay exact to the dtype's rounding however small the
tail; a row whose tail underflows next to its maximum sends the whole chunk back to the autograd path (its
exact log-sum-exp over the non-members); a teacher with zero-mass ids contributes 0 there (not ``0 * -inf``);
a NaN teacher gives NaN, as there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from distill.losses.divergences import LossSpec, SparseTarget, upcast

__all__ = ["Scratch", "disabled", "loss_chunk", "supports"]

_enabled = True


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block every loss chunk takes the autograd path (the reference): for comparisons
    (``benchmarks/kd_step.py --autograd``) and for ruling this module out when debugging. The chunk planner
    keeps the closed form's sizes, so the autograd path's temporaries may then exceed the memory budget."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


class Scratch:
    """Reused (rows, V) work tensors of a chunk loop: allocating them afresh for every loss chunk costs, on a
    CPU, about as much as the arithmetic (the allocator returns big blocks to the system, and each new one
    page-faults back in)."""

    def __init__(self):
        self._bufs: dict[int, torch.Tensor] = {}

    def get(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped and typed like ``like`` (contents undefined), the same storage across calls."""
        buf = self._bufs.get(slot)
        n = like.numel()
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._bufs[slot] = buf
        return buf[:n].view(like.shape)


def supports(spec: LossSpec, raw: torch.Tensor, teacher) -> bool:
    """Whether :func:`loss_chunk` computes this chunk: forward KL (or no teacher: cross-entropy), a dense teacher
    or a sparse target with a tail (and not inside :func:`disabled`)."""
    if not _enabled or not raw.dtype.is_floating_point:
        return False
    if teacher is None:
        return spec.divergence != "sampled_reverse_kl"
    if spec.divergence != "forward_kl":
        return False
    return not isinstance(teacher, SparseTarget) or teacher.tail is not None


def loss_chunk(head, spec: LossSpec, raw: torch.Tensor, labels: torch.Tensor, teacher, need_grad: bool,
               observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None],
               scratch: Scratch | None = None) -> torch.Tensor | None:
    """The summed loss of one loss chunk; ``raw`` (r, V) the student's raw logits (``head.postprocess`` gives
    the logits), ``labels`` (r,) supervised (no ``IGNORE_INDEX``: the chunk loop drops those rows), ``teacher``
    None, postprocessed dense logits (r, V) or a :class:`SparseTarget` with a tail.

    ``observe(z, ce, div)`` is called with the logits and the per-row CE and divergence (None without a
    teacher) while ``z`` is intact; then, with ``need_grad``, ``raw`` is overwritten with ``d loss_sum / d raw``
    (not divided by the number of tokens). Returns None, with ``raw`` untouched and ``observe`` not called,
    when a row's tail underflows (the caller takes the autograd path for the chunk). ``scratch``: work tensors
    reused across calls (a fresh one each call without).
    """
    scratch = Scratch() if scratch is None else scratch
    z = head.postprocess(raw) if head.has_postprocess else upcast(raw)  # bf16 / fp16 buffers: fp32 math
    t = spec.temperature
    lab = labels.clamp_min(0).unsqueeze(-1)
    alpha = 1.0 if teacher is None else spec.alpha  # the CE weight
    a = (1.0 - alpha) * spec.scale / t  # the divergence's gradient factor w.r.t. z (d z_T / d z = 1 / T)
    p = lq = sparse = None
    if teacher is None:
        lq = torch.log_softmax(z, -1, out=scratch.get(0, z))
        ce, div = -lq.gather(-1, lab).squeeze(-1), None
    elif isinstance(teacher, SparseTarget):
        sparse = _SparseTail(z, t, teacher, lab, scratch)
        if sparse.underflow:
            return None
        ce, div = sparse.ce, sparse.div
    else:
        zt = z if t == 1.0 else torch.div(z, t, out=scratch.get(5, z))
        lq = torch.log_softmax(zt, -1, out=scratch.get(0, z))
        # bf16 / fp16 teacher logits (autocast) are read into fp32 first; T divides in fp32
        tz = teacher if teacher.dtype == z.dtype else scratch.get(4, z).copy_(teacher)
        if t != 1.0:
            tz = torch.div(tz, t, out=scratch.get(4, z))
        lp = torch.log_softmax(tz, -1, out=scratch.get(1, z))
        p = torch.softmax(tz, -1, out=scratch.get(2, z))  # (a softmax pass costs less than exp of lp here)
        div = _kl_rows(p, lp.sub_(lq))  # lp now holds log p - log q
        del lp, tz
        ce = -lq.gather(-1, lab).squeeze(-1) if t == 1.0 else _ce(z, lab, scratch.get(4, z))
    if teacher is None or alpha == 1.0:
        loss = ce
    else:
        loss = div * ((1.0 - alpha) * spec.scale)
        if alpha > 0:
            loss = loss + alpha * ce
    observe(z, ce, div)
    if not need_grad:
        return loss.sum()
    # The CE part at T != 1 needs softmax(z) at T = 1: taken before raw (which may be z) is overwritten.
    q1 = (torch.softmax(z, -1, out=scratch.get(4, z)) if alpha > 0 and t != 1.0 and teacher is not None
          else None)
    slope = _postprocess_slope(head, z) if head.has_postprocess else None
    out = raw if raw.dtype == z.dtype else scratch.get(3, z)
    if sparse is not None:
        grad = sparse.grad(a, alpha if t == 1.0 else 0.0, out)
    elif p is None:  # teacher None: softmax(z) (the label's -1 below)
        grad = torch.exp(lq, out=out)
    else:
        # (a + alpha) q - a p at T = 1, a (q_T - p) otherwise; q_T from a softmax pass (lp's tensor is free).
        q = torch.softmax(zt, -1, out=scratch.get(1, z))
        q_scale = a + alpha if t == 1.0 else a
        if q_scale == 1.0 and a == 1.0:  # the default (T = 1, alpha = 0): one pass
            grad = torch.sub(q, p, out=out)
        else:
            grad = torch.mul(q, q_scale, out=out)
            if a != 0.0:  # a = 0: alpha = 1, the teacher has no weight
                grad.sub_(p, alpha=a)
    if q1 is not None:
        grad.add_(q1, alpha=alpha)
    if alpha > 0:
        grad.scatter_add_(-1, lab, torch.full(lab.shape, -alpha, dtype=grad.dtype, device=grad.device))
    if slope is not None:
        grad.mul_(slope)
    if grad is not raw:
        raw.copy_(grad)
    return loss.sum()


def _kl_rows(p: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum p * (log p - log q)`` from ``p`` and ``diff = log p - log q``, both (r, V), as row dot
    products. Zero-mass ids (``0 * -inf``) count 0; a NaN teacher stays NaN."""
    div = torch.linalg.vecdot(p, diff)
    bad = torch.isnan(div)
    if bool(bad.any()):
        rows = bad.nonzero(as_tuple=True)
        keep = (p[rows] > 0) | torch.isnan(p[rows])
        div[rows] = torch.where(keep, p[rows] * diff[rows], 0.0).sum(-1)
    return div


def _ce(z: torch.Tensor, lab: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Per-row CE at T = 1 from the logits (a log-softmax pass into ``work``: logsumexp costs more on a CPU)."""
    return -torch.log_softmax(z, -1, out=work).gather(-1, lab).squeeze(-1)


class _SparseTail:
    """Forward KL toward a sparse target with a tail, from one softmax pass over the (tempered) logits.

    ``e`` holds ``q_T = softmax(z_T)``, then (when some row has tail mass) with the members set to 0, so that the
    tail's sum is taken directly over the other ids (a minimum, so that a padded duplicate of a member never
    restores it). ``underflow``: some row with tail mass has its tail below what fp32 keeps next to its maximum.
    """

    def __init__(self, z: torch.Tensor, t: float, target: SparseTarget, lab: torch.Tensor, scratch: Scratch):
        work = scratch.get(0, z)
        zt = z if t == 1.0 else torch.div(z, t, out=scratch.get(5, z))
        dtype = zt.dtype
        tiny = torch.finfo(dtype).tiny
        self.ids = ids = target.ids
        self.probs = probs = upcast(target.probs).to(dtype)
        self.tail = tail = upcast(target.tail).to(dtype).clamp_min(0.0)
        self.present = present = probs > 0
        # One softmax pass (cheaper here than exp(z - max)): e = q_T. Its normalizer S (relative to exp(max))
        # is 1 / the largest q, so log q_id = z_id - max - log S exactly, even where q_id underflows.
        m = zt.amax(-1, keepdim=True)
        self.e = e = torch.softmax(zt, -1, out=work)
        log_all = -e.amax(-1, keepdim=True).log()
        self.e_ids = e.gather(-1, ids)
        lq_ids = zt.gather(-1, ids) - m - log_all
        logp = torch.where(present, probs, 1.0).log()
        div = torch.where(present, probs * (logp - lq_ids), 0.0).sum(-1)
        self.with_tail = bool((tail > 0).any())
        self.underflow = False
        self.rest = None
        if self.with_tail:
            e.scatter_reduce_(-1, ids, self.e_ids.masked_fill(present, 0.0), "amin")
            self.rest = rest = e.sum(-1)
            self.underflow = bool(((rest < tiny * math.exp(20.0)) & (tail > 0)).any())
            lq_tail = rest.log()
            div = div + torch.where(tail > 0, tail * (tail.clamp_min(tiny).log() - lq_tail), 0.0)
        self.div = div
        self.ce = ((m + log_all).squeeze(-1) - z.gather(-1, lab).squeeze(-1) if t == 1.0
                   else _ce(z, lab, scratch.get(4, z)))

    def grad(self, a: float, ce_weight: float, out: torch.Tensor) -> torch.Tensor:
        """``a * d KL / d z_T + ce_weight * softmax(z_T)`` (the label's -1 left to the caller), into ``out``.

        With M the target's mass (sum of p and r), outside the ids: ``q_j (a M + ce_weight - a r / rest)`` (rest:
        the student's mass outside the ids); at the ids: ``(a M + ce_weight) q_id - a p_id`` (with no tail
        anywhere, ``e`` still holds the members)."""
        e = self.e
        # The target's total mass (1 up to its rounding; kept, so that this is the gradient of the value computed).
        q_coef = a * (self.probs.sum(-1, keepdim=True) + self.tail.unsqueeze(-1)) + ce_weight
        if self.with_tail:
            tiny = torch.finfo(e.dtype).tiny
            share = torch.where(self.tail > 0, self.tail / self.rest.clamp_min(tiny), 0.0).unsqueeze(-1)
            coef = q_coef - a * share
            member = q_coef * self.e_ids - a * self.probs
        else:
            coef = q_coef
            member = -a * self.probs
        torch.mul(e, coef, out=out)
        out.scatter_add_(-1, self.ids, member.masked_fill(~self.present, 0.0))
        return out


def _postprocess_slope(head, z: torch.Tensor) -> torch.Tensor:
    """d z / d raw for ``z = c * tanh(scale * raw / c)`` (or ``scale * raw``), from z itself."""
    if head.softcap is None:
        return torch.full((), head.logit_scale, dtype=z.dtype, device=z.device)
    c = head.softcap
    return (z / c).square_().neg_().add_(1.0).mul_(head.logit_scale)
