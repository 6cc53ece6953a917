"""Student quality from cached teacher targets vs the live teacher, on the quickstart corpus.

The same student (architecture, seed, steps, data order, forward KL at T=1, alpha=0) is trained from:

* ``live``: the teacher model itself on every batch (full KD);
* ``topk_renorm``: a top-k cache, the k probabilities renormalized to sum to 1 (what most tools store);
* ``topk_tail``: the same cache with the tail mass ``1 - sum(top-k)`` kept as one extra class;
* ``sampled``: N draws with replacement from the teacher, stored as ids + counts (unbiased);
* ``hybrid``: the teacher's most probable id(s) with their probabilities and ``ceil(n * tail)`` systematic draws
  from the rest (unbiased; one student per ``--hybrid-n``);
* ``scratch``: no teacher (plain cross-entropy), for reference.

Everything is built with the library (quickstart corpus, tokenizer and cached teacher; ``distill cache``;
the ``train`` recipe). Each student is evaluated on every validation file: loss, perplexity, expected
calibration error (15 bins of top-1 confidence), KL to the teacher and top-1 agreement. Writes
``--out`` (default ``runs/benchmarks/cache_quality.json``; the committed record: ``--out benchmarks/results/cache_quality.json``) and prints a table.

    python benchmarks/cache_quality.py                       # quickstart fast preset, 200 student steps
    python benchmarks/cache_quality.py --preset default --steps 250
    python benchmarks/cache_quality.py --preset default --steps 250 --signals live sampled --seed 1 --reuse \
        --out benchmarks/results/cache_quality_seed1.json   # another draw of the sampled targets
    python benchmarks/cache_quality.py --preset default --steps 250 --signals live hybrid --hybrid-n 8 16 32 \
        --seed 0 --reuse --out benchmarks/results/cache_quality_hybrid.json   # the hybrid's size/quality curve
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distill import training  # noqa: E402
from distill.checkpoint import atomic_write_json  # noqa: E402
from distill.commands import cache as cache_recipe  # noqa: E402
from distill.commands.quickstart import PRESETS, evaluate_all, get_teacher, run_config, write_corpus  # noqa: E402
from distill.config import CacheConfig, ModelSpec, TeacherCacheSpec  # noqa: E402

# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/cache_quality.json
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "cache_quality.json"
SIGNALS = ("scratch", "live", "topk_renorm", "topk_tail", "sampled", "hybrid")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="fast", help="quickstart preset (models, data)")
    p.add_argument("--steps", type=int, default=200, help="student steps (each run the same)")
    p.add_argument("--k", type=int, default=12, help="top-k: ids kept per token")
    p.add_argument("--n", type=int, default=50, help="sampled: draws per token")
    p.add_argument("--head", type=int, default=1, help="hybrid: ids kept with their probabilities")
    p.add_argument("--hybrid-n", type=int, nargs="+", default=[16], help="hybrid: draws at a tail of mass 1 (each a student)")
    p.add_argument("--signals", nargs="+", choices=SIGNALS, default=list(SIGNALS[:-1]), help="which students to train")
    p.add_argument("--seed", type=int, default=0, help="sampled, hybrid: seed of the draws")
    p.add_argument("--reuse", action="store_true", help="keep caches and students already complete in --work")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "cache_quality", help="corpus, caches, students")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")

    t_start = time.perf_counter()
    preset = replace(PRESETS[args.preset], student_steps=args.steps)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train_jsonl, val_jsonl, corpus_key = write_corpus(work / "data", preset.max_files)
    # The teacher is keyed by the preset's model and data settings; student_steps is not part of a teacher.
    tok_dir, teacher_dir, teacher_info = get_teacher(
        PRESETS[args.preset], corpus_key, train_jsonl, val_jsonl
    )

    def student_cfg(name: str, live_teacher: Path | None):
        return run_config(preset, name, work, tok_dir, train_jsonl, val_jsonl, preset.student,
                          preset.student_steps, preset.student_lr, live_teacher)

    # The caches cover the same training examples the students read (the data section of their config).
    data = student_cfg("scratch", None).data
    caches = {}
    suffix = f"_seed{args.seed}" if args.seed else ""
    wanted = [("topk", "topk", {"k": args.k}), ("sampled", "sampled", {"n": args.n, "seed": args.seed})]
    wanted += [(f"hybrid_n{n}", "hybrid", {"head": args.head, "n": n, "seed": args.seed}) for n in args.hybrid_n]
    for key, mode, params in wanted:
        if not any(name.startswith(mode) for name in args.signals):
            continue
        # the name of the cache and of the student trained from it (top-k's two students have their own)
        run = (f"hybrid_h{args.head}_n{params['n']}" if mode == "hybrid" else key) + (suffix if mode != "topk" else "")
        cache_dir = work / f"cache_{run}"
        if not args.reuse:
            shutil.rmtree(cache_dir, ignore_errors=True)
        cfg = CacheConfig(out_dir=str(cache_dir), teacher=ModelSpec(path=str(teacher_dir)), data=data,
                                       mode=mode, batch_size=16, **params)
        summary = cache_recipe.main(cfg)  # a complete cache with the same settings is kept as is
        caches[key] = {"dir": cache_dir, "run": run, "mode": mode, **params,
                       "bytes_per_token": summary["splits"]["train"]["bytes_per_token"],
                       "capture_seconds": summary["seconds"]}

    def signal(name: str):
        """None: no teacher; "live": the teacher model; else the cache spec the student trains from."""
        if name in ("scratch", "live"):
            return None if name == "scratch" else "live"
        key = "topk" if name.startswith("topk") else name
        return TeacherCacheSpec(cache=str(caches[key]["dir"]), topk_tail=name != "topk_renorm")

    names = [name for name in SIGNALS[:-1] if name in args.signals]
    if "hybrid" in args.signals:
        names += [f"hybrid_n{n}" for n in args.hybrid_n]
    variants = {name: signal(name) for name in names}
    runs, seconds, dirs = {}, {}, {}
    for name, signal in variants.items():
        run_name = caches[name]["run"] if name in caches else name
        cfg = student_cfg(run_name, teacher_dir if signal == "live" else None)
        if isinstance(signal, TeacherCacheSpec):
            cfg = cfg.model_copy(update={"teacher": signal})
        dirs[name] = Path(cfg.out_dir)
        done = dirs[name] / "student" / "distill_summary.json"  # the student directory is committed whole
        if args.reuse and done.is_file():
            runs[name], seconds[name] = json.loads(done.read_text()), None
            continue
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        t0 = time.perf_counter()
        runs[name] = training.train(cfg)
        seconds[name] = round(time.perf_counter() - t0, 1)

    paths = {"teacher": teacher_dir, **{name: dirs[name] / "student" for name in variants}}
    metrics = evaluate_all(paths, teacher_dir, tok_dir, val_jsonl, preset.seq_len)
    live_loss = metrics["live"]["val_loss"] if "live" in metrics else None
    records = []
    for name in ("teacher", *variants):
        m = metrics[name]
        rec = {"teacher_signal": name, **{k: m[k] for k in ("val_loss", "val_ppl", "val_ece", "kl_to_teacher",
                                                              "top1_agreement", "val_top1_accuracy")}}
        if name != "teacher":
            if live_loss is not None:
                rec["val_loss_vs_live"] = (m["val_loss"] - live_loss) / live_loss
            rec["steps"], rec["tokens"], rec["train_seconds"] = runs[name]["steps"], runs[name]["tokens"], seconds[name]
        if name.startswith("topk"):
            rec.update(mode="topk", k=args.k, bytes_per_token=caches["topk"]["bytes_per_token"])
        elif name == "sampled":
            rec.update(mode="sampled", n=args.n, seed=args.seed, bytes_per_token=caches["sampled"]["bytes_per_token"])
        elif name.startswith("hybrid"):
            rec.update(teacher_signal="hybrid", mode="hybrid", head=args.head, n=caches[name]["n"], seed=args.seed,
                       bytes_per_token=caches[name]["bytes_per_token"])
        records.append(rec)
    result = {
        "settings": {"preset": args.preset, **asdict(preset), "k": args.k, "n": args.n, "head": args.head,
                     "hybrid_n": args.hybrid_n,
                     "python": sys.version.split()[0], "seconds": round(time.perf_counter() - t_start, 1),
                     "teacher_steps": teacher_info["steps"]},
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)

    print(f"\n{'signal':<13}{'val loss':>9}{'vs live':>9}{'ppl':>9}{'ECE':>8}{'KL to T':>9}{'agree':>8}{'B/token':>9}")
    for r in records:
        vs = f"{r['val_loss_vs_live']:+.2%}" if "val_loss_vs_live" in r else "-"
        bpt = f"{r['bytes_per_token']:.1f}" if "bytes_per_token" in r else "-"
        label = f"hybrid n={r['n']}" if r["teacher_signal"] == "hybrid" else r["teacher_signal"]
        print(f"{label:<13}{r['val_loss']:>9.4f}{vs:>9}{r['val_ppl']:>9.2f}{r['val_ece']:>8.4f}"
              f"{r['kl_to_teacher']:>9.4f}{r['top1_agreement']:>8.3f}{bpt:>9}")
    print(f"\nwrote {args.out} ({result['settings']['seconds']:.0f} s)")
    return result


LABELS = {"scratch": "none (scratch)", "live": "live teacher (full KD)", "topk_renorm": "top-{k} renormalized",
          "topk_tail": "top-{k} + tail bucket", "sampled": "sampled N={n}", "hybrid": "hybrid, head {head}, n={n}"}


def tables(first: dict, *others: dict) -> str:
    """The docs' table from records of the same settings whose draws differ (``--seed 0``, ``--seed 1``, ...):
    every row of the first (its val loss, ECE, KL and agreement), and for the rows with draws (sampled, hybrid)
    each record's gap to its live run and their mean."""
    def key(r):
        return r["teacher_signal"], r.get("n"), r.get("head")

    seeds = [first, *others]
    by_key = [{key(r): r for r in rec["records"]} for rec in seeds]
    draw_seeds = " / ".join(str(next(r["seed"] for r in rec["records"] if "seed" in r)) for rec in seeds)
    lines = [f"| teacher signal | bytes/token | val loss | vs live (draw seeds {draw_seeds}) | vs live, mean | ECE | "
             "KL to teacher | "
             "top-1 agreement |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in first["records"]:
        if r["teacher_signal"] == "teacher":
            continue
        label = LABELS[r["teacher_signal"]].format(k=r.get("k"), n=r.get("n"), head=r.get("head"))
        bpt = f"{r['bytes_per_token']:.1f}" if "bytes_per_token" in r else "–"
        if r["teacher_signal"] == "live":
            gaps = mean = "–"
        elif r["teacher_signal"] in ("sampled", "hybrid"):
            values = [found[key(r)]["val_loss_vs_live"] for found in by_key]
            gaps = " / ".join(f"{v:+.2%}" for v in values)
            mean = f"{sum(values) / len(values):+.2%}"
        else:  # no draws: one student, whatever the seed
            gaps, mean = f"{r['val_loss_vs_live']:+.2%}", "–"
        lines.append(f"| {label} | {bpt} | {r['val_loss']:.3f} | {gaps} | {mean} | {r['val_ece']:.3f} | "
                     f"{r['kl_to_teacher']:.3f} | {r['top1_agreement']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
