"""When distillation pays: a measured map on the quickstart corpus (issue 26, item 1).

Three parts, every student run with each of ``--seeds`` (student init and data order), the quickstart's
``fast`` preset (corpus: a 150-file subset of the standard library; its BPE tokenizer of 2,048 tokens;
student Llama 64 wide, 2 layers; batch 16 x 128 tokens; lr 3e-3):

* ``a`` **teacher strength**: four teachers on the same tokenizer, trained once and cached in the work
  directory: ``early`` (the fast teacher's architecture, 128 wide x 3 layers, a 50-step run: its own short
  schedule, not a checkpoint of a longer one), ``fast`` (the quickstart's cached fast teacher, 150 steps),
  ``long`` (the same architecture, 450 steps) and ``large`` (192 wide x 4 layers, 600 steps, lr 2e-3). The student trains ``--steps`` steps (the
  preset's 100) as ``scratch`` (CE) and with each teacher at ``loss.alpha`` 0 and 0.5 (forward KL, T = 1),
  same steps, data and seed. Every model is evaluated on all validation files (val loss, bits/byte). The
  map: KD gain over scratch (scratch - KD, per seed) against the teacher's gap to the scratch student
  (scratch - teacher, the same seed's scratch).
* ``b`` **repeated data**: a fixed subset of the training split (``SUBSET_BLOCKS`` + 1 blocks of 128 tokens,
  about 4 batches) seen for ``REPEAT_STEPS`` steps (98.5 epochs): CE vs KD from ``large`` (alpha = 0), the val
  loss every ``REPEAT_EVAL_EVERY`` steps on the periodic-eval batches, then on all validation files. The
  teacher was trained on the whole training split, as in Gemma 2's setting.
* ``c`` **forward vs reverse KL, mode coverage**: a generated task with six right answers per prompt
  (``MODES``: copy, reverse, sort, rotate, shift, swap of four distinct letters, at fixed frequencies),
  byte tokenizer. A teacher (64 wide x 2 layers) is trained with CE on samples of it; a capacity-limited
  student (16 wide x 1 layer) trains with token-level ``forward_kl`` and ``reverse_kl`` (alpha = 0) and
  CE on the same samples. Each model draws ``C_SAMPLES`` completions (T = 1) per held-out prompt: how many
  of the six answers they cover, the share of samples per answer, and the mass on wrong strings.

Writes ``--out`` (default ``runs/benchmarks/kd_map.json``; the committed record: ``--out
benchmarks/results/kd_map.json``, with its plot ``kd_map.png`` beside it) and prints the markdown tables
(:func:`tables`, the ones in docs/benchmarks.md).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/kd_map.py --seeds 0 1 --out benchmarks/results/kd_map.json
    python benchmarks/kd_map.py --smoke        # every part at a few steps, one seed: a minute
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from distill import checkpoint as ckpt
from distill.commands import quickstart as qs
from distill.config import TrainConfig, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
# Quick or exploratory runs land here; the committed record is written only when asked.
DEFAULT_OUT = REPO / "runs" / "benchmarks" / "kd_map.json"

LARGE_ARCH = qs._llama(192, 4, 6, 2, 512, 128)
# name -> (architecture: "fast" = the fast preset's teacher, or a dict; steps; lr)
TEACHERS = {"early": ("fast", 50, 3e-3), "fast": ("fast", 150, 3e-3), "long": ("fast", 450, 3e-3),
            "large": (LARGE_ARCH, 600, 2e-3)}
ALPHAS = (0.0, 0.5)
SUBSET_BLOCKS, REPEAT_STEPS, REPEAT_EVAL_EVERY = 64, 400, 20

LETTERS = "abcdefgh"
MODES = {  # name: (frequency, answer of a prompt of four distinct letters)
    "copy": (0.30, lambda s: s),
    "reverse": (0.22, lambda s: s[::-1]),
    "sort": (0.16, lambda s: "".join(sorted(s))),
    "rotate": (0.12, lambda s: s[1:] + s[0]),
    "shift": (0.10, lambda s: "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)),
    "swap": (0.10, lambda s: s[1] + s[0] + s[3] + s[2]),
}
C_TEST_PROMPTS, C_SAMPLES, C_PER_PROMPT = 200, 32, 8
C_TEACHER = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 192, "max_position_embeddings": 16}
C_STUDENT = {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "intermediate_size": 32, "max_position_embeddings": 16}
C_TEACHER_STEPS, C_STUDENT_STEPS, C_BATCH = 1500, 1000, 64


# ------------------------------------------------------------------------------------------- runs


def worker(cfg_path: str, result_path: str) -> None:
    """One training run in this process; writes its summary and wall time."""
    from distill import training

    cfg = load_config(TrainConfig, cfg_path)
    t0 = time.perf_counter()
    summary = training.train(cfg)
    Path(result_path).write_text(json.dumps({"summary": summary, "seconds": time.perf_counter() - t0}))


def run(cfg: TrainConfig, work: Path) -> dict:
    """Train ``cfg`` in a fresh process; a finished run of the same config is reused."""
    name = Path(cfg.out_dir).name
    cfg_path, result_path, new = work / f"{name}.yaml", work / f"{name}.result.json", work / f"{name}.new.yaml"
    dump_config(cfg, new)
    if result_path.is_file() and cfg_path.is_file() and cfg_path.read_text() == new.read_text() \
            and (Path(cfg.out_dir) / "student" / "config.json").is_file():
        new.unlink()
        return json.loads(result_path.read_text())
    new.replace(cfg_path)
    result_path.unlink(missing_ok=True)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    print(f"  training {name}", file=sys.stderr, flush=True)
    res = subprocess.run([sys.executable, __file__, "--worker", str(cfg_path), str(result_path)], cwd=REPO,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"run {cfg.out_dir} failed:\n{res.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def seeded(cfg: TrainConfig, seed: int, **sections) -> TrainConfig:
    """``cfg`` with the student's and the data order's seed set, and top-level sections updated."""
    tree = cfg.model_dump()
    tree["student"]["seed"] = seed
    tree["train"]["seed"] = seed
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return TrainConfig.model_validate(tree)


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def eval_curve(run_dir: Path) -> list[list[float]]:
    return [list(p) for p in qs._eval_curve(run_dir)]


# ---------------------------------------------------------------------------------- (a) strength


def train_teachers(ctx: dict, teachers: dict) -> tuple[dict, dict]:
    """Each teacher of ``teachers`` (trained once, cached in the work directory): its directory and settings."""
    preset, out, work = ctx["preset"], ctx["out"], ctx["work"]
    teacher_dirs, teacher_info = {}, {}
    for name, (arch, t_steps, lr) in teachers.items():
        if name == "fast" and t_steps == preset.teacher_steps:
            teacher_dirs[name], info = ctx["fast_dir"], ctx["fast_info"]
            teacher_info[name] = {"arch": "fast preset teacher", "steps": info["steps"], "lr": preset.teacher_lr,
                                  "cached": "the quickstart's teacher cache"}
            continue
        tdir = out / "teachers" / name
        cfg = qs.run_config(preset, f"teacher_{name}", out, ctx["tok"], ctx["train"], ctx["val"],
                            preset.teacher if arch == "fast" else arch, t_steps, lr, None)
        marker = out / "teachers" / f"{name}.json"
        if not ((tdir / "config.json").is_file() and marker.is_file()
                and json.loads(marker.read_text())["config"] == json.loads(json.dumps(cfg.model_dump()))):
            got = run(cfg, work)
            shutil.rmtree(tdir, ignore_errors=True)
            tdir.parent.mkdir(parents=True, exist_ok=True)
            ckpt.commit_dir(Path(cfg.out_dir) / "student", tdir)
            ckpt.atomic_write_json(marker, {"config": cfg.model_dump(), "seconds": got["seconds"]})
        teacher_dirs[name] = tdir
        teacher_info[name] = {"arch": "fast preset teacher" if arch == "fast" else arch, "steps": t_steps, "lr": lr,
                              "train_seconds": round(json.loads(marker.read_text())["seconds"], 1)}
    return teacher_dirs, teacher_info


def part_a(ctx: dict, seeds: list[int], steps: int, teachers: dict) -> dict:
    preset, out, work = ctx["preset"], ctx["out"], ctx["work"]
    teacher_dirs, teacher_info = train_teachers(ctx, teachers)
    ref = teacher_dirs[list(teachers)[-1]]
    t_metrics = qs.evaluate_all(teacher_dirs, ref, ctx["tok"], ctx["val"], preset.seq_len)
    for name, m in t_metrics.items():
        teacher_info[name].update(val_loss=m["val_loss"], bits_per_byte=m["bits_per_byte"])

    runs: dict = {}
    for seed in seeds:
        models = {}
        for name, tdir in [("scratch", None)] + list(teacher_dirs.items()):
            for alpha in ((None,) if tdir is None else ALPHAS):
                label = "scratch" if tdir is None else f"{name}_a{alpha:g}"
                base = qs.run_config(replace(preset, loss={**preset.loss, "alpha": alpha or 0.0}),
                                     f"a_{label}_s{seed}", out, ctx["tok"], ctx["train"], ctx["val"], preset.student,
                                     steps, preset.student_lr, tdir)
                print(f"(a) seed {seed}: {label}", file=sys.stderr, flush=True)
                got = run(seeded(base, seed), work)
                models[label] = Path(base.out_dir) / "student"
                runs.setdefault(label, {})[str(seed)] = {"train_seconds": round(got["seconds"], 1),
                                                         "steps": got["summary"]["steps"],
                                                         "tokens": got["summary"]["tokens"]}
        metrics = qs.evaluate_all(models, ref, ctx["tok"], ctx["val"], preset.seq_len)
        for label, m in metrics.items():
            runs[label][str(seed)].update(val_loss=m["val_loss"], bits_per_byte=m["bits_per_byte"])

    rows = []
    for name in teacher_dirs:
        for alpha in ALPHAS:
            label = f"{name}_a{alpha:g}"
            per_seed = {}
            for seed in map(str, seeds):
                s, k = runs["scratch"][seed], runs[label][seed]
                per_seed[seed] = {"teacher_gap": s["val_loss"] - teacher_info[name]["val_loss"],
                                  "gain": s["val_loss"] - k["val_loss"],
                                  "gain_bits_per_byte": s["bits_per_byte"] - k["bits_per_byte"]}
            rows.append({"teacher": name, "alpha": alpha, "teacher_val_loss": teacher_info[name]["val_loss"],
                         "per_seed": per_seed,
                         **{key: mean_std([p[key] for p in per_seed.values()])
                            for key in ("teacher_gap", "gain", "gain_bits_per_byte")}})
    means = {label: {key: mean_std([r[key] for r in per.values()]) for key in ("val_loss", "bits_per_byte")}
             for label, per in runs.items()}
    return {"student_steps": steps, "alphas": list(ALPHAS), "teachers": teacher_info, "runs": runs, "mean": means,
            "map": rows}


# ------------------------------------------------------------------------------ (b) repeated data


def write_subset(train_jsonl: Path, tok_dir: Path, tokens: int, path: Path) -> dict:
    """The first documents of every 10th training file, the last one cut, until they hold ``tokens`` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows, total = [], 0
    docs = [json.loads(x) for x in train_jsonl.read_text().splitlines() if x]
    for doc in docs[::10]:
        ids = tok(doc["text"], add_special_tokens=False)["input_ids"]
        need = tokens - total
        if len(ids) + 2 > need:  # bos + eos
            text = tok.decode(ids[: max(need - 2, 1)])
            rows.append({"text": text, "path": doc["path"]})
            total = tokens
            break
        rows.append(doc)
        total += len(ids) + 2
    ckpt.atomic_write_text(path, "\n".join(json.dumps(r) for r in rows) + "\n")
    return {"documents": len(rows), "approx_tokens": total, "files": [r["path"] for r in rows]}


