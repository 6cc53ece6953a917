"""Capture a teacher's per-token targets into an offline cache (``distill cache``).

    distill cache configs/tiny/cache.yaml out_dir=runs/cache          # tiny CPU run, seconds
    distill cache my.yaml mode=sampled n=50 temperature=1.0           # RS-KD targets
    distill cache my.yaml mode=hybrid head=1 n=16                     # exact head + systematic draws (~20 B/token)
    accelerate launch --num_processes 2 -m distill cache my.yaml      # each process writes its own shards

The data section is the one ``distill train`` uses, and the cache covers ``build_datasets``' train split
and, when the data has one, its eval split (``splits`` chooses), example by example in dataset order;
training from the cache reports KL to the teacher and agreement on the cached eval split. The format is
described in :mod:`distill.caching.codec`; train from it with ``teacher: {cache: OUT}``.

Resume: running the same command again continues from the last complete shard (shards are written
under a temporary name and renamed; each carries its own checksum, verified before it is skipped), and
the finished cache is byte-identical to one written without interruption: the batches are fixed per
shard and the draws of the sampled and hybrid modes depend only on (seed, split, example). ``plan.json`` (written first)
records the settings; resuming with other settings is refused. The manifest is written last by the
main process once every process has finished its shards. A complete cache (manifest present, same
settings) is left alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from distill.caching import codec
from distill.caching.capture import Capturer, build_manifest, capture_split
from distill.caching.reader import identity_diff
from distill.checkpoint import atomic_write_text
from distill.config import CacheConfig
from distill.data import build_datasets
from distill.engines import engine_identity, open_engine
from distill.models import has_accelerator, load_tokenizer
from distill.tokenizer import tokenizer_fingerprint

logger = logging.getLogger("distill")
DEFAULT_DRAWS = {"sampled": 50, "hybrid": 16}


def draws_per_token(cfg: CacheConfig) -> int:
    """``n`` as set, else the mode's default (draws are unused by top-k)."""
    return cfg.n if cfg.n is not None else DEFAULT_DRAWS.get(cfg.mode, 50)


# --------------------------------------------------------------------------------------------- the command


def main(cfg: CacheConfig, on_step: Callable[[dict], object] | None = None) -> dict:
    """Capture ``cfg.teacher``'s targets on ``cfg.data`` into ``cfg.out_dir`` (continuing a partial capture);
    returns the summary. ``on_step`` is told of each shard this process writes, once it is on disk."""
    out_dir = Path(cfg.out_dir)
    accelerator = Accelerator(cpu=not has_accelerator())
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if not is_main:
        logger.setLevel(logging.WARNING)

    tokenizer = load_tokenizer(cfg.teacher, "teacher")
    params = codec.CacheParams.make(cfg.mode, len(tokenizer), k=cfg.k, n=draws_per_token(cfg), head=cfg.head,
                                    prob_bits=cfg.prob_bits, tail_bits=cfg.tail_bits)
    engine = open_engine(cfg.teacher, tokenizer, vocab_policy=cfg.vocab_policy, device=accelerator.device,
                         temperature=cfg.temperature, top_k=cfg.k)
    if cfg.mode != "topk" and not engine.dense:
        raise ValueError(f"mode={cfg.mode} needs the teacher's whole distribution, which a server does not return; "
                         f"capture mode=topk from the server, or {cfg.mode} targets from the model itself")
    with accelerator.main_process_first():
        train_ds, eval_ds = build_datasets(cfg.data, tokenizer, max_positions=engine.max_positions)
    datasets = {"train": train_ds, "eval": eval_ds}
    splits = cfg.splits if cfg.splits is not None else [s for s in ("train", "eval") if datasets[s] is not None]
    for split in splits:
        if datasets[split] is None:
            raise ValueError(
                "splits includes eval, but the data has no eval split (data.eval_fraction=0 and no "
                "data.eval_source)"
            )
    hashes = {split: codec.example_hashes(datasets[split]) for split in splits}
    identity = _identity(cfg, tokenizer, params, {s: len(datasets[s]) for s in splits}, hashes)

    manifest_path = out_dir / codec.MANIFEST
    if manifest_path.is_file():
        _check_same(json.loads(manifest_path.read_text()), identity, out_dir, complete=True)
        logger.info("%s is already a complete cache with these settings; nothing to do", out_dir)
        return _summary(json.loads(manifest_path.read_text()), out_dir, written=0, seconds=0.0, tokens=0)
    if is_main:
        _start_or_resume(out_dir, identity)
    accelerator.wait_for_everyone()

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    capturer = Capturer(engine, params, temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size,
                        pad_id=pad_id, device=accelerator.device, logits_memory_mb=cfg.logits_memory_mb)
    written = tokens = 0
    seconds = 0.0
    for split in splits:
        res = capture_split(capturer, datasets[split], split, out_dir, shard_examples=cfg.shard_examples,
                            hashes=hashes[split], rank=rank, world=world, progress=cfg.progress and is_main,
                            on_shard=on_step)
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
        atomic_write_text(manifest_path, codec.canonical_json(manifest))  # last: marks the cache complete
    accelerator.wait_for_everyone()
    if manifest is None:
        manifest = json.loads(manifest_path.read_text())
    summary = _summary(manifest, out_dir, written=int(counts[0]), seconds=seconds, tokens=int(counts[1]))
    logger.info("cache written to %s: %s", out_dir, ", ".join(
        f"{s}: {v['examples']} examples, {v['bytes_per_token']:.2f} B/token" for s, v in summary["splits"].items()))
    return summary


def _identity(cfg: CacheConfig, tokenizer, params, sizes: dict[str, int], hashes: dict) -> dict:
    """What the cache is made of (the plan and the manifest record it; resuming with another is refused)."""
    return {
        "format": codec.FORMAT_NAME,
        "version": codec.FORMAT_VERSION,
        "teacher": engine_identity(cfg.teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "params": params.to_json(),
        "temperature": cfg.temperature,
        "seed": cfg.seed if cfg.mode != "topk" else None,
        "seq_len": cfg.data.seq_len,
        "capture": {"batch_size": cfg.batch_size, "logits_memory_mb": cfg.logits_memory_mb},
        "splits": {
            split: {
                "num_examples": n,
                "data_fingerprint": codec.data_fingerprint(hashes=hashes[split]),
                "shard_examples": cfg.shard_examples,
                "num_shards": -(-n // cfg.shard_examples),
            }
            for split, n in sizes.items()
        },
    }


def _start_or_resume(out_dir: Path, identity: dict) -> None:
    """The main process: write the plan (first), or check that a partial cache has the same one; remove a
    killed writer's temporary files."""
    plan_path = out_dir / codec.PLAN
    out_dir.mkdir(parents=True, exist_ok=True)
    if plan_path.is_file():
        _check_same(json.loads(plan_path.read_text()), identity, out_dir, complete=False)
        logger.info("resuming the capture in %s", out_dir)
    else:
        atomic_write_text(plan_path, codec.canonical_json(identity))
    for debris in out_dir.glob(".shard-*.tmp"):  # a killed writer's temporary file
        debris.unlink(missing_ok=True)


def _check_same(found: dict, identity: dict, out_dir: Path, complete: bool) -> None:
    if found.get("format") != codec.FORMAT_NAME:
        raise ValueError(
            f"{out_dir} holds something that is not a distill teacher cache; choose another out_dir"
        )
    found = {k: v for k, v in found.items() if k in identity}
    if complete and found.get("version") in codec.READABLE_VERSIONS:
        found["version"] = identity["version"]  # a complete cache of an earlier version reads as it is
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
