"""Prune, then distill: does a pruned teacher make a better student than random init, at the same steps and tokens?

On the quickstart corpus (the Python standard library's sources, its BPE tokenizer and its cached teacher:
:mod:`distill.commands.quickstart`), ``distill prune`` cuts the teacher to the quickstart student's sizes (fewer
layers, narrower embeddings and MLP; heads and their head_dim kept), then the same architecture is trained for
the same steps, batch, learning rate and tokens by each method, for every seed (the seed sets the data order
and, for random init, the weights):

* ``pruned_kd``: the pruned teacher, distilled from the teacher (forward KL at T = 1, alpha = 0: the
  quickstart's loss);
* ``pruned_ce``: the pruned teacher, cross-entropy only;
* ``random_kd``: the same architecture from random init, distilled from the teacher;
* ``random_ce``: the same architecture from random init, cross-entropy only (from scratch).

Then width against depth at one parameter count: ``depth_kd`` drops one layer of the teacher (layers ranked by
the loss increase when skipped), ``width_kd`` shrinks hidden_size and intermediate_size to the same parameter
count; both are distilled as above. Every model is evaluated on all validation files: loss, KL to the teacher,
top-1 agreement; the pruned checkpoints also before any training. The cost of pruning (importance + slicing)
is set against one forward pass over the calibration set. Writes ``--out`` (default ``runs/benchmarks/prune.json``; the committed record: ``--out benchmarks/results/prune.json``).

    python benchmarks/prune.py                          # fast quickstart preset, seeds 0 and 1 (~15 min, 1 core)
    python benchmarks/prune.py --preset default --seeds 0
    python benchmarks/prune.py --seeds 0 --steps 4 --samples 32 --out /tmp/prune.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distill import training  # noqa: E402
from distill.checkpoint import atomic_write_json  # noqa: E402
from distill.commands import prune as prune_recipe  # noqa: E402
from distill.commands import quickstart  # noqa: E402
from distill.config import DataConfig, ImportanceConfig, ModelSpec, PruneConfig, PruneTargetConfig  # noqa: E402

# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/prune.json
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "prune.json"
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
METRICS = ("val_loss", "kl_to_teacher", "top1_agreement")
log = logging.getLogger("distill")


def prune_to(name: str, work: Path, teacher_dir: Path, train_jsonl: Path, preset, target: dict,
             samples: int) -> tuple[Path, dict]:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = PruneConfig(out_dir=str(out), model=ModelSpec(path=str(teacher_dir)),
                      data=DataConfig(source=str(train_jsonl), seq_len=preset.seq_len, eval_fraction=0.0,
                                      format="text"),
                      target=PruneTargetConfig(**target), importance=ImportanceConfig(samples=samples, batch_size=16))
    return out, prune_recipe.main(cfg)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(quickstart.PRESETS), default="fast")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samples", type=int, default=512, help="calibration examples (the papers' range: 512-1024)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_prune")
    p.add_argument("--steps", type=int, default=None, help="student steps (default: the preset's; small = smoke run)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    log.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    preset = quickstart.PRESETS[args.preset]
    if args.steps:
        preset = replace(preset, student_steps=args.steps, eval_every=args.steps)
    work = args.work / args.preset
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    train_jsonl, val_jsonl, corpus_key = quickstart.write_corpus(work / "data", preset.max_files)
    tok_dir, teacher_dir, teacher_info = quickstart.get_teacher(preset, corpus_key, train_jsonl, val_jsonl)
    teacher_sizes = {k: preset.teacher[k] for k in SIZE_KEYS}
    student_sizes = {k: preset.student[k] for k in SIZE_KEYS}

    # 1. Prune: to the student's sizes; one layer fewer (depth); the same parameters by width.
    pruned_dir, pruned_report = prune_to("pruned", work, teacher_dir, train_jsonl, preset, student_sizes, args.samples)
    depth_dir, depth_report = prune_to("pruned_depth", work, teacher_dir, train_jsonl, preset,
                                       {"num_hidden_layers": teacher_sizes["num_hidden_layers"] - 1}, args.samples)
    depth_params = depth_report["plans"]["chosen"]["params"]
    width_dir, width_report = prune_to("pruned_width", work, teacher_dir, train_jsonl, preset,
                                       {"params": depth_params, "axes": ["hidden_size", "intermediate_size"]},
                                       args.samples)
    # The random-init students have the pruned architecture exactly (head_dim included): only the init differs.
    pruned_cfg = json.loads((pruned_dir / "config.json").read_text())
    arch = {**preset.student, "head_dim": pruned_cfg["head_dim"]}

    # 2. Train every method for the same steps and tokens.
    methods = {
        "pruned_kd": (pruned_dir, True), "pruned_ce": (pruned_dir, False),
        "random_kd": (None, True), "random_ce": (None, False),
        "depth_kd": (depth_dir, True), "width_kd": (width_dir, True),
    }
    students: dict[str, dict[int, Path]] = {m: {} for m in methods}
    runs: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for seed in args.seeds:
        for method, (init_dir, kd) in methods.items():
            name = f"{method}_seed{seed}"
            cfg = quickstart.run_config(preset, name, work, tok_dir, train_jsonl, val_jsonl, arch,
                                        preset.student_steps, preset.student_lr, teacher_dir if kd else None)
            student = (ModelSpec(path=str(init_dir)) if init_dir is not None
                       else ModelSpec(config=arch, tokenizer=str(tok_dir), seed=seed))
            cfg = cfg.model_copy(update={"student": student, "train": cfg.train.model_copy(update={"seed": seed})})
            shutil.rmtree(work / name, ignore_errors=True)
            t0 = time.perf_counter()
            runs[method][seed] = training.train(cfg)
            timings[name] = round(time.perf_counter() - t0, 1)
            students[method][seed] = work / name / "student"
            log.info("%s: %.1f s, val_loss %.4f", name, timings[name], runs[method][seed].get("val_loss", float("nan")))

    # 3. Evaluate on every validation file against the teacher.
    models = {"teacher": teacher_dir, "pruned_untrained": pruned_dir, "depth_untrained": depth_dir,
              "width_untrained": width_dir}
    models.update({f"{m}_seed{s}": d for m, by_seed in students.items() for s, d in by_seed.items()})
    t0 = time.perf_counter()
    evals = quickstart.evaluate_all(models, teacher_dir, tok_dir, val_jsonl, preset.seq_len)
    timings["evaluation"] = round(time.perf_counter() - t0, 1)

    def params(path: Path) -> int:
        from distill.models import count_parameters, load_model

        return count_parameters(load_model(ModelSpec(path=str(path)), "model"))

    def summary(method: str) -> dict:
        per_seed = {str(s): {k: evals[f"{method}_seed{s}"][k] for k in METRICS} for s in args.seeds}
        out = {"per_seed": per_seed, "steps": runs[method][args.seeds[0]]["steps"],
               "tokens": runs[method][args.seeds[0]]["tokens"], "params": params(students[method][args.seeds[0]])}
        for k in METRICS:
            values = [v[k] for v in per_seed.values()]
            out[k] = statistics.mean(values)
            out[f"{k}_spread"] = max(values) - min(values)
        return out

    def untrained(name: str, report: dict) -> dict:
        chosen = report["plans"]["chosen"]
        return {"sizes": chosen["sizes"], "params": chosen["params"], "calibration_loss": chosen["loss"],
                **{k: evals[name][k] for k in METRICS}}

    cost = pruned_report["seconds"]
    record = {
        "preset": args.preset, "seeds": args.seeds, "calibration_samples": args.samples,
        "teacher": {"sizes": teacher_sizes, "params": params(teacher_dir),
                    **{k: evals["teacher"][k] for k in ("val_loss",)}, "train_steps": teacher_info["steps"]},
        "student_arch": arch, "student_steps": preset.student_steps, "batch_size": preset.batch_size,
        "seq_len": preset.seq_len, "lr": preset.student_lr, "loss": preset.loss,
        "methods": {m: summary(m) for m in methods},
        "untrained": {"pruned": untrained("pruned_untrained", pruned_report),
                      "depth": untrained("depth_untrained", depth_report),
                      "width": untrained("width_untrained", width_report)},
        "prune_report_plans": {"pruned": pruned_report["plans"], "depth": depth_report["plans"]},
        "layer_importance": pruned_report["layer_importance"],
        "pruning_cost": {
            "forward_seconds": cost["forward"], "importance_activations_seconds": cost["importance_activations"],
            "importance_layer_loss_seconds": cost.get("importance_layer_loss"),
            "slicing_seconds": cost["slicing"], "importance_and_slicing_seconds": cost["importance_and_slicing"],
            "ratio_to_forward": cost["importance_and_slicing"] / cost["forward"],
            "calibration_tokens": pruned_report["calibration"]["tokens"],
        },
        "seconds": timings, "total_seconds": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    print(table(record))
    return record


def table(r: dict) -> str:
    lines = [f"teacher: val loss {r['teacher']['val_loss']:.3f} ({r['teacher']['params']:,} parameters); "
             f"students: {r['student_steps']} steps, seeds {r['seeds']}",
             "| method | params | val loss | KL to teacher | top-1 agreement |", "|---|---|---|---|---|"]
    for m, v in r["methods"].items():
        lines.append(f"| {m} | {v['params']:,} | {v['val_loss']:.3f} ± {v['val_loss_spread'] / 2:.3f} | "
                     f"{v['kl_to_teacher']:.3f} | {100 * v['top1_agreement']:.1f}% |")
    lines += ["", "| pruned, before training | params | calibration loss | val loss | KL to teacher |",
              "|---|---|---|---|---|"]
    for m, v in r["untrained"].items():
        lines.append(f"| {m} | {v['params']:,} | {v['calibration_loss']:.3f} | {v['val_loss']:.3f} | "
                     f"{v['kl_to_teacher']:.3f} |")
    c = r["pruning_cost"]
    lines += ["", f"pruning cost: importance + slicing {c['importance_and_slicing_seconds']:.2f} s = "
              f"{c['ratio_to_forward']:.1f} x one forward pass over the calibration set ({c['forward_seconds']:.2f} s, "
              f"{c['calibration_tokens']:,} tokens)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