def count_blocks(source: Path, tok_dir: Path, seq_len: int) -> int:
    from distill.config import DataConfig, ModelSpec
    from distill.data import build_datasets
    from distill.models import load_tokenizer

    tok = load_tokenizer(ModelSpec(tokenizer=str(tok_dir), config=qs.PRESETS["fast"].student), "subset")
    return len(build_datasets(DataConfig(source=str(source), seq_len=seq_len, eval_fraction=0.0, format="text"),
                              tok)[0])


def part_b(ctx: dict, seeds: list[int], steps: int, blocks: int, every: int, teacher_dir: Path) -> dict:
    preset, out, work = ctx["preset"], ctx["out"], ctx["work"]
    subset = out / "data" / f"subset_{blocks}.jsonl"
    info = write_subset(ctx["train"], ctx["tok"], (blocks + 1) * preset.seq_len, subset)
    blocks = count_blocks(subset, ctx["tok"], preset.seq_len)  # what packing made of it
    runs: dict = {}
    for seed in seeds:
        models = {}
        for label, tdir in (("ce", None), ("kd", teacher_dir)):
            base = qs.run_config(preset, f"b_{label}_s{seed}", out, ctx["tok"], subset, ctx["val"], preset.student,
                                 steps, preset.student_lr, tdir)
            cfg = seeded(base, seed, eval={"every": every})
            print(f"(b) seed {seed}: {label}", file=sys.stderr, flush=True)
            got = run(cfg, work)
            models[label] = Path(cfg.out_dir) / "student"
            curve = eval_curve(Path(cfg.out_dir))
            best = min(curve, key=lambda p: p[1])
            runs.setdefault(label, {})[str(seed)] = {"curve": curve, "min_step": best[0], "min_val": best[1],
                                                     "train_seconds": round(got["seconds"], 1),
                                                     "tokens": got["summary"]["tokens"]}
        metrics = qs.evaluate_all(models, teacher_dir, ctx["tok"], ctx["val"], preset.seq_len)
        for label, m in metrics.items():
            runs[label][str(seed)].update(val_loss=m["val_loss"], bits_per_byte=m["bits_per_byte"])
        ce, kd = runs["ce"][str(seed)], runs["kd"][str(seed)]
        at = dict((int(s), v) for s, v in kd["curve"])
        kd["val_at_ce_min_step"] = at.get(int(ce["min_step"]))
        kd["improved_after_ce_min"] = (kd["val_at_ce_min_step"] - kd["curve"][-1][1]
                                       if kd["val_at_ce_min_step"] is not None else None)
    blocks_seen = steps * preset.batch_size
    return {"subset": {**info, "blocks": blocks, "tokens": blocks * preset.seq_len}, "steps": steps,
            "epochs": blocks_seen / blocks, "eval_every": every, "teacher": teacher_dir.name, "alpha": 0.0,
            "runs": runs}


