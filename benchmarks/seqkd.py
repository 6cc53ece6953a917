"""Sequence-level distillation on the arithmetic task: which training signal makes the best small student?

On the task of :mod:`distill.tasks.arithmetic` (exact answers, every digit must be right), a teacher is
trained on the ground truth, then the same student (architecture, steps, batch, learning rate) is trained
for the same number of steps by each method, for every seed (the seed sets the student's init and data
order; the teacher and its samples are shared):

* ``ce_ground_truth``: cross-entropy on the ground-truth answers;
* ``token_kd_ground_truth``: the same data with the teacher's token-level distribution on top
  (``alpha * CE + (1 - alpha) * KL(p || q)``, alpha = 0.5, T = 1);
* ``seq_kd``: cross-entropy on the teacher's own answers, one sample per training prompt at T = 1
  (``distill generate``, n = 1, unfinished samples dropped);
* ``seq_kd_best_of_n``: the best of N teacher samples per prompt by the task's verifier (``distill
  generate`` with ``scorer: verifier``);
* ``seq_kd_plus_token_kd``: ``seq_kd``'s data with the teacher's token-level distribution on top (Kim &
  Rush's best combination);

and the on-policy batch sources (``train.batches``), on the ground-truth prompts, with the student sampling
at T = 1 and the teacher scoring every token (alpha = 0: the divergence alone):

* ``supervised_jsd``: generalized JSD (beta = 0.5) on the ground-truth answers (GKD with lambda = 0, the
  control for the GKD runs);
* ``gkd_lambda{0.5,1.0}_beta{0.1,0.5,0.9}``: GKD, each step the student's samples with probability lambda
  (else the ground truth), generalized JSD(beta);
* ``on_policy_sampled_rkl``: lambda = 1 with the sampled-token reverse KL, log q(x) - log p(x) on the
  student's own tokens (MiniLLM-style policy gradient without its extra terms), no baseline;
* ``on_policy_sampled_rkl_baseline``: the same with its running-mean baseline (``loss.baseline: running``);
* ``on_policy_reverse_kl``: lambda = 1 with the exact per-token reverse KL over the vocabulary, the objective
  whose gradient the sampled-token estimate has in expectation;
* ``skd_k1``, ``skd_k5``: the student proposes, the teacher replaces any token outside its top-K with a
  sample of its own (forward KL);
* ``distillm``: DistiLLM's adaptive schedule with its replay buffer and skew reverse KL (skew 0.1),
  evaluated every 100 steps (the schedule reads the eval loss);

and representation distillation on the ground truth (``loss.hidden``: 1 - cos between the student's layer-1
output, through a learned linear map, and the teacher's, at every answer position, weight 1):

* ``hidden_ce``: cross-entropy plus that term;
* ``hidden_token_kd``: ``token_kd_ground_truth`` plus that term.

Each student is scored by exact-match accuracy (greedy decoding) on the held-out problems, as is the
teacher, and by the teacher's per-token reverse KL on the student's own samples (T = 1) of the held-out
prompts: KL(q || p) over the vocabulary at each position the student wrote, averaged. Writes ``--out`` (default ``runs/benchmarks/seqkd.json``; the committed record: ``--out benchmarks/results/seqkd.json``) and prints a table.

    python benchmarks/seqkd.py                      # default preset, seeds 0, 1, 2, every method
    python benchmarks/seqkd.py --preset tiny --seeds 0 --n 2    # seconds: a smoke run
    python benchmarks/seqkd.py --seeds 0 --out a.json & python benchmarks/seqkd.py --seeds 1 --work runs/seqkd1 --out b.json
    python benchmarks/seqkd.py --combine a.json b.json     # one record (and table) of both runs' seeds
"""

from __future__ import annotations

import argparse
import json
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
from distill.commands import generate  # noqa: E402
from distill.config import GenerateConfig, ModelSpec, PromptsConfig, SamplingConfig  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402
from distill.tasks import arithmetic  # noqa: E402

# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/seqkd.json
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "seqkd.json"
SEQUENCE_METHODS = ("ce_ground_truth", "token_kd_ground_truth", "seq_kd", "seq_kd_best_of_n", "seq_kd_plus_token_kd")
# method -> (train.batches, loss settings, the source's settings): the methods with a live teacher in the loop
JSD = {"divergence": "jsd", "alpha": 0.0}
TEACHER_METHODS = {
    "supervised_jsd": ("dataset", {**JSD, "beta": 0.5}, {}),
    **{f"gkd_lambda{lam}_beta{beta}": ("gkd", {**JSD, "beta": beta}, {"student_fraction": lam})
       for lam in (0.5, 1.0) for beta in (0.1, 0.5, 0.9)},
    "on_policy_sampled_rkl": ("gkd", {"divergence": "sampled_reverse_kl", "alpha": 0.0, "baseline": "none"},
                              {"student_fraction": 1.0}),
    "on_policy_sampled_rkl_baseline": ("gkd", {"divergence": "sampled_reverse_kl", "alpha": 0.0, "baseline": "running",
                                               "baseline_decay": 0.9}, {"student_fraction": 1.0}),
    "on_policy_reverse_kl": ("gkd", {"divergence": "reverse_kl", "alpha": 0.0}, {"student_fraction": 1.0}),
    "skd_k1": ("skd", {"divergence": "forward_kl", "alpha": 0.0}, {"skd_top_k": 1}),
    "skd_k5": ("skd", {"divergence": "forward_kl", "alpha": 0.0}, {"skd_top_k": 5}),
    "distillm": ("distillm", {"divergence": "skew_reverse_kl", "skew": 0.1, "alpha": 0.0}, {}),
    "hidden_ce": ("dataset", {"alpha": 1.0, "hidden": {"weight": 1.0}}, {}),
    "hidden_token_kd": ("dataset", {"divergence": "forward_kl", "alpha": 0.5, "hidden": {"weight": 1.0}}, {}),
}
METHODS = SEQUENCE_METHODS + tuple(TEACHER_METHODS)


def accuracy(model_dir: Path, problems) -> float:
    spec = ModelSpec(path=str(model_dir))
    return arithmetic.exact_match(load_model(spec, "model"), load_tokenizer(spec, "model"), problems, batch_size=256)


