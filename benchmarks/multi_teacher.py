"""Several teachers, hidden-state KD, co-distillation and self-distillation on the quickstart corpus.

The quickstart's corpus (the standard library's sources), tokenizer and teacher (the *strong* teacher,
cached by ``distill quickstart``) are reused; a *weak* teacher (narrower, fewer steps) is trained once here.
Then the same student (architecture, steps, batch, tokens, learning rate, seed) is trained by each method:

* ``strong``, ``weak``: one teacher (forward KL, alpha = 0, T = 1, the quickstart's loss);
* ``mix_probability``, ``mix_loss``: both teachers at weights 0.5 / 0.5, in probability space (the student
  matches the mixture) and in loss space (the mean of the two KLs);
* ``strong_hidden``: ``strong`` plus the hidden-state term (uniform layer map, learned projection, cosine,
  weight 1, and the final-state cosine at weight 1);
* ``plain`` (cross-entropy, no teacher) and ``self_ema`` (alpha = 0.5, the teacher is the moving average of
  the student's weights, decay 0.99, from step 10);
* ``codistill`` (the student and a peer of the same architecture with another seed, each distilling from
  the other from step 20 on; alpha = 0.5) against ``plain`` and ``plain_peer`` (the same two models trained
  independently with CE).

Every model is evaluated on all validation files against the strong teacher (val loss, KL to it, top-1
agreement); each run's peak resident memory is measured in its own process. Writes
``--out`` (default ``runs/benchmarks/multi_teacher.json``; the committed record: ``--out
benchmarks/results/multi_teacher.json``) and prints a table.

    taskset -c 1 python benchmarks/multi_teacher.py --fast --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

from distill import checkpoint as ckpt
from distill import training
from distill.commands import quickstart as qs
from distill.config import TrainConfig, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/multi_teacher.json
DEFAULT_OUT = REPO / "runs" / "benchmarks" / "multi_teacher.json"


def worker(cfg_path: str, result_path: str) -> None:
    """One training run in this process; writes its summary, wall time and peak RSS."""
    cfg = load_config(TrainConfig, cfg_path)
    t0 = time.perf_counter()
    summary = training.train(cfg)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(result_path).write_text(json.dumps({"summary": summary, "seconds": time.perf_counter() - t0,
                                             "peak_rss_mib": peak_kib / 1024}))


def run(cfg: TrainConfig, work: Path) -> dict:
    """Train ``cfg`` in a fresh process (so that its peak memory is its own); a finished run of the same
    config is reused."""
    cfg_path, result_path = work / f"{Path(cfg.out_dir).name}.yaml", work / f"{Path(cfg.out_dir).name}.result.json"
    new = work / f"{Path(cfg.out_dir).name}.new.yaml"
    dump_config(cfg, new)
    if result_path.is_file() and cfg_path.is_file() and cfg_path.read_text() == new.read_text():
        new.unlink()
        return json.loads(result_path.read_text())
    new.replace(cfg_path)
    result_path.unlink(missing_ok=True)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    res = subprocess.run([sys.executable, __file__, "--worker", str(cfg_path), str(result_path)], cwd=REPO,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"run {cfg.out_dir} failed:\n{res.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def member(path: Path, name: str, weight: float) -> dict:
    return {"path": str(path), "name": name, "weight": weight}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="the quickstart's fast preset (minutes on one core)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=None, help="student steps (default: the preset's)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these methods")
    ap.add_argument("--out-dir", default="runs/bench_multi_teacher", help="work directory of the runs")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON record (default: %(default)s)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    t_start = time.perf_counter()
    preset = qs.PRESETS["fast" if args.fast else "default"]
    steps = args.steps or preset.student_steps
    out = Path(args.out_dir)
    work = out / "configs"
    work.mkdir(parents=True, exist_ok=True)
    train_jsonl, val_jsonl, corpus_key = qs.write_corpus(out / "data", preset.max_files)
    tok_dir, strong_dir, strong_info = qs.get_teacher(preset, corpus_key, train_jsonl, val_jsonl)

    # The weak teacher: narrower and trained for a third of the strong one's steps.
    weak_dir = out / "weak_teacher"
    weak_arch = {**preset.teacher, "hidden_size": preset.teacher["hidden_size"] // 2,
                 "intermediate_size": preset.teacher["intermediate_size"] // 2}
    if not (weak_dir / "config.json").is_file():
        cfg = qs.run_config(preset, "weak_run", out, tok_dir, train_jsonl, val_jsonl, weak_arch,
                            preset.teacher_steps // 3, preset.teacher_lr, None)
        run(cfg, work)
        ckpt.commit_dir(Path(cfg.out_dir) / "student", weak_dir)

    def base(name: str, seed: int, teacher, **loss) -> TrainConfig:
        cfg = qs.run_config(replace(preset, loss={**preset.loss, **loss}), f"{name}_s{seed}", out, tok_dir,
                            train_jsonl, val_jsonl, preset.student, steps, preset.student_lr, None)
        tree = cfg.model_dump()
        tree["student"]["seed"] = seed
        tree["train"]["seed"] = seed
        tree["teacher"] = teacher
        return TrainConfig.model_validate(tree)

    strong, weak = {"path": str(strong_dir)}, {"path": str(weak_dir)}
    both = [member(strong_dir, "strong", 0.5), member(weak_dir, "weak", 0.5)]
    hidden = {"weight": 1.0, "distance": "cosine", "layers": "uniform", "projection": "auto", "final_weight": 1.0}
    peer_arch = dict(preset.student)
    methods = {
        "strong": lambda s: base("strong", s, strong),
        "weak": lambda s: base("weak", s, weak),
        "mix_probability": lambda s: base("mix_probability", s, {"teachers": both, "mix": "probability"}),
        "mix_loss": lambda s: base("mix_loss", s, {"teachers": both, "mix": "loss"}),
        "strong_hidden": lambda s: base("strong_hidden", s, strong, hidden=hidden),
        "plain": lambda s: base("plain", s, None),
        "self_ema": lambda s: base("self_ema", s, {"self": "ema", "decay": 0.99, "start": 10}, alpha=0.5),
        "plain_peer": lambda s: base("plain_peer", s + 100, None),
        "codistill": lambda s: base("codistill", s, {"peers": [{"config": peer_arch, "tokenizer": str(tok_dir),
                                                                  "seed": s + 100}], "burn_in": 20}, alpha=0.5),
    }
    chosen = args.only or list(methods)
    results: dict = {}
    for seed in args.seeds:
        for name in chosen:
            try:
                cfg = methods[name](seed)
            except Exception as exc:  # a method this version does not have (e.g. no co-distillation)
                print(f"skipping {name}: {exc}", file=sys.stderr)
                continue
            print(f"seed {seed}: {name}", file=sys.stderr, flush=True)
            got = run(cfg, work)
            models = {name: Path(cfg.out_dir) / "student"}
            if name == "codistill":
                models["codistill_peer"] = Path(cfg.out_dir) / "peers" / "peer0"
            metrics = qs.evaluate_all(models, strong_dir, tok_dir, val_jsonl, preset.seq_len)
            for label, m in metrics.items():
                label = label if name != "plain_peer" else "plain_peer"
                results.setdefault(label, {})[str(seed)] = {
                    "val_loss": m["val_loss"], "kl_to_strong": m["kl_to_teacher"],
                    "agreement_with_strong": m["top1_agreement"], "train_seconds": round(got["seconds"], 1),
                    "peak_rss_mib": round(got["peak_rss_mib"], 1), "steps": got["summary"]["steps"],
                    "tokens": got["summary"]["tokens"]}
    teachers = qs.evaluate_all({"strong_teacher": strong_dir, "weak_teacher": weak_dir}, strong_dir, tok_dir,
                               val_jsonl, preset.seq_len)
    table = {}
    for label, per_seed in results.items():
        row = {}
        for key in ("val_loss", "kl_to_strong", "agreement_with_strong", "peak_rss_mib", "train_seconds"):
            values = [r[key] for r in per_seed.values()]
            row[key] = statistics.mean(values)
            if len(values) > 1:
                row[f"{key}_std"] = statistics.stdev(values)
        table[label] = row
    payload = {
        "preset": "fast" if args.fast else "default", "student_steps": steps, "seeds": args.seeds,
        "student": preset.student, "strong_teacher_arch": preset.teacher, "weak_teacher_arch": weak_arch,
        "weak_teacher_steps": preset.teacher_steps // 3, "strong_teacher_steps": strong_info["steps"],
        "teachers": {k: {"val_loss": v["val_loss"], "kl_to_strong": v["kl_to_teacher"],
                         "agreement_with_strong": v["top1_agreement"]} for k, v in teachers.items()},
        "mean": table, "runs": results, "seconds": round(time.perf_counter() - t_start, 1),
        "python": sys.version.split()[0],
    }
    if args.out.is_file() and args.only:  # a partial run adds to the results already there
        old = json.loads(args.out.read_text())
        for key in ("mean", "runs"):
            payload[key] = {**old.get(key, {}), **payload[key]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(args.out, payload)
    print(yaml.safe_dump(payload["mean"], sort_keys=False))


if __name__ == "__main__":
    main()
