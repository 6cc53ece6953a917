"""Generation throughput: distill's sampler against transformers' `generate` and a loop without KV cache.

The same model, prompts and batch for each, new tokens per second (every sequence writes exactly
``--new-tokens`` tokens: no stop token), round robin over ``--reps`` rounds, medians:

* ``distill``: :func:`distill.generation.sampling.sample` (our KV-cache loop; per-sample seeds; the sampler's
  log-probs; with ``model_logprobs`` on, as ``distill generate`` runs with the log-prob scorer, and off);
* ``transformers``: ``model.generate`` with the same explicit settings (``do_sample``, temperature, no
  top-k / top-p, ``min_new_tokens = max_new_tokens`` so that nobody stops early);
* ``no_cache``: the naive loop that re-runs the whole sequence for every new token.

Greedy and sampling (T = 1), at batch 1 and 16. Models: random-init Llamas (throughput does not depend on
the weights), ``--size small`` (the quickstart teacher's shape: hidden 192, 4 layers, V = 4,096) and
``--size medium`` (hidden 512, 8 layers, V = 32,000).

    python benchmarks/generate.py                 # both sizes, CPU (a GPU when present)
    python benchmarks/generate.py --quick         # small only, fewer rounds

Writes ``--out`` (default ``runs/benchmarks/generate.json``; the committed record: ``--out benchmarks/results/generate.json``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distill.checkpoint import atomic_write_json  # noqa: E402
from distill.generation.sampling import SamplingParams, left_pad, row_seed, sample  # noqa: E402

# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/generate.json
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "generate.json"
SIZES = {
    "small": dict(vocab_size=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2),
    "medium": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4),
}


def make_model(size: str, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0,
                               eos_token_id=1, bos_token_id=2, **SIZES[size])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(device).eval().requires_grad_(False)


def prompts_for(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    # Different lengths (left padding matters), 3/4 to the full prompt length.
    return [[2, *torch.randint(3, vocab, (prompt_len * 3 // 4 + (i * 7) % (prompt_len // 4),), generator=g).tolist()]
            for i in range(batch)]


def run_distill(model, prompts, params, model_logprobs: bool):
    seeds = None if params.greedy else [row_seed(0, i) for i in range(len(prompts))]
    return sample(model, prompts, params, pad_id=0, seeds=seeds, model_logprobs=model_logprobs)


def run_transformers(model, prompts, params):
    from transformers import GenerationConfig

    ids, mask = left_pad(prompts, 0, model.device)
    gc = GenerationConfig(do_sample=not params.greedy, temperature=None if params.greedy else params.temperature,
                          top_p=None, top_k=None, max_new_tokens=params.max_new_tokens,
                          min_new_tokens=params.max_new_tokens, pad_token_id=0, eos_token_id=1)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)


def run_no_cache(model, prompts, params):
    """The naive baseline: every step runs the whole (left-padded) sequence again."""
    ids, mask = left_pad(prompts, 0, model.device)
    g = torch.Generator(device=model.device).manual_seed(0)
    with torch.no_grad():
        for _ in range(params.max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                           logits_to_keep=1).logits[:, -1].float()
            logits[:, 1] = -float("inf")  # nobody stops early
            if params.greedy:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(logits / params.temperature, -1), 1, generator=g).squeeze(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return ids


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-cache-max-batch", type=int, default=16, help="skip the naive loop above this batch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or (["small"] if args.quick else ["small", "medium"])
    reps = args.reps or (3 if args.quick else 5)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = []
    for size in sizes:
        model = make_model(size, device)
        for batch in args.batches:
            prompts = prompts_for(batch, args.prompt_len, SIZES[size]["vocab_size"])
            for mode, temperature in (("greedy", 0.0), ("sample", 1.0)):
                params = SamplingParams(temperature=temperature, max_new_tokens=args.new_tokens, stop_ids=())
                impls = {
                    "distill": partial(run_distill, model, prompts, params, model_logprobs=False),
                    "distill_with_logprobs": partial(run_distill, model, prompts, params, model_logprobs=True),
                    "transformers": partial(run_transformers, model, prompts, params),
                }
                if batch <= args.no_cache_max_batch:
                    impls["no_cache"] = partial(run_no_cache, model, prompts, params)
                times = {name: [] for name in impls}
                for fn in impls.values():  # warm-up
                    fn()
                for _ in range(reps):
                    for name, fn in impls.items():
                        sync(device)
                        t0 = time.perf_counter()
                        fn()
                        sync(device)
                        times[name].append(time.perf_counter() - t0)
                tokens = batch * args.new_tokens
                rec = {"size": size, "batch": batch, "mode": mode, "new_tokens": args.new_tokens,
                       "prompt_len": args.prompt_len, "device": str(device),
                       "tokens_per_s": {k: tokens / statistics.median(v) for k, v in times.items()}}
                tps = rec["tokens_per_s"]
                rec["distill_vs_transformers"] = tps["distill"] / tps["transformers"]
                rec["distill_with_logprobs_vs_transformers"] = tps["distill_with_logprobs"] / tps["transformers"]
                if "no_cache" in tps:
                    rec["distill_vs_no_cache"] = tps["distill"] / tps["no_cache"]
                records.append(rec)
                print(f"{size:6s} batch {batch:3d} {mode:6s} " + "  ".join(f"{k} {v:8.1f} tok/s" for k, v in tps.items())
                      + f"  ratio {rec['distill_vs_transformers']:.3f}", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    import transformers

    meta["transformers"] = transformers.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"meta": meta, "records": records})
    return records


if __name__ == "__main__":
    main()
