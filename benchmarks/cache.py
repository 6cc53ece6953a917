"""Offline teacher cache: size, write/read throughput, and the bare teacher forward for comparison.

For each mode and parameter (top-k k = 8, 32, 64; sampled N = 16, 50; hybrid head 1, n = 16, 32) the same examples
are captured with
:class:`distill.caching.capture.Capturer` + :func:`distill.caching.capture.capture_split` (teacher forward,
targets, encoding and atomic shard writes, the writer thread included) into a fresh directory, then read
back at random (batches of 8 random examples through :meth:`TeacherCache.batch_target`, hash checks and
checksums included). ``teacher_forward_tokens_per_s`` is the bare teacher forward over the same rows and
chunks (final hidden states + output-layer logits into the same reused buffer, nothing else), so
``capture_vs_forward = write_tokens_per_s / teacher_forward_tokens_per_s`` is what capturing costs on top
of running the teacher. ``train_step_tokens_per_s`` is one student training step (forward, chunked
sparse loss on the cached targets, backward) for comparison with ``read_tokens_per_s``.

Teachers are random-init Llamas whose output layer is scaled so that the mean teacher entropy is
LM-like (``--entropy``, 2 nats by default, about the loss, hence the entropy, of a calibrated 8B-class
teacher on web text; a random init is near-uniform, which would make the sampled mode look far larger
than on a real teacher: N = 50 draws from a uniform 131k vocabulary are ~50 distinct ids). The measured
entropy and mean number of distinct sampled ids are in the records: sampled bytes per token grow with
the d distinct ids (Rice-coded sorted gaps, about ``log2(V / d) + 1.5`` bits each, plus Rice-coded counts),
so they follow the teacher; ``fixed_width_bytes_per_token`` is what plain ``ceil(log2 V)``-bit ids and
``bit_length(N - 1)``-bit counts would take. The data is random token ids (every position supervised). ``bytes_per_token`` counts the shard
files (headers, index and checksums included) over the stored positions; the manifest is a fixed size
(``manifest_bytes``). The forward and the capture of each setting are timed back to back.

    python benchmarks/cache.py            # V = 131,073 (18-bit ids), hidden 1024, all seven settings (minutes on 2 CPU cores)
    python benchmarks/cache.py --quick    # the tiny teacher of configs/tiny/cache.yaml (V = 263), k=64, N=50, hybrid n=16

Writes a list of records to ``--out`` (default ``runs/benchmarks/cache.json``; the committed record: ``--out benchmarks/results/cache.json``). CPU timings use
``--threads`` intra-op threads (1 by default: stable on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from distill.caching import capture, codec, reader  # noqa: E402
from distill.caching.capture import Capturer, build_manifest, capture_split  # noqa: E402
from distill.data import collate  # noqa: E402
from distill.engines import LocalEngine  # noqa: E402
from distill.losses import chunked_kd_loss  # noqa: E402
from distill.models import final_hidden, flat_positions, output_head  # noqa: E402

# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/cache.json
DEFAULT_OUT = REPO / "runs" / "benchmarks" / "cache.json"
FULL = [("topk", 8), ("topk", 32), ("topk", 64), ("sampled", 16), ("sampled", 50), ("hybrid", 16), ("hybrid", 32)]
QUICK = [("topk", 64), ("sampled", 50), ("hybrid", 16)]


def llama(vocab: int, hidden: int, layers: int, seed: int, max_pos: int = 1024):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 2),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


def tiny_teacher():
    from distill.config import CacheConfig, load_config
    from distill.models import load_model, load_tokenizer

    cfg = load_config(CacheConfig, REPO / "configs" / "tiny" / "cache.yaml", [])
    tok = load_tokenizer(cfg.teacher, "teacher")
    return load_model(cfg.teacher, "teacher", tok).eval().requires_grad_(False), len(tok)


def entropy_of(model, vocab: int, rows: torch.Tensor) -> tuple[float, torch.Tensor]:
    z = output_head(model, vocab).logits(rows).float()
    logp = torch.log_softmax(z, -1)
    return float(-(logp.exp() * logp).sum(-1).mean()), logp


def sharpen(model, vocab: int, examples: list[dict], target: float) -> float:
    """Scale the output layer so the mean entropy of the teacher's next-token distribution is ``target``."""
    batch = collate(examples[:2], 0)
    with torch.no_grad():
        rows = flat_positions(final_hidden(model, batch))[:48]
        w = model.get_output_embeddings().weight
        base = w.detach().clone()
        lo, hi = 0.0, 8.0  # log2 of the scale
        for _ in range(14):
            mid = (lo + hi) / 2
            w.copy_(base * 2**mid)
            if entropy_of(model, vocab, rows)[0] > target:
                lo = mid
            else:
                hi = mid
        w.copy_(base * 2 ** ((lo + hi) / 2))
    return 2 ** ((lo + hi) / 2)


