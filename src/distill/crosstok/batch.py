"""A student batch re-tokenized for a teacher with another tokenizer, and the aligned groups of its rows
(docs/methods.md §14).

Each sequence's real tokens (``attention_mask`` 1, right padding) are turned back into bytes, and the teacher
tokenizes their text as it is (special tokens written as text, none added). A sequence cut mid-character
(packing cuts at token boundaries, and a byte-level student's token can be part of a character) is read from
its first token that starts a character to its last that ends one; the tokens outside that span are in no
group (they keep their cross-entropy). A prefix space the teacher's tokenizer adds (SentencePiece) is not
part of the text: it is taken off the teacher's first token. Rows follow the training run's convention: row ``b * (T - 1) + t``
predicts token ``t + 1`` of sequence b, on each side with its own T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from distill.crosstok.align import align, concat_groups, label_groups
from distill.losses import IGNORE_INDEX, AlignedGroups


@dataclass
class CrossBatch:
    """The teacher's batch (``input_ids``, ``attention_mask``, right-padded) and the groups of both sides' rows."""

    teacher_batch: dict
    groups: AlignedGroups


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def _decodable(pieces: list[bytes]) -> bool:
    try:
        b"".join(pieces).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def text_span(pieces: list[bytes]) -> tuple[int, int]:
    """The longest run of tokens [k0, k1) from the first that starts a character whose bytes are valid UTF-8."""
    k0 = 0
    while k0 < len(pieces) and (not pieces[k0] or _is_continuation(pieces[k0][0])):
        k0 += 1
    k1 = len(pieces)
    while k1 > k0 and not _decodable(pieces[k0:k1]):
        k1 -= 1
    return k0, k1


def teacher_pieces(t_ids: list[int], teacher_bytes: list[bytes], text: bytes) -> list[bytes]:
    """The teacher tokens' bytes for ``text``; a space the teacher's tokenizer puts before the text
    (SentencePiece's prefix space) is taken off its first token, so that both sides cover the same bytes."""
    pieces = [teacher_bytes[i] for i in t_ids]
    if pieces and pieces[0].startswith(b" ") and b"".join(pieces) == b" " + text:
        pieces[0] = pieces[0][1:]
    return pieces


def _pad_groups(part: AlignedGroups, start: int, width_s: int, width_t: int) -> AlignedGroups:
    """A sequence's groups on full-width rows: its span's student rows start at row ``start``."""
    s_group = torch.full((width_s,), -1, dtype=torch.long)
    s_labels = torch.full((width_s,), IGNORE_INDEX, dtype=torch.long)
    n = part.student_group.numel()
    s_group[start:start + n], s_labels[start:start + n] = part.student_group, part.student_labels
    t_group = torch.full((width_t,), -1, dtype=torch.long)
    t_labels = torch.full((width_t,), IGNORE_INDEX, dtype=torch.long)
    m = part.teacher_group.numel()
    t_group[:m], t_labels[:m] = part.teacher_group, part.teacher_labels
    return AlignedGroups(s_group, s_labels, t_group, t_labels, part.num_groups)


def _real_length(mask: torch.Tensor, b: int) -> int:
    n = int(mask.sum())
    if not bool(mask[:n].all()):
        raise ValueError(f"sequence {b} of the batch is not right-padded (attention_mask has a gap); the "
                         "cross-tokenizer teacher re-reads each sequence's tokens up to its padding")
    return n


def retokenize_batch(batch: dict, teacher_tok: PreTrainedTokenizerBase, student_bytes: list[bytes],
                     teacher_bytes: list[bytes], *, teacher_pad_id: int) -> CrossBatch:
    """The teacher's tokens for a student batch (``input_ids``, ``labels``, ``attention_mask`` (B, T_s)) and
    the aligned groups of the B·(T_s − 1) student rows and B·(T_t − 1) teacher rows."""
    ids, labels, mask = batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].cpu()
    seqs = []
    for b in range(ids.shape[0]):
        s_ids = ids[b, :_real_length(mask[b], b)].tolist()
        pieces = [student_bytes[i] for i in s_ids]
        k0, k1 = text_span(pieces)
        text = b"".join(pieces[k0:k1]).decode("utf-8")
        t_ids = list(teacher_tok(text, add_special_tokens=False)["input_ids"]) if text else []
        seqs.append((s_ids, k0, k1, t_ids))
    width_t = max(2, max(len(t) for *_, t in seqs))
    t_input = torch.full((len(seqs), width_t), teacher_pad_id, dtype=torch.long)
    t_mask = torch.zeros((len(seqs), width_t), dtype=torch.long)
    parts = []
    for b, (s_ids, k0, k1, t_ids) in enumerate(seqs):
        t_input[b, :len(t_ids)] = torch.tensor(t_ids, dtype=torch.long)
        t_mask[b, :len(t_ids)] = 1
        if k1 - k0 < 2 or len(t_ids) < 2:
            part = AlignedGroups(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                 torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0)
        else:
            span = [student_bytes[i] for i in s_ids[k0:k1]]
            alignment = align(span, teacher_pieces(t_ids, teacher_bytes, b"".join(span)))
            supervised = (labels[b, k0:k1] != IGNORE_INDEX).tolist()
            part = label_groups(alignment, s_ids[k0:k1], t_ids, supervised)
        parts.append(_pad_groups(part, k0, ids.shape[1] - 1, width_t - 1))
    return CrossBatch({"input_ids": t_input, "attention_mask": t_mask}, concat_groups(parts))

