"""Distillation losses: pure functions of tensors (no model, config or tokenizer).

* :mod:`distill.losses.divergences`: :class:`LossSpec` (the whole loss setting), the per-position divergences
  between a student and a dense or sparse teacher, the CE mixing and the one reduction (:func:`reduce_loss`).
* :mod:`distill.losses.hidden`: the hidden-state term (:class:`HiddenStateLoss`, :func:`uniform_layer_map`).
* :mod:`distill.losses.chunked`: the memory-efficient loss from final hidden states and the output layer, a
  chunk of rows at a time (:func:`chunked_kd_loss`), and the teacher signals it takes (:class:`DenseSignal`,
  :class:`MixtureSignal`); :mod:`distill.losses.fused`, its loss chunks' forward KL and CE in closed form.
* :mod:`distill.losses.crosstok`: losses between a student and a teacher with another tokenizer, over groups of
  rows aligned at shared byte boundaries (:class:`AlignedGroups`): P-KL through a sparse projection
  (:class:`Projection`), GOLD's hybrid over exact matches (:class:`ExactMatches`) and ULD, naive and chunked;
  :func:`crosstok_kd_loss`, a micro-batch's whole loss toward such a teacher (:class:`CrossTokSignal`).

Every public name is importable from ``distill.losses``.
"""

from distill.losses.chunked import (
    DEFAULT_CUDA_MEMORY_BUDGET_BYTES,
    DEFAULT_MEMORY_BUDGET_BYTES,
    DenseSignal,
    LinearHead,
    MixtureSignal,
    Signal,
    chunked_kd_loss,
    default_memory_budget,
    logits_into,
    naive_kd_loss,
    plan_chunks,
    temporaries_per_token,
)
from distill.losses.crosstok import (
    CROSSTOK_METHODS,
    AlignedGroups,
    CrossTokMethod,
    CrossTokSignal,
    ExactMatches,
    Projection,
    chunked_crosstok_loss,
    crosstok_kd_loss,
    group_divergence,
    group_logprobs,
    naive_crosstok_loss,
    sorted_l1,
)
from distill.losses.divergences import (
    DIVERGENCES,
    FORWARD_KL,
    IGNORE_INDEX,
    OBJECTIVES,
    Divergence,
    LossSpec,
    Objective,
    SparseTarget,
    TeacherSignal,
    cross_entropy_per_token,
    divergence_from_logprobs,
    kd_loss_per_token,
    reduce_loss,
    sparse_logprobs,
    supervised_mask,
    teacher_label_logprob,
    tempered,
    token_divergence,
    upcast,
)
from distill.losses.hidden import HiddenStateLoss, hidden_distance, uniform_layer_map

__all__ = [
    "CROSSTOK_METHODS",
    "DEFAULT_CUDA_MEMORY_BUDGET_BYTES",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "DIVERGENCES",
    "FORWARD_KL",
    "IGNORE_INDEX",
    "OBJECTIVES",
    "AlignedGroups",
    "CrossTokMethod",
    "CrossTokSignal",
    "DenseSignal",
    "Divergence",
    "ExactMatches",
    "HiddenStateLoss",
    "LinearHead",
    "LossSpec",
    "MixtureSignal",
    "Objective",
    "Projection",
    "Signal",
    "SparseTarget",
    "TeacherSignal",
    "chunked_crosstok_loss",
    "chunked_kd_loss",
    "crosstok_kd_loss",
    "cross_entropy_per_token",
    "default_memory_budget",
    "divergence_from_logprobs",
    "group_divergence",
    "group_logprobs",
    "hidden_distance",
    "kd_loss_per_token",
    "logits_into",
    "naive_crosstok_loss",
    "naive_kd_loss",
    "plan_chunks",
    "reduce_loss",
    "sorted_l1",
    "sparse_logprobs",
    "supervised_mask",
    "teacher_label_logprob",
    "tempered",
    "temporaries_per_token",
    "token_divergence",
    "uniform_layer_map",
    "upcast",
]
