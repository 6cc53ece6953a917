"""Capture a teacher's per-token targets into an offline cache (``distill cache``).

    distill cache configs/tiny/cache.yaml out_dir=runs/cache          # tiny CPU run, seconds
    distill cache my.yaml mode=sampled n=50 temperature=1.0           # RS-KD targets
    accelerate launch --num_processes 2 -m distill cache my.yaml      # each process writes its own shards

The data section is the one ``distill train`` uses, and the cache covers ``build_datasets``' train split
and, when the data has one, its eval split (``splits`` chooses), example by example in dataset order;
training from the cache reports KL to the teacher and agreement on the cached eval split. The format is
described in :mod:`distill.cache`; train from it with ``teacher: {cache: OUT}``.

Resume: running the same command again continues from the last complete shard (shards are written
under a temporary name and renamed; each carries its own checksum, verified before it is skipped), and
the finished cache is byte-identical to one written without interruption: the batches are fixed per
shard and the draws of sampled mode depend only on (seed, split, example). ``plan.json`` (written first)
records the settings; resuming with other settings is refused. The manifest is written last by the
main process once every process has finished its shards. A complete cache (manifest present, same
settings) is left alone.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from distill.config import CacheConfig, ServerTeacherSpec

logger = logging.getLogger("distill")


# --------------------------------------------------------------------------------------------- capture


class Capturer:
    """Teacher + head + encoding parameters: turns a list of examples into one shard's arrays.

    The teacher's final hidden states are computed per batch (``logits_to_keep=1``: no full logits), then
    the logits of the stored rows, a chunk of rows at a time into reused buffers (``logits_memory_mb``
    bounds them), and the targets from each chunk (:func:`distill.cache.topk_targets` /
    :func:`distill.cache.sampled_targets`). The targets of a chunk are computed on a helper thread while
    the main thread runs the next chunk's matmul (two sets of buffers), so on a machine with a spare core
    (or a GPU, where the helper thread also takes the device-to-host copies off the main thread) capture
    runs at nearly the speed of the bare forward.
    """

    def __init__(
        self,
        teacher,
        head,
        params,
        *,
        temperature: float,
        seed: int,
        batch_size: int,
        pad_id: int,
        device,
        logits_memory_mb: int = 256,
    ):
        from distill.cache import sample_block

        self.teacher, self.head, self.params = teacher, head, params
        self.temperature, self.seed, self.batch_size = temperature, seed, batch_size
        self.pad_id, self.device = pad_id, device
        v = params.vocab_size
        if params.mode == "sampled":
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
        import torch

        from distill.losses import logits_into

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
        import torch

        work = self._work[slot]
        if work is None or work.shape[0] < c:
            work = self._work[slot] = torch.empty(
                min(self.chunk_rows, max(c, 1)), self.work_width, dtype=torch.float32, device=device
            )
        return work

    def _targets(self, z, slot: int, uniforms) -> dict:
        """One chunk's targets, moved to the CPU (runs on the helper thread)."""
        import torch

        from distill.cache import encode_tail, sampled_targets, topk_targets

        p = self.params
        with torch.no_grad():
            work = self._scratch(z.shape[0], slot, z.device)
            if p.mode == "topk":
                out = topk_targets(z, p.k, p.prob_bits, work=work)
                out["tail_codes"] = torch.from_numpy(encode_tail(out.pop("tail").cpu(), p.tail_bits))
            else:
                out = sampled_targets(z, uniforms, work=work)
            return {key: val.cpu() for key, val in out.items()}

    def batches(self, examples: list[dict]):
        """(offset, collated batch, stored-row mask) per batch of ``batch_size`` examples."""
        import torch

        from distill.data import collate
        from distill.losses import IGNORE_INDEX

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
        import torch

        from distill.models import final_hidden

        tokens = 0
        with torch.no_grad():
            for _, batch, sel in self.batches(examples):
                rows = final_hidden(self.teacher, batch)[sel]
                for r0 in range(0, rows.shape[0], self.chunk_rows):
                    self.logits(rows[r0 : r0 + self.chunk_rows])
                tokens += int(batch["attention_mask"].sum())
        if torch.cuda.is_available() and str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        return tokens

    def capture(self, examples: list[dict], first_index: int, split: str, on_batch=None) -> dict:
        """Targets of ``examples`` (dataset indices ``first_index, ...``): the arrays of :func:`encode_shard`."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np
        import torch

        from distill.cache import example_uniforms, stored_positions
        from distill.models import final_hidden

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
                rows = final_hidden(self.teacher, batch)[sel]
                uniforms = None
                if p.mode == "sampled":
                    uniforms = torch.cat(
                        [
                            example_uniforms(self.seed, split, first_index + b0 + j, positions[b0 + j], p.n)
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
        return {"arrays": arrays, "positions": positions}


class ServerCapturer:
    """Top-k targets from a teacher behind a server (:class:`distill.teacher.ServerTeacher`): the same arrays
    as :class:`Capturer` in top-k mode, from the server's prompt log-probabilities at the capture temperature
    (the k most probable ids at each stored position; the realized token the server adds beyond them is
    left out, and the tail is ``1 - sum(top-k)``)."""

    def __init__(self, server, params, *, batch_size: int):
        self.server, self.params, self.batch_size = server, params, batch_size

    def capture(self, examples: list[dict], first_index: int, split: str, on_batch=None) -> dict:
        import numpy as np
        import torch

        from distill.cache import encode_tail, stored_positions

        p = self.params
        top = (1 << p.prob_bits) - 1 if p.k > 1 else 0
        ids_rows, code_rows, tails, positions = [], [], [], []
        for b0 in range(0, len(examples), self.batch_size):
            batch = examples[b0 : b0 + self.batch_size]
            seqs = [list(map(int, ex["input_ids"])) for ex in batch]
            scored = self.server.scorer.score(seqs, p.k, self.server.temperature)
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
        import pyarrow.compute as pc

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
) -> dict:
    """Write this process's shards of one split (shards ``s % world == rank``), skipping complete ones.

    Returns counts: ``written`` and ``skipped`` shards, ``tokens`` forwarded, ``seconds``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from distill.cache import encode_shard, example_hash, shard_file_info, shard_name, write_file_atomic

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

    def write(s: int, a: int, shard_hashes, shard_lengths, out) -> None:
        blob = encode_shard(
            capturer.params, split, s, a, shard_hashes, shard_lengths, out["positions"], out["arrays"]
        )
        write_file_atomic(out_dir / shard_name(split, s), blob)

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
                pending.result()  # at most one shard being encoded/written while the next is captured
            pending = pool.submit(write, s, a, shard_hashes, lengths[a:b], out)
            bar.set_postfix(shards=f"{s + 1}/{num_shards}")
        if pending is not None:
            pending.result()
    bar.close()
    seconds = time.perf_counter() - t0
    return {"written": len(todo), "skipped": skipped, "tokens": total, "seconds": seconds}


