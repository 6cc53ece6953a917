"""Cross-tokenizer distillation's tokenizer side (docs/methods.md §14): the byte-offset alignment of two
tokenizations of the same text (:mod:`distill.crosstok.align`) and the projection W between two vocabularies,
built once and cached on disk (:mod:`distill.crosstok.projection`), a student batch re-tokenized for the
teacher with its rows' groups (:mod:`distill.crosstok.batch`) and the pair's pre-flight report
(:mod:`distill.crosstok.preflight`). The losses over the aligned groups are
pure tensor math in :mod:`distill.losses.crosstok`."""

from distill.crosstok.align import Alignment, align, align_ids, concat_groups, label_groups, token_bytes
from distill.crosstok.batch import CrossBatch, retokenize_batch, text_span
from distill.crosstok.preflight import Preflight, preflight
from distill.crosstok.projection import build_projection, exact_matches, load_projection, piece_weights

__all__ = [
    "Alignment",
    "CrossBatch",
    "Preflight",
    "align",
    "align_ids",
    "build_projection",
    "concat_groups",
    "exact_matches",
    "label_groups",
    "load_projection",
    "piece_weights",
    "preflight",
    "retokenize_batch",
    "text_span",
    "token_bytes",
]
