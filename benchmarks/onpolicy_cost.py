"""What an on-policy step costs: a GKD step (lambda = 1) of the training run against its parts timed apart.

On the arithmetic task's `student32` preset (:mod:`distill.tasks.arithmetic`: teacher 148k parameters, student
29k, batches of 64 prompts, answers of 5 tokens), the training run (distill.training) runs GKD with lambda = 1 (every step's
completions are the student's samples, T = 1; generalized JSD, beta = 0.5) twice, for ``--steps`` and for
``--steps`` + ``--extra`` steps: the difference of the two runs' CPU time over ``--extra`` is the cost of one
step without the setup and the final save. Then, in the same process, on the run's final student, the parts
of one step are timed apart, round robin, medians of ``--reps``:

* ``generate``: :func:`distill.generation.sampling.sample` of the 64 prompts (KV cache, per-sample seeds);
* ``teacher``: the live teacher's signal for those sequences (its forward, no gradient);
* ``train``: the student's forward, the memory-efficient loss against that signal, backward and AdamW.

Reports the training run's step against the sum of the parts (target <= 1.1x) and where the time goes. Everything
is measured in CPU time of this process (one intra-op thread), which other jobs on the machine do not
change; the run's own wall-clock log (generation / teacher / rest per step) is reported beside it.

    python benchmarks/onpolicy_cost.py [--teacher DIR] [--steps 60] [--reps 20]

Writes ``--out`` (default ``runs/benchmarks/onpolicy_cost.json``; the committed record: ``--out benchmarks/results/onpolicy_cost.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
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
from distill.config import GkdBatches, ModelSpec  # noqa: E402
from distill.engines import LocalEngine  # noqa: E402
from distill.generation.sampling import SamplingParams, row_seed, sample  # noqa: E402
from distill.losses import IGNORE_INDEX  # noqa: E402
from distill.models import load_model, load_tokenizer, output_head  # noqa: E402
from distill.tasks import arithmetic  # noqa: E402
from distill.teachers.engine import EngineTeacher  # noqa: E402

# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/onpolicy_cost.json
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "onpolicy_cost.json"


class _Fixed:
    """A teacher whose signal was computed beforehand: the train part is timed without the teacher."""

    def __init__(self, signal):
        self._signal = signal

    def signal(self, batch):
        return self._signal


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, default=None, help="a trained arithmetic teacher (default: train one)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--extra", type=int, default=60, help="the second run's additional steps")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "onpolicy_cost")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    torch.set_num_threads(args.threads)
    preset = arithmetic.PRESETS["student32"]
    data_dir = args.work / "data"
    preset.write_data(data_dir)
    teacher_dir = args.teacher
    if teacher_dir is None:
        shutil.rmtree(args.work / "teacher", ignore_errors=True)
        training.train(arithmetic.ground_truth_config(preset, data_dir, args.work / "teacher", role="teacher"))
        teacher_dir = args.work / "teacher" / "student"
    answer_tokens = max(len(p.response) for p in arithmetic.read_problems(data_dir / "test.jsonl")) + 1

    # 1. The training run: GKD with lambda = 1, one log record per step, for two lengths.
    def gkd_run(name: str, steps: int):
        run_dir = args.work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = arithmetic.ground_truth_config(preset, data_dir, run_dir, role="student", steps=steps)
        cfg = cfg.model_copy(update={
            "teacher": ModelSpec(path=str(teacher_dir)),
            "loss": cfg.loss.model_copy(update={"divergence": "jsd", "beta": 0.5, "alpha": 0.0}),
            "train": cfg.train.model_copy(update={"batches": GkdBatches(student_fraction=1.0, temperature=1.0,
                                                                          max_new_tokens=answer_tokens)}),
            "log": cfg.log.model_copy(update={"every": 1}),
        })
        c0 = time.process_time()
        training.train(cfg)
        return cfg, run_dir, time.process_time() - c0

    gkd_run("gkd_warmup", 2)  # tokenized data cached, imports done: the two timed runs start alike
    _, _, cpu_short = gkd_run("gkd_short", args.steps)
    cfg, run_dir, cpu_long = gkd_run("gkd", args.steps + args.extra)
    step_cpu = (cpu_long - cpu_short) / args.extra
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    records = [r for r in records if r.get("split") == "train"][5:]  # the first steps warm up
    logged = {k: statistics.median(r[k] for r in records)
              for k in ("step_seconds", "gen_seconds", "teacher_seconds", "train_seconds")}

    # 2. The parts, apart, on the run's final student and the same teacher.
    tok = load_tokenizer(ModelSpec(path=str(run_dir / "student")), "student")
    student = load_model(ModelSpec(path=str(run_dir / "student")), "student")
    teacher = EngineTeacher(LocalEngine(load_model(ModelSpec(path=str(teacher_dir)), "teacher"), tok), "live")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    problems = arithmetic.read_problems(data_dir / "train.jsonl")[: preset.batch_size]
    prompts = [[tok.bos_token_id] + tok(pr.prompt, add_special_tokens=False)["input_ids"] for pr in problems]
    params = SamplingParams(temperature=1.0, max_new_tokens=answer_tokens, stop_ids=(tok.eos_token_id,))
    times: dict[str, list[float]] = {"generate": [], "teacher": [], "train": []}
    clock = time.process_time
    for rep in range(args.reps + 1):
        t0 = clock()
        gen = sample(student, prompts, params, pad_id=tok.pad_token_id,
                     seeds=[row_seed(rep, i) for i in range(len(prompts))])
        t1 = clock()
        batch = gen.to_batch(tok.pad_token_id)
        signal = teacher.signal(batch)
        t2 = clock()
        student.train()
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss, _ = training.kd_step_loss(student, lambda: output_head(student, len(tok)), _Fixed(signal), batch, tokens,
                                     cfg.loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = clock()
        if rep:  # the first round warms up
            for key, dt in (("generate", t1 - t0), ("teacher", t2 - t1), ("train", t3 - t2)):
                times[key].append(dt)
    parts = {k: statistics.median(v) for k, v in times.items()}
    total = sum(parts.values())
    record = {
        "preset": "student32", "student": preset.student, "teacher": preset.teacher, "batch": preset.batch_size, "answer_tokens": answer_tokens,
        "steps": [args.steps, args.steps + args.extra], "training_step_cpu_seconds": step_cpu,
        "training_wall_clock_median_seconds": logged, "parts_median_cpu_seconds": parts, "sum_of_parts": total,
        "ratio_step_to_parts": step_cpu / total,
        "share_of_parts": {k: v / total for k, v in parts.items()},
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    print(f"training step: {1e3 * step_cpu:.1f} ms CPU; its wall-clock log (median): {1e3 * logged['step_seconds']:.1f} "
          f"ms (generation {1e3 * logged['gen_seconds']:.1f}, teacher {1e3 * logged['teacher_seconds']:.1f}, "
          f"rest {1e3 * logged['train_seconds']:.1f})")
    print("parts apart (median CPU): " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in parts.items())
          + f"; sum {1e3 * total:.1f} ms")
    print(f"step / sum of parts: {record['ratio_step_to_parts']:.3f}")
    return record


if __name__ == "__main__":
    main()
