"""Memory-efficient distillation loss: output-layer matmul + divergence, a chunk of tokens at a time.

The naive path materializes ``logits = hidden @ weight.T`` for every token, for the student and for a live
teacher, then a handful of ``(tokens, V)`` fp32 temporaries (log-softmax, divergence terms, and as many
again in backward). At V = 128k that is 0.5 MiB per token per tensor. :func:`chunked_kd_loss` takes the
final hidden states and the output layer(s) instead, so no ``(all tokens, V)`` tensor ever exists.

Two levels of chunking, both over supervised tokens only (unsupervised rows are dropped up front):

* a **chunk** of ``chunk_size`` rows is the unit of the matmuls: its raw logits (student, and teacher if
  live) are computed into two reused ``(chunk_size, V)`` buffers, and after the loss the student buffer
  holds the gradient w.r.t. those logits, from which two matmuls give the chunk's rows of
  ``grad_hidden`` and its contribution to ``grad_weight`` (accumulated in fp32). Big chunks keep the
  GEMMs efficient;
* a **loss chunk** of ``loss_chunk_size`` rows of a chunk gets its loss and the gradient w.r.t. its logits:
  for forward KL and plain CE in closed form (:mod:`distill.losses.fused`: a few V-wide passes into reused
  work tensors), for every other divergence through :func:`distill.losses.kd_loss_per_token` and autograd,
  which need about ten V-sized fp32 temporaries per row (more for JSD); small loss chunks keep those small
  (and, on CPU, cache-resident).

The value equals ``reduce_loss(kd_loss_per_token(logits, labels, teacher, ...)["loss"], mask, n)`` on
materialized logits (up to summation order), and so do the gradients.

Gradients are computed in the forward pass (a custom :class:`torch.autograd.Function`); backward only
scales the stored gradients by the incoming gradient (in place), so nothing is recomputed. They already
include the ``1 / num_tokens`` factor (applied to the (c, H) and (V, H) products, not to the (c, V)
buffer). Consequences: backward can run only once per call (no ``retain_graph`` re-use, no double
backward), and the teacher is a constant (no gradient reaches teacher tensors). Under ``torch.no_grad()``, or when nothing requires grad, no gradient work is done.

Sizes (:func:`plan_chunks`): with ``u = memory_budget_bytes / (4 V)`` (how many V-sized fp32 rows fit)
and ``n`` the V-sized fp32 temporaries one row of a loss chunk needs beyond the logit buffers (measured per
divergence and teacher type, with and without gradients: :func:`temporaries_per_token`), a quarter of
the budget goes to the loss chunk, ``loss_chunk_size = u / (4 n)``, and the rest to the logit buffers,
``chunk_size = (u - n * loss_chunk_size) / b`` with ``b`` the number of buffers (2 with a live teacher,
else 1; half a row each in bf16). Both at least 1, at most the number of supervised rows; ``chunk_size``
is rounded down to a multiple of 8 from 32 up. Defaults: :data:`DEFAULT_MEMORY_BUDGET_BYTES` (160 MiB)
on CPU, e.g. at V = 128k forward KL: chunks of 120 rows, loss chunks of 20 (JSD 4); and
:data:`DEFAULT_CUDA_MEMORY_BUDGET_BYTES` (1 GiB) on a GPU. Either size can be given explicitly. The budget
bounds the chunk temporaries; the fp32 weight gradient ``(V_rows, H)`` and the ``(N, H)`` hidden
gradient come on top (the naive path has those as well).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from distill.losses import fused
from distill.losses.divergences import (
    FORWARD_KL,
    IGNORE_INDEX,
    LossSpec,
    SparseTarget,
    kd_loss_per_token,
    reduce_loss,
    tempered,
    token_divergence,
    upcast,
)

__all__ = [
    "DEFAULT_CUDA_MEMORY_BUDGET_BYTES",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "DenseSignal",
    "LinearHead",
    "MixtureSignal",
    "Signal",
    "chunked_kd_loss",
    "logits_into",
    "default_memory_budget",
    "naive_kd_loss",
    "plan_chunks",
    "temporaries_per_token",
]

DEFAULT_MEMORY_BUDGET_BYTES = 160 * 2**20
DEFAULT_CUDA_MEMORY_BUDGET_BYTES = 2**30


@dataclass
class LinearHead:
    """An output layer: ``logits = softcap(scale * (hidden @ weight.T + bias))[..., :vocab_size]``.

    weight: (V_rows, H); bias: (V_rows,) or None. ``softcap`` (Gemma 2) maps ``x -> c * tanh(x / c)``.
    ``vocab_size`` keeps the first ``vocab_size`` rows only (padded embedding matrices; use the
    tokenizer's size so that student and teacher classes line up). The matmul runs in the input dtype;
    scale and soft-cap are applied in fp32 (the losses upcast to fp32 anyway).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None
    vocab_size: int | None = None

    @property
    def num_classes(self) -> int:
        rows = self.weight.shape[0]
        if self.vocab_size is None:
            return rows
        if not 0 < self.vocab_size <= rows:
            raise ValueError(f"vocab_size {self.vocab_size} must be in [1, {rows}] (the weight's rows)")
        return self.vocab_size

    @property
    def has_postprocess(self) -> bool:
        return self.logit_scale != 1.0 or self.softcap is not None

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight[:V], bias[:V])`` (views)."""
        v = self.num_classes
        w = self.weight if v == self.weight.shape[0] else self.weight[:v]
        b = self.bias if self.bias is None or v == self.bias.shape[0] else self.bias[:v]
        return w, b

    def raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ weight[:V].T + bias[:V]`` in the input dtype (before scale / soft-cap)."""
        w, b = self.sliced()
        return F.linear(hidden, w, b)

    def postprocess(self, raw: torch.Tensor) -> torch.Tensor:
        """Scale and soft-cap raw logits (fp32 if either applies, else unchanged)."""
        z = raw
        if self.logit_scale != 1.0:
            z = upcast(z) * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(upcast(z) / self.softcap) * self.softcap
        return z

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Materialized logits (..., V): the naive path."""
        return self.postprocess(self.raw_logits(hidden))


@dataclass
class DenseSignal:
    """A teacher given by its final hidden states and output layer; its logits are formed a chunk of rows
    at a time and never exist for all positions at once.

    hidden: (N, H_t) (or (B, T, H_t)); head: the teacher's output layer. Treated as a constant.
    """

    hidden: torch.Tensor
    head: LinearHead

    def rows(self, index) -> torch.Tensor:
        """Hidden states of some positions: a slice or a (M,) index tensor."""
        return self.hidden[index] if isinstance(index, slice) else self.hidden.index_select(0, index)


@dataclass
class MixtureSignal:
    """Several teachers' signals for the same positions (docs/methods.md §9), never materialized together: a
    chunk of rows of each member's logits at a time.

    signals: each member's :class:`DenseSignal` or :class:`SparseTarget`; weights: their shares (>= 0, summing
    to 1; a member of weight 0 is only logged); temperatures: each member's T; mix: ``probability`` (the
    divergence to the mixture ``p = sum_k w_k softmax(z_k / T_k)`` at the loss temperature; dense members
    only) or ``loss`` (``sum_k w_k [alpha CE + (1 - alpha) s_k D(p_k || q)]`` with each member at its own
    temperature T_k, ``s_k = T_k^2``).
    """

    signals: list
    weights: list[float]
    temperatures: list[float]
    mix: str = "probability"

    def __post_init__(self):
        if not len(self.signals) == len(self.weights) == len(self.temperatures) or not self.signals:
            raise ValueError("a mixture needs as many weights and temperatures as signals, and at least one")
        if self.mix not in ("probability", "loss"):
            raise ValueError(f"unknown mix {self.mix!r}; choose probability or loss")
        if min(self.weights) < 0 or abs(sum(self.weights) - 1.0) > 1e-6:
            raise ValueError(f"mixture weights must be >= 0 and sum to 1, got {self.weights}")
        if self.mix == "probability" and any(not isinstance(s, DenseSignal) for s in self.active_signals()):
            raise ValueError("a probability-space mixture needs every teacher's full distribution (live teachers); "
                             "top-k or sampled targets can be mixed in loss space (mix: loss)")

    def active(self) -> list[int]:
        """The members with a positive weight (the others are only logged)."""
        return [k for k, w in enumerate(self.weights) if w > 0]

    def active_signals(self) -> list:
        return [self.signals[k] for k in self.active()]


# What a teacher gives the loss for a batch's positions: dense (hidden states + output layer), sparse
# (ids + probabilities, with or without a tail), several teachers, or nothing (plain cross-entropy).
Signal = DenseSignal | SparseTarget | MixtureSignal | None


def logits_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """``out = x @ w.T + b`` for ``x`` of shape (C, H), ``out`` (C, V) preallocated.

    On CPU with few rows, BLAS is markedly faster (about 1.2-1.5x at 32-128 rows, H = 1024, V = 128k)
    computing ``w @ x.T`` and transposing than computing ``x @ w.T``; it is done in vocabulary slices so the
    transposed temporary stays at 1/8 of ``out``. From a few hundred rows on the plain product into ``out``
    is as fast or faster (1.4x at 2,040 rows, H = 128, V = 2,048), and it writes no copy.
    """
    if x.device.type == "cpu" and x.shape[0] < 256:
        v = w.shape[0]
        step = max(1, -(-v // 8))
        for s in range(0, v, step):
            out[:, s : s + step].copy_(torch.mm(w[s : s + step], x.t()).t())
    else:
        torch.mm(x, w.t(), out=out)
    if b is not None:
        out.add_(b)


# V-sized fp32 temporaries per token of a loss chunk at its peak, measured with
# ``python benchmarks/loss_memory.py --calibrate`` (CPU, fp32, live bytes, loss chunk = chunk) and rounded
# up: (teacher type, divergence) -> (with gradients, without). These include the token's raw logits (and a
# live teacher's), which live in the chunk buffers. The sparse row is for K = 64 with a tail.
_TEMPORARIES: dict[tuple[str, str | None], tuple[int, int]] = {
    ("none", None): (3, 3),  # closed form (distill.losses.fused)
    ("sparse", None): (7, 6),  # the autograd path's (forward KL toward a tail in closed form takes 3)
    ("dense", "forward_kl"): (6, 6),  # closed form
    ("dense", "reverse_kl"): (12, 9),
    ("dense", "jsd"): (20, 14),
    ("dense", "skew_kl"): (14, 10),
    ("dense", "skew_reverse_kl"): (15, 10),
    ("dense", "tvd"): (10, 9),
    ("dense", "jeffreys"): (14, 10),
}
# Logit scale / soft-cap: a few more V-sized tensors per head (scaled, tanh output, capped).
_POSTPROCESS_TEMPORARIES = 2


def temporaries_per_token(
    teacher: str, kind: str | None = None, *, grad: bool = True, postprocess: bool = False
) -> int:
    """V-sized fp32 tensors one token needs at the peak of a loss chunk, its logit rows included.

    teacher: "none" | "dense" | "sparse"; kind: the divergence (matters for a dense teacher);
    grad: gradients are computed; postprocess: a head has a logit scale or soft-cap.
    """
    key = (teacher, kind) if teacher == "dense" else (teacher, None)
    with_grad, without = _TEMPORARIES.get(key, max(_TEMPORARIES.values()))
    n = with_grad if grad else without
    return n + (_POSTPROCESS_TEMPORARIES if postprocess else 0)


def default_memory_budget(device: torch.device | str | None = None) -> int:
    """:data:`DEFAULT_MEMORY_BUDGET_BYTES`, or :data:`DEFAULT_CUDA_MEMORY_BUDGET_BYTES` off the CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return DEFAULT_MEMORY_BUDGET_BYTES if dev.type == "cpu" else DEFAULT_CUDA_MEMORY_BUDGET_BYTES


