"""Reading a teacher cache (:class:`TeacherCache`): the manifest checked (present, a supported version, the
run's tokenizer, vocabulary, sequence length and data), shards opened and verified against their sha256 on first
use, and each example's stored rows put back in place as a :class:`~distill.losses.SparseTarget` after its
tokens are checked against the hash the cache stored for it. The format: :mod:`distill.caching.codec`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from distill.caching.codec import (
    FORMAT_NAME,
    HEAD_LEVELS,
    INDEX_DTYPE,
    MANIFEST,
    PLAN,
    READABLE_VERSIONS,
    CacheParams,
    decode_tail,
    example_hash,
    hybrid_draws,
    ratio_levels,
    read_shard_header,
    readable_versions,
    rice_decode,
    stored_positions,
    unpack_bits,
)
from distill.losses import SparseTarget


class CacheError(ValueError):
    """A teacher cache that cannot be used; the message says why and what to do."""


class IncompleteCacheError(CacheError):
    pass


class CacheMismatchError(CacheError):
    pass


class CorruptShardError(CacheError):
    pass


def identity_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two identity dicts (for 'built with other settings')."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += identity_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {_short(va)} (cache) vs {_short(vb)} (now)")
    return out


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 60 else s[:57] + "..."


class _Shard:
    """One opened shard: its bytes (mmap), parsed index and per-example offsets."""

    def __init__(self, path: Path, entry: dict, params: CacheParams, cache_path: Path, split: str):
        self.name = entry["file"]
        self.first, self.stop = entry["examples"]
        self.path = path
        where = f"teacher cache {cache_path}: shard {self.name} (split {split}, examples {self.first}-{self.stop - 1})"
        self.where = where
        self.problem: str | None = None
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            self.problem = "is missing"
            return
        if size != entry["bytes"]:
            self.problem = f"is truncated or was changed: {size} bytes, the manifest says {entry['bytes']}"
            return
        with open(path, "rb") as fh:
            self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        digest = hashlib.sha256(self.mm).hexdigest()
        if digest != entry["sha256"]:
            self.problem = (
                "is corrupt: its sha256 does not match the manifest (bit flip or partial overwrite)"
            )
            return
        try:
            header, base = read_shard_header(self.mm)
        except ValueError as exc:
            self.problem = f"is malformed: {exc}"
            return
        self.header, self.base = header, base
        self.params = params
        off, nb = header["sections"]["index"]
        self.index = np.frombuffer(
            self.mm, INDEX_DTYPE, count=nb // INDEX_DTYPE.itemsize, offset=base + off
        )
        self.pos_off = np.concatenate([[0], np.cumsum(self.index["positions"], dtype=np.int64)])
        if params.mode in ("sampled", "hybrid"):
            d = unpack_bits(self.section("distinct"), params.distinct_bits, 0, int(self.pos_off[-1])) + params.min_distinct
            self.distinct = d
            self.row_entry_off = np.concatenate([[0], np.cumsum(d)])
            self.drawn_off = np.concatenate([[0], np.cumsum(d > 0)])  # rows before: each implies its last count
            self.bit_off = np.frombuffer(self.section("offsets"), "<u8").reshape(-1, 2).astype(np.int64)
            self.rice = header["rice"]

    def section(self, name: str) -> memoryview:
        off, nb = self.header["sections"][name]
        start = self.base + off
        return memoryview(self.mm)[start : start + nb]

    def rows(self, local: int) -> dict[str, np.ndarray]:
        """The decoded rows of the shard's ``local``-th example."""
        p = self.params
        p0, p1 = int(self.pos_off[local]), int(self.pos_off[local + 1])
        rows = p1 - p0
        if p.mode == "topk":
            ids = unpack_bits(self.section("ids"), p.id_bits, p0 * p.k, rows * p.k).reshape(rows, p.k)
            codes = unpack_bits(self.section("codes"), p.prob_bits, p0 * (p.k - 1), rows * (p.k - 1))
            tail_codes = unpack_bits(self.section("tail"), p.tail_bits, p0, rows)
            return {"ids": ids, "codes": codes.reshape(rows, p.k - 1), "tail_codes": tail_codes}
        head = {}
        if p.mode == "hybrid":
            h = p.head
            head = {"head_ids": unpack_bits(self.section("head_ids"), p.id_bits, p0 * h, rows * h).reshape(rows, h),
                    "head_codes": unpack_bits(self.section("head_codes"), 8, p0 * h, rows * h).reshape(rows, h)}
        e0, e1 = int(self.row_entry_off[p0]), int(self.row_entry_off[p1])
        distinct = self.distinct[p0:p1]
        (i0, c0), (i1, c1) = self.bit_off[local], self.bit_off[local + 1]
        try:
            g = rice_decode(self.section("id_unary"), self.section("id_rem"), self.rice["ids"], e0, e1 - e0, i0, i1)
            d0, d1 = int(self.drawn_off[p0]), int(self.drawn_off[p1])
            stored = rice_decode(self.section("count_unary"), self.section("count_rem"), self.rice["counts"],
                                 e0 - d0, (e1 - e0) - (d1 - d0), c0, c1) + 1
        except ValueError as exc:
            raise CorruptShardError(f"{self.where}: example {self.first + local} {exc}") from None
        # ids from gaps: within each row, id_j = sum_{i <= j} (gap_i + 1) - 1.
        g += 1
        cs = np.cumsum(g)
        starts = self.row_entry_off[p0:p1] - e0
        ids = cs - np.repeat(cs[starts] - g[starts], distinct) - 1
        counts = np.empty(e1 - e0, np.int64)
        drawn = distinct > 0
        last = (np.cumsum(distinct) - 1)[drawn]
        keep = np.ones(e1 - e0, bool)
        keep[last] = False
        counts[keep] = stored
        row_of = np.repeat(np.arange(rows), distinct)
        sums = np.bincount(row_of[keep], weights=stored, minlength=rows).astype(np.int64)
        if head:
            head["draws"] = hybrid_draws(head["head_codes"], p.n)  # implied by the codes; _assemble weighs by it
        draws = head["draws"] if head else np.full(rows, p.n, np.int64)
        counts[last] = (draws - sums)[drawn]
        return {**head, "distinct": distinct, "ids": ids, "counts": counts}