@torch.no_grad()
def reverse_kl_on_own_samples(student_dir: Path, teacher_dir: Path, problems, seed: int = 0) -> float:
    """Mean over the student's written tokens of KL(q || p) (student q, teacher p, full vocabulary), on one
    sample (T = 1) of the student per held-out prompt."""
    from distill.generation.sampling import SamplingParams, row_seed, sample
    from distill.losses import IGNORE_INDEX

    spec = ModelSpec(path=str(student_dir))
    student, tok = load_model(spec, "student").eval(), load_tokenizer(spec, "student")
    teacher = load_model(ModelSpec(path=str(teacher_dir)), "teacher").eval()
    prompts = [[tok.bos_token_id] + tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    params = SamplingParams(temperature=1.0, max_new_tokens=max(len(p.response) for p in problems) + 1,
                            stop_ids=(tok.eos_token_id,))
    total, count = 0.0, 0
    for start in range(0, len(prompts), 256):
        chunk = prompts[start : start + 256]
        gen = sample(student, chunk, params, pad_id=tok.pad_token_id,
                     seeds=[row_seed(seed, "rkl", start + i) for i in range(len(chunk))], model_logprobs=False)
        batch = gen.to_batch(tok.pad_token_id)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        lq, lp = (torch.log_softmax(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                    .logits[:, :-1][mask].double(), -1) for m in (student, teacher))
        total += float((lq.exp() * (lq - lp)).sum())
        count += int(mask.sum())
    return total / count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(arithmetic.PRESETS), default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=4, help="samples per prompt for best-of-N")
    p.add_argument("--temperature", type=float, default=1.0, help="the teacher's sampling temperature")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "seqkd")
    p.add_argument("--reuse", action="store_true", help="keep the teacher, generations and students already done")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                   help="write one record of these runs' records (same preset and teacher, other seeds) and stop")
    args = p.parse_args(argv)
    if args.combine:
        record = combine([json.loads(f.read_text()) for f in args.combine])
        atomic_write_json(args.out, record)
        print(table(record))
        return record
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("distill").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    preset = arithmetic.PRESETS[args.preset]
    work = args.work / args.preset
    data_dir = work / "data"
    train_jsonl, test_jsonl = preset.write_data(data_dir)
    tests = arithmetic.read_problems(test_jsonl)
    timings: dict[str, float] = {}

    # The teacher, on the ground truth.
    teacher_cfg = arithmetic.ground_truth_config(preset, data_dir, work / "teacher", role="teacher", seed=0)
    teacher_dir = work / "teacher" / "student"
    if not (args.reuse and reusable(work / "teacher", teacher_cfg)):
        _fresh(work / "teacher")
        t0 = time.perf_counter()
        training.train(teacher_cfg)
        timings["teacher"] = time.perf_counter() - t0
    teacher_acc = accuracy(teacher_dir, tests)
    logging.getLogger("distill").info("teacher exact match: %.1f%%", 100 * teacher_acc)

    # Its answers to the training prompts: one sample each, and the best of N by the verifier.
    answer_tokens = max(len(pr.response) for pr in tests) + 1
    gens, gen_stats = {}, {}
    for name, n, scorer, keep in (("samples", 1, "none", "all"), ("best_of_n", args.n, "verifier", "best")):
        out = work / f"gen_{name}" if name == "samples" else work / f"gen_{name}{args.n}"
        cfg = GenerateConfig(
            out_dir=str(out), teacher=ModelSpec(path=str(teacher_dir)),
            prompts=PromptsConfig(source=str(train_jsonl)),
            sampling=SamplingConfig(temperature=args.temperature, max_new_tokens=answer_tokens),
            n=n, scorer=scorer, verifier="distill.tasks.arithmetic:verify" if scorer == "verifier" else None,
            keep=keep, batch_size=256, shard_prompts=4096, progress=False,
        )
        if not args.reuse:
            _fresh(out)
        t0 = time.perf_counter()
        counts = generate.main(cfg)
        timings[f"generate_{name}"] = time.perf_counter() - t0
        records = [json.loads(line) for f in sorted(out.glob("shard-*.jsonl")) for line in f.read_text().splitlines()]
        right = sum(arithmetic.verify(r["prompt"], r["response"]) for r in records)
        gens[name] = out
        gen_stats[name] = {**counts, "kept_correct": right / max(len(records), 1), "n": n}

    # The students.
    results: dict[str, dict] = {m: {} for m in args.methods}
    costs: dict[str, dict] = {m: {} for m in args.methods}
    rkl: dict[str, dict] = {m: {} for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            run_dir = work / f"{method}_seed{seed}"
            cfg = arithmetic.ground_truth_config(preset, data_dir, run_dir, role="student", seed=seed)
            update: dict = {}
            if method in ("token_kd_ground_truth", "seq_kd_plus_token_kd"):
                update["teacher"] = ModelSpec(path=str(teacher_dir))
            if method in TEACHER_METHODS:
                batches, loss, settings = TEACHER_METHODS[method]
                update["teacher"] = ModelSpec(path=str(teacher_dir))
                update["loss"] = type(cfg.loss).model_validate({**cfg.loss.model_dump(), **loss})
                sampling = {"temperature": 1.0, "max_new_tokens": answer_tokens} if batches != "dataset" else {}
                update["train"] = type(cfg.train).model_validate(
                    {**cfg.train.model_dump(), "batches": {"source": batches, **sampling, **settings}})
                if batches == "distillm":
                    update["eval"] = cfg.eval.model_copy(update={"every": 100, "max_batches": 2})
            if method.startswith("seq_kd"):
                source = gens["best_of_n"] if method == "seq_kd_best_of_n" else gens["samples"]
                # A teacher's wrong answer can decode to more student tokens than any right one (a special
                # token's text is several bytes): cut at the task's length, as the answer would be wrong anyway.
                update["data"] = cfg.data.model_copy(update={"source": str(source), "truncate": True})
            cfg = cfg.model_copy(update=update)
            student_dir = run_dir / "student"
            if not (args.reuse and reusable(run_dir, cfg)):
                _fresh(run_dir)
                t0 = time.perf_counter()
                training.train(cfg)
                timings[f"{method}_seed{seed}"] = time.perf_counter() - t0
            results[method][seed] = accuracy(student_dir, tests)
            rkl[method][seed] = reverse_kl_on_own_samples(student_dir, teacher_dir, tests, seed)
            costs[method][seed] = step_costs(run_dir / "metrics.jsonl")
            logging.getLogger("distill").info("%s seed %d: exact match %.1f%%", method, seed,
                                              100 * results[method][seed])

    summary = {
        m: {"exact_match": {str(s): v for s, v in r.items()},
            "mean": statistics.mean(r.values()),
            "spread": (max(r.values()) - min(r.values())) if len(r) > 1 else 0.0,
            "reverse_kl_on_own_samples": {str(s): v for s, v in rkl[m].items()},
            "reverse_kl_mean": statistics.mean(rkl[m].values()),
            "step_seconds": mean_costs(costs[m])}
        for m, r in results.items()
    }
    record = {"preset": args.preset, "task": {"digits": preset.digits, "operators": list(preset.operators),
                                              "n_train": preset.n_train, "n_test": preset.n_test,
                                              "n_valid": preset.n_valid, "eval_split": "valid.jsonl"},
              "teacher": preset.teacher, "student": preset.student, "student_steps": preset.student_steps,
              "batch_size": preset.batch_size, "seeds": args.seeds, "best_of_n": args.n,
              "sampling_temperature": args.temperature, "teacher_exact_match": teacher_acc,
              "generations": gen_stats, "methods": summary, "seconds": {k: round(v, 1) for k, v in timings.items()},
              "total_seconds": round(time.perf_counter() - t_start, 1), "torch_threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    print(table(record))
    return record


def combine(records: list[dict]) -> dict:
    """One record of several runs of this script that differ only in their seeds (each run trains the same
    teacher: seed 0, same data), e.g. seeds run in parallel processes."""
    first = records[0]
    same = ("preset", "task", "teacher", "student", "student_steps", "batch_size", "best_of_n", "sampling_temperature",
            "teacher_exact_match")
    for r in records[1:]:
        differ = [k for k in same if r.get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"--combine: the records differ in {', '.join(differ)}; combine runs of one setting only")
    seeds = sorted({s for r in records for s in r["seeds"]})
    if sum(len(r["seeds"]) for r in records) != len(seeds):
        raise SystemExit("--combine: a seed appears in more than one record")
    methods = {}
    for m in sorted(first["methods"], key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS)):
        runs = [r["methods"][m] for r in records if m in r["methods"]]
        acc = {k: v for run in runs for k, v in run["exact_match"].items()}
        rkl = {k: v for run in runs for k, v in run["reverse_kl_on_own_samples"].items()}
        costs = [run["step_seconds"] for run in runs if run.get("step_seconds")]
        methods[m] = {"exact_match": acc, "mean": statistics.mean(acc.values()),
                      "spread": max(acc.values()) - min(acc.values()),
                      "reverse_kl_on_own_samples": rkl, "reverse_kl_mean": statistics.mean(rkl.values()),
                      "step_seconds": {k: round(statistics.mean(c[k] for c in costs), 4) for k in COST_KEYS}
                      if costs else {}}
    return {**first, "seeds": seeds, "methods": methods,
            "seconds": {f"run{i}_{k}": v for i, r in enumerate(records) for k, v in r["seconds"].items()},
            "total_seconds": max(r["total_seconds"] for r in records), "combined_from": len(records)}


COST_KEYS = ("step_seconds", "gen_seconds", "teacher_seconds", "train_seconds")


def step_costs(metrics: Path) -> dict[str, float]:
    """Mean seconds per optimizer step over the run's train log records, and its parts where logged
    (generation by the student, the teacher's signal, the rest: forward, loss, backward, optimizer)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("split") == "train" and "step_seconds" in r][1:]  # the first: warm-up
    for r in records:  # the recipe logs train_seconds only where a batch source generates: the rest of the step
        r.setdefault("train_seconds", r["step_seconds"] - r.get("gen_seconds", 0.0) - r.get("teacher_seconds", 0.0))
    return {k: statistics.mean(r.get(k, 0.0) for r in records) for k in COST_KEYS} if records else {}


def mean_costs(per_seed: dict[int, dict]) -> dict[str, float]:
    runs = [c for c in per_seed.values() if c]
    return {k: round(statistics.mean(c[k] for c in runs), 4) for k in COST_KEYS} if runs else {}


def reusable(run_dir: Path, cfg) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``cfg`` (``--reuse``); a finished run of other
    settings stops the script, naming the settings that differ, rather than being reported as this one."""
    import yaml

    if not (run_dir / "student" / "distill_summary.json").is_file():
        return False
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    wanted = yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    differ = sorted(f"{section}.{key}" for section in set(saved) | set(wanted)
                    for key in _keys(saved.get(section)) | _keys(wanted.get(section))
                    if _get(saved.get(section), key) != _get(wanted.get(section), key))
    if differ:
        raise SystemExit(f"--reuse: {run_dir} holds a run of other settings ({', '.join(differ[:8])}); "
                         "rerun without --reuse, or give another --work")
    return True


def _keys(section) -> set:
    return set(section) if isinstance(section, dict) else {""}


def _get(section, key):
    return section.get(key) if isinstance(section, dict) else section


def _fresh(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def table(r: dict) -> str:
    seeds = r["seeds"]
    lines = [f"teacher: {100 * r['teacher_exact_match']:.1f}% exact match",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | KL(q‖p) on own samples | ms/step (generation + teacher + rest) |",
             "|---" * (len(seeds) + 4) + "|"]
    for m, v in r["methods"].items():
        cells = " | ".join(f"{100 * v['exact_match'][str(s)]:.1f}%" if str(s) in v["exact_match"] else "–"
                           for s in seeds)
        c = v.get("step_seconds") or {}
        cost = (f"{1e3 * c['step_seconds']:.0f} ({1e3 * c['gen_seconds']:.0f} + {1e3 * c['teacher_seconds']:.0f} + "
                f"{1e3 * c['train_seconds']:.0f})") if c else ""
        lines.append(f"| {m} | {cells} | {100 * v['mean']:.1f}% | {v['reverse_kl_mean']:.3f} | {cost} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