def plan_chunks(
    vocab_size: int,
    num_rows: int,
    *,
    temporaries: int,
    buffers: float = 2.0,
    memory_budget_bytes: int | None = None,
    chunk_size: int | None = None,
    loss_chunk_size: int | None = None,
) -> tuple[int, int]:
    """``(chunk_size, loss_chunk_size)`` for a memory budget (see the module docstring).

    temporaries: :func:`temporaries_per_token` (logit rows included); buffers: V-sized fp32 rows per
    chunk row that the logit buffers take (2 with a live teacher, 1 otherwise; halve for bf16).
    Sizes given explicitly are kept (``loss_chunk_size`` is capped at ``chunk_size``).
    """
    budget = DEFAULT_MEMORY_BUDGET_BYTES if memory_budget_bytes is None else int(memory_budget_bytes)
    rows_cap = max(int(num_rows), 1)
    units = budget / (vocab_size * 4.0)  # V-sized fp32 rows that fit in the budget
    extra = max(1.0, temporaries - buffers)  # per loss-chunk row, beyond the logit buffers
    if loss_chunk_size is None:
        loss_chunk_size = max(1, int(units / (4 * extra)))
    if chunk_size is None:
        chunk_size = max(loss_chunk_size, int((units - extra * loss_chunk_size) / max(buffers, 0.5)))
        if chunk_size >= 32:
            chunk_size -= chunk_size % 8
    chunk_size = max(1, min(int(chunk_size), rows_cap))
    loss_chunk_size = max(1, min(int(loss_chunk_size), chunk_size))
    return chunk_size, loss_chunk_size


