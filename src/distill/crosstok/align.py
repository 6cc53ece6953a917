"""Byte-offset alignment of two tokenizations of the same text (docs/methods.md §14).

Every token is a byte string (:func:`token_bytes`): a byte-level token's bytes through GPT-2's byte table, a
SentencePiece piece with ``▁`` as a space and ``<0xNN>`` as its byte, an added or special token its own
content (the text it was parsed from). Two tokenizations of the same text then cover the same bytes, and a
**group** is a shortest run of tokens on each side that ends on the same byte: both sides' cumulative ends
meet there. A token with no bytes (a BOS the tokenizer adds, not in the text) belongs to no group.

For the loss the tokens are labels: row r predicts token r + 1 (:func:`label_groups`). A group is kept only
when every token in it has a row on both sides (so not the first token) and every student token in it is
supervised; the kept groups are renumbered 0 .. G - 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from distill.losses import IGNORE_INDEX, AlignedGroups
from distill.tokenizer import bytes_to_unicode

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte (the inverse of the table ``pre_tokenizers.ByteLevel`` uses)."""
    return {c: b for b, c in bytes_to_unicode().items()}


def _decoder_types(tok: PreTrainedTokenizerBase) -> set[str]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return set()
    found, todo = set(), [json.loads(backend.to_str()).get("decoder")]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            found.add(node.get("type"))
            todo += node.get("decoders") or []
    return found


def token_bytes(tok: PreTrainedTokenizerBase) -> list[bytes]:
    """The bytes of every id of ``tok`` (``len(tok)`` entries): what each token contributes to the text."""
    kinds = _decoder_types(tok)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    added = {i: t.content for i, t in tok.added_tokens_decoder.items()}
    table = _gpt2_byte_decoder()
    out = []
    for i, piece in enumerate(pieces):
        if i in added:
            out.append(added[i].encode("utf-8"))
        elif piece is None:
            out.append(b"")
        elif "ByteLevel" in kinds and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif "ByteFallback" in kinds and _BYTE_PIECE.fullmatch(piece):
            out.append(bytes([int(piece[3:5], 16)]))
        elif "Metaspace" in kinds or "Replace" in kinds:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
        else:
            out.append(tok.decode([i]).encode("utf-8"))
    return out


@dataclass
class Alignment:
    """The group of every token on each side (-1: a token with no bytes), groups 0 .. num_groups - 1."""

    student: list[int]
    teacher: list[int]
    num_groups: int


def _ends(pieces: Sequence[bytes]) -> list[int]:
    ends, at = [], 0
    for b in pieces:
        at += len(b)
        ends.append(at)
    return ends


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def align(student: Sequence[bytes], teacher: Sequence[bytes]) -> Alignment:
    """Group two tokenizations (each token's bytes) of the same text at their shared byte boundaries."""
    s_text, t_text = b"".join(student), b"".join(teacher)
    if s_text != t_text:
        at = _first_difference(s_text, t_text)
        raise ValueError(
            f"the two tokenizations cover different bytes (from byte {at}: student {s_text[at:at + 16]!r}, "
            f"teacher {t_text[at:at + 16]!r}): the teacher must tokenize the student's decoded text as it is "
            "(no normalizer that changes it, special tokens written as text; retokenize_batch takes off a prefix "
            "space the teacher adds)")
    s_ends, t_ends = _ends(student), _ends(teacher)
    shared = (set(s_ends) & set(t_ends)) - {0}

    def groups(pieces: Sequence[bytes], ends: list[int]) -> list[int]:
        out, g = [], 0
        for b, end in zip(pieces, ends, strict=True):
            out.append(g if b else -1)
            if b and end in shared:
                g += 1
        return out

    return Alignment(groups(student, s_ends), groups(teacher, t_ends), len(shared))


def align_ids(student_tok: PreTrainedTokenizerBase, student_ids: Sequence[int], teacher_tok: PreTrainedTokenizerBase,
              teacher_ids: Sequence[int], *, student_bytes: list[bytes] | None = None,
              teacher_bytes: list[bytes] | None = None) -> Alignment:
    """:func:`align` on token ids (the byte tables may be passed in, :func:`token_bytes` of each tokenizer)."""
    s_table = student_bytes if student_bytes is not None else token_bytes(student_tok)
    t_table = teacher_bytes if teacher_bytes is not None else token_bytes(teacher_tok)
    return align([s_table[i] for i in student_ids], [t_table[i] for i in teacher_ids])


def label_groups(alignment: Alignment, student_ids: Sequence[int], teacher_ids: Sequence[int],
                 student_supervised: Sequence[bool] | None = None) -> AlignedGroups:
    """The loss's groups of one sequence: student row r (teacher row r) predicts token r + 1 of its side.

    A group is dropped when it holds a side's first token (no row predicts it) or a student token that is
    not supervised (``student_supervised``, one flag per token; all supervised when None). Rows outside
    the kept groups get group -1; the kept ones are renumbered in order.
    """
    n_s, n_t = len(student_ids), len(teacher_ids)
    sup = [True] * n_s if student_supervised is None else list(student_supervised)
    drop = {alignment.student[0], alignment.teacher[0]} if n_s and n_t else set()
    drop |= {g for g, ok in zip(alignment.student, sup, strict=True) if not ok}
    kept = sorted(set(alignment.student) - drop - {-1})
    renumber = {g: k for k, g in enumerate(kept)}
    s_group = [renumber.get(g, -1) for g in alignment.student[1:]]
    t_group = [renumber.get(g, -1) for g in alignment.teacher[1:]]
    s_labels = [i if g >= 0 else IGNORE_INDEX for i, g in zip(student_ids[1:], s_group, strict=True)]
    t_labels = [i if g >= 0 else IGNORE_INDEX for i, g in zip(teacher_ids[1:], t_group, strict=True)]
    return AlignedGroups(torch.tensor(s_group, dtype=torch.long), torch.tensor(s_labels, dtype=torch.long),
                         torch.tensor(t_group, dtype=torch.long), torch.tensor(t_labels, dtype=torch.long),
                         len(kept))


def concat_groups(parts: Sequence[AlignedGroups]) -> AlignedGroups:
    """Several sequences' groups as one, rows and groups in order (the rows of a flattened batch)."""
    s_group, t_group, offset = [], [], 0
    for part in parts:
        s_group.append(torch.where(part.student_group >= 0, part.student_group + offset, -1))
        t_group.append(torch.where(part.teacher_group >= 0, part.teacher_group + offset, -1))
        offset += part.num_groups
    return AlignedGroups(torch.cat(s_group), torch.cat([p.student_labels for p in parts]), torch.cat(t_group),
                         torch.cat([p.teacher_labels for p in parts]), offset)
