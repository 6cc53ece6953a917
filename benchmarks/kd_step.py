"""What a distillation step costs over the plain steps it is made of, through the train recipe's own seam.

On the quickstart's teacher and student (the ``default`` preset: a 2.4M-parameter Llama teacher, a 0.6M
student, V = 4096, 16 blocks of 256 tokens per step), one process measures, on the same batches, round
robin so that drift hits every variant alike:

* ``ce``: a plain cross-entropy step of the student (forward, chunked CE, backward, AdamW step);
* ``teacher_forward``: a no-grad forward of the teacher (its logits included);
* ``live``: a KD step from the live teacher (forward KL, alpha = 0): ``train.kd_step_loss`` with a
  teacher over a :class:`distill.engines.LocalEngine`, backward, AdamW step;
* ``topk_tail``: a KD step from a top-k + tail cache (k = 64, ``distill cache``), through
  :class:`distill.teachers.CachedTeacher`, which reads, checks and decodes the next batch's targets on its
  helper thread while this step runs (``prefetch``, as the training run does; the first batch's before it);
* ``sampled``: the same from a sampled cache (N = 50).

Ratios: ``live / (ce + teacher_forward)`` (the physical bound is 1.0) and ``cache / ce``. For each cached step
the extra over a CE step is recorded, and the teacher's decoding alone (``teacher.signal`` on the same batch
again, inline: read + hash check + decode), which the step itself no longer waits for.

``--autograd`` also runs ``ce``, ``live``, ``topk_tail`` and ``sampled`` with every loss chunk on the autograd path
(:func:`distill.losses.fused.disabled`: the per-position loss and autograd instead of the closed-form forward KL
and CE), each with its own student (and cached teacher), in the same rounds: ``autograd`` in the record.

    python benchmarks/kd_step.py            # trains the quickstart teacher first if $DISTILL_CACHE lacks it
    python benchmarks/kd_step.py --quick    # the fast preset (smaller models), fewer repetitions
    python benchmarks/kd_step.py --autograd # beside the same steps on the autograd path
    python benchmarks/kd_step.py --profile --reps 8 --out benchmarks/results/kd_step_profile.json  # per op

Writes ``--out`` (default ``runs/benchmarks/kd_step.json``; the committed record: ``--out benchmarks/results/kd_step.json``): per variant the median and quartiles of the step
time over ``--reps`` rounds (after ``--warmup`` rounds), and the CPU share the process got.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distill.checkpoint import atomic_write_json  # noqa: E402
from distill.commands import cache as cache_recipe  # noqa: E402
from distill.commands.quickstart import PRESETS, get_teacher, write_corpus  # noqa: E402
from distill.config import CacheConfig, DataConfig, LossConfig, ModelSpec, TeacherCacheSpec  # noqa: E402
from distill.data import build_datasets, collate  # noqa: E402
from distill.engines import LocalEngine  # noqa: E402
from distill.losses import fused  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402
from distill.teachers.cached import CachedTeacher  # noqa: E402
from distill.teachers.engine import EngineTeacher  # noqa: E402
from distill.training import kd_step_loss  # noqa: E402

# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/kd_step.json
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "kd_step.json"
VARIANTS = ("ce", "teacher_forward", "live", "topk_tail", "sampled")
AUTOGRAD = ("ce", "live", "topk_tail", "sampled")  # --autograd: these again, as "<name>_autograd"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fast preset, 6 rounds")
    p.add_argument("--reps", type=int, default=None, help="measured rounds (default 20; 6 with --quick)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--autograd", action="store_true",
                   help="also the same steps with every loss chunk on the autograd path, in the same rounds")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: each op's self CPU time per step (torch.profiler) and where each KD "
                        "step's extra over its parts goes, per op")
    p.add_argument("--no-prefetch", action="store_true",
                   help="decode each cached batch when its step asks (what the helper thread saves, by difference)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "kd_step")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("distill").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (6 if args.quick else 20)
    preset_name = "fast" if args.quick else "default"
    preset = PRESETS[preset_name]

    # The quickstart's corpus, tokenizer and teacher (trained once, cached in $DISTILL_CACHE).
    work = args.work
    train_jsonl, val_jsonl, corpus_key = write_corpus(work / "data", preset.max_files)
    tok_dir, teacher_dir, _ = get_teacher(preset, corpus_key, train_jsonl, val_jsonl)
    tokenizer = load_tokenizer(ModelSpec(path=str(tok_dir)), "tokenizer")
    rounds = args.warmup + reps
    data = DataConfig(source=str(train_jsonl), seq_len=preset.seq_len, eval_fraction=0.0, format="text",
                      max_examples=max(8, rounds * preset.batch_size // 4))
    dataset, _ = build_datasets(data, tokenizer)
    if len(dataset) < rounds * preset.batch_size:
        raise SystemExit(f"only {len(dataset)} blocks for {rounds} rounds of {preset.batch_size}; raise max_examples")
    batches = []
    for r in range(rounds):
        idx = list(range(r * preset.batch_size, (r + 1) * preset.batch_size))
        batches.append({**collate([dataset[i] for i in idx], tokenizer.pad_token_id), "index": idx, "split": "train"})

    # The caches of exactly these examples.
    spec = LossConfig(divergence="forward_kl", temperature=1.0, alpha=0.0)
    caches = {}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for name, mode, extra in (("topk_tail", "topk", {"k": args.k}), ("sampled", "sampled", {"n": args.n})):
            cfg = CacheConfig(out_dir=str(Path(tmp) / name), teacher=ModelSpec(path=str(teacher_dir)), data=data,
                              mode=mode, splits=["train"], batch_size=16, progress=False, **extra)
            summary = cache_recipe.main(cfg)
            for key in (name, f"{name}_autograd") if args.autograd else (name,):  # one helper thread each
                teacher = CachedTeacher(TeacherCacheSpec(cache=cfg.out_dir), tokenizer, spec.spec(), preset.seq_len,
                                        "cpu")
                teacher.check_data(dataset, None)
                caches[key] = (teacher, summary["splits"]["train"]["bytes_per_token"])
        if args.profile:
            result = profile_ops(preset, tokenizer, teacher_dir, caches, batches, spec, args.warmup,
                                 prefetch=not args.no_prefetch)
        else:
            result = measure(preset, tokenizer, teacher_dir, caches, batches, spec, args.warmup,
                             prefetch=not args.no_prefetch, autograd=args.autograd)
    result.update(
        prefetch=not args.no_prefetch,
        preset=preset_name,
        batch_size=preset.batch_size,
        seq_len=preset.seq_len,
        vocab_size=len(tokenizer),
        reps=reps,
        warmup=args.warmup,
        k=args.k,
        n=args.n,
        cache_bytes_per_token={name: c[1] for name, c in caches.items() if not name.endswith("_autograd")},
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(json.dumps(result["extra_ms_per_step"], indent=1) if args.profile else table(result))
    return result


def measure(preset, tokenizer, teacher_dir: Path, caches: dict, batches: list[dict], loss: LossConfig,
            warmup: int, prefetch: bool = True, autograd: bool = False) -> dict:
    variants = VARIANTS + tuple(f"{v}_autograd" for v in AUTOGRAD if autograd)
    step = Steps(preset, tokenizer, teacher_dir, caches, batches, loss, variants, prefetch)
    teachers = step.teachers

    times: dict[str, list[float]] = {v: [] for v in variants}
    signal_times: dict[str, list[float]] = {"topk_tail": [], "sampled": []}
    cpu0, wall0 = process_cpu(), time.perf_counter()
    for r, batch in enumerate(batches):
        for variant in variants:
            t0 = time.perf_counter()
            step(variant, r)
            dt = time.perf_counter() - t0
            if variant in signal_times:  # the cached teacher's part alone, on the same batch
                t1 = time.perf_counter()
                teachers[variant].signal(batch)
                st = time.perf_counter() - t1
            if r >= warmup:
                times[variant].append(dt)
                if variant in signal_times:
                    signal_times[variant].append(st)
    cpu_share = (process_cpu() - cpu0) / (time.perf_counter() - wall0) / torch.get_num_threads()

    med = {v: statistics.median(t) for v, t in times.items()}
    out = {
        "seconds": {v: summarize(t) for v, t in times.items()},
        "signal_seconds": {v: summarize(t) for v, t in signal_times.items()},
        **ratios(med),
        "cpu_share": round(cpu_share, 3),
        "tokens_per_step": int(sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)),
    }
    if autograd:
        out["autograd"] = ratios({v: med[f"{v}_autograd"] for v in AUTOGRAD} | {"teacher_forward": med["teacher_forward"]})
    for v in ("topk_tail", "sampled"):
        sig = statistics.median(signal_times[v])
        # The signal is decoded ahead on the helper thread (its time measured again here, inline): the step's
        # extra over a CE step is what is left on the training thread.
        out[f"{v}_breakdown"] = {"signal": sig, "extra_over_ce": med[v] - med["ce"]}
    return out


class Steps:
    """One step of each variant on round ``r``'s batch: ``steps(variant, r)``. Each KD and CE variant has its own
    student (same initialization) and optimizer; a cached variant prefetches the next round's targets."""

    def __init__(self, preset, tokenizer, teacher_dir: Path, caches: dict, batches: list[dict], loss: LossConfig,
                 variants: tuple[str, ...], prefetch: bool):
        self.vocab = vocab = len(tokenizer)
        self.teacher = EngineTeacher(
            LocalEngine(load_model(ModelSpec(path=str(teacher_dir)), "teacher"), vocab_size=vocab), "live")
        self.students = {}
        for name in variants:
            if name == "teacher_forward":
                continue
            model = load_model(ModelSpec(config=preset.student, tokenizer=str(teacher_dir), seed=0), "student",
                               tokenizer)
            self.students[name] = (model.train(), torch.optim.AdamW(model.parameters(), lr=1e-3))
        self.teachers = {"ce": None, "live": self.teacher, **{name: c[0] for name, c in caches.items()}}
        self.teachers.update({f"{v}_autograd": self.teachers[v] for v in ("ce", "live")})
        self.cached = [v for v in variants if v.removesuffix("_autograd") in ("topk_tail", "sampled")]
        self.batches, self.loss, self.ce_loss, self.prefetch = batches, loss, replace_loss(loss), prefetch

    def __call__(self, variant: str, r: int) -> None:
        batch, batches = self.batches[r], self.batches
        if variant == "teacher_forward":
            with torch.no_grad():
                self.teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return
        n = int((batch["labels"][:, 1:] != -100).sum())
        model, opt = self.students[variant]
        if self.prefetch and variant in self.cached:  # as the training run: the next batch decoded meanwhile
            for ahead in batches[r:r + 2] if r == 0 else batches[r + 1:r + 2]:
                self.teachers[variant].prefetch(ahead)
        with fused.disabled() if variant.endswith("_autograd") else contextlib.nullcontext():
            loss_value, _ = kd_step_loss(model, _head_fn(model, self.vocab), self.teachers[variant], batch, n,
                                         self.ce_loss if variant.startswith("ce") else self.loss)
            loss_value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def profile_ops(preset, tokenizer, teacher_dir: Path, caches: dict, batches: list[dict], loss: LossConfig,
                warmup: int, prefetch: bool = True) -> dict:
    """Self CPU time per step of each op (torch.profiler, one step at a time, round robin) in each variant, and
    where a KD step's extra over its parts goes: ``live - ce - teacher_forward`` and ``<cache> - ce`` per op (ops of 0.5 ms or more; the rest summed
    as ``other``). ``_ChunkedKD``'s own time is the chunk loop's Python between ops."""
    from torch.profiler import ProfilerActivity, profile

    step = Steps(preset, tokenizer, teacher_dir, caches, batches, loss, VARIANTS, prefetch)
    per_step: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
    steps = len(batches) - warmup
    for r in range(len(batches)):  # round robin, as the timing: drift hits every variant alike
        for variant in VARIANTS:
            if r < warmup:
                step(variant, r)
                continue
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(variant, r)
            ops = per_step[variant]
            for e in prof.key_averages():
                ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1000.0 / steps

    def diff(variant: str, minus: tuple[str, ...]) -> dict[str, float]:
        keys = set(per_step[variant]).union(*(per_step[m] for m in minus))
        d = {k: per_step[variant].get(k, 0.0) - sum(per_step[m].get(k, 0.0) for m in minus) for k in keys}
        big = {k: round(v, 2) for k, v in sorted(d.items(), key=lambda kv: -abs(kv[1])) if abs(v) >= 0.5}
        big["other"] = round(sum(v for k, v in d.items() if k not in big), 2)
        big["total"] = round(sum(d.values()), 2)
        return big

    return {
        "profile_ms_per_step": {v: round(sum(ops.values()), 2) for v, ops in per_step.items()},
        "extra_ms_per_step": {"live": diff("live", ("ce", "teacher_forward")),
                              "topk_tail": diff("topk_tail", ("ce",)), "sampled": diff("sampled", ("ce",))},
        "profiled_steps": len(batches) - warmup,
    }