def _flatten_signal(teacher: Signal, n: int) -> Signal:
    if teacher is None:
        return None
    if isinstance(teacher, MixtureSignal):
        return MixtureSignal([_flatten_signal(t, n) for t in teacher.signals], teacher.weights,
                             teacher.temperatures, teacher.mix)
    if isinstance(teacher, SparseTarget):
        k = teacher.ids.shape[-1]
        return SparseTarget(
            teacher.ids.reshape(n, k),
            teacher.probs.reshape(n, k),
            None if teacher.tail is None else teacher.tail.reshape(n),
        )
    return DenseSignal(teacher.hidden.reshape(n, teacher.hidden.shape[-1]), teacher.head)


@dataclass(frozen=True)
class _Plan:
    """Everything the chunk loop needs that is not a differentiable input."""

    head: LinearHead  # the student's output layer
    teacher: Signal  # flattened to (N, ...)
    labels: torch.Tensor  # (N,)
    rows: torch.Tensor | None  # (M,) supervised positions, or None when all N are supervised
    num_rows: int  # M
    chunk_size: int  # rows per logit matmul
    loss_chunk_size: int  # rows per kd_loss_per_token call
    spec: LossSpec
    want_kl: bool  # log the true forward KL beside another divergence
    top1_stats: bool  # argmax statistics (accuracy, agreement, teacher mass on the top-1)
    grad_weight_fp32: bool
    calibration_bins: int
    device_type: str
    compute_dtype: torch.dtype | None  # the autocast dtype, or None (the weight's dtype)
    inv_num_tokens: torch.Tensor  # 1 / supervised tokens in the optimizer step (float64 scalar)
    needs: tuple[bool, bool, bool]  # gradients for (hidden, weight, bias)
    scratch: fused.Scratch  # the closed-form loss's work tensors, reused from one loss chunk to the next

    @property
    def dense(self) -> bool:
        return isinstance(self.teacher, DenseSignal)

    @property
    def sparse(self) -> bool:
        return isinstance(self.teacher, SparseTarget)

    @property
    def mixture(self) -> bool:
        return isinstance(self.teacher, MixtureSignal)


_MM_OUT_DTYPE: dict[str, bool] = {}


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for bf16/fp16 ``a``, ``b`` and an fp32 ``acc``.

    On CUDA the product runs on the tensor cores with fp32 output (``torch.mm(..., out_dtype=)``, or a
    half-precision product upcast where that is missing); on CPU it is an fp32 GEMM of upcast copies
    (``b`` may already be fp32).
    """
    if a.is_cuda:
        if _MM_OUT_DTYPE.get("cuda", True):
            try:
                acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
                _MM_OUT_DTYPE["cuda"] = True
                return
            except (TypeError, RuntimeError):
                _MM_OUT_DTYPE["cuda"] = False
        acc.add_(a @ b)
        return
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """Detached, in ``dtype`` (None: unchanged)."""
    if t is None:
        return None
    return t.detach() if dtype is None else t.detach().to(dtype)


class _Logits:
    """The reused ``(chunk_size, V)`` raw-logit buffers of the student and of a dense teacher.

    ``fill(sel, h_c)`` computes a chunk's raw logits into them; after the loss, the student buffer is
    overwritten with the gradient w.r.t. those logits (:meth:`_Grads.add_chunk` reads it from there).
    """

    def __init__(self, plan: _Plan, s_weight: torch.Tensor, s_bias: torch.Tensor | None, device):
        v = plan.head.num_classes
        cdt = plan.compute_dtype
        # Under autocast the logit matmuls run in the autocast dtype (as the model's own head would);
        # otherwise in the weight's dtype. The losses upcast to fp32 inside the chunk either way.
        w = s_weight if v == s_weight.shape[0] else s_weight[:v]
        b = None if s_bias is None else (s_bias if v == s_bias.shape[0] else s_bias[:v])
        self.w, self.b = _cast(w, cdt), _cast(b, cdt)
        rows0 = min(plan.chunk_size, max(plan.num_rows, 1))
        self.student = torch.empty(rows0, v, dtype=self.w.dtype, device=device)
        self.teacher = None
        if plan.dense:
            t_w, t_b = plan.teacher.head.sliced()
            self.t_w, self.t_b = _cast(t_w, cdt), _cast(t_b, cdt)
            self.teacher = torch.empty(rows0, v, dtype=self.t_w.dtype, device=device)
        # A mixture: one buffer per dense member (chunk-sized, inside the memory budget), None for sparse ones.
        self.members: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None] = []
        if plan.mixture:
            for sig in plan.teacher.signals:
                if not isinstance(sig, DenseSignal):
                    self.members.append(None)
                    continue
                m_w, m_b = sig.head.sliced()
                m_w, m_b = _cast(m_w, cdt), _cast(m_b, cdt)
                self.members.append((m_w, m_b, torch.empty(rows0, v, dtype=m_w.dtype, device=device)))

    @torch.no_grad()
    def fill_members(self, plan: _Plan, sel, c: int) -> list:
        """Each member's signal for the chunk's rows ``sel``: raw logits (c, V) of a dense member (in its
        buffer), the rows of a sparse one."""
        out = []
        for sig, buf in zip(plan.teacher.signals, self.members, strict=True):
            if buf is None:
                out.append(sig[sel])
                continue
            m_w, m_b, raw = buf
            logits_into(raw[:c], sig.rows(sel).detach().to(m_w.dtype), m_w, m_b)
            out.append(raw[:c])
        return out

    @torch.no_grad()
    def fill(self, plan: _Plan, sel, h_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw logits of the chunk's rows ``sel``: (student (c, V), dense teacher (c, V) or None)."""
        c = h_c.shape[0]
        t_raw = None
        if self.teacher is not None:
            t_raw = self.teacher[:c]
            logits_into(t_raw, plan.teacher.rows(sel).detach().to(self.t_w.dtype), self.t_w, self.t_b)
        s_raw = self.student[:c]
        logits_into(s_raw, h_c, self.w, self.b)
        return s_raw, t_raw


