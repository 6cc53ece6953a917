"""The projection W from a student's vocabulary to a teacher's (docs/methods.md §14), built once from the two
tokenizers and cached on disk.

Row i of W: a student token whose bytes are exactly a teacher token's is mapped to that token alone, with
weight 1 (an exact match). Any other token is re-tokenized by the teacher (its text; bytes that are not
valid UTF-8 on their own, a piece of a character, are split greedily into the longest teacher tokens with
those bytes), and its first ``pieces`` teacher tokens get weights 0.9 · 0.1^k; with ``reverse`` every teacher
token is also re-tokenized by the student and adds the same weights to the (student piece, teacher token)
entries. Each row keeps its ``top_k`` largest entries (ties by teacher id) and is normalized to sum to 1; a
token with no bytes maps nowhere (a zero row). W is stored as (V_s, top_k) ids and weights, never dense.

The cache file is ``crosstok-<key>.safetensors`` in the cache directory, the key a hash of both tokenizers'
fingerprints and the settings; it is written to a temporary name and renamed, so it is complete or absent.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from transformers import PreTrainedTokenizerBase

from distill.checkpoint import atomic_write_bytes
from distill.crosstok.align import token_bytes
from distill.losses import ExactMatches, Projection
from distill.tokenizer import tokenizer_fingerprint

FORMAT = 1
TOP_K = 32
PIECES = 4


def piece_weights(n: int) -> list[float]:
    """Decaying weights of a re-tokenization's n pieces: 0.9 · 0.1^k, normalized to sum to 1."""
    raw = [0.9 * 0.1**k for k in range(n)]
    return [w / sum(raw) for w in raw]


def exact_matches(student_bytes: Sequence[bytes], teacher_bytes: Sequence[bytes]) -> list[tuple[int, int]]:
    """(student id, teacher id) pairs with the same non-empty bytes, each id at most once (the lowest id wins)."""
    teacher_of: dict[bytes, int] = {}
    for j, b in enumerate(teacher_bytes):
        if b:
            teacher_of.setdefault(b, j)
    pairs, taken = [], set()
    for i, b in enumerate(student_bytes):
        j = teacher_of.get(b) if b else None
        if j is not None and j not in taken:
            taken.add(j)
            pairs.append((i, j))
    return pairs


def _greedy(data: bytes, table: dict[bytes, int], longest: int) -> list[int]:
    """Longest-first split of ``data`` into tokens of ``table`` (bytes -> id); [] when some byte has none."""
    out, at = [], 0
    while at < len(data):
        for n in range(min(longest, len(data) - at), 0, -1):
            j = table.get(data[at:at + n])
            if j is not None:
                out.append(j)
                at += n
                break
        else:
            return []
    return out


def _retokenize(sources: Sequence[bytes], tok: PreTrainedTokenizerBase, tok_bytes: Sequence[bytes],
                pieces: int) -> list[list[int]]:
    """Each byte string's first ``pieces`` tokens under ``tok``: its text tokenized, or a greedy byte split."""
    table: dict[bytes, int] = {}
    for j, b in enumerate(tok_bytes):
        if b:
            table.setdefault(b, j)
    longest = max((len(b) for b in table), default=1)
    texts, where, out = [], [], [[] for _ in sources]
    for k, b in enumerate(sources):
        try:
            texts.append(b.decode("utf-8"))
            where.append(k)
        except UnicodeDecodeError:
            out[k] = _greedy(b, table, longest)[:pieces]
    if texts:
        encoded = tok(texts, add_special_tokens=False)["input_ids"]
        for k, ids in zip(where, encoded, strict=True):
            out[k] = list(ids)[:pieces]
    return out


def _rows(student_bytes, teacher_bytes, student_tok, teacher_tok, pieces: int, reverse: bool) -> list[dict]:
    counts: list[dict[int, float]] = [defaultdict(float) for _ in student_bytes]
    todo = [i for i, b in enumerate(student_bytes) if b]
    for i, ids in zip(todo, _retokenize([student_bytes[i] for i in todo], teacher_tok, teacher_bytes, pieces),
                      strict=True):
        for j, w in zip(ids, piece_weights(len(ids)), strict=True):
            counts[i][j] += w
    if reverse:
        back = [j for j, b in enumerate(teacher_bytes) if b]
        for j, ids in zip(back, _retokenize([teacher_bytes[j] for j in back], student_tok, student_bytes, pieces),
                          strict=True):
            for i, w in zip(ids, piece_weights(len(ids)), strict=True):
                counts[i][j] += w
    return counts


def build_projection(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, *,
                     top_k: int = TOP_K, pieces: int = PIECES, reverse: bool = True) -> tuple[Projection, ExactMatches]:
    """W and the exact matches between two tokenizers (see the module docstring)."""
    if top_k < 1 or pieces < 1:
        raise ValueError(f"the projection needs top_k >= 1 and pieces >= 1, got top_k={top_k}, pieces={pieces}")
    s_bytes, t_bytes = token_bytes(student_tok), token_bytes(teacher_tok)
    pairs = exact_matches(s_bytes, t_bytes)
    counts = _rows(s_bytes, t_bytes, student_tok, teacher_tok, pieces, reverse)
    for i, j in pairs:
        counts[i] = {j: 1.0}
    ids = torch.zeros(len(s_bytes), top_k, dtype=torch.long)
    weights = torch.zeros(len(s_bytes), top_k, dtype=torch.float32)
    for i, row in enumerate(counts):
        best = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        total = sum(w for _, w in best)
        for k, (j, w) in enumerate(best):
            ids[i, k], weights[i, k] = j, w / total
    matches = ExactMatches(torch.tensor([i for i, _ in pairs], dtype=torch.long),
                           torch.tensor([j for _, j in pairs], dtype=torch.long))
    return Projection(ids, weights, len(t_bytes)), matches


def projection_key(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, *, top_k: int,
                   pieces: int, reverse: bool) -> str:
    """The cache key: both fingerprints, the settings and the format."""
    payload = [FORMAT, tokenizer_fingerprint(student_tok), tokenizer_fingerprint(teacher_tok), top_k, pieces, reverse]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def load_projection(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase,
                    cache_dir: str | Path, *, top_k: int = TOP_K, pieces: int = PIECES,
                    reverse: bool = True) -> tuple[Projection, ExactMatches, Path]:
    """W and the exact matches from the cache directory, built and written there first when absent. Returns
    them and the cache file's path."""
    key = projection_key(student_tok, teacher_tok, top_k=top_k, pieces=pieces, reverse=reverse)
    path = Path(cache_dir).expanduser() / f"crosstok-{key}.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            num_teacher = int(f.metadata()["num_teacher"])
        return (Projection(t["ids"], t["weights"], num_teacher),
                ExactMatches(t["exact_student"], t["exact_teacher"]), path)
    projection, matches = build_projection(student_tok, teacher_tok, top_k=top_k, pieces=pieces, reverse=reverse)
    tensors = {"ids": projection.ids, "weights": projection.weights, "exact_student": matches.student_ids,
               "exact_teacher": matches.teacher_ids}
    metadata = {"num_teacher": str(projection.num_teacher), "format": str(FORMAT),
                "student_fingerprint": tokenizer_fingerprint(student_tok),
                "teacher_fingerprint": tokenizer_fingerprint(teacher_tok)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return projection, matches, path