def build_manifest(out_dir: Path, identity: dict) -> dict:
    """The manifest: the identity plus, per split, every shard's example range, size and sha256."""
    from distill.cache import shard_file_info, shard_name

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


# --------------------------------------------------------------------------------------------- the recipe


def main(cfg: CacheConfig) -> dict:
    import torch
    from accelerate import Accelerator

    from distill import cache as fmt
    from distill.checkpoint import atomic_write_text
    from distill.data import build_datasets
    from distill.models import (
        has_accelerator,
        load_model,
        load_tokenizer,
        max_positions,
        model_identity,
        output_head,
        resolve_vocab,
    )
    from distill.tokenizer import tokenizer_fingerprint

    out_dir = Path(cfg.out_dir)
    accelerator = Accelerator(cpu=not has_accelerator())
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if not is_main:
        logger.setLevel(logging.WARNING)

    tokenizer = load_tokenizer(cfg.teacher, "teacher")
    vocab = len(tokenizer)
    params = fmt.CacheParams.make(cfg.mode, vocab, k=cfg.k, n=cfg.n, prob_bits=cfg.prob_bits,
                                  tail_bits=cfg.tail_bits)
    on_server = isinstance(cfg.teacher, ServerTeacherSpec)
    if on_server:
        if cfg.mode != "topk":
            raise ValueError("mode=sampled needs the teacher's whole distribution, which a server does not return; "
                             "capture mode=topk from the server, or sampled targets from the model itself")
        from distill.losses import LossSpec
        from distill.teacher import ServerTeacher

        server = ServerTeacher(cfg.teacher.model_copy(update={"top_k": cfg.k}), tokenizer,
                               LossSpec(temperature=cfg.temperature))
        limit = server.max_positions
    else:
        teacher = load_model(cfg.teacher, "teacher", tokenizer)
        resolve_vocab(teacher, vocab, "teacher", cfg.vocab_policy)
        teacher.to(accelerator.device).eval().requires_grad_(False)
        limit = max_positions(teacher)
    with accelerator.main_process_first():
        train_ds, eval_ds = build_datasets(cfg.data, tokenizer, max_positions=limit)
    datasets = {"train": train_ds, "eval": eval_ds}
    splits = cfg.splits if cfg.splits is not None else [s for s in ("train", "eval") if datasets[s] is not None]
    for split in splits:
        if datasets[split] is None:
            raise ValueError(
                "splits includes eval, but the data has no eval split (data.eval_fraction=0 and no "
                "data.eval_source)"
            )

    hashes = {split: fmt.example_hashes(datasets[split]) for split in splits}
    identity = {
        "format": fmt.FORMAT_NAME,
        "version": fmt.FORMAT_VERSION,
        "teacher": model_identity(cfg.teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "params": params.to_json(),
        "temperature": cfg.temperature,
        "seed": cfg.seed if cfg.mode == "sampled" else None,
        "seq_len": cfg.data.seq_len,
        "capture": {"batch_size": cfg.batch_size, "logits_memory_mb": cfg.logits_memory_mb},
        "splits": {
            split: {
                "num_examples": len(datasets[split]),
                "data_fingerprint": fmt.data_fingerprint(hashes=hashes[split]),
                "shard_examples": cfg.shard_examples,
                "num_shards": -(-len(datasets[split]) // cfg.shard_examples),
            }
            for split in splits
        },
    }

    manifest_path, plan_path = out_dir / fmt.MANIFEST, out_dir / fmt.PLAN
    if manifest_path.is_file():
        _check_same(json.loads(manifest_path.read_text()), identity, out_dir, complete=True)
        logger.info("%s is already a complete cache with these settings; nothing to do", out_dir)
        return _summary(json.loads(manifest_path.read_text()), out_dir, written=0, seconds=0.0, tokens=0)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if plan_path.is_file():
            _check_same(json.loads(plan_path.read_text()), identity, out_dir, complete=False)
            logger.info("resuming the capture in %s", out_dir)
        else:
            atomic_write_text(plan_path, fmt.canonical_json(identity))
        for debris in out_dir.glob(".shard-*.tmp"):  # a killed writer's temporary file
            debris.unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    capturer = ServerCapturer(server, params, batch_size=cfg.batch_size) if on_server else Capturer(
        teacher,
        output_head(teacher, vocab),
        params,
        temperature=cfg.temperature,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        pad_id=pad_id,
        device=accelerator.device,
        logits_memory_mb=cfg.logits_memory_mb,
    )
    written = tokens = 0
    seconds = 0.0
    for split in splits:
        res = capture_split(
            capturer,
            datasets[split],
            split,
            out_dir,
            shard_examples=cfg.shard_examples,
            hashes=hashes[split],
            rank=rank,
            world=world,
            progress=cfg.progress and is_main,
        )
        written, tokens, seconds = written + res["written"], tokens + res["tokens"], seconds + res["seconds"]
        if res["skipped"]:
            logger.info("%s: %d complete shard(s) kept, %d written", split, res["skipped"], res["written"])
    counts = accelerator.reduce(
        torch.tensor([written, tokens], dtype=torch.float64, device=accelerator.device), "sum"
    ).tolist()
    accelerator.wait_for_everyone()
    manifest = None
    if is_main:
        manifest = build_manifest(out_dir, identity)
        atomic_write_text(manifest_path, fmt.canonical_json(manifest))  # last: marks the cache complete
    accelerator.wait_for_everyone()
    if manifest is None:
        manifest = json.loads(manifest_path.read_text())
    summary = _summary(manifest, out_dir, written=int(counts[0]), seconds=seconds, tokens=int(counts[1]))
    logger.info(
        "cache written to %s: %s",
        out_dir,
        ", ".join(
            f"{s}: {v['examples']} examples, {v['bytes_per_token']:.2f} B/token"
            for s, v in summary["splits"].items()
        ),
    )
    return summary


def _check_same(found: dict, identity: dict, out_dir: Path, complete: bool) -> None:
    from distill.cache import FORMAT_NAME, identity_diff

    if found.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{out_dir} holds something that is not a distill teacher cache; choose another out_dir"
        )
    found = {k: v for k, v in found.items() if k in identity}
    if complete:
        found["splits"] = {
            s: {k: v for k, v in info.items() if k in identity["splits"].get(s, {})}
            for s, info in found.get("splits", {}).items()
        }
    diff = identity_diff(found, identity)
    if diff:
        what = "a complete cache" if complete else "a partial cache"
        raise ValueError(
            f"{out_dir} holds {what} built with other settings ({'; '.join(diff[:4])}); use another out_dir, "
            "or delete it to rebuild"
        )


def _summary(manifest: dict, out_dir: Path, *, written: int, seconds: float, tokens: int) -> dict:
    splits = {
        s: {
            "examples": v["num_examples"],
            "positions": v["positions"],
            "shards": len(v["shards"]),
            "bytes": v["bytes"],
            "bytes_per_token": v["bytes_per_token"],
        }
        for s, v in manifest["splits"].items()
    }
    return {
        "out_dir": str(out_dir),
        "mode": manifest["params"]["mode"],
        "splits": splits,
        "shards_written": written,
        "tokens_captured": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
    }
