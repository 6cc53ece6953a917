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
* a **loss chunk** of ``loss_chunk_size`` rows of a chunk goes through
  :func:`distill.losses.kd_loss_per_token` (the math is not re-implemented) and autograd, which need
  about ten V-sized fp32 temporaries per row (more for JSD); small loss chunks keep those small (and, on
  CPU, cache-resident).

The value equals ``reduce_loss(kd_loss_per_token(logits, labels, teacher, ...)["loss"], mask, n)`` on
materialized logits (up to summation order), and so do the gradients.

Gradients are computed in the forward pass (a custom :class:`torch.autograd.Function`); backward only
scales the stored gradients by the incoming gradient (in place), so nothing is recomputed. They already
include the ``1 / num_tokens`` factor. Consequences: backward can run only once per call (no
``retain_graph`` re-use, no double backward), and the teacher is a constant (no gradient reaches
teacher tensors). Under ``torch.no_grad()``, or when nothing requires grad, no gradient work is done.

Sizes (:func:`plan_chunks`): with ``u = memory_budget_bytes / (4 V)`` (how many V-sized fp32 rows fit)
and ``n`` the V-sized fp32 temporaries one row of a loss chunk needs beyond the logit buffers (measured per
divergence and teacher type, with and without gradients: :func:`temporaries_per_token`), a quarter of
the budget goes to the loss chunk, ``loss_chunk_size = u / (4 n)``, and the rest to the logit buffers,
``chunk_size = (u - n * loss_chunk_size) / b`` with ``b`` the number of buffers (2 with a live teacher,
else 1; half a row each in bf16). Both at least 1, at most the number of supervised rows; ``chunk_size``
is rounded down to a multiple of 8 from 32 up. Defaults: :data:`DEFAULT_MEMORY_BUDGET_BYTES` (160 MiB)
on CPU, e.g. at V = 128k forward KL: chunks of 120 rows, loss chunks of 8 (JSD 4); and
:data:`DEFAULT_CUDA_MEMORY_BUDGET_BYTES` (1 GiB) on a GPU. Either size can be given explicitly. The budget
bounds the chunk temporaries; the fp32 weight gradient ``(V_rows, H)`` and the ``(N, H)`` hidden
gradient come on top (the naive path has those as well).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.losses import (
    IGNORE_INDEX,
    SparseTarget,
    _upcast,
    kd_loss_per_token,
    reduce_loss,
    token_divergence,
)

