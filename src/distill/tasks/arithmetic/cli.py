"""The arithmetic task's command line: ``python -m distill.tasks.arithmetic prepare|score ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.config import ModelSpec, dump_config
from distill.models import load_model, load_tokenizer
from distill.tasks.arithmetic import PRESETS, VALID_FILE, exact_match, ground_truth_config, read_problems


def prepare(preset_name: str, out_dir: str | Path) -> dict[str, Path]:
    """The task's files for the command line: ``data/train.jsonl``, ``data/test.jsonl``, and ``teacher.yaml`` /
    ``student.yaml``, configs of ``distill train`` that train each on the ground truth (runs in ``out_dir``)."""
    if preset_name not in PRESETS:
        raise ValueError(f"preset={preset_name!r}: use one of {', '.join(sorted(PRESETS))}")
    preset, out = PRESETS[preset_name], Path(out_dir)
    train_path, test_path = preset.write_data(out / "data")
    paths = {"train": train_path, "test": test_path, "valid": train_path.parent / VALID_FILE}
    for role in ("teacher", "student"):
        cfg = ground_truth_config(preset, out / "data", out / f"{role}-run", role=role)
        cfg = cfg.model_copy(update={"log": cfg.log.model_copy(update={"progress": True})})
        dump_config(cfg, out / f"{role}.yaml")
        paths[role] = out / f"{role}.yaml"
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m distill.tasks.arithmetic",
        description="The arithmetic task: write its data and train configs, or score a model's exact answers.\n\n"
        "    python -m distill.tasks.arithmetic prepare runs/arith        # data/ + teacher.yaml + student.yaml\n"
        "    distill train runs/arith/teacher.yaml                          # the teacher on the ground truth\n"
        "    python -m distill.tasks.arithmetic score runs/arith/teacher-run/student runs/arith/data/test.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write data/{train,test,valid}.jsonl, teacher.yaml, student.yaml")
    prep.add_argument("out_dir")
    prep.add_argument("--preset", default="default", choices=sorted(PRESETS))
    score = sub.add_parser("score", help="exact-match accuracy of a model's greedy answers on a split")
    score.add_argument("model_dir")
    score.add_argument("problems", help="a split written by prepare (test.jsonl)")
    score.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            for name, path in prepare(args.preset, args.out_dir).items():
                print(f"{name}: {path}")
        else:
            spec = ModelSpec(path=args.model_dir)
            acc = exact_match(load_model(spec, "model_dir"), load_tokenizer(spec, "model_dir"),
                              read_problems(args.problems), args.batch_size)
            print(f"exact match: {100 * acc:.1f}% of {args.problems}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

