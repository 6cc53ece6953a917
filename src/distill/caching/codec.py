"""The teacher cache's format: sparse per-token teacher targets on disk, written once, read by training.

``distill cache`` (:mod:`distill.commands.cache`, through :mod:`distill.caching.capture`) runs a teacher over a
tokenized dataset and stores, for every position whose next token is supervised, one of (docs/methods.md §2):

* ``topk``: the k most probable ids, their probabilities and the tail mass ``1 - sum(top-k p)``;
* ``sampled``: N draws with replacement from the teacher distribution, kept as distinct ids + counts;
* ``hybrid``: the h most probable ids with their probabilities rounded without bias, and a systematic sample
  of the rest of the distribution whose size follows the mass left to it (fewer bytes at the same noise).

Probabilities are at the capture temperature ``T``: ``p = softmax(z / T)``. This module is the format (bit
packing, Rice codes, quantization, hashes, the shard files, the manifest's constants);
:mod:`distill.caching.capture` computes the targets and writes the shards, :mod:`distill.caching.reader` reads
them back.

Positions
---------
Position ``t`` of an example (``0 <= t < len - 1``) predicts token ``t + 1``; it is stored iff
``labels[t + 1] != IGNORE_INDEX``, exactly the rows the training loss uses (``labels[:, 1:]``). The reader
needs the example's ``labels`` to put rows back in place, and checks them: the per-example hash covers
``input_ids`` and ``labels``.

Encoding (all integers little-endian; bit fields packed LSB-first, see :func:`pack_bits`)
------------------------------------------------------------------------------------------
* ids: ``id_bits = ceil(log2 V)`` bits each (9 for V = 263, 17 for 128k, 18 for 262k).
* ``topk``, per position, sorted by probability (descending): k ids; the ratios ``r_i = p_i / p_1`` of
  entries 2..k (the first is 1 and not stored) as ``prob_bits``-bit codes on a fourth-root grid,
  ``c = round((1 - r^(1/4)) * (L - 1))``, ``L = 2^prob_bits``, decoded as ``r = (1 - c / (L - 1))^4``;
  the top code (r = 0) marks a negligible entry, read back as padding (probability 0). The fourth-root
  grid spends its levels where the KL is sensitive (large ratios) and still resolves ratios down to
  ``(L - 1)^-4`` (1e-6 at 5 bits). The tail mass in ``tail_bits`` bits (16 from k = 32 on, else 8):
  code 0 is a tail below ``sigmoid(-20)`` (read as 0), else ``logit(tail)`` clamped to [-20, 20] on
  ``2^tail_bits - 1`` uniform levels (step 0.157 at 8 bits: relative error at most 8% on the tail and on
  1 - tail; 6e-4 at 16 bits). On reading, the ratios are normalized so that the kept entries sum to
  ``1 - tail`` (``topk_tail=True``) or to 1 (renormalized top-k).
  ``prob_bits`` (and ``tail_bits``, 8 or 16) can be set; ``prob_bits`` defaults to the most bits (at most 8, at least 4) that keep an entry within 3 bytes, the
  tail and the index included: ``(24k - k * id_bits - tail_bits - 2) // (k - 1)``: 8 bits at V = 263,
  6 at 128k, 5 at 262k (k >= 8). Measured error (``tests/test_cache.py``): mean KL between the exact and
  the decoded renormalized top-k below 2e-3 nats at 5 bits, 5e-4 at 6 bits.
* ``sampled``, per position: ``d - 1`` (``d`` distinct ids, ``bit_length(min(N, V) - 1)`` bits); the d ids
  in increasing order as gaps (the first id, then ``id_j - id_{j-1} - 1``) and ``count - 1`` of each but
  the last (the last count is ``N - sum(others)``), both Rice-coded (see :func:`rice_encode`: a unary
  quotient stream and a fixed-width remainder stream, with the parameter k that minimizes each shard's
  bits). Sorted gaps of d ids out of V take about ``log2(V / d) + 1.5`` bits instead of ``log2 V``, and
  the many counts of 1 a high-entropy teacher gives take 1 bit; per example the shard stores the unary
  streams' bit offsets (``offsets`` section), so any example decodes on its own. Exact: read back as
  ``probs = count / N``, ``tail = 0`` (unbiased: E[count / N] = p). Draws are inverse-CDF samples (fp64
  over blocks of 256 ids, fp32 within a block) with uniforms from a generator seeded by (seed, split,
  example index), so they do not depend on batching.
* ``hybrid`` (``head`` = h, ``n``), per position: the h most probable ids (``id_bits`` each) and h 8-bit codes
  ``c_j``: the cumulative head mass ``S_j = p_1 + ... + p_j`` on the grid ``1/255`` is ``C_j = floor(255 S_j +
  u)`` (one uniform u per position, ``C_h`` from ``1 - tail`` so that no rounding pushes it past 255), stored as
  increments ``c_j = C_j - C_{j-1}``; read back as ``p_j = c_j / 255`` (``E[C_j] = 255 S_j``: unbiased) and the
  rest of the mass ``t = 1 - C_h / 255`` (unbiased for the tail mass). Then ``M = ceil(t n)`` draws from the
  teacher with the head removed (renormalized), systematic: points ``(u' + i) / M`` on its cumulative
  distribution (each id's count is ``floor`` or ``ceil`` of ``M q_i``, mean exactly ``M q_i``), stored as in
  ``sampled`` (distinct ids as Rice-coded sorted gaps, counts less the last), with ``d`` in
  ``bit_length(min(n, V - h))`` bits (``d = 0`` when ``t = 0``). Read back as ``t * count / M``. Every id's
  decoded probability has the teacher's as its mean, and they sum to 1 (docs/methods.md §2).

Files
-----
``OUT/plan.json``: the cache's identity, written first (resume checks it). ``OUT/shard-SPLIT-SSSSSS.bin``:
shard ``S`` holds examples ``[S * shard_examples, (S + 1) * shard_examples)`` of the split (so the layout
does not depend on the number of processes; process ``r`` of ``w`` writes shards ``S % w == r``). Each
shard is written under a temporary name, fsynced and renamed, so a file with a shard's name is complete.
Layout: magic ``DSTLSHRD``, u32 format version, u32 header length, the header (JSON: split, shard,
examples, positions, entries, section offsets), then 8-byte aligned sections (``index``: per example an
8-byte hash, u32 token count, u32 stored positions; then the bit streams), then the sha256 of everything
before it (a shard verifies itself). ``OUT/manifest.json``, written last (atomically): format name and
version, teacher identity, tokenizer fingerprint, vocabulary size, mode and its parameters, temperature,
seq_len, and per split the data fingerprint and each shard's name, example range, size and sha256. No
manifest means an incomplete cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from distill.checkpoint import atomic_write_bytes
from distill.losses import IGNORE_INDEX

FORMAT_NAME = "distill-teacher-cache"
FORMAT_VERSION = 3  # 3: the hybrid mode; top-k and sampled shards are laid out as in 2
READABLE_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
PLAN = "plan.json"
SHARD_MAGIC = b"DSTLSHRD"
HEAD_LEVELS = 255  # hybrid: head probabilities on the grid 1/255 (8-bit codes)
TAIL_LOGIT_RANGE = 20.0  # tail codes: logit(tail) in [-20, 20] on codes 1.., code 0 = (almost) no tail
INDEX_DTYPE = np.dtype([("hash", "V8"), ("length", "<u4"), ("positions", "<u4")])
_TRAILER = 32  # sha256 of the shard's content


# ---------------------------------------------------------------------------------------------- bit packing


def id_bits_for(vocab_size: int) -> int:
    """``ceil(log2 V)`` (at least 1): the bits one token id needs."""
    if vocab_size < 1:
        raise ValueError(f"vocabulary size must be >= 1, got {vocab_size}")
    return max(1, (vocab_size - 1).bit_length())


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers into ``bits`` bits each, LSB-first; returns uint8.

    Value ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream (bit ``j`` of the stream is bit
    ``j % 8`` of byte ``j // 8``). The values are padded with zeros to a multiple of 8, so the stream is
    ``ceil(n / 8) * bits`` bytes: every block of 8 values is exactly ``bits`` bytes, which is what makes
    vectorized encoding and random access simple. ``bits`` in [0, 57]; 0 gives an empty stream.
    """
    values = np.asarray(values)
    if bits == 0:
        if values.size and values.max() != 0:
            raise ValueError("pack_bits: non-zero values do not fit in 0 bits")
        return np.zeros(0, np.uint8)
    if not 1 <= bits <= 57:
        raise ValueError(f"pack_bits: bits must be in [0, 57], got {bits}")
    n = values.size
    if n and (values.min() < 0 or int(values.max()) >> bits):
        raise ValueError(f"pack_bits: values must be in [0, 2^{bits}), got [{values.min()}, {values.max()}]")
    blocks = -(-n // 8)
    dt = np.uint32 if bits <= 25 else np.uint64  # shift + bits fits in the word
    v = np.zeros(blocks * 8, dt)
    v[:n] = values.reshape(-1)
    v = v.reshape(blocks, 8)
    out = np.zeros((bits, blocks), np.uint8)  # byte lanes, each contiguous
    for j in range(8):
        first = j * bits
        off, shift = first >> 3, first & 7
        w = v[:, j] << dt(shift)
        for m in range((shift + bits + 7) >> 3):
            out[off + m] |= (w >> dt(8 * m)).astype(np.uint8)  # astype keeps the low byte
    return np.ascontiguousarray(out.T).reshape(-1)


def unpack_bits(buf, bits: int, start: int, count: int) -> np.ndarray:
    """Values ``[start, start + count)`` of a stream written by :func:`pack_bits`, as int64.

    ``buf``: anything ``np.frombuffer`` accepts (bytes, a memoryview or mmap slice, a uint8 array). Only
    the blocks of 8 values that hold the requested ones are read.
    """
    if count <= 0:
        return np.zeros(0, np.int64)
    if bits == 0:
        return np.zeros(count, np.int64)
    if bits in (8, 16, 32):  # whole little-endian words: the stream is the array itself
        word = np.dtype(f"<u{bits // 8}")
        return np.frombuffer(buf, word, count=count, offset=start * word.itemsize).astype(np.int64)
    dt = np.uint32 if bits <= 25 else np.uint64
    b0, b1 = start // 8, -(-(start + count) // 8)
    raw = np.frombuffer(buf, np.uint8, count=(b1 - b0) * bits, offset=b0 * bits).reshape(-1, bits)
    raw = np.ascontiguousarray(raw.T)
    out = np.empty((8, b1 - b0), dt)
    mask = dt((1 << bits) - 1)
    for j in range(8):
        first = j * bits
        off, shift = first >> 3, first & 7
        acc = raw[off].astype(dt)
        for m in range(1, (shift + bits + 7) >> 3):
            acc |= raw[off + m].astype(dt) << dt(8 * m)
        out[j] = (acc >> dt(shift)) & mask
    lo = start - b0 * 8
    return out.T.reshape(-1)[lo : lo + count].astype(np.int64)


def packed_nbytes(count: int, bits: int) -> int:
    return -(-count // 8) * bits


# Rice codes: a value v with parameter k is the unary quotient v >> k (that many 0 bits, then a 1) in one
# stream and the k low bits in another (fixed width, so pack_bits gives random access by value index).
# Small values cost k + 1 bits; the encoder picks k per shard and stream (Rice with k = b costs at most one
# bit more than a fixed b-bit field, so a good k is never much worse than fixed width).


def rice_parameter(values: np.ndarray, max_k: int) -> int:
    """The k in [0, max_k] that codes ``values`` (non-negative) in the fewest bits."""
    v = np.asarray(values, dtype=np.int64)
    if v.size == 0:
        return 0
    costs = [int((v >> k).sum()) + v.size * (k + 1) for k in range(max_k + 1)]
    return int(np.argmin(costs))


def rice_encode(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unary stream, remainder stream, unary bit offset of every value and of the end) for ``values``."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    ends = np.cumsum((v >> k) + 1)  # one past each value's terminating 1 bit
    starts = np.concatenate([[0], ends]).astype(np.int64)
    bits = np.zeros(int(starts[-1]), np.uint8)
    bits[ends - 1] = 1
    unary = np.packbits(bits, bitorder="little")
    rem = pack_bits(v & ((1 << k) - 1), k) if k else np.zeros(0, np.uint8)
    return unary, rem, starts


def rice_decode(unary, rem, k: int, first: int, count: int, bit0: int, bit1: int) -> np.ndarray:
    """Values ``[first, first + count)`` whose unary codes fill bits ``[bit0, bit1)`` of the stream."""
    if count <= 0:
        return np.zeros(0, np.int64)
    b0, b1 = bit0 // 8, -(-bit1 // 8)
    raw = np.frombuffer(unary, np.uint8, count=b1 - b0, offset=b0)
    bits = np.unpackbits(raw, bitorder="little")[bit0 - 8 * b0 : bit1 - 8 * b0]
    ones = np.flatnonzero(bits)
    if len(ones) != count or (count and ones[-1] != len(bits) - 1):
        raise ValueError(f"Rice stream: expected {count} values in bits {bit0}-{bit1}, found {len(ones)}")
    q = np.diff(ones, prepend=-1) - 1
    if not k:
        return q.astype(np.int64)
    return (q.astype(np.int64) << k) | unpack_bits(rem, k, first, count)


# ---------------------------------------------------------------------------------------------- quantization


def auto_tail_bits(k: int) -> int:
    """Tail code bits for top-k: 16 from k = 32 on (1/2 bit per entry or less), else 8."""
    return 16 if k >= 32 else 8


def auto_prob_bits(k: int, id_bits: int, tail_bits: int | None = None) -> int:
    """Ratio-code bits for top-k: the most (<= 8, >= 4) that keep a kept entry within 3 bytes.

    Per position: ``k * id_bits + (k - 1) * prob_bits + tail_bits + 2`` (index, amortized) bits must fit
    in ``24 k``.
    """
    if k <= 1:
        return 0
    tail_bits = auto_tail_bits(k) if tail_bits is None else tail_bits
    return int(min(8, max(4, (24 * k - k * id_bits - tail_bits - 2) // (k - 1))))


def encode_ratios(ratios: np.ndarray | torch.Tensor, bits: int) -> np.ndarray:
    """Ratios ``p_i / p_1`` in [0, 1] -> codes ``round((1 - r^(1/4)) * (2^bits - 1))`` (uint16)."""
    r = torch.as_tensor(ratios, dtype=torch.float64).clamp(0.0, 1.0)
    top = (1 << bits) - 1
    codes = torch.round((1.0 - r.pow(0.25)) * top)
    return codes.to(torch.int32).numpy().astype(np.uint16)


def ratio_levels(bits: int) -> np.ndarray:
    """The decoded ratio of each code: ``(1 - c / (2^bits - 1))^4`` (the last code is 0)."""
    top = (1 << bits) - 1
    return (1.0 - np.arange(top + 1, dtype=np.float64) / top) ** 4


def encode_tail(tail: np.ndarray | torch.Tensor, bits: int = 8) -> np.ndarray:
    """Tail masses in [0, 1] -> ``bits``-bit codes: 0 below ``sigmoid(-20)``, else ``logit(tail)`` clamped
    to [-20, 20] on the ``2^bits - 1`` uniform levels 1, 2, ... (int64)."""
    t = torch.as_tensor(tail, dtype=torch.float64).clamp(0.0, 1.0)
    a, top = TAIL_LOGIT_RANGE, (1 << bits) - 2
    x = (torch.log(t) - torch.log1p(-t)).clamp(-a, a)  # logit; +-inf at 0 / 1 clamp to the ends
    codes = 1 + torch.round((x + a) / (2 * a) * top)
    codes = torch.where(t < 1.0 / (1.0 + math.exp(a)), torch.zeros_like(codes), codes)
    return codes.to(torch.int64).numpy()


def decode_tail(codes: np.ndarray, bits: int = 8) -> np.ndarray:
    a, top = TAIL_LOGIT_RANGE, (1 << bits) - 2
    x = (np.asarray(codes, dtype=np.float64) - 1) / top * (2 * a) - a
    return np.where(np.asarray(codes) == 0, 0.0, 1.0 / (1.0 + np.exp(-x)))


def readable_versions() -> str:
    return " and ".join(str(v) for v in READABLE_VERSIONS)


def hybrid_draws(head_codes: np.ndarray, n: int) -> np.ndarray:
    """A hybrid position's number of draws from its head codes (P, h): ``ceil(n * t)`` for the decoded rest
    of the mass ``t = 1 - sum(codes) / 255`` (exact integer arithmetic; 0 when the head holds everything)."""
    rest = HEAD_LEVELS - np.asarray(head_codes, dtype=np.int64).sum(-1)
    return -(-(rest * n) // HEAD_LEVELS)


# ---------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class CacheParams:
    """How targets are encoded; what the manifest records about the mode."""

    mode: str  # "topk" | "sampled" | "hybrid"
    vocab_size: int
    k: int = 0
    prob_bits: int = 0
    tail_bits: int = 0
    n: int = 0
    head: int = 0  # hybrid: ids kept with their probabilities

    @property
    def id_bits(self) -> int:
        return id_bits_for(self.vocab_size)

    @property
    def count_bits(self) -> int:
        return (self.n - 1).bit_length()

    @property
    def min_distinct(self) -> int:
        """The fewest distinct sampled ids a position has: 1 (sampled), 0 (hybrid: no draws without a tail)."""
        return 0 if self.mode == "hybrid" else 1

    @property
    def distinct_bits(self) -> int:
        if self.mode == "hybrid":
            return min(self.n, self.vocab_size - self.head).bit_length()
        return (min(self.n, self.vocab_size) - 1).bit_length()

    @classmethod
    def make(cls, mode: str, vocab_size: int, *, k: int = 64, n: int = 50, prob_bits: int | None = None,
             tail_bits: int | None = None, head: int = 1):
        if mode == "topk":
            if not 1 <= k <= vocab_size:
                raise ValueError(f"top-k: k={k} must be between 1 and the vocabulary size {vocab_size}")
            tail_bits = auto_tail_bits(k) if tail_bits is None else int(tail_bits)
            if tail_bits not in (8, 16):
                raise ValueError(f"tail_bits must be 8 or 16, got {tail_bits}")
            bits = (
                auto_prob_bits(k, id_bits_for(vocab_size), tail_bits) if prob_bits is None else int(prob_bits)
            )
            if k > 1 and not 2 <= bits <= 16:
                raise ValueError(f"prob_bits must be in [2, 16], got {bits}")
            return cls("topk", vocab_size, k=k, prob_bits=bits if k > 1 else 0, tail_bits=tail_bits)
        if mode == "sampled":
            if n < 1:
                raise ValueError(f"sampled: n={n} must be >= 1")
            return cls("sampled", vocab_size, n=n)
        if mode == "hybrid":
            if not 1 <= head < vocab_size:
                raise ValueError(f"hybrid: head={head} must be at least 1 and below the vocabulary size {vocab_size}")
            if n < 1:
                raise ValueError(f"hybrid: n={n} must be >= 1")
            return cls("hybrid", vocab_size, n=n, head=head)
        raise ValueError(f"unknown cache mode {mode!r} (expected topk, sampled or hybrid)")

    def to_json(self) -> dict:
        out: dict[str, Any] = {"mode": self.mode, "vocab_size": self.vocab_size, "id_bits": self.id_bits}
        if self.mode == "topk":
            out.update(
                k=self.k,
                prob_bits=self.prob_bits,
                prob_scheme="fourth-root-ratio-to-top1",
                tail_bits=self.tail_bits,
                tail_scheme=f"logit-clamp-{TAIL_LOGIT_RANGE:g}",
            )
        else:
            out.update(
                n=self.n,
                distinct_bits=self.distinct_bits,
                id_scheme="sorted-gaps-rice",
                count_scheme="count-minus-1-rice",
            )
            if self.mode == "hybrid":
                out.update(head=self.head, head_levels=HEAD_LEVELS, head_scheme="cumulative-stochastic-rounding",
                           draws="systematic-ceil-tail-times-n")
        return out

    @classmethod
    def from_json(cls, d: dict) -> CacheParams:
        if d.get("mode") not in ("topk", "sampled", "hybrid"):
            raise ValueError(f"unknown cache mode {d.get('mode')!r} (this distill reads topk, sampled and hybrid)")
        if d.get("mode") == "topk":
            return cls(
                "topk",
                int(d["vocab_size"]),
                k=int(d["k"]),
                prob_bits=int(d["prob_bits"]),
                tail_bits=int(d["tail_bits"]),
            )
        if d.get("mode") == "hybrid":
            return cls("hybrid", int(d["vocab_size"]), n=int(d["n"]), head=int(d["head"]))
        return cls("sampled", int(d["vocab_size"]), n=int(d["n"]))


# ---------------------------------------------------------------------------------------------- hashes


def example_hash(input_ids, labels) -> bytes:
    """8-byte BLAKE2b of an example's ``input_ids`` and ``labels`` (as int32)."""
    ids = np.asarray(input_ids, dtype=np.int32)
    lab = np.asarray(labels, dtype=np.int32)
    if ids.shape != lab.shape:
        raise ValueError(f"{ids.shape[0]} input_ids but {lab.shape[0]} labels")
    h = hashlib.blake2b(digest_size=8, person=b"distill-ex-v1")
    h.update(ids.tobytes())
    h.update(lab.tobytes())
    return h.digest()


def example_hashes(dataset) -> list[bytes]:
    """:func:`example_hash` of every example of a dataset (or a list of dicts), in order."""
    columns = None
    try:
        table = dataset.with_format("arrow")[:]
        ids_col, lab_col = table.column("input_ids"), table.column("labels")
        ids_flat = pc.list_flatten(ids_col).to_numpy().astype(np.int32, copy=False)
        lab_flat = pc.list_flatten(lab_col).to_numpy().astype(np.int32, copy=False)
        lengths = pc.list_value_length(ids_col).to_numpy()
        columns = ids_flat, lab_flat, lengths
    except (AttributeError, TypeError, KeyError):
        pass
    if columns is None:
        return [example_hash(ex["input_ids"], ex["labels"]) for ex in dataset]
    ids_flat, lab_flat, lengths = columns
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [
        example_hash(ids_flat[a:b], lab_flat[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)
    ]


def data_fingerprint(dataset=None, hashes: Sequence[bytes] | None = None) -> str:
    """sha256 over the number of examples and every example's hash: identifies the tokenized data."""
    if hashes is None:
        hashes = example_hashes(dataset)
    h = hashlib.sha256(b"distill-data-v1")
    h.update(len(hashes).to_bytes(8, "little"))
    for x in hashes:
        h.update(x)
    return h.hexdigest()


def stored_positions(labels) -> np.ndarray:
    """Positions ``t`` (0 <= t < len - 1) whose next token is supervised: the rows a cache stores."""
    lab = np.asarray(labels)
    return np.flatnonzero(lab[1:] != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------- shards


def shard_name(split: str, shard: int) -> str:
    return f"shard-{split}-{shard:06d}.bin"


def _align8(n: int) -> int:
    return (n + 7) & ~7


def encode_shard(
    params: CacheParams,
    split: str,
    shard: int,
    first_example: int,
    hashes: Sequence[bytes],
    lengths: Sequence[int],
    positions: Sequence[int],
    arrays: dict[str, np.ndarray],
) -> bytes:
    """One shard file's bytes (deterministic). ``arrays``: the targets of all its rows, in order.

    topk: ``ids`` (P, k), ``codes`` (P, k - 1), ``tail_codes`` (P,).
    sampled: ``distinct`` (P,), ``ids`` (E,) increasing within each position, ``counts`` (E,).
    hybrid: ``head_ids`` (P, h), ``head_codes`` (P, h), and the sampled arrays of the draws outside the head.
    """
    index = _shard_index(hashes, lengths, positions)
    total = int(index["positions"].sum())
    if params.mode == "topk":
        sections, entries, extra = _topk_sections(params, arrays, total)
    else:
        sections, entries, extra = _sampled_sections(params, arrays, index["positions"], total)
        if params.mode == "hybrid":
            head_ids = np.asarray(arrays["head_ids"]).reshape(total, params.head)
            head_codes = np.asarray(arrays["head_codes"]).reshape(total, params.head)
            draws = hybrid_draws(head_codes, params.n)
            if not np.array_equal(np.bincount(np.repeat(np.arange(total), arrays["distinct"]), arrays["counts"],
                                              minlength=total).astype(np.int64), draws):
                raise ValueError("hybrid shard: the counts of a position do not add up to its draws")
            sections = [("head_ids", pack_bits(head_ids.reshape(-1), params.id_bits)),
                        ("head_codes", pack_bits(head_codes.reshape(-1), 8)), *sections]
            entries += total * params.head
    sections = [("index", index.view(np.uint8)), *sections]
    layout, size = _section_layout(sections)
    header = {
        "split": split,
        "shard": shard,
        "examples": [first_example, first_example + len(hashes)],
        "positions": total,
        "entries": entries,
        "sections": layout,
        **extra,
    }
    return _shard_bytes(header, sections, layout, size)


def _shard_index(hashes: Sequence[bytes], lengths: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """The shard's index (:data:`INDEX_DTYPE`): each example's hash, length and stored positions."""
    num = len(hashes)
    index = np.zeros(num, INDEX_DTYPE)
    index["hash"] = np.frombuffer(b"".join(hashes), dtype="V8") if num else index["hash"]
    index["length"] = np.asarray(lengths, dtype=np.uint32)
    index["positions"] = np.asarray(positions, dtype=np.uint32)
    return index


def _topk_sections(params: CacheParams, arrays: dict[str, np.ndarray], total: int):
    """A top-k shard's sections (ids, probability codes, tail codes: bit-packed), its entries (P * k) and no
    extra header fields."""
    ids = np.asarray(arrays["ids"]).reshape(total, params.k)
    sections = [
        ("ids", pack_bits(ids.reshape(-1), params.id_bits)),
        ("codes", pack_bits(np.asarray(arrays["codes"]).reshape(-1), params.prob_bits)),
        ("tail", pack_bits(np.asarray(arrays["tail_codes"]).reshape(-1), params.tail_bits)),
    ]
    return sections, total * params.k, {}


def _sampled_sections(params: CacheParams, arrays: dict[str, np.ndarray], positions: np.ndarray, total: int):
    """A sampled shard's sections, its entries (distinct ids over all positions) and the header's ``rice``
    parameters: the distinct counts bit-packed; the id gaps and the counts (less the last of each position,
    which the others imply) Rice-coded, with each example's unary bit offsets; ``positions``: per example."""
    distinct = np.asarray(arrays["distinct"], dtype=np.int64)
    ids = np.asarray(arrays["ids"], dtype=np.int64)
    counts = np.asarray(arrays["counts"], dtype=np.int64)
    entries = int(distinct.sum())
    if len(distinct) != total or len(ids) != entries or len(counts) != entries:
        raise ValueError("sampled shard: distinct/ids/counts do not add up")
    if total and distinct.min() < params.min_distinct:
        raise ValueError("sampled shard: a position without draws")
    if entries and (ids.min() < 0 or ids.max() >= params.vocab_size):
        raise ValueError("sampled shard: ids outside the vocabulary")
    drawn = distinct > 0
    row_start = (np.cumsum(distinct) - distinct)[drawn]  # entry index of each position's first id
    gaps = ids - np.concatenate([[-1], ids[:-1]]) - 1  # ids increase within a row: gaps >= 0
    gaps[row_start] = ids[row_start]
    if entries and gaps.min() < 0:
        raise ValueError("sampled shard: ids must be distinct and increasing within each position")
    last = (np.cumsum(distinct) - 1)[drawn]  # the last count of each row is implied by the others
    keep = np.ones(entries, bool)
    keep[last] = False
    stored = counts[keep] - 1
    k_ids, k_counts = rice_parameter(gaps, params.id_bits), rice_parameter(stored, params.count_bits)
    id_unary, id_rem, id_bit = rice_encode(gaps, k_ids)
    count_unary, count_rem, count_bit = rice_encode(stored, k_counts)
    # Per example (and the end): the unary bit offset of its first id and of its first stored count.
    pos_off = np.concatenate([[0], np.cumsum(positions, dtype=np.int64)])
    entry_off = np.concatenate([[0], np.cumsum(distinct)]).astype(np.int64)[pos_off]
    drawn_off = np.concatenate([[0], np.cumsum(drawn)]).astype(np.int64)[pos_off]  # rows with an implied count
    offsets = np.stack([id_bit[entry_off], count_bit[entry_off - drawn_off]], 1).astype("<u8")
    sections = [
        ("distinct", pack_bits(distinct - params.min_distinct, params.distinct_bits)),
        ("offsets", offsets.reshape(-1).view(np.uint8)),
        ("id_unary", id_unary),
        ("id_rem", id_rem),
        ("count_unary", count_unary),
        ("count_rem", count_rem),
    ]
    return sections, entries, {"rice": {"ids": k_ids, "counts": k_counts}}


def _section_layout(sections: list[tuple[str, np.ndarray]]) -> tuple[dict[str, list[int]], int]:
    """Each section's ``[offset, nbytes]`` after the header (every section 8-byte aligned) and their span."""
    layout: dict[str, list[int]] = {}
    offset = 0
    for name, arr in sections:
        layout[name] = [offset, int(arr.nbytes)]
        offset = _align8(offset + arr.nbytes)
    return layout, offset


def _shard_bytes(header: dict, sections: list[tuple[str, np.ndarray]], layout: dict[str, list[int]],
                 size: int) -> bytes:
    """Magic, format version, header length, the header as JSON, the sections where ``layout`` puts them (after
    the 8-byte aligned prefix), then the sha256 of all that."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    prefix_len = _align8(16 + len(head))
    buf = bytearray(prefix_len + size)
    buf[0:8] = SHARD_MAGIC
    buf[8:12] = FORMAT_VERSION.to_bytes(4, "little")
    buf[12:16] = len(head).to_bytes(4, "little")
    buf[16 : 16 + len(head)] = head
    for name, arr in sections:
        start = prefix_len + layout[name][0]
        buf[start : start + arr.nbytes] = arr.tobytes()
    buf += hashlib.sha256(buf).digest()
    return bytes(buf)


write_file_atomic = atomic_write_bytes  # shards and manifests: complete or absent


def read_shard_header(data) -> tuple[dict, int]:
    """(header, offset of the first section) of a shard's bytes; raises ValueError if malformed."""
    if len(data) < 16 + _TRAILER or bytes(data[0:8]) != SHARD_MAGIC:
        raise ValueError("not a shard file (bad magic or too short)")
    version = int.from_bytes(data[8:12], "little")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"shard format version {version}, this distill reads versions {readable_versions()}")
    hlen = int.from_bytes(data[12:16], "little")
    if 16 + hlen > len(data) - _TRAILER:
        raise ValueError("header runs past the end of the file (truncated)")
    try:
        header = json.loads(bytes(data[16 : 16 + hlen]))
    except ValueError as exc:
        raise ValueError(f"unreadable header ({exc})") from None
    return header, _align8(16 + hlen)


def shard_file_info(path: Path) -> dict | None:
    """Size, sha256 and header of a complete, self-consistent shard file; None if it is not one."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) < 16 + _TRAILER:
        return None
    digest = hashlib.sha256(data[:-_TRAILER]).digest()
    if digest != data[-_TRAILER:]:
        return None
    try:
        header, _ = read_shard_header(data)
    except ValueError:
        return None
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "header": header}


# ---------------------------------------------------------------------------------------------- manifest


def canonical_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"
