"""Cross-tokenizer losses over aligned groups (docs/methods.md §14): pure functions of tensors.

The student and the teacher tokenize the same text differently. Their label rows are grouped where both
tokenizations reach the same byte (:class:`AlignedGroups`; built by ``distill.crosstok``). A group's
distribution on one side, at temperature T, has V + 1 classes:

    P(v)    = p_first(v) · e^c            for each token v of the vocabulary
    P(tail) = 1 − e^c,                    c = Σ_{later rows k of the group} log p_k(y_k)

(the group's first row's full distribution times the probabilities of the group's later labels; the tail is
"the text after the first token did not follow"). With groups of one token c = 0 and the tail is exactly
zero, so every loss here equals its same-tokenizer counterpart. The three methods (``CROSSTOK_METHODS``):

* ``pkl``: the student's first-row distribution pushed through the projection W (:class:`Projection`,
  student token -> weighted teacher tokens) against the teacher's first row, over the teacher tokens W
  reaches, each side renormalized over them; the divergence is ``spec.divergence`` (forward KL by default).
* ``gold``: exact vocabulary matches (:class:`ExactMatches`, pairs with the same bytes) get
  ``spec.divergence`` between the two first rows renormalized over the matched tokens; the unmatched tokens'
  group probabilities ``P`` (without the tail) get ULD's sorted L1.
* ``uld``: ULD alone, ``Σ_k |sort(P_s)_k − sort(P_t)_k|`` over the V + 1 classes, the shorter side padded
  with zeros (identity-blind).

A divergence over some tokens renormalizes both sides over them, so e^c cancels there: mass the other side
cannot name (a teacher token W never reaches, an unmatched token) is left out rather than compared with
nothing, and a tail is never compared with a side whose tail is exactly zero (a group of one token), which
would make a KL infinite. The later rows enter through ULD's terms (and through the cross-entropy).

A sparse teacher (a server's top-k log-probabilities and the realized token, :class:`SparseTarget`) names
only the ids it sent: its other ids are -inf (:func:`sent_logprobs`). ``pkl`` and ``gold``'s divergence
then run over the teacher tokens it named (each side renormalized over them, as above: the biased top-k
convention of a cache without its tail), and ULD's vectors have zeros where it sent nothing. The later rows
need only their labels' log-probabilities, which a server always sends (the realized token). With every id
sent (``top_k: all``) this is the dense computation, to rounding.

Each function returns the divergence **per group** (no T² factor, no reduction). :func:`chunked_crosstok_loss`
computes it from final hidden states and output layers a chunk of groups at a time under activation
checkpointing, so no (rows, V) tensor of either vocabulary exists beyond one chunk, in forward or backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch
from torch.utils.checkpoint import checkpoint

from distill.losses.chunked import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    DenseSignal,
    LinearHead,
    chunked_kd_loss,
    naive_kd_loss,
)
from distill.losses.divergences import FORWARD_KL, LossSpec, SparseTarget, divergence_from_logprobs, tempered

CrossTokMethod = Literal["pkl", "gold", "uld"]
CROSSTOK_METHODS: tuple[str, ...] = get_args(CrossTokMethod)


@dataclass
class Projection:
    """W: each student token -> up to K weighted teacher tokens (never a dense V_s x V_t matrix).

    ids: (V_s, K) long teacher ids; weights: (V_s, K) float >= 0, 0 marks padding. A row sums to 1 (a
    student token mapped to teacher tokens) or to 0 (mapped nowhere). num_teacher: V_t.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    num_teacher: int
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.ids.shape != self.weights.shape or self.ids.dim() != 2:
            raise ValueError(f"projection ids {tuple(self.ids.shape)} and weights {tuple(self.weights.shape)} "
                             "must be the same (V_s, K) shape")
        if self.ids.numel() and (int(self.ids.min()) < 0 or int(self.ids.max()) >= self.num_teacher):
            raise ValueError(f"projection ids must lie in [0, {self.num_teacher}) (the teacher's vocabulary)")

    @property
    def num_student(self) -> int:
        return self.ids.shape[0]

    @classmethod
    def identity(cls, vocab_size: int) -> Projection:
        """The projection between a tokenizer and itself."""
        return cls(torch.arange(vocab_size).unsqueeze(1), torch.ones(vocab_size, 1), vocab_size)

    def support(self) -> torch.Tensor:
        """(V_t,) bool: teacher tokens some student token maps to (computed once)."""
        if "support" not in self._cache:
            out = torch.zeros(self.num_teacher, dtype=torch.bool)
            self._cache["support"] = out.index_fill_(0, self.ids[self.weights > 0], True)
        return self._cache["support"]

    def transposed(self, device, dtype) -> torch.Tensor:
        """Wᵀ as a sparse (V_t, V_s) COO tensor of the nonzero entries (built once per device and dtype)."""
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._build_transposed(device, dtype)
        return self._cache[key]

    def _build_transposed(self, device, dtype) -> torch.Tensor:
        keep = self.weights > 0
        rows = self.ids[keep]
        cols = torch.arange(self.num_student).unsqueeze(1).expand_as(self.ids)[keep]
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), self.weights[keep].to(dtype),
                                       (self.num_teacher, self.num_student),
                                       check_invariants=True).coalesce().to(device)