class _Grads:
    """Gradients w.r.t. the student's hidden states, weight and bias, accumulated chunk by chunk."""

    def __init__(self, plan: _Plan, s_hidden, s_weight, s_bias):
        need_h, need_w, need_b = plan.needs
        v = plan.head.num_classes
        acc = torch.float32 if plan.grad_weight_fp32 else s_weight.dtype
        self.acc_dtype = torch.float64 if s_weight.dtype == torch.float64 else acc
        dev = s_hidden.device
        self.h = torch.zeros_like(s_hidden) if need_h else None
        self.w = torch.zeros(s_weight.shape, dtype=self.acc_dtype, device=dev) if need_w else None
        self.b = torch.zeros(s_bias.shape, dtype=self.acc_dtype, device=dev) if need_b else None
        self.w_view = None if self.w is None else self.w[:v]
        self.b_view = None if self.b is None else self.b[:v]

    @torch.no_grad()
    def add_chunk(self, d_c: torch.Tensor, h_c: torch.Tensor, sel, w_mm: torch.Tensor, inv: torch.Tensor) -> None:
        """``d_c`` (c, V): the summed loss's gradient w.r.t. the chunk's raw logits; ``inv``: 1 / num_tokens,
        applied here to the (c, H) and (V,) products and to the hidden states, not to the (c, V) buffer."""
        if self.h is not None:
            g = d_c @ w_mm  # (c, H) in the matmul dtype
            g.mul_(inv.to(g.dtype))
            if isinstance(sel, slice):
                self.h[sel] = g
            else:
                self.h.index_copy_(0, sel, g.to(self.h.dtype))
        if self.w_view is not None:
            if d_c.dtype == self.acc_dtype:
                self.w_view.addmm_(d_c.t(), h_c * inv.to(h_c.dtype))
            else:
                # bf16/fp16 logits into the fp32 accumulator, in vocabulary slices so that any temporary
                # stays at 1/8 of the chunk buffer.
                v = d_c.shape[1]
                step = max(1, -(-v // 8))
                h_acc = h_c if d_c.is_cuda else h_c.to(self.acc_dtype)  # upcast once per chunk on CPU
                h_acc = h_acc * inv.to(h_acc.dtype)
                for s in range(0, v, step):
                    _accumulate_mm(self.w_view[s : s + step], d_c[:, s : s + step].t(), h_acc)
        if self.b_view is not None:
            self.b_view += d_c.sum(0, dtype=self.acc_dtype) * inv.to(self.acc_dtype)


class _Stats:
    """Detached sums over supervised positions (see :func:`chunked_kd_loss` for the keys)."""

    def __init__(self, plan: _Plan, dtype: torch.dtype, device):
        zero = torch.zeros((), dtype=dtype, device=device)
        self.plan = plan
        self.loss, self.ce, self.div, self.kl = zero.clone(), zero.clone(), zero.clone(), zero.clone()
        self.div_sq, self.kl_sq = zero.clone(), zero.clone()  # sums of squares: the spread over positions
        self.teacher_entropy, self.teacher_p_top1 = zero.clone(), zero.clone()
        self.agree = torch.zeros((), dtype=torch.long, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        bins = plan.calibration_bins
        # Per confidence bin: positions, summed confidence, correct predictions (float64 sums).
        self.calib = torch.zeros(3, bins, dtype=torch.float64, device=device) if bins else None
        # A mixture: each member's forward KL to the student at the member's temperature.
        self.member_kl = torch.zeros(len(plan.teacher.signals), dtype=dtype, device=device) if plan.mixture else None

    @torch.no_grad()
    def add_forward_kl(self, z: torch.Tensor, t_sig) -> None:
        """The logging-only forward KL when the trained divergence is another one."""
        kl = token_divergence(z, t_sig, "forward_kl", temperature=self.plan.spec.temperature)
        self.kl += kl.sum()
        self.kl_sq += kl.square().sum()

    @torch.no_grad()
    def add(self, z: torch.Tensor, lab: torch.Tensor, t_sig, ce: torch.Tensor, div: torch.Tensor | None) -> None:
        """One loss chunk: student logits ``z`` (r, V), labels, teacher signal, per-row CE and D."""
        self.ce += ce.sum()
        if t_sig is not None:
            self.div += div.sum()
            self.div_sq += div.square().sum()
            if self.plan.spec.is_forward_kl:
                self.kl += div.sum()
                self.kl_sq += div.square().sum()
        if not self.plan.top1_stats and self.calib is None:
            return
        if self.calib is None:
            s_arg = z.argmax(-1)
        else:
            bins = self.calib.shape[1]
            zf = z.float()
            top, s_arg = zf.max(-1)
            conf = torch.exp(top - torch.logsumexp(zf, -1)).double()  # max softmax prob, T = 1
            idx = (conf * bins).long().clamp_(0, bins - 1)
            self.calib[0].index_add_(0, idx, torch.ones_like(conf))
            self.calib[1].index_add_(0, idx, conf)
            self.calib[2].index_add_(0, idx, (s_arg == lab).double())
        self.correct += (s_arg == lab).sum()
        if t_sig is None:
            return
        if isinstance(t_sig, SparseTarget):
            probs = t_sig.probs.to(self.teacher_entropy.dtype)
            t_arg = t_sig.ids.gather(-1, t_sig.probs.argmax(-1, keepdim=True)).squeeze(-1)
            # Teacher probability of the student's top-1 and the target's own entropy: both exact
            # functions of the stored target (for sampled targets, unbiased estimates; distill.evaluation.metrics).
            self.teacher_p_top1 += (probs * (t_sig.ids == s_arg.unsqueeze(-1))).sum()
            self.teacher_entropy -= torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), 0.0).sum()
            if t_sig.tail is not None:
                tail = t_sig.tail.to(probs.dtype)
                self.teacher_entropy -= torch.where(tail > 0, tail * tail.clamp_min(1e-30).log(), 0.0).sum()
        else:
            t_arg = t_sig.argmax(-1)
        self.agree += (s_arg == t_arg).sum()

    def as_dict(self) -> dict[str, torch.Tensor]:
        plan = self.plan
        out = {"ce_sum": self.ce, "count": torch.tensor(plan.num_rows, device=self.ce.device)}
        top1 = plan.top1_stats or self.calib is not None
        if top1:
            out["correct_sum"] = self.correct
        if self.calib is not None:
            out["calibration"] = self.calib
        if plan.teacher is not None:
            out["div_sum"] = self.div
            out["div_sq_sum"] = self.div_sq
            if plan.want_kl:
                out["kl_sum"] = self.kl
                out["kl_sq_sum"] = self.kl_sq
            if top1:
                out["agree_sum"] = self.agree
        if plan.sparse and top1:
            out["teacher_entropy_sum"] = self.teacher_entropy
            out["teacher_p_top1_sum"] = self.teacher_p_top1
        if self.member_kl is not None:
            out["teacher_kl_sums"] = self.member_kl
        return out


def _loss_chunk(plan: _Plan, stats: _Stats, raw: torch.Tensor, lab: torch.Tensor, t_sig, need_grad: bool) -> None:
    """One loss chunk: loss and statistics from the raw logits ``raw`` (r, V, a view of the chunk buffer);
    with ``need_grad`` the buffer rows are overwritten with d loss_sum / d raw logits (the division by the
    number of tokens comes in :meth:`_Grads.add_chunk`). Forward KL and plain CE in closed form
    (:mod:`distill.losses.fused`), everything else through :func:`kd_loss_per_token` and autograd."""
    spec = plan.spec
    if fused.supports(spec, raw, t_sig):
        loss = fused.loss_chunk(plan.head, spec, raw, lab, t_sig, need_grad,
                                lambda z, ce, div: stats.add(z, lab, t_sig, ce, div), plan.scratch)
        if loss is not None:
            stats.loss += loss
            return
    # Logging-only forward KL first, before the graph holds its saved tensors (lower peak).
    if t_sig is not None and plan.want_kl and not spec.is_forward_kl:
        stats.add_forward_kl(plan.head.postprocess(raw), t_sig)

    leaf = raw.detach()  # a view into the buffer: the leaf we differentiate w.r.t.
    with torch.enable_grad() if need_grad else contextlib.nullcontext():
        if need_grad:
            leaf.requires_grad_(True)
        z = plan.head.postprocess(leaf)
        out = kd_loss_per_token(z, lab, t_sig, spec)
        loss = out["loss"].sum()
    # Keep only detached stats: this drops e.g. the CE graph when alpha == 0.
    stats.add(z.detach(), lab, t_sig, out["ce"].detach(), out["div"].detach() if "div" in out else None)
    del out, z
    if need_grad:
        (d_raw,) = torch.autograd.grad(loss, leaf)
        raw.copy_(d_raw)  # the buffer now holds d loss_sum / d raw logits for these rows
    stats.loss += loss.detach()


def _member_signal(sig, raw_or_target, rows: slice):
    """A member's teacher signal for some rows of a chunk: postprocessed logits (dense) or target rows."""
    if isinstance(sig, DenseSignal):
        return sig.head.postprocess(raw_or_target[rows])
    return raw_or_target[rows]


def _mixture_loss_chunk(plan: _Plan, stats: _Stats, raw: torch.Tensor, lab: torch.Tensor, member_sigs: list,
                        need_grad: bool) -> None:
    """One loss chunk of a mixture: each member's forward KL (logged), then the loss (docs/methods.md §9):
    probability space, the divergence to the mixture of the members' distributions; loss space, the weighted
    sum of each member's per-position loss at its own temperature."""
    mix: MixtureSignal = plan.teacher
    spec = plan.spec
    active = mix.active()
    with torch.no_grad():
        z0 = plan.head.postprocess(raw)
        kls = []
        for k, t_sig in enumerate(member_sigs):
            kl = token_divergence(z0, t_sig, "forward_kl", temperature=mix.temperatures[k])
            stats.member_kl[k] += kl.sum()
            kls.append(kl)
        del z0
        if mix.mix == "probability":
            # log sum_k w_k softmax(z_k / T_k), as logits at the loss temperature (log_softmax(T * lm / T) = lm).
            parts = [math.log(mix.weights[k]) + torch.log_softmax(tempered(member_sigs[k], mix.temperatures[k]), -1)
                     for k in active]
            mixed = (parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), 0)) * spec.temperature
            del parts, kls
    if mix.mix == "probability":
        _loss_chunk(plan, stats, raw, lab, mixed, need_grad)
        return
    heaviest = max(active, key=lambda k: mix.weights[k])
    if plan.want_kl and not spec.is_forward_kl:
        kl = sum(mix.weights[k] * kls[k] for k in active)
        stats.kl += kl.sum()
        stats.kl_sq += kl.square().sum()
    del kls
    leaf = raw.detach()
    with torch.enable_grad() if need_grad else contextlib.nullcontext():
        if need_grad:
            leaf.requires_grad_(True)
        z = plan.head.postprocess(leaf)
        total, div, ce = None, None, None
        for k in active:
            w = mix.weights[k]
            out = kd_loss_per_token(z, lab, member_sigs[k], replace(spec, temperature=mix.temperatures[k]))
            term = out["loss"] if w == 1.0 else w * out["loss"]
            total = term if total is None else total + term
            d = out["div"].detach() * w
            div = d if div is None else div + d
            ce = out["ce"].detach()
            del out
        loss = total.sum()
    stats.add(z.detach(), lab, member_sigs[heaviest], ce, div)
    del z, total
    if need_grad:
        (d_raw,) = torch.autograd.grad(loss, leaf)
        raw.copy_(d_raw)
    stats.loss += loss.detach()


