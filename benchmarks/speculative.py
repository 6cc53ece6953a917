"""The student as a speculative-decoding draft for its teacher (DistillSpec's claim), on the quickstart models.

The quickstart's teacher (the standard library corpus, cached in ``$DISTILL_CACHE``) and its student
architecture, trained for the quickstart's steps and tokens three ways, per seed:

* ``scratch``: cross-entropy only;
* ``forward_kl``: the quickstart's distillation (forward KL at T = 1, alpha = 0);
* ``tvd``: total variation distance to the teacher (alpha = 0), whose minimization is the maximization of
  the acceptance rate sum_v min(p, q) = 1 - TVD (DistillSpec).

Each is the teacher's draft with :func:`distill.evaluation.metrics.measure_speculative` (what ``distill eval``'s
``speculative`` section runs) on validation prompts (their first 32 tokens), greedy and sampled at T = 1:
per gamma in {1, 2, 4, 8} the acceptance rate alpha, tokens per target call and the wall-clock speed-up over
the teacher alone at batch 1 and 8 (timed for the first seed's drafts only), beside the prediction from
alpha-hat (one teacher-forced pass). Also
the validation loss and KL to the teacher of each student.

    python benchmarks/speculative.py                  # default quickstart models, seeds 0 and 1
    python benchmarks/speculative.py --preset fast --seeds 0 --prompts 4 --gammas 1 2   # minutes

Writes ``--out`` (default ``runs/benchmarks/speculative.json``; the committed record: ``--out benchmarks/results/speculative.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distill import training  # noqa: E402
from distill.checkpoint import atomic_write_json  # noqa: E402
from distill.commands import quickstart  # noqa: E402
from distill.config import DataConfig, LossConfig, ModelSpec  # noqa: E402
from distill.data import build_datasets  # noqa: E402
from distill.evaluation.metrics import measure_speculative  # noqa: E402
from distill.generation.sampling import SamplingParams  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402

# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/speculative.json
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "speculative.json"
DRAFTS = {"scratch": None, "forward_kl": "forward_kl", "tvd": "tvd"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(quickstart.PRESETS), default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--timing-seeds", type=int, nargs="*", default=None,
                   help="seeds whose drafts are also timed (default: the first); the others get acceptance only")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "speculative")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("distill").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    preset = quickstart.PRESETS[args.preset]
    work = args.work / args.preset
    train_jsonl, val_jsonl, corpus_key = quickstart.write_corpus(work / "data", preset.max_files)
    tok_dir, teacher_dir, _ = quickstart.get_teacher(preset, corpus_key, train_jsonl, val_jsonl)

    students: dict[str, dict[int, Path]] = {name: {} for name in DRAFTS}
    train_seconds: dict[str, float] = {}
    for seed in args.seeds:
        for name, divergence in DRAFTS.items():
            cfg = quickstart.run_config(preset, f"{name}_seed{seed}", work, tok_dir, train_jsonl, val_jsonl,
                                        preset.student, preset.student_steps, preset.student_lr,
                                        teacher_dir if divergence else None)
            cfg = cfg.model_copy(update={
                "student": cfg.student.model_copy(update={"seed": seed}),
                "train": cfg.train.model_copy(update={"seed": seed}),
                "loss": LossConfig(divergence=divergence or "forward_kl", temperature=1.0, alpha=0.0),
                "log": cfg.log.model_copy(update={"progress": False}),
            })
            t0 = time.perf_counter()
            training.train(cfg)
            train_seconds[f"{name}_seed{seed}"] = round(time.perf_counter() - t0, 1)
            students[name][seed] = Path(cfg.out_dir) / "student"

    quality = quickstart.evaluate_all({f"{n}_seed{s}": d for n, per in students.items() for s, d in per.items()},
                                      teacher_dir, tok_dir, val_jsonl, preset.seq_len)

    tokenizer = load_tokenizer(ModelSpec(path=str(tok_dir)), "tokenizer")
    val_ds, _ = build_datasets(DataConfig(source=str(val_jsonl), seq_len=preset.seq_len, eval_fraction=0.0,
                                          format="text", packing=True), tokenizer)
    step = max(len(val_ds) // args.prompts, 1)  # prompts spread over the validation files
    prompts = [list(val_ds[i]["input_ids"][: args.prompt_tokens]) for i in range(0, len(val_ds), step)][: args.prompts]
    target = load_model(ModelSpec(path=str(teacher_dir)), "teacher").eval()
    eos = tokenizer.eos_token_id
    timed = set(args.seeds[:1] if args.timing_seeds is None else args.timing_seeds)
    results: dict = {}
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        # No stop token: every sequence writes new_tokens tokens, so the speed-ups compare equal work.
        params = SamplingParams(temperature=temperature, max_new_tokens=args.new_tokens)
        for name, per_seed in students.items():
            for seed, path in per_seed.items():
                draft = load_model(ModelSpec(path=str(path)), name).eval()
                logging.getLogger("distill").info("speculative %s: draft %s seed %d", mode, name, seed)
                with torch.no_grad():
                    rec = measure_speculative(target, draft, prompts, params, args.gammas,
                                              args.batch_sizes if seed in timed else [],
                                              pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                              else eos, seed=seed, reps=args.reps)
                results.setdefault(mode, {}).setdefault(name, {})[str(seed)] = rec

    summary = {mode: {name: summarize(per_seed) for name, per_seed in by_name.items()}
               for mode, by_name in results.items()}
    record = {"preset": args.preset, "teacher": preset.teacher, "student": preset.student,
              "student_steps": preset.student_steps, "seeds": args.seeds, "prompts": len(prompts),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "gammas": args.gammas,
              "batch_sizes": args.batch_sizes, "reps": args.reps, "timing_seeds": sorted(timed), "quality": quality, "speculative": results,
              "summary": summary, "train_seconds": train_seconds, "torch_threads": torch.get_num_threads(),
              "total_seconds": round(time.perf_counter() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    print(table(record))
    return record


def summarize(per_seed: dict[str, dict]) -> dict:
    """Means over seeds of alpha-hat and, per gamma, of alpha, tokens per call (measured, predicted) and the
    speed-up per batch size (over the timed seeds)."""
    runs = list(per_seed.values())
    out = {"alpha_hat": statistics.mean(r["alpha_hat"] for r in runs), "gammas": {}}
    for g in runs[0]["gammas"]:
        rs = [r["gammas"][g] for r in runs]
        out["gammas"][g] = {
            "acceptance_rate": statistics.mean(r["acceptance_rate"] for r in rs),
            "tokens_per_target_call": statistics.mean(r["tokens_per_target_call"] for r in rs),
            "predicted_tokens_per_target_call": statistics.mean(r["predicted_tokens_per_target_call"] for r in rs),
            "speedup": {b: statistics.mean(r["speedup"][b]["ratio"] for r in rs if b in r["speedup"])
                        for b in {b for r in rs for b in r["speedup"]}},
        }
    return out


def table(r: dict) -> str:
    lines = ["| draft | val loss | KL to teacher | agreement |", "|---|---|---|---|"]
    names = {k.rsplit("_seed", 1)[0] for k in r["quality"]}
    for name in DRAFTS:
        if name not in names:
            continue
        rows = [v for k, v in r["quality"].items() if k.rsplit("_seed", 1)[0] == name]
        mean = {m: statistics.mean(x[m] for x in rows) for m in ("val_loss", "kl_to_teacher", "top1_agreement")}
        lines.append(f"| {name} | {mean['val_loss']:.3f} | {mean['kl_to_teacher']:.3f} | "
                     f"{100 * mean['top1_agreement']:.1f}% |")
    sizes = r["batch_sizes"]
    for mode, by_name in r["summary"].items():
        lines += ["", f"{mode}: mean over seeds {r['seeds']} (speed-ups: seeds {r['timing_seeds']})",
                  "| draft | gamma | alpha | alpha-hat | tokens/call (predicted) | "
                  + " | ".join(f"speed-up, batch {b}" for b in sizes) + " |", "|---" * (5 + len(sizes)) + "|"]
        for name, s in by_name.items():
            for g, v in s["gammas"].items():
                ups = " | ".join(f"{v['speedup'][str(b)]:.2f}x" for b in sizes if str(b) in v["speedup"])
                lines.append(f"| {name} | {g} | {v['acceptance_rate']:.3f} | {s['alpha_hat']:.3f} | "
                             f"{v['tokens_per_target_call']:.2f} ({v['predicted_tokens_per_target_call']:.2f}) | {ups} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
