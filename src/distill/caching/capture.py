"""Capture: a teacher's targets computed and written as cache shards (what ``distill cache`` runs).

From the teacher's logits (divided by the capture temperature), :func:`topk_targets` and
:func:`sampled_targets` and :func:`hybrid_targets` give the codes the shards store (:mod:`distill.caching.codec`); :class:`Capturer` turns a
shard's examples into those codes with the teacher's engine (:mod:`distill.engines`): from full logits, a chunk
of rows at a time, for a dense one (a model in this process), from its top-k log-probabilities for a sparse one
(a server); :func:`capture_split` writes one process's shards of a split (skipping complete ones) and
:func:`build_manifest` gathers every shard's entry for the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from distill.caching.codec import (
    HEAD_LEVELS,
    encode_shard,
    encode_tail,
    example_hash,
    hybrid_draws,
    shard_file_info,
    shard_name,
    stored_positions,
    write_file_atomic,
)
from distill.data import collate
from distill.losses import IGNORE_INDEX, logits_into

logger = logging.getLogger("distill")


# ---------------------------------------------------------------------------------------------- targets


def _work(work: torch.Tensor | None, rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """A contiguous (rows, width) fp32 scratch tensor, carved out of ``work`` when it is big enough."""
    if work is not None and work.numel() >= rows * width and work.dtype == torch.float32:
        return work.reshape(-1)[: rows * width].view(rows, width)
    return torch.empty(rows, width, dtype=torch.float32, device=like.device)


def topk_targets(
    logits: torch.Tensor, k: int, bits: int, work: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Top-k of ``softmax(logits)`` (already divided by T), as the codes the cache stores.

    logits: (M, V) fp32. Returns ``ids`` (M, k) long sorted by probability, ``codes`` (M, k - 1) int32
    ratio codes, ``tail`` (M,) fp64 tail mass (the exps outside the top-k over all of them, so small
    tails keep their digits). ``work``: optional fp32 scratch of at least M * V elements (reused, no allocation).
    """
    z = logits.float()
    m_rows, v = z.shape
    vals, ids = z.topk(k, dim=-1, sorted=True)
    m = vals[:, :1]
    e = _work(work, m_rows, v, z)
    torch.sub(z, m, out=e)
    e.exp_()
    total = e.sum(-1).double()  # cascade-summed fp32: ~1e-7 relative
    rest = e.scatter_(-1, ids, 0.0).sum(-1).double()  # the mass outside the top-k, without cancellation
    tail = rest / total
    out = {"ids": ids, "tail": tail}
    if k > 1:
        root4 = (vals[:, 1:] - m).mul_(0.25).exp_()  # r^(1/4) = exp((log r) / 4), in fp32
        top = (1 << bits) - 1
        out["codes"] = torch.round((1.0 - root4) * top).to(torch.int32)
    else:
        out["codes"] = torch.zeros(m_rows, 0, dtype=torch.int32)
    return out


def sample_block(vocab_size: int) -> int:
    """Block size of the two-level inverse CDF; one block (a plain fp64 CDF) up to 2048 ids."""
    return vocab_size if vocab_size <= 2048 else 256