def _run_chunks(plan: _Plan, s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: torch.Tensor | None):
    """The loop over chunks, with autocast off (the loop chooses its own dtypes, ``plan.compute_dtype``).

    Returns ``(loss_sum, stats, grad_hidden, grad_weight, grad_bias)`` (gradients None when not needed).
    """
    need_grad = any(plan.needs)
    device = s_hidden.device
    m, chunk, loss_chunk = plan.num_rows, plan.chunk_size, plan.loss_chunk_size
    with torch.autocast(plan.device_type, enabled=False):
        stats = _Stats(plan, torch.float64 if s_hidden.dtype == torch.float64 else torch.float32, device)
        grads = _Grads(plan, s_hidden, s_weight, s_bias)
        buffers = _Logits(plan, s_weight, s_bias, device) if m else None
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            sel = slice(start, stop) if plan.rows is None else plan.rows[start:stop]
            h_c = s_hidden[sel] if plan.rows is None else s_hidden.index_select(0, sel)
            h_c = h_c.detach().to(buffers.w.dtype)  # a no-op unless autocast (or a model) mixes dtypes
            s_raw, t_raw = buffers.fill(plan, sel, h_c)
            lab_c = plan.labels[sel]
            sparse_c = plan.teacher[sel] if plan.sparse else None
            members = buffers.fill_members(plan, sel, stop - start) if plan.mixture else None
            for i in range(0, stop - start, loss_chunk):
                j = min(i + loss_chunk, stop - start)
                if members is not None:
                    with torch.no_grad():
                        sigs = [_member_signal(sig, m, slice(i, j))
                                for sig, m in zip(plan.teacher.signals, members, strict=True)]
                    _mixture_loss_chunk(plan, stats, s_raw[i:j], lab_c[i:j], sigs, need_grad)
                    continue
                if t_raw is not None:
                    with torch.no_grad():
                        t_sig = plan.teacher.head.postprocess(t_raw[i:j])
                else:
                    t_sig = None if sparse_c is None else sparse_c[i:j]
                _loss_chunk(plan, stats, s_raw[i:j], lab_c[i:j], t_sig, need_grad)
            if need_grad:
                grads.add_chunk(s_raw, h_c, sel, buffers.w, plan.inv_num_tokens)
    return stats.loss, stats.as_dict(), grads.h, grads.w, grads.b


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, num_tokens, plan, stats_out):
        loss_sum, stats, gh, gw, gb = _run_chunks(plan, s_hidden, s_weight, s_bias)
        stats_out.update(stats)
        ctx.grads = (gh, gw, gb)
        ctx.dtypes = (s_hidden.dtype, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        return _normalize(loss_sum, num_tokens)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "chunked_kd_loss: backward ran twice; the gradients are computed in the forward pass and "
                "released by the first backward (retain_graph re-use is not supported)"
            )
        grads, ctx.grads = ctx.grads, None
        out = []
        for g, dt in zip(grads, ctx.dtypes, strict=True):
            if g is None:
                out.append(None)
                continue
            g.mul_(grad_out.to(g.dtype))  # in place: no second (V, H) buffer
            out.append(g if g.dtype == dt else g.to(dt))
        return out[0], out[1], out[2], None, None, None


