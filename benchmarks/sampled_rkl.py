"""The sampled-token reverse KL against the exact one, on the student's own samples: how far apart, and why.

On ``configs/tiny/gkd.yaml`` (short sums, byte tokenizer: V = 263) with a teacher trained on the sums first
(its architecture from that config, cross-entropy on the same data, ``--teacher-steps``), GKD with
lambda = 1 (every step trains on the student's own completions, T = 1, alpha = 0) runs ``--steps`` steps per
objective, learning rate and seed:

* ``plain``: ``loss.divergence=sampled_reverse_kl loss.baseline=none``: per sampled token x,
  f = log q(x) - log p(x), surrogate stopgrad(f) * log q(x);
* ``running``: ``sampled_reverse_kl`` with ``loss.baseline=running`` (the default): stopgrad(f - b) * log q(x),
  b the running mean of f over earlier steps (decay ``loss.baseline_decay``, 0.9);
* ``exact``: ``loss.divergence=reverse_kl``: the full-vocabulary KL(q || p) at every position the student wrote
  (the same expected gradient, the expectation over x taken exactly: it needs the teacher's whole distribution).

Reported per run: the train log's per-token reverse KL on the student's samples (``div``: f for the sampled
objectives, an unbiased one-sample estimate; the exact KL for ``exact``) over the first and the last
``log.every`` steps, and, after training, the exact per-token KL(q || p) over the vocabulary on 4 fresh samples
of the student per training prompt (``final_exact``; the same for the untrained student: ``initial_exact``).

And why: the total variance (summed over the student's parameters) of one step's gradient, over
``--batches`` independent batches of 8 prompts with one sample each, for the untrained student and for the
``exact`` run's final student, of the recipe's per-token loss (:func:`distill.losses.kd_loss_per_token`):
plain (b = 0), with a baseline (b = the mean f of another, independent batch: what the running mean
estimates) and exact, with the distance of each estimator's mean gradient from the exact estimator's in
standard errors (all three estimate the same gradient); and, on batches of 2 prompts x 4 samples (as many
sequences), plain against a leave-one-out baseline (per token, the mean f of the prompt's 3 other samples at
the same position), the other unbiased baseline a teacher of sampled tokens allows.

    python benchmarks/sampled_rkl.py                          # seeds 0 1, lr 3e-3 and 1e-3, about 5 CPU minutes
    python benchmarks/sampled_rkl.py --out benchmarks/results/sampled_rkl.json    # the committed record

Runs on one intra-op thread (``--threads``); writes ``--out`` (default ``runs/benchmarks/sampled_rkl.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distill import training  # noqa: E402
from distill.checkpoint import atomic_write_json  # noqa: E402
from distill.config import ModelSpec, TrainConfig, load_config  # noqa: E402
from distill.data import build_datasets  # noqa: E402
from distill.generation.sampling import SamplingParams, row_seed, sample  # noqa: E402
from distill.losses import IGNORE_INDEX, LossSpec, kd_loss_per_token  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402
from distill.sources.onpolicy import example_prompt  # noqa: E402

CONFIG = ROOT / "configs" / "tiny" / "gkd.yaml"
# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/sampled_rkl.json
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "sampled_rkl.json"
METHODS = {  # method -> loss overrides
    "plain": ["loss.divergence=sampled_reverse_kl", "loss.baseline=none"],
    "running": ["loss.divergence=sampled_reverse_kl", "loss.baseline=running"],
    "exact": ["loss.divergence=reverse_kl"],
}
QUIET = ["log.progress=false", "eval.every=0", "checkpoint.every=0"]


def train_teacher(work: Path, steps: int, reuse: bool) -> Path:
    """The config's teacher architecture trained with cross-entropy on the config's data (no teacher)."""
    out = work / "teacher"
    if reuse and (out / "student" / "distill_summary.json").is_file():
        return out / "student"
    shutil.rmtree(out, ignore_errors=True)
    base = load_config(TrainConfig, CONFIG, [])
    cfg = load_config(TrainConfig, CONFIG, [
        f"out_dir={out}", "teacher=null", "train.batches=dataset", f"train.max_steps={steps}", "train.batch_size=16",
        "optim.lr=3e-3", "optim.warmup_steps=10", "log.every=100", *QUIET])
    cfg = cfg.model_copy(update={"student": base.teacher})  # the teacher's architecture and seed
    training.train(cfg)
    return out / "student"


def run_config(work: Path, teacher: Path, method: str, lr: float, seed: int, steps: int, log_every: int) -> TrainConfig:
    return load_config(TrainConfig, CONFIG, [
        f"out_dir={work / f'{method}_lr{lr:g}_seed{seed}'}", "teacher=null", f"teacher.path={teacher}",
        "train.batches.student_fraction=1", "train.batches.temperature=1", "loss.alpha=0",
        f"train.max_steps={steps}", f"optim.lr={lr}", f"train.seed={seed}", f"student.seed={seed + 1}",
        f"log.every={log_every}", *QUIET, *METHODS[method]])


def prompts_of(cfg: TrainConfig, tok) -> list[list[int]]:
    train_ds, _ = build_datasets(cfg.data, tok)
    return [example_prompt(ex, "gkd", tok.bos_token_id) for ex in train_ds]


def own_samples(student, tok, prompts: list[list[int]], max_new_tokens: int, tag: str) -> dict:
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, stop_ids=(tok.eos_token_id,))
    gen = sample(student, prompts, params, pad_id=tok.pad_token_id, seeds=[row_seed(tag, i) for i in range(len(prompts))],
                 model_logprobs=False)
    return gen.to_batch(tok.pad_token_id)


def logits_of(model, batch: dict, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (M, V) at the M positions that predict a completion token, and those tokens (M,)."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]
    return logits[mask].float(), labels[mask]


@torch.no_grad()
def exact_kl_on_own_samples(student, teacher, tok, prompts: list[list[int]], max_new_tokens: int, n: int = 4) -> float:
    """The mean over the student's written tokens of KL(q || p) over the vocabulary, n samples per prompt."""
    total, count = 0.0, 0
    for k in range(n):
        batch = own_samples(student, tok, prompts, max_new_tokens, f"final{k}")
        zs, _ = logits_of(student, batch, len(tok))
        zt, _ = logits_of(teacher, batch, len(tok))
        lq, lp = torch.log_softmax(zs.double(), -1), torch.log_softmax(zt.double(), -1)
        total += float((lq.exp() * (lq - lp)).sum())
        count += zs.shape[0]
    return total / count