def sampled_targets(
    logits: torch.Tensor, uniforms: torch.Tensor, work: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """N draws per row from ``softmax(logits)`` by inverse CDF, as distinct ids + counts.

    logits: (M, V); uniforms: (M, N) in [0, 1). Returns ``distinct`` (M,), ``ids`` (sum distinct,)
    increasing within a row, ``counts`` (sum distinct,), rows one after the other.

    Above 2048 ids, a two-level inverse CDF, accurate without an fp64 cumulative sum over V: the
    vocabulary is cut into blocks of 256; a draw picks its block on the fp64 cumulative block masses,
    then its id on the fp32 cumulative sum within the block. ``work``: optional fp32 scratch of
    M * ceil(V / block) * block elements.
    """
    e = _exps(logits, work)
    return _distinct_counts(_inverse_cdf(e, logits.shape[1], uniforms).sort(dim=-1).values)


def hybrid_targets(
    logits: torch.Tensor, head: int, n: int, uniforms: torch.Tensor, work: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The hybrid cache's targets of each row of ``softmax(logits)`` (codec: ``hybrid``).

    logits: (M, V); uniforms: (M, 2) in [0, 1): the first rounds the head's cumulative mass, the second places
    the systematic draws. Returns ``head_ids`` (M, h) by probability, ``head_codes`` (M, h) (increments of
    ``C_j = floor(255 S_j + u)``), and ``distinct``, ``ids``, ``counts`` of the ``ceil(t n)`` draws from the rest
    of the distribution (``t = 1 - C_h / 255``), as :func:`sampled_targets` gives them.
    """
    z = logits.float()
    m_rows, v = z.shape
    e = _exps(z, work)
    ev = e[:, :v]
    head_ids = z.topk(head, dim=-1, sorted=True).indices
    total = ev.sum(-1).double()  # cascade-summed fp32: ~1e-7 relative
    head_p = ev.gather(1, head_ids).double() / total.unsqueeze(1)
    ev.scatter_(1, head_ids, 0.0)
    tail = ev.sum(-1).double() / total  # the mass outside the head, without cancellation
    cum = head_p.cumsum(-1)
    cum[:, -1] = 1.0 - tail  # S_h: with no tail it is exactly 1, so C_h = 255 and no draws follow
    c = torch.floor(cum.clamp(0.0, 1.0) * HEAD_LEVELS + uniforms[:, :1].to(cum)).clamp_(0, HEAD_LEVELS)
    c = torch.cummax(c, dim=-1).values.long()  # rounding noise never makes a head probability negative
    codes = torch.diff(c, dim=-1, prepend=torch.zeros(m_rows, 1, dtype=torch.long, device=c.device))
    draws = torch.from_numpy(hybrid_draws(codes.cpu().numpy(), n)).to(z.device)
    width = int(draws.max()) if m_rows else 0
    j = torch.arange(max(width, 1), device=z.device, dtype=torch.float64)
    points = (uniforms[:, 1:2].to(torch.float64) + j) / draws.clamp_min(1).unsqueeze(1).double()
    valid = j < draws.unsqueeze(1)
    picked = _inverse_cdf(e, v, torch.where(valid, points, 0.0).clamp_max_(1.0 - 1e-12))
    picked = torch.where(valid, picked, v).sort(dim=-1).values  # a row's draws first, then the unused columns
    return {"head_ids": head_ids, "head_codes": codes, **_distinct_counts(picked, valid)}


def _exps(logits: torch.Tensor, work: torch.Tensor | None) -> torch.Tensor:
    """``exp(z - max z)`` of each row in an fp32 buffer padded with zeros to whole sampling blocks."""
    z = logits.float()
    m_rows, v = z.shape
    block = sample_block(v)
    nb = -(-v // block)
    e = _work(work, m_rows, nb * block, z)
    torch.sub(z, z.max(dim=-1, keepdim=True).values, out=e[:, :v])
    e[:, :v].exp_()
    e[:, v:] = 0.0
    return e


def _inverse_cdf(e: torch.Tensor, v: int, uniforms: torch.Tensor) -> torch.Tensor:
    """The id at each of the (M, N) ``uniforms`` on the cumulative distribution of the masses ``e``
    (unnormalized, (M, whole blocks), zeros past ``v``). Overwrites ``e``."""
    m_rows = e.shape[0]
    block = sample_block(v)
    nb = e.shape[1] // block
    if nb == 1:  # small vocabulary: one fp64 CDF
        cdf = e.double().cumsum_(-1)
        x = uniforms.to(torch.float64) * cdf[:, -1:]
        draws = torch.searchsorted(cdf, x, right=True).clamp_max_(v - 1)
    else:
        e3 = e.view(m_rows, nb, block).cumsum_(-1)  # within-block cumulative masses
        bcdf = e3[:, :, -1].double().cumsum(-1)  # (M, nb) cumulative block masses
        x = uniforms.to(torch.float64) * bcdf[:, -1:]
        blk = torch.searchsorted(bcdf, x, right=True).clamp_max_(nb - 1)
        before = torch.where(blk > 0, bcdf.gather(1, (blk - 1).clamp_min(0)), torch.zeros_like(x))
        seg = e3[torch.arange(m_rows, device=e.device).unsqueeze(1), blk]  # (M, N, block)
        # within the block: stay strictly below its total so a rounding never lands on a zero-mass id
        r = (x - before).clamp_min(0.0).to(torch.float32).unsqueeze(-1)
        last = seg[..., -1:]
        r = torch.minimum(r, last - last.abs() * 1e-6)
        j = torch.searchsorted(seg, r, right=True).squeeze(-1).clamp_max_(block - 1)
        draws = (blk * block + j).clamp_max_(v - 1)
    return draws


def _distinct_counts(draws: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sorted (M, N) draws -> ``distinct`` (M,), ``ids`` and ``counts`` (rows one after the other). ``valid``:
    which columns are draws, a prefix of each row (default: all)."""
    m_rows, n = draws.shape
    if valid is None:
        valid = torch.ones_like(draws, dtype=torch.bool)
    start = valid.clone()
    start[:, 1:] &= draws[:, 1:] != draws[:, :-1]
    flat_start = start.reshape(-1).nonzero().squeeze(1)
    flat_end = torch.cat([flat_start[1:], flat_start.new_tensor([m_rows * n])])
    row_end = (torch.arange(m_rows, device=draws.device) * n + valid.sum(-1))  # one past each row's valid draws
    counts = torch.minimum(flat_end, row_end[flat_start // n]) - flat_start
    return {"distinct": start.sum(-1), "ids": draws.reshape(-1)[flat_start], "counts": counts}


def example_uniforms(seed: int, split: str, example: int, rows: int, n: int) -> torch.Tensor:
    """The (rows, n) uniforms that drive the draws of one example: a pure function of its identity."""
    digest = hashlib.blake2b(f"{seed}:{split}:{example}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.rand(rows, n, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- capture


class Capturer:
    """The teacher's engine + encoding parameters: turns a list of examples into one shard's arrays.

    A dense engine (full logits): the teacher's final hidden states are computed per batch
    (``logits_to_keep=1``: no full logits), then the logits of the stored rows, a chunk of rows at a time into
    reused buffers (``logits_memory_mb`` bounds them), and the targets from each chunk (:func:`topk_targets` /
    :func:`sampled_targets` / :func:`hybrid_targets`). The targets of a chunk are computed on a helper thread while the main thread
    runs the next chunk's matmul (two sets of buffers), so on a machine with a spare core (or a GPU, where the
    helper thread also takes the device-to-host copies off the main thread) capture runs at nearly the speed
    of the bare forward.

    A sparse engine (a server's top-k log-probabilities at the capture temperature): top-k mode only, the same
    arrays; the k most probable ids at each stored position (the realized token the server adds beyond them is
    left out), and the tail is ``1 - sum(top-k)``.
    """

    def __init__(
        self,
        engine,
        params,
        *,
        temperature: float,
        seed: int,
        batch_size: int,
        pad_id: int,
        device,
        logits_memory_mb: int = 256,
    ):
        assert engine.dense or (params.mode == "topk" and params.k <= engine.max_top_k), "no full logits for this"
        self.engine, self.params = engine, params
        self.head = engine.head if engine.dense else None
        self.temperature, self.seed, self.batch_size = temperature, seed, batch_size
        self.pad_id, self.device = pad_id, device
        v = params.vocab_size
        if params.mode in ("sampled", "hybrid"):
            block = sample_block(v)
            self.work_width = -(-v // block) * block
            per_row = 4 * v + 4 * self.work_width + 4 * params.n * block + 64 * params.n
        else:
            self.work_width = v
            per_row = 8 * v + 32 * params.k
        self.chunk_rows = max(1, logits_memory_mb * 2**20 // (2 * per_row))  # two sets of buffers
        self._zbuf: list = [None, None]
        self._work: list = [None, None]

    def logits(self, rows, slot: int = 0):
        """Teacher logits / T of ``rows`` (C, H), C <= chunk_rows: a view of a reused fp32 buffer."""
        w, b = self.head.sliced()
        c = rows.shape[0]
        buf = self._zbuf[slot]
        if buf is None or buf.shape[0] < c:
            buf = self._zbuf[slot] = torch.empty(
                min(self.chunk_rows, max(c, 1)), w.shape[0], dtype=w.dtype, device=rows.device
            )
        out = buf[:c]
        logits_into(out, rows, w, b)
        z = self.head.postprocess(out).float()
        if self.temperature != 1.0:
            z.div_(self.temperature)  # the buffer, or a fresh tensor from postprocess / float
        return z

    def _scratch(self, c: int, slot: int, device):
        work = self._work[slot]
        if work is None or work.shape[0] < c:
            work = self._work[slot] = torch.empty(
                min(self.chunk_rows, max(c, 1)), self.work_width, dtype=torch.float32, device=device
            )
        return work

    def _targets(self, z, slot: int, uniforms) -> dict:
        """One chunk's targets, moved to the CPU (runs on the helper thread)."""
        p = self.params
        with torch.no_grad():
            work = self._scratch(z.shape[0], slot, z.device)
            if p.mode == "topk":
                out = topk_targets(z, p.k, p.prob_bits, work=work)
                out["tail_codes"] = torch.from_numpy(encode_tail(out.pop("tail").cpu(), p.tail_bits))
            elif p.mode == "hybrid":
                out = hybrid_targets(z, p.head, p.n, uniforms, work=work)
            else:
                out = sampled_targets(z, uniforms, work=work)
            return {key: val.cpu() for key, val in out.items()}

    def batches(self, examples: list[dict]):
        """(offset, collated batch, stored-row mask) per batch of ``batch_size`` examples."""
        for b0 in range(0, len(examples), self.batch_size):
            batch = {
                k: v.to(self.device)
                for k, v in collate(examples[b0 : b0 + self.batch_size], self.pad_id).items()
            }
            sel = torch.zeros_like(batch["labels"], dtype=torch.bool)
            sel[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
            yield b0, batch, sel

    def forward_only(self, examples: list[dict]) -> int:
        """The bare teacher forward over the same rows and chunks (final hidden states + logits), for
        comparison with :meth:`capture`. Returns the number of input tokens."""
        tokens = 0
        with torch.no_grad():
            for _, batch, sel in self.batches(examples):
                rows = self.engine.hidden(batch)[sel]
                for r0 in range(0, rows.shape[0], self.chunk_rows):
                    self.logits(rows[r0 : r0 + self.chunk_rows])
                tokens += int(batch["attention_mask"].sum())
        if torch.cuda.is_available() and str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        return tokens

    def capture(self, examples: list[dict], first_index: int, split: str, on_batch=None) -> dict:
        """Targets of ``examples`` (dataset indices ``first_index, ...``): the arrays of :func:`encode_shard`."""
        if not self.engine.dense:
            return self._capture_top_logprobs(examples, on_batch)
        p = self.params
        parts: dict[str, list] = {}
        positions = [len(stored_positions(ex["labels"])) for ex in examples]
        pending: deque = deque()

        def collect() -> None:
            for key, val in pending.popleft().result().items():
                parts.setdefault(key, []).append(val)

        chunk_no = 0
        with torch.no_grad(), ThreadPoolExecutor(max_workers=1) as helper:
            for b0, batch, sel in self.batches(examples):
                rows = self.engine.hidden(batch)[sel]
                uniforms = None
                if p.mode != "topk":  # sampled: one uniform per draw; hybrid: two per position
                    uniforms = torch.cat(
                        [
                            example_uniforms(self.seed, split, first_index + b0 + j, positions[b0 + j],
                                             p.n if p.mode == "sampled" else 2)
                            for j in range(sel.shape[0])
                        ]
                    ).to(self.device)
                for r0 in range(0, rows.shape[0], self.chunk_rows):
                    slot = chunk_no % 2
                    if len(pending) == 2:
                        collect()  # the chunk that used this slot is done: its buffers are free
                    z = self.logits(rows[r0 : r0 + self.chunk_rows], slot)
                    u = None if uniforms is None else uniforms[r0 : r0 + self.chunk_rows]
                    pending.append(helper.submit(self._targets, z, slot, u))
                    chunk_no += 1
                if on_batch is not None:
                    on_batch(int(batch["attention_mask"].sum()))
            while pending:
                collect()
        arrays = {key: torch.cat(vals).numpy() for key, vals in parts.items()}
        if not parts:  # no stored position at all (cannot happen with build_datasets, but stay valid)
            if p.mode == "topk":
                arrays = {
                    "ids": np.zeros((0, p.k), np.int64),
                    "codes": np.zeros((0, max(p.k - 1, 0)), np.int32),
                    "tail_codes": np.zeros(0, np.int64),
                }
            else:
                arrays = {
                    "distinct": np.zeros(0, np.int64),
                    "ids": np.zeros(0, np.int64),
                    "counts": np.zeros(0, np.int64),
                }
                if p.mode == "hybrid":
                    arrays.update(head_ids=np.zeros((0, p.head), np.int64), head_codes=np.zeros((0, p.head), np.int64))
        return {"arrays": arrays, "positions": positions}

    def _capture_top_logprobs(self, examples: list[dict], on_batch=None) -> dict:
        """A sparse engine's top-k targets (class docstring)."""
        p = self.params
        top = (1 << p.prob_bits) - 1 if p.k > 1 else 0
        ids_rows, code_rows, tails, positions = [], [], [], []
        for b0 in range(0, len(examples), self.batch_size):
            batch = examples[b0 : b0 + self.batch_size]
            seqs = [list(map(int, ex["input_ids"])) for ex in batch]
            scored = self.engine.top_logprobs(seqs, p.k, self.temperature)
            for ex, entries in zip(batch, scored, strict=True):
                where = stored_positions(ex["labels"])
                positions.append(len(where))
                for t in where:  # position t predicts token t + 1: the server's entry t + 1
                    tid, lp = entries[t + 1]
                    order = sorted(range(len(tid)), key=lambda i: -lp[i])[: p.k]
                    if len(order) < p.k:
                        raise ValueError(f"the server returned {len(order)} log-probs where {p.k} were asked for")
                    lps = torch.tensor([lp[i] for i in order], dtype=torch.float64)
                    ids_rows.append([tid[i] for i in order])
                    code_rows.append(torch.round((1.0 - torch.exp((lps[1:] - lps[0]) * 0.25)) * top).int().tolist())
                    tails.append(float((1.0 - lps.exp().sum()).clamp_min(0.0)))
            if on_batch is not None:
                on_batch(sum(len(s) for s in seqs))
        return {
            "arrays": {
                "ids": np.asarray(ids_rows, dtype=np.int64).reshape(-1, p.k),
                "codes": np.asarray(code_rows, dtype=np.int32).reshape(-1, max(p.k - 1, 0)),
                "tail_codes": encode_tail(np.asarray(tails, dtype=np.float64), p.tail_bits),
            },
            "positions": positions,
        }


def _lengths(dataset) -> list[int]:
    try:
        return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy().tolist()
    except (AttributeError, TypeError, KeyError):
        return [len(ex["input_ids"]) for ex in dataset]


def _examples(dataset, a: int, b: int) -> list[dict]:
    if isinstance(dataset, list):
        return dataset[a:b]
    cols = dataset[a:b]
    return [{"input_ids": i, "labels": lab} for i, lab in zip(cols["input_ids"], cols["labels"], strict=True)]


def capture_split(
    capturer: Capturer,
    dataset,
    split: str,
    out_dir: Path,
    *,
    shard_examples: int,
    hashes: list[bytes] | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    on_shard: Callable[[dict], object] | None = None,
) -> dict:
    """Write this process's shards of one split (shards ``s % world == rank``), skipping complete ones;
    ``on_shard`` is told of each shard once it is on disk (split, shard, examples, path).

    Returns counts: ``written`` and ``skipped`` shards, ``tokens`` forwarded, ``seconds``.
    """
    n = len(dataset)
    num_shards = -(-n // shard_examples)
    lengths = _lengths(dataset)
    todo, skipped = [], 0
    for s in range(rank, num_shards, world):
        a, b = s * shard_examples, min((s + 1) * shard_examples, n)
        path = out_dir / shard_name(split, s)
        if path.exists():
            info = shard_file_info(path)
            if (
                info is not None
                and info["header"].get("examples") == [a, b]
                and info["header"].get("split") == split
            ):
                skipped += 1
                continue
            logger.warning("%s is damaged or from another run; rewriting it", path)
        todo.append((s, a, b))
    total = sum(sum(lengths[a:b]) for _, a, b in todo)
    bar = tqdm(
        total=total,
        desc=f"cache {split}",
        unit="tok",
        unit_scale=True,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    t0 = time.perf_counter()
    pending = None

    def write(s: int, a: int, b: int, shard_hashes, shard_lengths, out) -> dict:
        blob = encode_shard(
            capturer.params, split, s, a, shard_hashes, shard_lengths, out["positions"], out["arrays"]
        )
        write_file_atomic(out_dir / shard_name(split, s), blob)
        return {"split": split, "shard": s, "examples": [a, b], "path": str(out_dir / shard_name(split, s))}

    def finish(job) -> None:
        written = job.result()
        if on_shard is not None:
            on_shard(written)

    with ThreadPoolExecutor(max_workers=1) as pool:
        for s, a, b in todo:
            examples = _examples(dataset, a, b)
            shard_hashes = (
                hashes[a:b]
                if hashes is not None
                else [example_hash(ex["input_ids"], ex["labels"]) for ex in examples]
            )
            out = capturer.capture(examples, a, split, on_batch=bar.update)
            if pending is not None:
                finish(pending)  # at most one shard being encoded/written while the next is captured
            pending = pool.submit(write, s, a, b, shard_hashes, lengths[a:b], out)
            bar.set_postfix(shards=f"{s + 1}/{num_shards}")
        if pending is not None:
            finish(pending)
    bar.close()
    seconds = time.perf_counter() - t0
    return {"written": len(todo), "skipped": skipped, "tokens": total, "seconds": seconds}


def build_manifest(out_dir: Path, identity: dict) -> dict:
    """The manifest: the identity plus, per split, every shard's example range, size and sha256."""
    manifest = json.loads(json.dumps(identity))
    for split, info in manifest["splits"].items():
        shards, nbytes, positions = [], 0, 0
        n, e = info["num_examples"], info["shard_examples"]
        for s in range(info["num_shards"]):
            name = shard_name(split, s)
            got = shard_file_info(out_dir / name)
            want = [s * e, min((s + 1) * e, n)]
            if got is None or got["header"]["examples"] != want:
                raise RuntimeError(
                    f"{out_dir / name} is missing or damaged after capture; run the same command again"
                )
            shards.append(
                {
                    "file": name,
                    "examples": want,
                    "positions": got["header"]["positions"],
                    "entries": got["header"]["entries"],
                    "bytes": got["bytes"],
                    "sha256": got["sha256"],
                }
            )
            nbytes += got["bytes"]
            positions += got["header"]["positions"]
        info.update(
            shards=shards,
            bytes=nbytes,
            positions=positions,
            bytes_per_token=round(nbytes / max(positions, 1), 4),
        )
    return manifest