__all__ = [
    "DEFAULT_CUDA_MEMORY_BUDGET_BYTES",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "LinearHead",
    "chunked_kd_loss",
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
            z = _upcast(z) * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(_upcast(z) / self.softcap) * self.softcap
        return z

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Materialized logits (..., V): the naive path."""
        return self.postprocess(self.raw_logits(hidden))


Teacher = tuple[torch.Tensor, LinearHead] | SparseTarget | None


def _raw_logits_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """``out = x @ w.T + b`` for ``x`` of shape (C, H), ``out`` (C, V) preallocated.

    On CPU, BLAS is markedly faster (about 1.5x at 32-128 rows, H = 1024, V = 128k) computing ``w @ x.T``
    and transposing than computing ``x @ w.T``; it is done in vocabulary slices so the transposed
    temporary stays at 1/8 of ``out``.
    """
    if x.device.type == "cpu":
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
    ("none", None): (5, 3),
    ("sparse", None): (7, 6),
    ("dense", "forward_kl"): (11, 9),
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


def _flatten_teacher(teacher: Teacher, n: int) -> Teacher:
    if teacher is None:
        return None
    if isinstance(teacher, SparseTarget):
        k = teacher.ids.shape[-1]
        return SparseTarget(
            teacher.ids.reshape(n, k),
            teacher.probs.reshape(n, k),
            None if teacher.tail is None else teacher.tail.reshape(n),
        )
    hidden, head = teacher
    return hidden.reshape(n, hidden.shape[-1]), head


class _Plan:
    """Everything the chunk loop needs that is not a differentiable input."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


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


def _run_chunks(plan: _Plan, *args):
    """:func:`_chunk_loop` with autocast off: the loop chooses its own dtypes (``plan.compute_dtype``)."""
    with torch.autocast(plan.device_type, enabled=False):
        return _chunk_loop(plan, *args)


def _chunk_loop(
    plan: _Plan,
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    s_bias: torch.Tensor | None,
    need_h: bool,
    need_w: bool,
    need_b: bool,
):
    """The loop over chunks. Returns (loss_sum, stats, grad_hidden, grad_weight, grad_bias)."""
    head: LinearHead = plan.head
    teacher = plan.teacher
    rows = plan.rows  # (M,) long indices of supervised rows, or None if all rows are supervised
    m, chunk, loss_chunk = plan.num_rows, plan.chunk_size, plan.loss_chunk_size
    labels = plan.labels
    v = head.num_classes
    w = s_weight if v == s_weight.shape[0] else s_weight[:v]
    b = None if s_bias is None else (s_bias if v == s_bias.shape[0] else s_bias[:v])
    # Under autocast the logit matmuls run in the autocast dtype (as the model's own head would);
    # otherwise in the weight's dtype. The losses upcast to fp32 inside the chunk either way.
    cdt = plan.compute_dtype
    w_mm = w.detach() if cdt is None else w.detach().to(cdt)
    b_mm = None if b is None else (b.detach() if cdt is None else b.detach().to(cdt))
    need_grad = need_h or need_w or need_b
    device = s_hidden.device
    dense = teacher is not None and not isinstance(teacher, SparseTarget)

    grad_h = torch.zeros_like(s_hidden) if need_h else None
    acc_dtype = torch.float32 if plan.grad_weight_fp32 else s_weight.dtype
    acc_dtype = torch.float64 if s_weight.dtype == torch.float64 else acc_dtype
    grad_w = torch.zeros(s_weight.shape, dtype=acc_dtype, device=device) if need_w else None
    grad_b = torch.zeros(s_bias.shape, dtype=acc_dtype, device=device) if need_b else None
    gw_view = None if grad_w is None else grad_w[:v]
    gb_view = None if grad_b is None else grad_b[:v]

    stat_dtype = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=stat_dtype, device=device)
    loss_sum, ce_sum, div_sum, kl_sum = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    agree = torch.zeros((), dtype=torch.long, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    bins = plan.calibration_bins
    # Per confidence bin: positions, summed confidence, correct predictions (float64 sums).
    calib = torch.zeros(3, bins, dtype=torch.float64, device=device) if bins else None
    inv_n = plan.inv_num_tokens.to(stat_dtype)
    kw = dict(
        kind=plan.kind,
        temperature=plan.temperature,
        alpha=plan.alpha,
        t2_scale=plan.t2_scale,
        beta=plan.beta,
        skew=plan.skew,
    )

    # Logit buffers, reused by every chunk (the last one uses a prefix).
    rows0 = min(chunk, max(m, 1))
    s_buf = torch.empty(rows0, v, dtype=w_mm.dtype, device=device) if m else None
    t_buf = None
    if dense and m:
        t_hidden, t_head = teacher
        t_w, t_b = t_head.sliced()
        t_w = t_w.detach() if cdt is None else t_w.detach().to(cdt)
        t_b = None if t_b is None else (t_b.detach() if cdt is None else t_b.detach().to(cdt))
        t_buf = torch.empty(rows0, v, dtype=t_w.dtype, device=device)
    grad_ctx = torch.enable_grad if need_grad else contextlib.nullcontext

    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        c = stop - start
        if rows is None:
            sel = slice(start, stop)
            h_c = s_hidden[sel].detach()
        else:
            sel = rows[start:stop]
            h_c = s_hidden.detach().index_select(0, sel)
        h_c = h_c.to(w_mm.dtype)  # a no-op unless autocast (or a model) mixes dtypes
        lab_c = labels[sel]
        raw_c = s_buf[:c]
        with torch.no_grad():
            if dense:
                th_c = t_hidden[sel] if rows is None else t_hidden.index_select(0, sel)
                _raw_logits_into(t_buf[:c], th_c.detach().to(t_w.dtype), t_w, t_b)
            _raw_logits_into(raw_c, h_c, w_mm, b_mm)
        sparse_c = teacher[sel] if isinstance(teacher, SparseTarget) else None

        for i in range(0, c, loss_chunk):
            j = min(i + loss_chunk, c)
            lab = lab_c[i:j]
            if dense:
                with torch.no_grad():
                    t_sig = t_head.postprocess(t_buf[i:j])
            elif sparse_c is not None:
                t_sig = sparse_c[i:j]
            else:
                t_sig = None

            # Logging-only forward KL first, before the graph holds its saved tensors (lower peak).
            if t_sig is not None and plan.want_kl and not plan.kl_is_div:
                with torch.no_grad():
                    kl = token_divergence(
                        head.postprocess(raw_c[i:j]), t_sig, "forward_kl", temperature=plan.temperature
                    )
                    kl_sum += kl.sum()
                    del kl

            raw = raw_c[i:j].detach()  # a view into the buffer: the leaf we differentiate w.r.t.
            with grad_ctx():
                if need_grad:
                    raw.requires_grad_(True)
                z = head.postprocess(raw)
                out = kd_loss_per_token(z, lab, t_sig, **kw)
                loss_c = out["loss"].sum()
            # Keep only detached stats: this drops e.g. the CE graph when alpha == 0.
            ce = out["ce"].detach()
            div = out["div"].detach() if "div" in out else None
            del out

            with torch.no_grad():
                ce_sum += ce.sum()
                if calib is None:
                    s_arg = z.detach().argmax(-1)
                else:
                    zf = z.detach().float()
                    top, s_arg = zf.max(-1)
                    conf = torch.exp(top - torch.logsumexp(zf, -1)).double()  # max softmax prob, T = 1
                    idx = (conf * bins).long().clamp_(0, bins - 1)
                    calib[0].index_add_(0, idx, torch.ones_like(conf))
                    calib[1].index_add_(0, idx, conf)
                    calib[2].index_add_(0, idx, (s_arg == lab).double())
                    del zf, top, conf, idx
                correct += (s_arg == lab).sum()
                if t_sig is not None:
                    div_sum += div.sum()
                    if plan.kl_is_div:
                        kl_sum += div.sum()
                    if dense:
                        t_arg = t_sig.argmax(-1)
                    else:
                        t_arg = t_sig.ids.gather(-1, t_sig.probs.argmax(-1, keepdim=True)).squeeze(-1)
                    agree += (s_arg == t_arg).sum()
            del z, t_sig, ce, div

            if need_grad:
                (d_raw,) = torch.autograd.grad(loss_c, raw, grad_outputs=inv_n.to(loss_c.dtype))
                raw_c[i:j].copy_(d_raw)  # the buffer now holds d loss / d raw logits for these rows
                del d_raw
            loss_sum += loss_c.detach()
            del loss_c, raw

        if need_grad:
            with torch.no_grad():
                d_c = raw_c  # (c, V): gradient w.r.t. the chunk's raw logits, already / num_tokens
                if need_h:
                    g = d_c @ w_mm  # (c, H) in the matmul dtype
                    if rows is None:
                        grad_h[sel] = g
                    else:
                        grad_h.index_copy_(0, sel, g.to(grad_h.dtype))
                    del g
                if need_w:
                    if d_c.dtype == acc_dtype:
                        gw_view.addmm_(d_c.t(), h_c)
                    else:
                        # bf16/fp16 logits into the fp32 accumulator, in vocabulary slices so that any
                        # temporary stays at 1/8 of the chunk buffer.
                        step = max(1, -(-v // 8))
                        h_acc = h_c if d_c.is_cuda else h_c.to(acc_dtype)  # upcast once per chunk on CPU
                        for s in range(0, v, step):
                            _accumulate_mm(gw_view[s : s + step], d_c[:, s : s + step].t(), h_acc)
                        del h_acc
                if need_b:
                    gb_view += d_c.sum(0, dtype=acc_dtype)

    stats = {"ce_sum": ce_sum, "correct_sum": correct, "count": torch.tensor(m, device=device)}
    if calib is not None:
        stats["calibration"] = calib
    if teacher is not None:
        stats["div_sum"] = div_sum
        if plan.want_kl:
            stats["kl_sum"] = kl_sum
        stats["agree_sum"] = agree
    return loss_sum, stats, grad_h, grad_w, grad_b


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, num_tokens, plan, stats_out):
        need_h, need_w, need_b = plan.needs
        loss_sum, stats, gh, gw, gb = _run_chunks(plan, s_hidden, s_weight, s_bias, need_h, need_w, need_b)
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


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    student_head: LinearHead,
    labels: torch.Tensor,
    teacher: Teacher,
    num_tokens: int | float | torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    t2_scale: bool = True,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    loss_chunk_size: int | None = None,
    log_kl: bool = True,
    grad_weight_fp32: bool = True,
    calibration_bins: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss from final hidden states, without materializing ``(N, V)`` logits.

    student_hidden: (N, H) (or (B, T, H)), final hidden states after the final norm.
    student_head: the student's output layer (its weight/bias receive gradients; may be tied).
    labels: (N,) (or (B, T)), ``IGNORE_INDEX`` for unsupervised positions. Only supervised rows are
        computed; an all-masked input gives a loss of 0 with zero gradients.
    teacher: ``(teacher_hidden (N, H_t), teacher_head)`` for a live teacher (treated as a constant),
        a :class:`SparseTarget` with leading shape (N,), or ``None`` (plain cross-entropy).
    num_tokens: supervised tokens in the whole optimizer step (the :func:`reduce_loss` normalizer).
    kind, temperature, alpha, t2_scale, beta, skew: as in :func:`distill.losses.kd_loss_per_token`.
    chunk_size: rows whose logits are computed at once (matmul unit); loss_chunk_size: rows per
        ``kd_loss_per_token`` call. Defaults from ``memory_budget_bytes`` (:func:`plan_chunks`).
    log_kl: compute ``kl_sum`` (the true forward KL at temperature T) also when ``kind`` is not forward
        KL; that costs an extra no-grad pass. With ``False``, ``kl_sum`` is left out unless it is free.
    grad_weight_fp32: accumulate the weight/bias gradient in fp32 (else in the weight's dtype).
    calibration_bins: with B > 0, ``stats["calibration"]`` is a (3, B) float64 tensor: per bin of the
        student's top-1 probability at T = 1 (equal-width bins over [0, 1]), the number of positions, their
        summed confidence and their correct top-1 predictions (for the expected calibration error).

    Called under autocast, the logit matmuls run in the autocast dtype (like the model's own head) and
    the gradients come back in the parameters' dtypes.

    Returns ``(loss, stats)``; ``loss`` equals ``reduce_loss(kd_loss_per_token(logits, labels, teacher,
    ...)["loss"], labels != IGNORE_INDEX, num_tokens)``. ``stats`` (detached, summed over supervised
    positions): ``ce_sum``, ``div_sum`` and ``kl_sum`` (teacher only), ``agree_sum`` (student argmax ==
    teacher argmax, teacher only; for a sparse target its most probable id), ``correct_sum`` (student
    argmax == label), ``count`` (supervised positions).
    """
    if student_hidden.dim() != 2:
        student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = student_hidden.shape[0]
    labels = labels.reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"labels have {labels.shape[0]} positions, hidden states {n}")
    teacher = _flatten_teacher(teacher, n)
    dense = teacher is not None and not isinstance(teacher, SparseTarget)
    if dense:
        t_hidden, t_head = teacher
        if t_hidden.shape[0] != n:
            raise ValueError(f"teacher hidden states have {t_hidden.shape[0]} positions, student {n}")
        if t_head.num_classes != student_head.num_classes:
            raise ValueError(
                f"teacher has {t_head.num_classes} classes and student {student_head.num_classes}; "
                "set vocab_size on both heads to the tokenizer's size"
            )
    if teacher is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, size in (("chunk_size", chunk_size), ("loss_chunk_size", loss_chunk_size)):
        if size is not None and int(size) < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")

    mask = labels != IGNORE_INDEX
    m = int(mask.sum())
    rows = None if m == n else mask.nonzero().squeeze(1)

    weight, bias = student_head.weight, student_head.bias
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and student_hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    teacher_type = "none" if teacher is None else ("dense" if dense else "sparse")
    post = student_head.has_postprocess or (dense and teacher[1].has_postprocess)
    buffers = weight.element_size() / 4.0 + (teacher[1].weight.element_size() / 4.0 if dense else 0.0)
    if memory_budget_bytes is None:
        memory_budget_bytes = default_memory_budget(student_hidden.device)
    chunk_size, loss_chunk_size = plan_chunks(
        student_head.num_classes,
        m,
        temporaries=temporaries_per_token(teacher_type, kind, grad=any(needs), postprocess=post),
        buffers=buffers,
        memory_budget_bytes=memory_budget_bytes,
        chunk_size=chunk_size,
        loss_chunk_size=loss_chunk_size,
    )

    if isinstance(num_tokens, torch.Tensor):
        inv = 1.0 / num_tokens.detach().to(torch.float64).clamp_min(1)
    else:
        inv = torch.tensor(1.0 / max(float(num_tokens), 1.0), dtype=torch.float64)
    plan = _Plan(
        head=student_head,
        teacher=teacher,
        rows=rows,
        num_rows=m,
        chunk_size=chunk_size,
        loss_chunk_size=loss_chunk_size,
        labels=labels,
        kind=kind,
        temperature=temperature,
        alpha=alpha,
        t2_scale=t2_scale,
        beta=beta,
        skew=skew,
        want_kl=log_kl or kind == "forward_kl",
        kl_is_div=kind == "forward_kl" or (kind == "jsd" and beta == 0.0),
        grad_weight_fp32=grad_weight_fp32,
        calibration_bins=int(calibration_bins),
        device_type=student_hidden.device.type,
        compute_dtype=_autocast_dtype(student_hidden.device.type),
        inv_num_tokens=inv.to(student_hidden.device),
        needs=needs,
    )
    stats: dict[str, torch.Tensor] = {}
    if any(needs):
        loss = _ChunkedKD.apply(student_hidden, weight, bias, num_tokens, plan, stats)
    else:
        with torch.no_grad():
            loss_sum, stats, *_ = _run_chunks(plan, student_hidden, weight, bias, False, False, False)
            loss = _normalize(loss_sum, num_tokens)
    return loss, stats


def naive_kd_loss(
    student_hidden: torch.Tensor,
    student_head: LinearHead,
    labels: torch.Tensor,
    teacher: Teacher,
    num_tokens: int | float | torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    t2_scale: bool = True,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Reference: materialize the logits of both models, then ``kd_loss_per_token`` + ``reduce_loss``."""
    logits = student_head.logits(student_hidden)
    if teacher is not None and not isinstance(teacher, SparseTarget):
        t_hidden, t_head = teacher
        with torch.no_grad():
            teacher = t_head.logits(t_hidden.detach())
    out = kd_loss_per_token(
        logits,
        labels,
        teacher,
        kind=kind,
        temperature=temperature,
        alpha=alpha,
        t2_scale=t2_scale,
        beta=beta,
        skew=skew,
    )
    return reduce_loss(out["loss"], labels != IGNORE_INDEX, num_tokens)