def gradient_variance(student, teacher, tok, prompts: list[list[int]], max_new_tokens: int, batches: int,
                      seed: int) -> dict:
    """Per estimator: the total variance of one batch's gradient (8 prompts, one sample each), the norm of the
    mean gradient, and the distance of the mean from the exact estimator's mean in standard errors."""
    params = [p for p in student.parameters() if p.requires_grad]
    rng = random.Random(seed)
    grads: dict[str, list[torch.Tensor]] = {"plain": [], "baseline": [], "exact": [], "plain_2x4": [],
                                            "leave_one_out_2x4": []}
    previous_f = None
    for r in range(batches + 1):
        if r:  # 2 prompts x 4 samples (as many sequences): plain, and a leave-one-out mean per prompt and position
            idx = [i for i in rng.sample(range(len(prompts)), 2) for _ in range(4)]
            batch = own_samples(student, tok, [prompts[i] for i in idx], max_new_tokens, f"loo{seed}.{r}")
            mask = batch["labels"][:, 1:] != IGNORE_INDEX
            pos = (mask.cumsum(1) - 1)[mask]
            row = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
            zs, labels = logits_of(student, batch, len(tok))
            with torch.no_grad():
                zt, _ = logits_of(teacher, batch, len(tok))
            out = kd_loss_per_token(zs, labels, zt, LossSpec("sampled_reverse_kl"))
            f = out["div"]
            others = [(row // 4 == row[i] // 4) & (pos == pos[i]) & (row != row[i]) for i in range(len(f))]
            b = torch.stack([f[o].mean() if o.any() else f.new_zeros(()) for o in others])
            log_q = torch.log_softmax(zs, -1).gather(-1, labels[:, None])[:, 0]
            for name, loss in (("plain_2x4", out["loss"]), ("leave_one_out_2x4", out["loss"] - b * log_q)):
                g = torch.autograd.grad(loss.sum() / len(f), params, retain_graph=True)
                grads[name].append(torch.cat([x.reshape(-1) for x in g]).double())
        idx = rng.sample(range(len(prompts)), 8)
        batch = own_samples(student, tok, [prompts[i] for i in idx], max_new_tokens, f"var{seed}.{r}")
        zs, labels = logits_of(student, batch, len(tok))
        with torch.no_grad():
            zt, _ = logits_of(teacher, batch, len(tok))
        n = labels.shape[0]
        f = kd_loss_per_token(zs.detach(), labels, zt, LossSpec("sampled_reverse_kl"))["div"]
        if previous_f is not None:  # the baseline: the mean f of an independent batch (the one before)
            for name, spec in (("plain", LossSpec("sampled_reverse_kl")),
                               ("baseline", LossSpec("sampled_reverse_kl", baseline=float(previous_f.mean()))),
                               ("exact", LossSpec("reverse_kl"))):
                loss = kd_loss_per_token(zs, labels, zt, spec)["loss"].sum() / n
                g = torch.autograd.grad(loss, params, retain_graph=True)
                grads[name].append(torch.cat([x.reshape(-1) for x in g]).double())
        previous_f = f
    ref = torch.stack(grads["exact"]).mean(0)
    out = {}
    for name, gs in grads.items():
        stack = torch.stack(gs)
        mean = stack.mean(0)
        var = float(((stack - mean) ** 2).sum(1).mean())
        out[name] = {"total_variance": var, "mean_norm": float(mean.norm()),
                     "mean_minus_exact_in_standard_errors": float((mean - ref).norm()) / max((var / len(gs)) ** 0.5, 1e-30)}
    out["variance_ratio_plain_to_baseline"] = out["plain"]["total_variance"] / out["baseline"]["total_variance"]
    out["variance_ratio_plain_to_exact"] = out["plain"]["total_variance"] / out["exact"]["total_variance"]
    out["variance_ratio_plain_to_leave_one_out_2x4"] = (out["plain_2x4"]["total_variance"]
                                                        / out["leave_one_out_2x4"]["total_variance"])
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-3])
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--teacher-steps", type=int, default=800)
    p.add_argument("--batches", type=int, default=64, help="batches per gradient-variance estimate (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "sampled_rkl")
    p.add_argument("--reuse", action="store_true", help="keep a teacher already trained in --work")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("distill").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher_dir = train_teacher(args.work, args.teacher_steps, args.reuse)
    teacher_ce = [json.loads(line) for line in (teacher_dir.parent / "metrics.jsonl").read_text().splitlines()
                  if '"train"' in line][-1]["ce"]
    teacher = load_model(ModelSpec(path=str(teacher_dir)), "teacher").eval()

    runs, initial, variance = [], {}, {}
    for seed in args.seeds:
        for lr in args.lrs:
            for method in args.methods:
                cfg = run_config(args.work, teacher_dir, method, lr, seed, args.steps, args.log_every)
                shutil.rmtree(cfg.out_dir, ignore_errors=True)
                tok = load_tokenizer(cfg.student, "student")
                prompts = prompts_of(cfg, tok)
                if seed not in initial:
                    init = load_model(cfg.student, "student", tok).eval()
                    initial[seed] = exact_kl_on_own_samples(init, teacher, tok, prompts, cfg.train.batches.max_new_tokens)
                    if args.batches:
                        variance[f"seed{seed}_untrained"] = gradient_variance(
                            init, teacher, tok, prompts, cfg.train.batches.max_new_tokens, args.batches, seed)
                t0 = time.process_time()
                training.train(cfg)
                cpu = time.process_time() - t0
                recs = [r for r in map(json.loads, (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines())
                        if r["split"] == "train"]
                student = load_model(ModelSpec(path=str(Path(cfg.out_dir) / "student")), "student").eval()
                final = exact_kl_on_own_samples(student, teacher, tok, prompts, cfg.train.batches.max_new_tokens)
                if method == "exact" and args.batches and lr == args.lrs[0]:
                    variance[f"seed{seed}_trained_exact_lr{lr:g}"] = gradient_variance(
                        student, teacher, tok, prompts, cfg.train.batches.max_new_tokens, args.batches, seed)
                runs.append({"method": method, "lr": lr, "seed": seed, "div_start": recs[0]["div"],
                             "div_end": recs[-1]["div"], "div": [round(r["div"], 4) for r in recs],
                             "initial_exact": initial[seed], "final_exact": final, "cpu_seconds": round(cpu, 1)})
                print(f"{method:8s} lr {lr:g} seed {seed}: div {recs[0]['div']:.2f} -> {recs[-1]['div']:.2f}, "
                      f"exact {initial[seed]:.2f} -> {final:.2f} ({cpu:.0f} s CPU)", flush=True)

    summary = {}
    for method in args.methods:
        for lr in args.lrs:
            rs = [r for r in runs if r["method"] == method and r["lr"] == lr]
            summary[f"{method}_lr{lr:g}"] = {k: statistics.mean(r[k] for r in rs)
                                             for k in ("div_start", "div_end", "initial_exact", "final_exact")}
    record = {"config": str(CONFIG.relative_to(ROOT)), "steps": args.steps, "log_every": args.log_every,
              "student_fraction": 1.0, "teacher_steps": args.teacher_steps, "teacher_final_train_ce": teacher_ce,
              "seeds": args.seeds, "lrs": args.lrs, "runs": runs, "mean_over_seeds": summary,
              "gradient_variance": variance, "torch_threads": torch.get_num_threads(),
              "total_seconds": round(time.perf_counter() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    print(table(record))
    return record


def table(record: dict) -> str:
    lines = ["| objective | lr | logged per-token KL(q‖p), start → end | exact per-token KL on own samples, start → end |",
             "|---|---|---|---|"]
    for key, v in record["mean_over_seeds"].items():
        method, lr = key.rsplit("_lr", 1)
        lines.append(f"| {method} | {lr} | {v['div_start']:.2f} → {v['div_end']:.2f} | "
                     f"{v['initial_exact']:.2f} → {v['final_exact']:.2f} |")
    for name, v in record["gradient_variance"].items():
        lines.append(f"gradient variance, {name}: plain / baseline {v['variance_ratio_plain_to_baseline']:.1f}x, "
                     f"plain / exact {v['variance_ratio_plain_to_exact']:.0f}x, 2x4 plain / leave-one-out "
                     f"{v['variance_ratio_plain_to_leave_one_out_2x4']:.1f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