# --------------------------------------------------------------------------------- (c) fwd vs rev


def c_prompts(seed: int = 1234) -> tuple[list[str], list[str]]:
    """All four-distinct-letter prompts whose six answers are distinct, split into train and test."""
    all_p = ["".join(p) for p in itertools.permutations(LETTERS, 4)]
    ok = [p for p in all_p if len({f(p) for _, f in MODES.values()}) == len(MODES)]
    random.Random(seed).shuffle(ok)
    return ok[C_TEST_PROMPTS:], ok[:C_TEST_PROMPTS]


def write_c_data(out: Path, per_prompt: int) -> tuple[Path, Path, dict]:
    train_p, test_p = c_prompts()
    names = list(MODES)
    weights = [MODES[m][0] for m in names]
    rng = random.Random(0)

    def rows(prompts, n):
        for p in prompts:
            for m in rng.choices(names, weights, k=n):
                yield json.dumps({"prompt": p + "=", "response": MODES[m][1](p)})

    train, val = out / "c_train.jsonl", out / "c_val.jsonl"
    ckpt.atomic_write_text(train, "\n".join(rows(train_p, per_prompt)) + "\n")
    ckpt.atomic_write_text(val, "\n".join(rows(test_p, 4)) + "\n")
    return train, val, {"train_prompts": len(train_p), "test_prompts": len(test_p), "samples_per_train_prompt":
                        per_prompt, "train_rows": len(train_p) * per_prompt}