def _normalize(loss_sum: torch.Tensor, num_tokens) -> torch.Tensor:
    """``loss_sum / num_tokens`` exactly as :func:`reduce_loss` divides."""
    return reduce_loss(loss_sum, torch.ones((), dtype=torch.bool, device=loss_sum.device), num_tokens)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _flat_inputs(student_hidden: torch.Tensor, labels: torch.Tensor, teacher: Signal, student_head: LinearHead):
    """(N, H) hidden states, (N,) labels and the teacher signal flattened to N rows, shapes checked."""
    if student_hidden.dim() != 2:
        student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = student_hidden.shape[0]
    labels = labels.reshape(-1)
    teacher = _flatten_signal(teacher, n)
    _check_shapes(n, labels, teacher, student_head)
    return student_hidden, labels, teacher


def _check_shapes(n: int, labels: torch.Tensor, teacher: Signal, student_head: LinearHead) -> None:
    if labels.shape[0] != n:
        raise ValueError(f"labels have {labels.shape[0]} positions, hidden states {n}")
    if isinstance(teacher, MixtureSignal):
        for member in teacher.signals:
            _check_shapes(n, labels, member, student_head)
    if isinstance(teacher, DenseSignal):
        if teacher.hidden.shape[0] != n:
            raise ValueError(f"teacher hidden states have {teacher.hidden.shape[0]} positions, student {n}")
        if teacher.head.num_classes != student_head.num_classes:
            raise ValueError(
                f"teacher has {teacher.head.num_classes} classes and student {student_head.num_classes}; "
                "set vocab_size on both heads to the tokenizer's size"
            )


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    student_head: LinearHead,
    labels: torch.Tensor,
    teacher: Signal,
    num_tokens: int | float | torch.Tensor,
    spec: LossSpec = FORWARD_KL,
    *,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    loss_chunk_size: int | None = None,
    log_kl: bool = True,
    top1_stats: bool = True,
    grad_weight_fp32: bool = True,
    calibration_bins: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss from final hidden states, without materializing ``(N, V)`` logits.

    student_hidden: (N, H) (or (B, T, H)), final hidden states after the final norm.
    student_head: the student's output layer (its weight/bias receive gradients; may be tied).
    labels: (N,) (or (B, T)), ``IGNORE_INDEX`` for unsupervised positions. Only supervised rows are
        computed; an all-masked input gives a loss of 0 with zero gradients.
    teacher: a :class:`DenseSignal` (treated as a constant), a :class:`SparseTarget` with leading shape
        (N,), or ``None`` (plain cross-entropy).
    num_tokens: supervised tokens in the whole optimizer step (the :func:`reduce_loss` normalizer).
    spec: the loss (:class:`distill.losses.LossSpec`).
    chunk_size: rows whose logits are computed at once (matmul unit); loss_chunk_size: rows per
        ``kd_loss_per_token`` call. Defaults from ``memory_budget_bytes`` (:func:`plan_chunks`).
    log_kl: compute ``kl_sum`` (the true forward KL at temperature T) also when the divergence is not
        forward KL; that costs an extra no-grad pass. With ``False``, ``kl_sum`` is left out unless it is free.
    top1_stats: compute the argmax statistics (``correct_sum``, ``agree_sum``, ``teacher_p_top1_sum``,
        ``teacher_entropy_sum``): two V-wide reductions per row that training does not need (always on
        with ``calibration_bins``).
    grad_weight_fp32: accumulate the weight/bias gradient in fp32 (else in the weight's dtype).
    calibration_bins: with B > 0, ``stats["calibration"]`` is a (3, B) float64 tensor: per bin of the
        student's top-1 probability at T = 1 (equal-width bins over [0, 1]), the number of positions, their
        summed confidence and their correct top-1 predictions (for the expected calibration error).

    Called under autocast, the logit matmuls run in the autocast dtype (like the model's own head) and
    the gradients come back in the parameters' dtypes.

    Returns ``(loss, stats)``; ``loss`` equals ``reduce_loss(kd_loss_per_token(logits, labels, teacher,
    spec)["loss"], labels != IGNORE_INDEX, num_tokens)``. ``stats`` (detached, summed over supervised
    positions): ``ce_sum``, ``div_sum`` and ``kl_sum`` (teacher only; ``div_sq_sum`` and ``kl_sq_sum`` their
    squares, for the spread over positions), ``count`` (supervised positions); with
    ``top1_stats``: ``agree_sum`` (student argmax == teacher argmax, teacher only; for a sparse target its
    most probable id), ``correct_sum`` (student argmax == label), and for a sparse target
    ``teacher_entropy_sum`` (the target's own entropy over its classes) and ``teacher_p_top1_sum`` (the
    target's probability of the student's argmax).
    """
    student_hidden, labels, teacher = _flat_inputs(student_hidden, labels, teacher, student_head)
    for name, size in (("chunk_size", chunk_size), ("loss_chunk_size", loss_chunk_size)):
        if size is not None and int(size) < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    sizes = dict(chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes, loss_chunk_size=loss_chunk_size,
                 grad_weight_fp32=grad_weight_fp32)
    if isinstance(teacher, MixtureSignal) and len(teacher.active()) == 1:
        return _single_member(student_hidden, student_head, labels, teacher, num_tokens, spec, sizes,
                              log_kl=log_kl, top1_stats=top1_stats, calibration_bins=calibration_bins)
    plan = _make_plan(student_hidden, student_head, labels, teacher, num_tokens, spec, sizes, log_kl=log_kl,
                      top1_stats=top1_stats, calibration_bins=calibration_bins)
    weight, bias = student_head.weight, student_head.bias
    stats: dict[str, torch.Tensor] = {}
    if any(plan.needs):
        loss = _ChunkedKD.apply(student_hidden, weight, bias, num_tokens, plan, stats)
    else:
        with torch.no_grad():
            loss_sum, stats, *_ = _run_chunks(plan, student_hidden, weight, bias)
            loss = _normalize(loss_sum, num_tokens)
    return loss, stats


def _grad_needs(student_hidden: torch.Tensor, student_head: LinearHead) -> tuple[bool, bool, bool]:
    """Whether the hidden states, the head's weight and its bias need gradients here."""
    grad_on = torch.is_grad_enabled()
    bias = student_head.bias
    return (
        grad_on and student_hidden.requires_grad,
        grad_on and student_head.weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )


def _chunk_sizes(student_hidden: torch.Tensor, student_head: LinearHead, teacher: Signal, spec: LossSpec,
                 num_rows: int, needs: tuple[bool, bool, bool], sizes: dict) -> tuple[int, int]:
    """``(chunk_size, loss_chunk_size)``: the given sizes, or :func:`plan_chunks`' for the memory budget, from
    the V-sized buffers and temporaries that this student head, teacher and loss take per row."""
    members = teacher.signals if isinstance(teacher, MixtureSignal) else [teacher]
    dense = [t for t in members if isinstance(t, DenseSignal)]
    teacher_type = "none" if teacher is None else ("dense" if dense else "sparse")
    post = student_head.has_postprocess or any(t.head.has_postprocess for t in dense)
    buffers = student_head.weight.element_size() / 4.0 + sum(t.head.weight.element_size() / 4.0 for t in dense)
    temporaries = temporaries_per_token(teacher_type, spec.divergence, grad=any(needs), postprocess=post)
    if isinstance(teacher, MixtureSignal):  # every member's loss terms live in one graph (+ the mixture)
        temporaries = temporaries * len(teacher.active()) + len(members) + 2
    memory_budget_bytes = sizes["memory_budget_bytes"]
    if memory_budget_bytes is None:
        memory_budget_bytes = default_memory_budget(student_hidden.device)
    return plan_chunks(
        student_head.num_classes,
        num_rows,
        temporaries=temporaries,
        buffers=buffers,
        memory_budget_bytes=memory_budget_bytes,
        chunk_size=sizes["chunk_size"],
        loss_chunk_size=sizes["loss_chunk_size"],
    )


def _inv_num_tokens(num_tokens: int | float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``1 / num_tokens`` (at least 1 token) as a float64 scalar on ``device``."""
    if isinstance(num_tokens, torch.Tensor):
        inv = 1.0 / num_tokens.detach().to(torch.float64).clamp_min(1)
    else:
        inv = torch.tensor(1.0 / max(float(num_tokens), 1.0), dtype=torch.float64)
    return inv.to(device)


def _make_plan(student_hidden: torch.Tensor, student_head: LinearHead, labels: torch.Tensor, teacher: Signal,
               num_tokens: int | float | torch.Tensor, spec: LossSpec, sizes: dict, *, log_kl: bool,
               top1_stats: bool, calibration_bins: int) -> _Plan:
    """The chunk loop's :class:`_Plan` for flattened inputs: the supervised rows, the chunk sizes, what needs
    gradients, the normalizer and the dtypes."""
    mask = labels != IGNORE_INDEX
    m = int(mask.sum())
    rows = None if m == student_hidden.shape[0] else mask.nonzero().squeeze(1)
    needs = _grad_needs(student_hidden, student_head)
    chunk_size, loss_chunk_size = _chunk_sizes(student_hidden, student_head, teacher, spec, m, needs, sizes)
    return _Plan(
        head=student_head,
        teacher=teacher,
        labels=labels,
        rows=rows,
        num_rows=m,
        chunk_size=chunk_size,
        loss_chunk_size=loss_chunk_size,
        spec=spec,
        want_kl=log_kl or spec.is_forward_kl,
        top1_stats=top1_stats,
        grad_weight_fp32=sizes["grad_weight_fp32"],
        calibration_bins=int(calibration_bins),
        device_type=student_hidden.device.type,
        compute_dtype=_autocast_dtype(student_hidden.device.type),
        inv_num_tokens=_inv_num_tokens(num_tokens, student_hidden.device),
        needs=needs,
        scratch=fused.Scratch(),
    )


def _single_member(student_hidden, student_head, labels, teacher: MixtureSignal, num_tokens, spec: LossSpec,
                   sizes: dict, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A mixture with one member of positive weight is that member alone (exactly: the same code path); the
    others' forward KL is logged from a no-gradient pass each."""
    (k,) = teacher.active()
    spec_k = replace(spec, temperature=teacher.temperatures[k])
    loss, stats = chunked_kd_loss(student_hidden, student_head, labels, teacher.signals[k], num_tokens, spec_k,
                                  **sizes, **kw)
    member_kl = []
    for j, sig in enumerate(teacher.signals):
        if j == k and "kl_sum" in stats:
            member_kl.append(stats["kl_sum"])
            continue
        with torch.no_grad():
            _, logged = chunked_kd_loss(student_hidden.detach(), student_head, labels, sig, num_tokens,
                                        LossSpec(temperature=teacher.temperatures[j], alpha=1.0),
                                        top1_stats=False, **sizes)
        member_kl.append(logged["kl_sum"])
    stats["teacher_kl_sums"] = torch.stack([t.to(stats["ce_sum"].dtype) for t in member_kl])
    return loss, stats


def naive_kd_loss(
    student_hidden: torch.Tensor,
    student_head: LinearHead,
    labels: torch.Tensor,
    teacher: Signal,
    num_tokens: int | float | torch.Tensor,
    spec: LossSpec = FORWARD_KL,
) -> torch.Tensor:
    """Reference: materialize the logits of both models, then ``kd_loss_per_token`` + ``reduce_loss``.

    Like the chunked path, only supervised positions are computed: an unsupervised position may have a
    zero-mass teacher row (padding of a cached target), whose divergence is infinite for reverse KL, and
    masking it after the fact would make ``0 * inf = NaN`` gradients.
    """
    student_hidden, labels, teacher = _flat_inputs(student_hidden, labels, teacher, student_head)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    logits = student_head.logits(student_hidden.index_select(0, rows))
    if isinstance(teacher, MixtureSignal):
        return reduce_loss(_naive_mixture(logits, labels[rows], rows, teacher, spec),
                           torch.ones(rows.shape, dtype=torch.bool, device=rows.device), num_tokens)
    if isinstance(teacher, DenseSignal):
        with torch.no_grad():
            teacher = teacher.head.logits(teacher.rows(rows).detach())
    elif teacher is not None:
        teacher = teacher[rows]
    labels = labels[rows]
    out = kd_loss_per_token(logits, labels, teacher, spec)
    return reduce_loss(out["loss"], labels != IGNORE_INDEX, num_tokens)


def _naive_mixture(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, teacher: MixtureSignal,
                   spec: LossSpec) -> torch.Tensor:
    """The per-position loss of a mixture from materialized logits (the reference of the chunked path)."""
    sigs = []
    with torch.no_grad():
        for sig in teacher.signals:
            sigs.append(sig.head.logits(sig.rows(rows).detach()) if isinstance(sig, DenseSignal) else sig[rows])
    active = teacher.active()
    if len(active) == 1:
        (k,) = active
        return kd_loss_per_token(logits, labels, sigs[k], replace(spec, temperature=teacher.temperatures[k]))["loss"]
    if teacher.mix == "probability":
        with torch.no_grad():
            probs = sum(teacher.weights[k] * torch.softmax(tempered(sigs[k], teacher.temperatures[k]), -1)
                        for k in active)
        return kd_loss_per_token(logits, labels, probs.log() * spec.temperature, spec)["loss"]
    return sum(teacher.weights[k] * kd_loss_per_token(logits, labels, sigs[k],
                                                      replace(spec, temperature=teacher.temperatures[k]))["loss"]
               for k in active)