def ratios(med: dict) -> dict:
    """The ratios of the record from the variants' median step times."""
    return {
        "live_vs_ce_plus_teacher_forward": med["live"] / (med["ce"] + med["teacher_forward"]),
        "topk_tail_vs_ce": med["topk_tail"] / med["ce"],
        "sampled_vs_ce": med["sampled"] / med["ce"],
    }


def replace_loss(loss: LossConfig) -> LossConfig:
    """The same loss settings with alpha = 1: the plain cross-entropy step (the teacher is None there)."""
    return loss.model_copy(update={"alpha": 1.0})


def _head_fn(model, vocab: int):
    from distill.models import output_head

    return lambda: output_head(model, vocab)


def summarize(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median": statistics.median(ts), "q1": q[0], "q3": q[2], "n": len(ts)}


def process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def table(r: dict) -> str:
    s = r["seconds"]
    ag = r.get("autograd")
    lines = [f"quickstart {r['preset']} preset, {r['tokens_per_step']} tokens/step, V={r['vocab_size']}, "
             f"{r['threads']} threads, CPU share {r['cpu_share']:.2f}",
             "| step | median s | vs |" + (" autograd path: median s | vs |" if ag else ""),
             "| --- | --- | --- |" + (" --- | --- |" if ag else "")]

    def row(name: str, label: str, ratio: str | None) -> str:
        line = f"| {label} | {s[name]['median']:.3f} | {ratio if ratio else '–'} |"
        if ag and f"{name}_autograd" in s:
            key = {"ce": None, "live": "live_vs_ce_plus_teacher_forward"}.get(name, f"{name}_vs_ce")
            line += f" {s[name + '_autograd']['median']:.3f} | {'1.00' if key is None else f'{ag[key]:.3f}'} |"
        elif ag:
            line += " – | – |"
        return line

    lines.append(row("ce", "ce", "1.00"))
    lines.append(row("teacher_forward", "teacher forward (no grad)", None))
    lines.append(row("live", "live KD", f"{r['live_vs_ce_plus_teacher_forward']:.3f} x (ce + teacher)"))
    for v in ("topk_tail", "sampled"):
        b = r[f"{v}_breakdown"]
        lines.append(row(v, f"{v} cache KD", f"{r[f'{v}_vs_ce']:.3f} x ce (extra {b['extra_over_ce']:+.3f} s; "
                                             f"decoding, ahead: {b['signal']:.3f} s)"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