@dataclass(frozen=True)
class ExactMatches:
    """Pairs of a student and a teacher token with the same bytes (each id at most once on each side)."""

    student_ids: torch.Tensor  # (M,) long
    teacher_ids: torch.Tensor  # (M,) long


@dataclass
class AlignedGroups:
    """Label rows of both sides grouped by a shared byte boundary.

    student_group: (N_s,) long, the group of each student row (-1: in no group, left out of the loss);
    student_labels: (N_s,) long, the token each student row predicts; teacher_group, teacher_labels: the same
    for the teacher's N_t rows. Groups are numbered 0 .. num_groups - 1 in row order on both sides, each
    with at least one row on each side; a group's first row (its smallest row index) gives the full
    distribution, its later rows their label's probability.
    """

    student_group: torch.Tensor
    student_labels: torch.Tensor
    teacher_group: torch.Tensor
    teacher_labels: torch.Tensor
    num_groups: int

    def check(self) -> None:
        """A ValueError unless both sides number the groups 0 .. num_groups - 1 in ascending row order."""
        for side, group in (("student", self.student_group), ("teacher", self.teacher_group)):
            g = group[group >= 0]
            ascending = not bool((g[1:] < g[:-1]).any())
            if not ascending or torch.unique(g).numel() != self.num_groups or (
                    g.numel() and int(g.max()) >= self.num_groups):
                raise ValueError(f"aligned groups: the {side}'s rows must number the groups 0 .. "
                                 f"{self.num_groups - 1} in ascending row order, each at least once")