def c_config(name: str, out: Path, train: Path, val: Path, arch: dict, steps: int, teacher: Path | None,
             divergence: str, seed: int) -> TrainConfig:
    teacher_spec = {"path": str(teacher)} if teacher is not None else None
    return TrainConfig.model_validate({
        "out_dir": str(out / name),
        "student": {"config": arch, "tokenizer": "byte", "seed": seed},
        "teacher": teacher_spec,
        "data": {"source": str(train), "eval_source": str(val), "format": "prompt_response", "seq_len": 16,
                 "packing": False, "eval_fraction": 0.0},
        "loss": {"divergence": divergence, "temperature": 1.0, "alpha": 0.0},
        "optim": {"lr": 3e-3, "warmup_steps": max(steps // 20, 1), "weight_decay": 0.1},
        "train": {"max_steps": steps, "batch_size": C_BATCH, "seed": seed},
        "eval": {"every": 0, "batch_size": 256, "max_batches": 4},
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 50},
    })


def coverage(model_dir: Path, prompts: list[str], n: int, seed: int) -> dict:
    """Draw ``n`` completions (T = 1) per prompt; the answers they hit, per prompt and per mode."""
    import torch

    from distill.config import ModelSpec
    from distill.generation.sampling import SamplingParams, row_seed, sample
    from distill.models import load_model, load_tokenizer

    tok = load_tokenizer(ModelSpec(tokenizer="byte", config=C_STUDENT), "c")
    model = load_model(ModelSpec(path=str(model_dir)), "c", tok).eval()
    params = SamplingParams(temperature=1.0, max_new_tokens=6, stop_ids=(tok.eos_token_id,))
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    names = list(MODES)
    hits = {m: 0 for m in names}
    wrong = unfinished = 0
    covered = []
    for p in prompts:
        ids = bos + tok(p + "=", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gen = sample(model, [ids] * n, params, pad_id=tok.pad_token_id if tok.pad_token_id is not None else
                         tok.eos_token_id, seeds=[row_seed(seed, p, j) for j in range(n)])
        answers = {MODES[m][1](p): m for m in names}
        seen = set()
        for comp, done in zip(gen.completions(), gen.finished.tolist(), strict=True):
            text = tok.decode([t for t in comp if t != tok.eos_token_id])
            if not done:
                unfinished += 1
            if done and text in answers:
                hits[answers[text]] += 1
                seen.add(answers[text])
            else:
                wrong += 1
        covered.append(len(seen))
    total = n * len(prompts)
    return {"modes_covered_mean": statistics.mean(covered), "all_modes_fraction": sum(c == len(names) for c in covered)
            / len(covered), "wrong_mass": wrong / total, "unfinished": unfinished / total,
            "mode_share": {m: hits[m] / total for m in names}}


def part_c(ctx: dict, seeds: list[int], teacher_steps: int, student_steps: int, per_prompt: int, n: int,
           test_prompts: int) -> dict:
    out, work = ctx["out"] / "c", ctx["work"]
    out.mkdir(parents=True, exist_ok=True)
    train, val, data_info = write_c_data(out, per_prompt)
    test = c_prompts()[1][:test_prompts]
    t_cfg = c_config("c_teacher", out, train, val, C_TEACHER, teacher_steps, None, "forward_kl", 0)
    print("(c) teacher", file=sys.stderr, flush=True)
    t_got = run(t_cfg, work)
    t_dir = Path(t_cfg.out_dir) / "student"
    teacher = {"arch": C_TEACHER, "steps": teacher_steps, "train_seconds": round(t_got["seconds"], 1),
               "val_loss": t_got["summary"].get("val_loss"), **coverage(t_dir, test, n, 0)}
    runs: dict = {}
    for seed in seeds:
        for label, tdir, div in (("ce", None, "forward_kl"), ("forward_kl", t_dir, "forward_kl"),
                                 ("reverse_kl", t_dir, "reverse_kl")):
            cfg = c_config(f"c_{label}_s{seed}", out, train, val, C_STUDENT, student_steps, tdir, div, seed)
            print(f"(c) seed {seed}: {label}", file=sys.stderr, flush=True)
            got = run(cfg, work)
            runs.setdefault(label, {})[str(seed)] = {"train_seconds": round(got["seconds"], 1),
                                                     "val_loss": got["summary"].get("val_loss"),
                                                     **coverage(Path(cfg.out_dir) / "student", test, n, seed)}
    means = {label: {key: statistics.mean(r[key] for r in per.values())
                     for key in ("modes_covered_mean", "all_modes_fraction", "wrong_mass")}
             for label, per in runs.items()}
    return {"modes": {m: f for m, (f, _) in MODES.items()}, "data": data_info, "test_prompts": len(test),
            "samples_per_prompt": n, "student_arch": C_STUDENT, "student_steps": student_steps,
            "batch_size": C_BATCH, "teacher": teacher, "runs": runs, "mean": means}


# ---------------------------------------------------------------------------------------- output


def _pm(d: dict, fmt: str = "+.3f") -> str:
    return f"{d['mean']:{fmt}} ± {d['std']:.3f}"


def tables(payload: dict) -> str:
    """The markdown tables of a kd_map JSON (the ones docs/benchmarks.md shows)."""
    parts = []
    a = payload.get("a")
    if a:
        seeds = list(next(iter(a["runs"].values())))
        lines = ["| teacher | teacher val loss | α | " + " | ".join(f"KD val loss s{s}" for s in seeds)
                 + " | gap to scratch | KD gain (nats) | KD gain (bits/byte) |", "|---" * (6 + len(seeds)) + "|"]
        sc = a["runs"]["scratch"]
        lines.insert(2, "| — (scratch, CE) | — | — | " + " | ".join(f"{sc[s]['val_loss']:.3f}" for s in seeds)
                     + " | — | — | — |")
        for r in a["map"]:
            label = f"{r['teacher']}_a{r['alpha']:g}"
            lines.append(f"| {r['teacher']} | {r['teacher_val_loss']:.3f} | {r['alpha']:g} | "
                         + " | ".join(f"{a['runs'][label][s]['val_loss']:.3f}" for s in seeds)
                         + f" | {_pm(r['teacher_gap'])} | {_pm(r['gain'])} | {_pm(r['gain_bits_per_byte'])} |")
        parts.append("\n".join(lines))
    b = payload.get("b")
    if b:
        lines = ["| run | seed | min val (periodic) | at step | last periodic val | val loss, all files | "
                 "KD: val at CE's best step − last |", "|---" * 7 + "|"]
        for label in ("ce", "kd"):
            for s, r in b["runs"][label].items():
                extra = f"{r['improved_after_ce_min']:+.3f}" if label == "kd" else "—"
                lines.append(f"| {label} | {s} | {r['min_val']:.3f} | {r['min_step']} | {r['curve'][-1][1]:.3f} | "
                             f"{r['val_loss']:.3f} | {extra} |")
        parts.append("\n".join(lines))
    c = payload.get("c")
    if c:
        modes = list(c["modes"])
        lines = ["| model | seed | answers covered (of 6) | all 6 covered | wrong strings | "
                 + " | ".join(modes) + " |", "|---" * (5 + len(modes)) + "|"]
        lines.append("| target | — | — | — | 0.0% | " + " | ".join(f"{c['modes'][m]:.0%}" for m in modes) + " |")
        rows = [("teacher", "—", c["teacher"])] + [(label, s, r) for label in c["runs"]
                                                   for s, r in c["runs"][label].items()]
        for label, s, r in rows:
            lines.append(f"| {label} | {s} | {r['modes_covered_mean']:.2f} | {r['all_modes_fraction']:.0%} | "
                         f"{r['wrong_mass']:.1%} | " + " | ".join(f"{r['mode_share'][m]:.1%}" for m in modes) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(payload: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    a, b = payload.get("a"), payload.get("b")
    if a:
        for alpha, marker in zip(ALPHAS, ("o", "s"), strict=True):
            pts = [(p["teacher_gap"], p["gain"], r["teacher"]) for r in a["map"] if r["alpha"] == alpha
                   for p in r["per_seed"].values()]
            ax1.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"α = {alpha:g} (each seed)")
        for r in a["map"]:
            if r["alpha"] == ALPHAS[0]:
                ax1.annotate(r["teacher"], (r["teacher_gap"]["mean"], r["gain"]["mean"]), fontsize=8,
                             xytext=(4, 4), textcoords="offset points")
        ax1.axhline(0, color="gray", lw=0.8)
        ax1.axvline(0, color="gray", lw=0.8)
        ax1.set_xlabel("teacher's gap to the scratch student (nats/token)")
        ax1.set_ylabel("KD gain over scratch (nats/token)")
        ax1.set_title(f"(a) teacher strength, {a['student_steps']} student steps")
        ax1.grid(alpha=0.3)
        ax1.legend(fontsize=8)
    if b:
        for label, style in (("ce", "-"), ("kd", "--")):
            for s, r in b["runs"][label].items():
                ax2.plot([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], style,
                         label=f"{'CE' if label == 'ce' else 'KD (' + b['teacher'] + ', α=0)'} seed {s}")
        ax2.set_xlabel(f"step ({b['subset']['blocks']} blocks repeated; {b['epochs']:.0f} epochs in all)")
        ax2.set_ylabel("val loss, periodic-eval batches")
        ax2.set_title("(b) repeated data")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=None, help="student steps in (a) (default: the fast preset's)")
    ap.add_argument("--only", nargs="*", choices=["a", "b", "c"], default=None, help="run only these parts")
    ap.add_argument("--smoke", action="store_true", help="every part at a few steps, first seed only")
    ap.add_argument("--out-dir", default="runs/bench_kd_map", help="work directory of the runs")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON record (default: %(default)s)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    preset = qs.PRESETS["fast"]
    seeds = args.seeds[:1] if args.smoke else args.seeds
    steps = args.steps or (10 if args.smoke else preset.student_steps)
    teachers = {k: (arch, 5 if args.smoke else n, lr) for k, (arch, n, lr) in TEACHERS.items()
                if not args.smoke or k in ("early", "large")}
    out = Path(args.out_dir + ("_smoke" if args.smoke else ""))
    work = out / "configs"
    work.mkdir(parents=True, exist_ok=True)
    train_jsonl, val_jsonl, corpus_key = qs.write_corpus(out / "data", preset.max_files)
    tok_dir, fast_dir, fast_info = qs.get_teacher(preset, corpus_key, train_jsonl, val_jsonl)
    ctx = {"preset": preset, "out": out, "work": work, "train": train_jsonl, "val": val_jsonl, "tok": tok_dir,
           "fast_dir": fast_dir, "fast_info": fast_info}
    chosen = args.only or ["a", "b", "c"]
    payload: dict = {"preset": "fast", "seeds": seeds, "student": preset.student, "batch_size": preset.batch_size,
                     "seq_len": preset.seq_len, "lr": preset.student_lr, "loss": "forward_kl, T = 1",
                     "python": sys.version.split()[0], "part_seconds": {}}
    for part in chosen:
        t0 = time.perf_counter()
        if part == "a":
            payload["a"] = part_a(ctx, seeds, steps, teachers)
        elif part == "b":
            large = train_teachers(ctx, {"large": teachers["large"]})[0]["large"]
            payload["b"] = part_b(ctx, seeds, 20 if args.smoke else REPEAT_STEPS, 8 if args.smoke else SUBSET_BLOCKS,
                                  5 if args.smoke else REPEAT_EVAL_EVERY, large)
        else:
            payload["c"] = part_c(ctx, seeds, 30 if args.smoke else C_TEACHER_STEPS,
                                  30 if args.smoke else C_STUDENT_STEPS, 2 if args.smoke else C_PER_PROMPT,
                                  4 if args.smoke else C_SAMPLES, 10 if args.smoke else C_TEST_PROMPTS)
        payload["part_seconds"][part] = round(time.perf_counter() - t0, 1)
    payload["missing"] = [p for p in ("a", "b", "c") if p not in payload]
    if args.out.is_file() and args.only:  # a partial run adds to the parts already there
        old = json.loads(args.out.read_text())
        for part in ("a", "b", "c"):
            if part not in payload and part in old:
                payload[part] = old[part]
                payload["part_seconds"].setdefault(part, old.get("part_seconds", {}).get(part))
        payload["missing"] = [p for p in ("a", "b", "c") if p not in payload]
    payload["seconds"] = round(sum(v for v in payload["part_seconds"].values() if v), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"))
    print(tables(payload))


if __name__ == "__main__":
    main()