class TeacherCache:
    """Read a teacher cache written by ``distill cache``.

    ``TeacherCache(path, split="train", topk_tail=True)`` validates the manifest (present, a supported
    version); shards are opened and verified against their sha256 on first use. ``target(i, input_ids,
    labels)`` gives example ``i``'s :class:`~distill.losses.SparseTarget` of shape (len - 1, K), aligned with
    ``labels[1:]``, after checking that the example is the one the cache was built from.

    topk_tail: top-k caches only: keep the tail mass (``tail`` = stored tail, the loss runs over k + 1
    classes) or renormalize the top-k (``tail=None``). Sampled caches always give ``probs = counts / N``
    and ``tail = 0``; hybrid caches the head's decoded probabilities, then ``t * count / M``, and ``tail = 0``.
    """

    def __init__(
        self, path: str | Path, split: str = "train", *, topk_tail: bool = True, max_open_shards: int = 64
    ):
        self.path = Path(path).expanduser()
        self.split_name = split
        self.topk_tail = topk_tail
        self.max_open_shards = max_open_shards
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise CacheError(f"teacher cache {self.path} does not exist (run `distill cache` to build it)")
        if not manifest_path.is_file():
            what = (
                "a capture was started here but did not finish"
                if (self.path / PLAN).is_file()
                else "no manifest.json"
            )
            raise IncompleteCacheError(
                f"incomplete cache at {self.path} ({what}): run the same `distill cache` command to resume; "
                "it continues from the last complete shard"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise CacheError(f"teacher cache {self.path}: manifest.json is not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise CacheError(
                f"{self.path} is not a distill teacher cache (manifest format {manifest.get('format')!r})"
            )
        version = manifest.get("version")
        if version not in READABLE_VERSIONS:
            raise CacheError(
                f"teacher cache {self.path}: unsupported format version {version!r}; this distill reads versions "
                f"{readable_versions()}. Rebuild the cache with this distill (`distill cache`) or use a matching "
                "distill"
            )
        self.manifest = manifest
        try:
            self.params = CacheParams.from_json(manifest["params"])
        except (KeyError, ValueError) as exc:
            raise CacheError(f"teacher cache {self.path}: manifest.json params: {exc}") from None
        splits = manifest["splits"]
        if split not in splits:
            raise CacheError(f"teacher cache {self.path} has no {split!r} split (it has {', '.join(splits)})")
        self.split = splits[split]
        self.shard_examples = int(self.split["shard_examples"])
        self.num_examples = int(self.split["num_examples"])
        self._shards: OrderedDict[int, _Shard] = OrderedDict()

    # ---- identity

    @property
    def mode(self) -> str:
        return self.params.mode

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return self.params.vocab_size

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def data_fingerprint(self) -> str:
        return self.split["data_fingerprint"]

    def __len__(self) -> int:
        return self.num_examples

    def check_compatible(
        self,
        tokenizer_fingerprint: str | None = None,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        data_fingerprint: str | None = None,
        num_examples: int | None = None,
    ) -> None:
        """Refuse a cache built with another tokenizer, vocabulary, seq_len or data (clear messages)."""
        m, where = self.manifest, f"the teacher cache {self.path}"
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != m["tokenizer_fingerprint"]:
            raise CacheMismatchError(
                f"{where} was built with another tokenizer (fingerprint {m['tokenizer_fingerprint'][:12]}..., "
                f"this run's is {tokenizer_fingerprint[:12]}...); use the teacher's tokenizer for the student or "
                "rebuild the cache with `distill cache`"
            )
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise CacheMismatchError(
                f"{where} holds ids over a vocabulary of {self.vocab_size} tokens, but the tokenizer here has "
                f"{vocab_size}; rebuild the cache with this tokenizer"
            )
        if seq_len is not None and seq_len != self.seq_len:
            raise CacheMismatchError(
                f"{where} was built with data.seq_len={self.seq_len}, this config has data.seq_len={seq_len}; "
                "use the same data settings or rebuild the cache"
            )
        if num_examples is not None and num_examples != self.num_examples:
            raise CacheMismatchError(
                f"{where} was built from other data: it holds {self.num_examples} {self.split_name} examples, "
                f"the data here has {num_examples}; use the same data config or rebuild the cache"
            )
        if data_fingerprint is not None and data_fingerprint != self.data_fingerprint:
            raise CacheMismatchError(
                f"{where} was built from other data (data fingerprint {self.data_fingerprint[:12]}... vs "
                f"{data_fingerprint[:12]}... here: other data, tokenizer or seq_len); use the same data config "
                "or rebuild the cache with `distill cache`"
            )

    # ---- shards

    def _shard(self, shard: int, example: int) -> _Shard:
        got = self._shards.get(shard)
        if got is not None:
            self._shards.move_to_end(shard)
            return got
        entries = self.split["shards"]
        if not 0 <= shard < len(entries):
            raise IndexError(
                f"example {example} is out of range: the cache holds {self.num_examples} examples"
            )
        entry = entries[shard]
        opened = _Shard(self.path / entry["file"], entry, self.params, self.path, self.split_name)
        if opened.problem is not None:
            raise CorruptShardError(
                f"{opened.where} {opened.problem}, so example {example} cannot be read; nothing is trained on it. "
                f"Delete {entry['file']} and manifest.json and run the same `distill cache` command to rewrite it"
            )
        self._shards[shard] = opened
        while len(self._shards) > self.max_open_shards:
            self._shards.popitem(last=False)
        return opened

    def verify(self) -> None:
        """Open (and checksum) every shard now rather than on first use."""
        for s, entry in enumerate(self.split["shards"]):
            self._shard(s, entry["examples"][0])

    def raw(self, index: int) -> tuple[dict[str, np.ndarray], np.void]:
        """The decoded rows of example ``index`` and its index record (hash, length, positions)."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"example {index} is out of range: the cache holds {self.num_examples} examples")
        shard = self._shard(index // self.shard_examples, index)
        local = index - shard.first
        return shard.rows(local), shard.index[local]

    # ---- targets

    def target(self, index: int, input_ids, labels) -> SparseTarget:
        """Example ``index``'s target (len - 1, K) aligned with ``labels[1:]``; unstored rows have probs 0."""
        rows, where, t = self._checked_rows(index, input_ids, labels)
        return self._assemble(rows, where, t)

    def _checked_rows(self, index: int, input_ids, labels) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
        """Example ``index``'s decoded rows, the positions they go to and its length - 1, after checking that the
        example is the one the cache was built from."""
        ids_np = np.asarray(
            input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64
        )
        lab_np = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        rows, rec = self.raw(index)
        if example_hash(ids_np, lab_np) != bytes(rec["hash"]):
            extra = ""
            if int(rec["length"]) != len(ids_np):
                extra = f" (the cache has {int(rec['length'])} tokens for it, the data {len(ids_np)}: another data.seq_len?)"
            raise CacheMismatchError(
                f"example {index}: its tokens do not match the teacher cache {self.path}{extra}. The cache was "
                "built from other data, another tokenizer or another sequence length; rebuild it with "
                "`distill cache` on this data"
            )
        return rows, stored_positions(lab_np), max(len(ids_np) - 1, 0)

    def _assemble(self, rows: dict[str, np.ndarray], where: np.ndarray, t: int) -> SparseTarget:
        p = self.params
        n_rows = len(where)
        if p.mode == "topk":
            ratios = np.empty((n_rows, p.k), np.float64)
            ratios[:, 0] = 1.0
            if p.k > 1:
                ratios[:, 1:] = ratio_levels(p.prob_bits)[rows["codes"]]
            ratios /= ratios.sum(1, keepdims=True)
            tail = decode_tail(rows["tail_codes"], p.tail_bits)
            if self.topk_tail:
                ratios *= (1.0 - tail)[:, None]
            ids_full = torch.zeros(t, p.k, dtype=torch.long)
            probs_full = torch.zeros(t, p.k, dtype=torch.float32)
            idx = torch.from_numpy(where)
            ids_full[idx] = torch.from_numpy(rows["ids"])
            probs_full[idx] = torch.from_numpy(ratios).float()
            tail_full = None
            if self.topk_tail:
                tail_full = torch.zeros(t, dtype=torch.float32)
                tail_full[idx] = torch.from_numpy(tail).float()
            return SparseTarget(ids_full, probs_full, tail_full)
        distinct = rows["distinct"]
        h = p.head if p.mode == "hybrid" else 0
        width = h + (int(distinct.max()) if n_rows else 0)
        row_of = np.repeat(np.arange(n_rows), distinct)
        starts = np.concatenate([[0], np.cumsum(distinct)[:-1]]) if n_rows else np.zeros(0, np.int64)
        col = h + np.arange(len(row_of)) - np.repeat(starts, distinct)
        ids_full = torch.zeros(t, max(width, 1), dtype=torch.long)
        probs_full = torch.zeros(t, max(width, 1), dtype=torch.float32)
        r = torch.from_numpy(where[row_of])
        c = torch.from_numpy(col)
        ids_full[r, c] = torch.from_numpy(rows["ids"])
        if h:  # head: codes / 255; draws: (1 - sum(codes) / 255) * count / M (codec: hybrid)
            codes = rows["head_codes"]
            draws = rows["draws"]
            rest = (HEAD_LEVELS - codes.sum(-1)) / HEAD_LEVELS
            weight = np.where(draws > 0, rest / np.maximum(draws, 1), 0.0)
            idx = torch.from_numpy(where)
            ids_full[idx, :h] = torch.from_numpy(rows["head_ids"])
            probs_full[idx, :h] = torch.from_numpy(codes / HEAD_LEVELS).float()
            probs_full[r, c] = torch.from_numpy(rows["counts"] * weight[row_of]).float()
        else:
            probs_full[r, c] = torch.from_numpy(rows["counts"] / p.n).float()
        return SparseTarget(ids_full, probs_full, torch.zeros(t, dtype=torch.float32))

    def batch_target(
        self, indices: Sequence[int], examples: Sequence[dict], width: int | None = None
    ) -> SparseTarget:
        """Targets of a collated batch: (B, width - 1, K), aligned with ``batch["labels"][:, 1:]``; equal to
        :func:`collate_targets` of the examples' :meth:`target`, assembled in one pass over the whole batch's rows.

        indices: the dataset index of each example; examples: dicts with ``input_ids`` and ``labels``;
        width: the collated sequence length (default: the longest example; at least that).
        """
        parts = [self._checked_rows(i, ex["input_ids"], ex["labels"]) for i, ex in zip(indices, examples, strict=True)]
        if not parts:
            raise ValueError("batch_target got no examples")
        longest = max(t for _, _, t in parts)
        t = longest if width is None else max(width - 1, 0)
        if t < longest:
            raise ValueError(f"width {width} is shorter than the longest example ({longest + 1} tokens)")
        # Every example's rows one after another, placed at b * t + position of the flattened (B * t) target.
        rows = {key: np.concatenate([r[key] for r, _, _ in parts]) for key in parts[0][0]}
        where = np.concatenate([b * t + w for b, (_, w, _) in enumerate(parts)])
        flat = self._assemble(rows, where, len(parts) * t)
        b, k = len(parts), flat.ids.shape[-1]
        return SparseTarget(flat.ids.view(b, t, k), flat.probs.view(b, t, k),
                            None if flat.tail is None else flat.tail.view(b, t))

    def iter_targets(self, dataset: Iterable[dict], start: int = 0) -> Iterator[tuple[int, SparseTarget]]:
        """Stream ``(index, target)`` for the examples of ``dataset`` from ``start`` on, shard by shard."""
        for i, ex in enumerate(dataset):
            if i < start:
                continue
            yield i, self.target(i, ex["input_ids"], ex["labels"])

    def stats(self) -> dict:
        """Size of the split: bytes, stored positions, bytes per position."""
        shards = self.split["shards"]
        nbytes = sum(s["bytes"] for s in shards)
        positions = sum(s["positions"] for s in shards)
        return {"bytes": nbytes, "positions": positions, "bytes_per_token": nbytes / max(positions, 1)}


def collate_targets(targets: Sequence[SparseTarget], length: int | None = None) -> SparseTarget:
    """Stack per-example targets (T_i, K_i) into (B, T, K): padded rows and entries have probs 0.

    ``length``: T (default: the longest). Tails are stacked when every target has one, else None.
    """
    if not targets:
        raise ValueError("collate_targets got no targets")
    t = max(x.ids.shape[0] for x in targets) if length is None else length
    k = max(max(x.ids.shape[-1] for x in targets), 1)
    b = len(targets)
    ids = torch.zeros(b, t, k, dtype=torch.long)
    probs = torch.zeros(b, t, k, dtype=targets[0].probs.dtype)
    with_tail = all(x.tail is not None for x in targets)
    tail = torch.zeros(b, t, dtype=targets[0].probs.dtype) if with_tail else None
    for i, x in enumerate(targets):
        ti, ki = min(x.ids.shape[0], t), x.ids.shape[-1]
        ids[i, :ti, :ki] = x.ids[:ti]
        probs[i, :ti, :ki] = x.probs[:ti]
        if tail is not None:
            tail[i, :ti] = x.tail[:ti]
    return SparseTarget(ids, probs, tail)