def _divergence(lq: torch.Tensor, lp: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    return divergence_from_logprobs(lq, lp, spec.divergence, beta=spec.beta, skew=spec.skew)


def sorted_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ULD: Σ_k |sort(a)_k − sort(b)_k| over the last axis, both sorted descending, the shorter padded with 0."""
    n = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a.sort(-1, descending=True).values, (0, n - a.shape[-1]))
    b = torch.nn.functional.pad(b.sort(-1, descending=True).values, (0, n - b.shape[-1]))
    return (a - b).abs().sum(-1)


def _normalized(classes: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (G, C) of some classes, renormalized over them."""
    return classes - torch.logsumexp(classes, dim=-1, keepdim=True)


def _compared(s_classes: torch.Tensor, t_classes: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """``spec``'s divergence (G,) between two sides' log-masses over some classes (G, C), each side renormalized
    over the classes the teacher names: every class of a dense teacher; of a sparse one (a server's top-k) the
    ids it sent, a finite entry (:func:`sent_logprobs`). A group where it names none compares nothing (0)."""
    known = t_classes > -math.inf
    if bool(known.all()):
        return _divergence(_normalized(s_classes), _normalized(t_classes), spec)
    named = known.any(-1, keepdim=True)
    t = torch.where(named, t_classes, torch.zeros_like(t_classes))
    s = torch.where(known | ~named, s_classes, torch.full_like(s_classes, -math.inf))
    value = _divergence(_normalized(s), _normalized(t), spec)
    return torch.where(named.squeeze(-1), value, torch.zeros_like(value))


def _pkl(s_logp, t_logp, spec: LossSpec, projection: Projection) -> torch.Tensor:
    support = projection.support().to(s_logp.device)
    m = s_logp.detach().amax(-1, keepdim=True)
    w_t = projection.transposed(s_logp.device, s_logp.dtype)
    pushed = torch.sparse.mm(w_t, (s_logp - m).exp().T).T  # (G, V_t): q W, relative to exp(m)
    everything = bool(support.all())
    if not everything:
        pushed = pushed[:, support]
    tiny = torch.finfo(pushed.dtype).tiny
    return _compared(pushed.clamp_min(tiny).log() + m, t_logp if everything else t_logp[:, support], spec)


def _gold(s_logp, s_c, t_logp, t_c, spec: LossSpec, matches: ExactMatches) -> torch.Tensor:
    s_ids, t_ids = matches.student_ids.to(s_logp.device), matches.teacher_ids.to(s_logp.device)
    s_rest = torch.ones(s_logp.shape[-1], dtype=torch.bool, device=s_logp.device).index_fill_(0, s_ids, False)
    t_rest = torch.ones(t_logp.shape[-1], dtype=torch.bool, device=t_logp.device).index_fill_(0, t_ids, False)
    matched = _compared(s_logp[:, s_ids], t_logp[:, t_ids], spec)
    if not bool(s_rest.any()) and not bool(t_rest.any()):
        return matched
    s_un = (s_logp[:, s_rest] + s_c.unsqueeze(-1)).exp()
    t_un = (t_logp[:, t_rest] + t_c.unsqueeze(-1)).exp()
    return matched + sorted_l1(s_un, t_un)


def _uld(s_logp, s_c, t_logp, t_c) -> torch.Tensor:
    s = torch.cat([(s_logp + s_c.unsqueeze(-1)).exp(), -torch.expm1(s_c).unsqueeze(-1)], -1)
    t = torch.cat([(t_logp + t_c.unsqueeze(-1)).exp(), -torch.expm1(t_c).unsqueeze(-1)], -1)
    return sorted_l1(s, t)


def group_divergence(
    student_logp: torch.Tensor,
    student_later: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_later: torch.Tensor,
    method: CrossTokMethod,
    spec: LossSpec = FORWARD_KL,
    *,
    projection: Projection | None = None,
    matches: ExactMatches | None = None,
) -> torch.Tensor:
    """The divergence of each group from its two sides (see the module docstring).

    student_logp: (G, V_s) log-probabilities of each group's first student row at T; student_later: (G,)
    c_s, the sum of the group's later student labels' log-probabilities at T (0 for a group of one);
    teacher_logp (G, V_t), teacher_later (G,): the same for the teacher. ``pkl`` needs ``projection``,
    ``gold`` needs ``matches``. Returns (G,).
    """
    if method == "pkl":
        if projection is None:
            raise ValueError("the pkl cross-tokenizer loss needs the projection W")
        if projection.num_student != student_logp.shape[-1] or projection.num_teacher != teacher_logp.shape[-1]:
            raise ValueError(f"projection W is {projection.num_student} x {projection.num_teacher} but the "
                             f"vocabularies are {student_logp.shape[-1]} (student) and {teacher_logp.shape[-1]} "
                             "(teacher): build W from these two tokenizers")
        return _pkl(student_logp, teacher_logp, spec, projection)
    if method == "gold":
        if matches is None:
            raise ValueError("the gold cross-tokenizer loss needs the exact vocabulary matches")
        return _gold(student_logp, student_later, teacher_logp, teacher_later, spec, matches)
    if method == "uld":
        return _uld(student_logp, student_later, teacher_logp, teacher_later)
    raise ValueError(f"unknown cross-tokenizer loss {method!r}; choose one of {', '.join(CROSSTOK_METHODS)}")


def sent_logprobs(target: SparseTarget, num_classes: int) -> torch.Tensor:
    """(R, V) log-probabilities of a sparse teacher's R rows (a server's top-k and realized token, at the
    temperature it scored at): its entries' values, -inf at every id it did not send (its padding, ``probs``
    0, included)."""
    ids, probs = target.ids, target.probs
    real = probs > 0
    columns = torch.where(real, ids, torch.full_like(ids, num_classes))  # padding lands in a column dropped below
    values = torch.where(real, probs.clamp_min(torch.finfo(probs.dtype).tiny).log(),
                         torch.full_like(probs, -math.inf))
    out = torch.full((ids.shape[0], num_classes + 1), -math.inf, dtype=probs.dtype, device=probs.device)
    return out.scatter_(1, columns, values)[:, :num_classes]


def group_logprobs(logits: torch.Tensor, group: torch.Tensor, labels: torch.Tensor, num_groups: int,
                   temperature: float, *, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One side's parts of each group from its rows' logits (R, V), their groups (R,) in [0, num_groups)
    or -1, ascending, and their labels (R,): the first row's log-probabilities (G, V) and the later labels'
    summed log-probabilities c (G,), both at temperature T. ``normalized``: the rows are log-probabilities
    already, at the temperature they were scored at (a sparse teacher's, :func:`sent_logprobs`)."""
    inside = group >= 0
    rows = inside.nonzero().squeeze(1)
    g = group[rows]
    first = torch.ones_like(g, dtype=torch.bool)
    first[1:] = g[1:] != g[:-1]
    picked = logits.index_select(0, rows)
    logp = picked if normalized else torch.log_softmax(tempered(picked, temperature), dim=-1)
    first_logp = logp[first]
    later = ~first
    label_logp = logp[later].gather(-1, labels[rows][later].unsqueeze(-1)).squeeze(-1)
    c = torch.zeros(num_groups, dtype=logp.dtype, device=logp.device).index_add(0, g[later], label_logp)
    return first_logp, c


def naive_crosstok_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | SparseTarget,
                        groups: AlignedGroups, method: CrossTokMethod, spec: LossSpec = FORWARD_KL, *,
                        projection: Projection | None = None, matches: ExactMatches | None = None,
                        teacher_vocab: int | None = None) -> torch.Tensor:
    """Reference: the per-group divergence (G,) from materialized logits (N_s, V_s) and (N_t, V_t), or a sparse
    teacher's N_t rows (its ``teacher_vocab`` ids, default: W's)."""
    groups.check()
    s_logp, s_c = group_logprobs(student_logits, groups.student_group, groups.student_labels, groups.num_groups,
                                 spec.temperature)
    with torch.no_grad():
        sparse = isinstance(teacher_logits, SparseTarget)
        rows = sent_logprobs(teacher_logits, _teacher_vocab(teacher_vocab, projection)) if sparse else teacher_logits
        t_logp, t_c = group_logprobs(rows, groups.teacher_group, groups.teacher_labels, groups.num_groups,
                                     spec.temperature, normalized=sparse)
    return group_divergence(s_logp, s_c, t_logp, t_c, method, spec, projection=projection, matches=matches)


def _teacher_vocab(teacher_vocab: int | None, projection: Projection | None) -> int:
    if teacher_vocab is not None:
        return teacher_vocab
    if projection is None:
        raise ValueError("a sparse teacher's rows need the teacher's vocabulary size (teacher_vocab or W)")
    return projection.num_teacher


def _rows_of(group: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
    return ((group >= g0) & (group < g1)).nonzero().squeeze(1)


def chunked_crosstok_loss(
    student_hidden: torch.Tensor,
    student_head: LinearHead,
    teacher: DenseSignal | SparseTarget,
    groups: AlignedGroups,
    method: CrossTokMethod,
    spec: LossSpec = FORWARD_KL,
    *,
    projection: Projection | None = None,
    matches: ExactMatches | None = None,
    chunk_groups: int | None = None,
    teacher_vocab: int | None = None,
) -> torch.Tensor:
    """The per-group divergence (G,) from the student's final hidden states (N_s, H) and output layer and a
    teacher's N_t rows: its final hidden states and output layer (:class:`DenseSignal`), or a server's top-k
    log-probabilities over ``teacher_vocab`` ids (default: W's; :class:`SparseTarget`, at the temperature it
    scored at), ``chunk_groups`` groups at a time.

    Each chunk forms the logits of its own rows only, inside :func:`torch.utils.checkpoint.checkpoint`: nothing
    V-sized is kept between chunks, and backward recomputes one chunk at a time (the teacher's logits too, a
    constant). The value and gradients equal :func:`naive_crosstok_loss` on materialized logits.
    """
    groups.check()
    sparse = isinstance(teacher, SparseTarget)
    v_s = student_head.num_classes
    v_t = _teacher_vocab(teacher_vocab, projection) if sparse else teacher.head.num_classes
    if chunk_groups is None:  # each row: its logits and about four V-sized temporaries, both sides
        chunk_groups = max(1, DEFAULT_MEMORY_BUDGET_BYTES // (4 * 5 * (v_s + v_t)))
    if chunk_groups < 1:
        raise ValueError(f"chunk_groups must be >= 1, got {chunk_groups}")
    out = []
    for g0 in range(0, groups.num_groups, chunk_groups):
        g1 = min(g0 + chunk_groups, groups.num_groups)
        s_rows, t_rows = _rows_of(groups.student_group, g0, g1), _rows_of(groups.teacher_group, g0, g1)
        s_group, s_lab = groups.student_group[s_rows] - g0, groups.student_labels[s_rows]
        t_group, t_lab = groups.teacher_group[t_rows] - g0, groups.teacher_labels[t_rows]
        t_part = teacher[t_rows] if sparse else teacher.rows(t_rows).detach()

        def chunk(h_s, s_group=s_group, s_lab=s_lab, t_part=t_part, t_group=t_group, t_lab=t_lab, n=g1 - g0):
            s_logp, s_c = group_logprobs(student_head.logits(h_s), s_group, s_lab, n, spec.temperature)
            with torch.no_grad():
                rows = sent_logprobs(t_part, v_t) if sparse else teacher.head.logits(t_part)
                t_logp, t_c = group_logprobs(rows, t_group, t_lab, n, spec.temperature, normalized=sparse)
            return group_divergence(s_logp, s_c, t_logp, t_c, method, spec, projection=projection, matches=matches)

        h_s = student_hidden.index_select(0, s_rows)
        out.append(checkpoint(chunk, h_s, use_reentrant=False) if torch.is_grad_enabled() else chunk(h_s))
    if not out:
        return student_hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


@dataclass
class CrossTokSignal:
    """A teacher with another tokenizer, as the training loss reads it: its N_t rows over its own tokens
    (``teacher``: its final hidden states and output layer, or a server's top-k log-probabilities), the groups
    of both sides' rows, the method, and W and the exact matches (``projection`` is also what the logged KL
    reads, whatever the method, and gives the teacher's vocabulary size)."""

    teacher: DenseSignal | SparseTarget
    groups: AlignedGroups
    method: CrossTokMethod
    projection: Projection
    matches: ExactMatches


def crosstok_kd_loss(
    student_hidden: torch.Tensor,
    student_head: LinearHead,
    labels: torch.Tensor,
    signal: CrossTokSignal,
    num_tokens: int | float | torch.Tensor,
    spec: LossSpec = FORWARD_KL,
    *,
    chunked: bool = True,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss toward a teacher with another tokenizer: ``alpha * CE(labels) / num_tokens + (1 -
    alpha) * s * Σ_groups D / num_tokens`` (``s = T^2`` with ``t2_scale``), the CE over the student's own
    supervised rows and D the per-group divergence of ``signal.method`` (docs/methods.md §14).

    student_hidden (N_s, H) and labels (N_s,) as for :func:`~distill.losses.chunked.chunked_kd_loss`;
    ``chunked``: the memory-efficient path (else materialized logits, the reference). Returns ``(loss,
    stats)``, stats detached: ``ce_sum`` and ``count`` over the supervised student tokens, ``div_sum`` (the
    per-group divergences summed) and ``kl_sum`` (pkl's forward KL at T summed over the groups, whatever the
    method: with one tokenizer on both sides it is the ordinary KL)."""
    ce_spec = replace(spec, alpha=1.0)
    if chunked:
        ce, stats = chunked_kd_loss(student_hidden, student_head, labels, None, num_tokens, ce_spec,
                                    chunk_size=chunk_size, top1_stats=False)
    else:
        ce = naive_kd_loss(student_hidden, student_head, labels, None, num_tokens, ce_spec)
        with torch.no_grad():
            _, stats = chunked_kd_loss(student_hidden.detach(), student_head, labels, None, num_tokens, ce_spec,
                                       top1_stats=False)
    per_group = _group_loss(student_hidden, student_head, signal, signal.method, spec, chunked)
    stats["div_sum"] = per_group.detach().double().sum()
    if signal.method == "pkl" and spec.is_forward_kl:
        stats["kl_sum"] = stats["div_sum"]
    else:
        with torch.no_grad():
            kl = _group_loss(student_hidden.detach(), student_head, signal, "pkl",
                             replace(spec, divergence="forward_kl"), chunked)
        stats["kl_sum"] = kl.double().sum()
    total = per_group.sum() if per_group.numel() else student_hidden.sum() * 0.0
    loss = ce if spec.alpha == 1.0 else spec.alpha * ce + (1.0 - spec.alpha) * spec.scale * total / num_tokens
    return loss, stats


def _group_loss(student_hidden: torch.Tensor, student_head: LinearHead, signal: CrossTokSignal,
                method: CrossTokMethod, spec: LossSpec, chunked: bool) -> torch.Tensor:
    """The per-group divergence (G,) of ``method``, chunked or from materialized logits."""
    kw = dict(projection=signal.projection, matches=signal.matches)
    if chunked:
        return chunked_crosstok_loss(student_hidden, student_head, signal.teacher, signal.groups, method, spec, **kw)
    teacher = signal.teacher
    teacher_logits = teacher if isinstance(teacher, SparseTarget) else teacher.head.logits(teacher.hidden.detach())
    return naive_crosstok_loss(student_head.logits(student_hidden), teacher_logits, signal.groups, method, spec, **kw)