def random_examples(n: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    gen = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = gen.integers(0, vocab, seq_len).astype(np.int32).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t0


def read_throughput(path: Path, examples: list[dict], batch_size: int = 8) -> tuple[float, float]:
    """(random-access tokens/s, sequential streaming tokens/s), a fresh reader each (checksums included)."""
    order = np.random.default_rng(0).permutation(len(examples)).tolist()
    cache = reader.TeacherCache(path)
    t0 = time.perf_counter()
    tokens = 0
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        cache.batch_target(idx, [examples[i] for i in idx])
        tokens += sum(len(examples[i]["input_ids"]) for i in idx)
    random_tps = tokens / (time.perf_counter() - t0)
    cache = reader.TeacherCache(path)
    t0 = time.perf_counter()
    for _ in cache.iter_targets(examples):
        pass
    return random_tps, tokens / (time.perf_counter() - t0)


def train_step_throughput(
    student, vocab: int, path: Path, examples: list[dict], batch_size: int = 8
) -> float:
    """Student tokens/s of forward + chunked sparse KD loss + backward on cached targets (reading excluded)."""
    cache = reader.TeacherCache(path)
    head_fn = lambda: output_head(student, vocab)  # noqa: E731
    student.requires_grad_(True).train()
    batches = []
    for b in range(0, min(len(examples), 2 * batch_size), batch_size):
        idx = list(range(b, min(b + batch_size, len(examples))))
        exs = [examples[i] for i in idx]
        batch = collate(exs, 0)
        batches.append((batch, cache.batch_target(idx, exs, width=batch["input_ids"].shape[1])))
    t0, tokens = time.perf_counter(), 0
    for batch, target in batches:
        labels = batch["labels"][:, 1:].reshape(-1)
        n = int((labels != -100).sum())
        loss, _ = chunked_kd_loss(
            flat_positions(final_hidden(student, batch)), head_fn(), labels, target, n
        )
        loss.backward()
        student.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def topk_quant_kl(logp: torch.Tensor, k: int, bits: int) -> float:
    """Mean KL(exact renormalized top-k || decoded renormalized top-k) on the teacher's own rows."""
    out = capture.topk_targets(logp.float(), k, bits)
    top = logp.double().topk(k, -1).values
    p = torch.softmax(top, -1)
    q = torch.cat(
        [
            torch.ones(len(p), 1, dtype=torch.float64),
            torch.from_numpy(codec.ratio_levels(bits)[out["codes"].numpy()]),
        ],
        1,
    )
    q = q / q.sum(-1, keepdim=True)
    return float(torch.where(q > 0, p * (p.log() - q.clamp_min(1e-300).log()), p * 50).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny teacher (V=263), top-k 64, sampled 50, hybrid 16 only")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--entropy", type=float, default=2.0, help="mean teacher entropy in nats (0: do not sharpen)"
    )
    ap.add_argument("--tokens", type=int, default=None, help="tokens captured per setting")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    if args.quick:
        teacher, vocab = tiny_teacher()
        student = llama(vocab, 32, 2, seed=1, max_pos=256)
        seq_len, tokens, settings = 128, args.tokens or 65536, QUICK
        describe = "configs/tiny/cache.yaml teacher (llama, hidden 64, 2 layers), byte tokenizer"
    else:
        vocab, hidden, layers = 131073, 1024, 2
        teacher = llama(vocab, hidden, layers, seed=0)
        student = llama(vocab, 256, 2, seed=1)
        seq_len, tokens, settings = 256, args.tokens or 1024, FULL
        describe = f"random llama, hidden {hidden}, {layers} layers, vocab {vocab}"
    examples = random_examples(max(1, tokens // seq_len), seq_len, vocab, seed=0)
    shard_examples = min(len(examples), 128)
    scale = sharpen(teacher, vocab, examples, args.entropy) if args.entropy > 0 else 1.0
    with torch.no_grad():
        rows = flat_positions(final_hidden(teacher, collate(examples[:1], 0)))[:64]
        entropy, logp = entropy_of(teacher, vocab, rows)
    print(f"teacher: {describe}; output layer x{scale:.3g}: mean entropy {entropy:.2f} nats", flush=True)

    records = []
    step_tps = None
    with tempfile.TemporaryDirectory(prefix="distill-cache-bench-") as tmp:
        for mode, value in settings:
            params = codec.CacheParams.make(mode, vocab, **({"k": value} if mode == "topk" else {"n": value, "head": 1}))
            out = Path(tmp) / f"{mode}-{value}"
            out.mkdir()
            cap = Capturer(
                LocalEngine(teacher, vocab_size=vocab),
                params,
                temperature=1.0,
                seed=0,
                batch_size=4,
                pad_id=0,
                device="cpu",
            )
            cap.capture(examples[:1], 0, "warmup")
            # the bare forward right before the capture (same capturer, chunks and buffers): paired timings
            fwd_tokens, fwd_s = timed(cap.forward_only, examples)
            forward_tps = fwd_tokens / fwd_s
            hashes = codec.example_hashes(examples)
            res, write_s = timed(
                capture_split,
                cap,
                examples,
                "train",
                out,
                shard_examples=shard_examples,
                hashes=hashes,
                progress=False,
            )
            identity = {
                "format": codec.FORMAT_NAME,
                "version": codec.FORMAT_VERSION,
                "teacher": {"benchmark": describe},
                "tokenizer_fingerprint": "benchmark",
                "params": params.to_json(),
                "temperature": 1.0,
                "seed": 0,
                "seq_len": seq_len,
                "splits": {
                    "train": {
                        "num_examples": len(examples),
                        "shard_examples": shard_examples,
                        "num_shards": -(-len(examples) // shard_examples),
                        "data_fingerprint": codec.data_fingerprint(hashes=hashes),
                    }
                },
            }
            manifest = build_manifest(out, identity)
            (out / codec.MANIFEST).write_text(codec.canonical_json(manifest))
            split = manifest["splits"]["train"]
            total_bytes = split["bytes"]  # every shard file, headers and checksums included
            positions = split["positions"]
            read_tps, stream_tps = read_throughput(out, examples)
            if step_tps is None:
                step_tps = train_step_throughput(student, vocab, out, examples)
            rec = {
                "mode": mode,
                ("k" if mode == "topk" else "n"): value,
                "bytes_per_token": round(total_bytes / positions, 3),
                "write_tokens_per_s": round(res["tokens"] / write_s, 1),
                "read_tokens_per_s": round(read_tps, 1),
                "read_sequential_tokens_per_s": round(stream_tps, 1),
                "teacher_forward_tokens_per_s": round(forward_tps, 1),
                "capture_vs_forward": round(res["tokens"] / write_s / forward_tps, 3),
                "train_step_tokens_per_s": round(step_tps, 1),
                "manifest_bytes": (out / codec.MANIFEST).stat().st_size,
                "vocab_size": vocab,
                "id_bits": params.id_bits,
                "tokens": res["tokens"],
                "teacher_entropy_nats": round(entropy, 3),
            }
            if mode == "topk":
                rec["bytes_per_entry"] = round(total_bytes / positions / value, 3)
                rec["prob_bits"] = params.prob_bits
                rec["tail_bits"] = params.tail_bits
                rec["quantization_kl_nats"] = float(f"{topk_quant_kl(logp, value, params.prob_bits):.3g}")
            else:
                cache = reader.TeacherCache(out)
                distinct = [float(np.mean(cache.raw(i)[0]["distinct"])) for i in range(len(examples))]
                d = float(np.mean(distinct))
                rec["mean_distinct_ids"] = round(d, 2)
                if mode == "sampled":
                    fixed = d * (params.id_bits + params.count_bits) - params.count_bits + params.distinct_bits
                    rec["fixed_width_bytes_per_token"] = round(fixed / 8, 2)
                else:
                    rec["head"] = params.head
                    rec["mean_draws"] = round(float(np.mean(np.concatenate(
                        [codec.hybrid_draws(cache.raw(i)[0]["head_codes"], params.n) for i in range(len(examples))]))), 2)
                # The decoded targets of the first example's first rows against the exact teacher: the noise
                # an unbiased target adds to the forward-KL gradient, E||p_hat - p||^2 (one draw per row).
                t = cache.target(0, examples[0]["input_ids"], examples[0]["labels"])
                est = torch.zeros(len(logp), vocab, dtype=torch.float64)
                est.scatter_add_(1, t.ids[: len(logp)], t.probs[: len(logp)].double())
                rec["target_sq_error"] = float(f"{float(((est - logp.double().exp()) ** 2).sum(-1).mean()):.4g}")
            records.append(rec)
            print(json.dumps(rec), flush=True)

    meta = {
        "quick": args.quick,
        "teacher": describe,
        "output_layer_scale": round(scale, 4),
        "seq_len": seq_len,
        "threads": args.threads,
        "device": "cpu",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    for rec in records:
        rec["run"] = meta
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['seconds']} s)")
    for r in records:
        par = f"k={r['k']}" if r["mode"] == "topk" else f"n={r['n']}"
        print(
            f"{r['mode']:8s} {par:6s} {r['bytes_per_token']:8.2f} B/token  write {r['write_tokens_per_s']:>10,.0f}  "
            f"read {r['read_tokens_per_s']:>10,.0f}  forward {r['teacher_forward_tokens_per_s']:>10,.0f} tok/s  "
            f"capture/forward {r['capture_vs_forward']:.2f}"
        )
    if not math.isfinite(sum(r["bytes_per_token"] for r in records)):
        raise SystemExit("non-finite result")


if __name__ == "__main__":
    main()
