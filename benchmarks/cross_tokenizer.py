"""Cross-tokenizer distillation: which loss teaches a student best from a teacher with another tokenizer?

Two experiments (``--parts``), each run for every seed with the same student (architecture, steps, batch,
learning rate, data order per seed); the teachers are trained once (seed 0) and shared.

(a) ``arithmetic``: the task of :mod:`distill.tasks.arithmetic` (preset ``student32`` by default: 3-digit
addition, a 29k-parameter student that escapes the task's loss plateau on about half the seeds with plain
cross-entropy). The student is byte-level (the task's own tokenizer, one token per digit). The teacher
(the preset's teacher architecture, trained on the ground truth; ``--teacher-steps``, 5,000 in the committed
record) reads a **packing** tokenizer: a BPE whose pre-tokenizer cuts runs of digits into chunks, so that a
number is one or a few tokens (GOLD's failure case: a teacher and a student that split numerals differently).
``--digit-chunks`` lists the tokenizers to try in order until a teacher reaches 50%: ``l3`` (chunks of up to
3 from the left, like Llama 3: ``482`` is one token, the answer ``0879`` is ``087|9``), ``l2`` (``08|79``,
``48|2``), ``r2`` (up to 2 from the right, as thousands separators group digits: ``08|79``, ``4|82``); every
teacher tried is in the record. Methods:

* ``ce_ground_truth``: cross-entropy on the ground-truth answers (no teacher);
* ``seq_kd``: cross-entropy on the packing teacher's own answers, one sample per training prompt at T = 1
  (``distill generate``); its output is text, which the byte student reads with its own tokenizer;
* ``uld``, ``gold``, ``pkl``: ``loss.crosstok`` with the packing teacher live (``alpha * CE + (1 - alpha) *
  divergence over the byte-aligned groups``, alpha = 0.5, forward KL, T = 1);
* ``same_tokenizer_kd``: ordinary token-level KD (alpha = 0.5, forward KL, T = 1) from a byte-level teacher of
  the same architecture, steps and data: the ceiling a teacher with the student's own tokenizer gives.

Each student is scored by exact match (greedy) on the 500 held-out problems; the record has every seed and
the count of seeds that reach 50% ("success count"). Also recorded: both teachers' exact match and the share
of the answer tokens (digits and eos) whose aligned group is not a one-to-one exact vocabulary match
(GOLD's unmatched bucket: those get only ULD's sorted L1 under ``gold``).

(b) ``quickstart``: the corpus, tokenizer and preset ``fast`` of ``distill quickstart`` (Python's standard
library). The student reads the quickstart's BPE (2,048 tokens); the teacher (the preset's teacher
architecture and steps) reads a BPE of 4,096 tokens trained on the same files. Students ``scratch``
(cross-entropy only), ``uld``, ``gold``, ``pkl`` (alpha = 0.5, forward KL, T = 1). Reported: the validation
loss (nats per student token, comparable between students: one tokenizer) and bits per byte over every
validation file (tokenizer-independent, so the teacher's own is comparable too).

    python benchmarks/cross_tokenizer.py --preset tiny --seeds 0 --seeds-b 0    # seconds: a smoke run
    # the committed record (each part ~40 minutes on one core):
    python benchmarks/cross_tokenizer.py --parts arithmetic --teacher-steps 5000 --out a.json
    python benchmarks/cross_tokenizer.py --parts quickstart --out b.json
    python benchmarks/cross_tokenizer.py --combine a.json b.json --out benchmarks/results/cross_tokenizer.json

Writes ``--out`` (default ``runs/benchmarks/cross_tokenizer.json``; the committed record:
``--out benchmarks/results/cross_tokenizer.json``) and prints the tables (:func:`table`).
"""

from __future__ import annotations

import argparse
import json
import logging
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
from distill.commands import generate  # noqa: E402
from distill.config import GenerateConfig, ModelSpec, PromptsConfig, SamplingConfig  # noqa: E402
from distill.models import load_model, load_tokenizer  # noqa: E402
from distill.tasks import arithmetic  # noqa: E402

DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "cross_tokenizer.json"
PARTS = ("arithmetic", "quickstart")
CROSSTOK = ("uld", "gold", "pkl")
ARITH_METHODS = ("ce_ground_truth", "seq_kd", *CROSSTOK, "same_tokenizer_kd")
QS_METHODS = ("scratch", *CROSSTOK)
KD_LOSS = {"divergence": "forward_kl", "temperature": 1.0, "alpha": 0.5}
DIRECTIONS = {"l": "left-to-right", "r": "right-to-left"}
SUCCESS = 0.5  # exact match a seed must reach to count as a success
QS_TEACHER_VOCAB = 4096
# The quickstart experiment's sizes per --preset: the quickstart preset it takes, and overrides (tiny: a smoke run).
QS_SETTINGS = {
    "tiny": {"preset": "fast", "max_files": 60, "teacher_steps": 4, "student_steps": 4, "student_vocab": 300,
             "teacher_vocab": 400},
}


def _log():
    return logging.getLogger("distill")


# ------------------------------------------------------------------------------------------------ tokenizer


def packing_tokenizer(out: Path, chunk: int = 3, right_to_left: bool = False) -> Path:
    """A byte-level BPE whose pre-tokenizer cuts digit runs into chunks of up to ``chunk`` digits, from the left
    (Llama 3's ``\\p{N}{1,3}``: ``"0879"`` -> ``087|9``) or, with ``right_to_left``, from the right (as thousands
    separators group them: ``0|879``), and every other character into its own piece; its merges make every such
    chunk one token. bos/eos/pad are the byte tokenizer's strings, so the student's decoded specials are the
    teacher's specials. Saved with :func:`distill.tokenizer.save_tokenizer` (reloads with AutoTokenizer,
    checked)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    from distill.checkpoint import commit_dir, tmp_dir_for
    from distill.tokenizer import BOS, EOS, PAD, save_tokenizer

    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rf"\p{{N}}{{1,{chunk}}}(?=(?:\p{{N}}{{{chunk}}})*(?!\p{{N}}))|[^\p{{N}}]"
                                   if right_to_left else rf"\p{{N}}{{1,{chunk}}}|[^\p{{N}}]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    numbers = [f"{i:0{w}d}" for w in range(1, chunk + 1) for i in range(10**w)]
    trainer = trainers.BpeTrainer(vocab_size=1 << 20, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator(numbers, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 clean_up_tokenization_spaces=False)
    wrong = [n for n in numbers if len(hf(n, add_special_tokens=False)["input_ids"]) != 1]
    if wrong:
        raise RuntimeError(f"the packing tokenizer splits {wrong[:5]}: every chunk of up to {chunk} digits "
                           "should be one token")
    tmp = tmp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(hf, tmp, where=str(out))
    commit_dir(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------ (a) arithmetic


def accuracy(model_dir: Path, problems) -> float:
    spec = ModelSpec(path=str(model_dir))
    return arithmetic.exact_match(load_model(spec, "model"), load_tokenizer(spec, "model"), problems, batch_size=256)


def unmatched_share(student_tok, teacher_tok, problems) -> dict:
    """Of the answer tokens (the response's and the eos) of the byte student on ``problems``, the share whose
    aligned group is not one student token against one teacher token with the same bytes (GOLD's unmatched
    bucket), and how many student tokens the answer's groups hold on average."""
    from distill.crosstok import align, token_bytes

    s_table, t_table = token_bytes(student_tok), token_bytes(teacher_tok)
    unmatched = total = groups = 0
    for p in problems:
        prompt = [student_tok.bos_token_id] + student_tok(p.prompt, add_special_tokens=False)["input_ids"]
        answer = student_tok(p.response, add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id]
        s_ids = prompt + answer
        s_pieces = [s_table[i] for i in s_ids]
        t_ids = teacher_tok(b"".join(s_pieces).decode(), add_special_tokens=False)["input_ids"]
        al = align(s_pieces, [t_table[i] for i in t_ids])
        size_s = {g: al.student.count(g) for g in set(al.student)}
        size_t = {g: al.teacher.count(g) for g in set(al.teacher)}
        answer_groups = al.student[len(prompt):]
        for g in answer_groups:
            total += 1
            unmatched += not (size_s[g] == 1 and size_t[g] == 1)
        groups += len(set(answer_groups))
    return {"unmatched_answer_token_share": unmatched / total, "answer_tokens": total,
            "student_tokens_per_answer_group": total / groups}


@torch.no_grad()
def reach_mass(teacher_dir: Path, student_tok, teacher_tok, problems, cache_dir: Path) -> list[float]:
    """The packing teacher's mean probability, at each of its answer positions (teacher tokens of the response,
    then the eos), on the teacher tokens that W reaches (those some student token maps to): the mass that
    ``pkl`` compares there, each side renormalized over it (``gold``'s matched tokens are a subset)."""
    from distill.crosstok import load_projection

    projection, _, _ = load_projection(student_tok, teacher_tok, cache_dir)
    reach = projection.support()
    teacher = load_model(ModelSpec(path=str(teacher_dir)), "teacher").eval()
    sums: list[float] = []
    for p in problems:
        prompt = [teacher_tok.bos_token_id] + teacher_tok(p.prompt, add_special_tokens=False)["input_ids"]
        answer = teacher_tok(p.response, add_special_tokens=False)["input_ids"] + [teacher_tok.eos_token_id]
        probs = torch.softmax(teacher(input_ids=torch.tensor([prompt + answer])).logits[0].double(), -1)
        mass = probs[len(prompt) - 1 : len(prompt) - 1 + len(answer)][:, reach].sum(-1).tolist()
        sums = [a + b for a, b in zip(sums, mass, strict=True)] if sums else mass
    return [x / len(problems) for x in sums]


def run_arithmetic(args, work: Path, timings: dict) -> dict:
    preset = arithmetic.PRESETS[args.preset]
    data_dir = work / "data"
    train_jsonl, test_jsonl = preset.write_data(data_dir)
    tests = arithmetic.read_problems(test_jsonl)

    def train_once(name: str, cfg) -> None:
        train_once_timed(args, name, cfg, timings)

    def teacher_config(run: Path, tokenizer: str):
        cfg = arithmetic.ground_truth_config(preset, data_dir, run, role="teacher", seed=0, steps=args.teacher_steps)
        arch = arithmetic.llama(*args.teacher_arch) if args.teacher_arch else cfg.student.config
        return cfg.model_copy(update={
            "student": cfg.student.model_copy(update={"tokenizer": tokenizer, "config": arch}),
            "optim": cfg.optim.model_copy(update={"lr": args.teacher_lr or cfg.optim.lr})})

    # The byte-level teacher (the same-tokenizer ceiling) and the packing teacher, both on the ground truth.
    byte_cfg = teacher_config(work / "teacher_byte", "byte")
    train_once("teacher_byte", byte_cfg)
    byte_teacher = work / "teacher_byte" / "student"
    teachers = {"byte": {"exact_match": accuracy(byte_teacher, tests)}}
    _log().info("byte teacher: exact match %.1f%%", 100 * teachers["byte"]["exact_match"])
    tried = []
    for spec in args.digit_chunks:
        chunk, direction = int(spec[1:]), DIRECTIONS[spec[0]]
        tok_dir = packing_tokenizer(work / f"tokenizer_{spec}", chunk, right_to_left=spec[0] == "r")
        run = work / f"teacher_{spec}"
        cfg = teacher_config(run, str(tok_dir))
        train_once(f"teacher_{spec}", cfg)
        acc = accuracy(run / "student", tests)
        tried.append({"digit_chunk": chunk, "direction": direction, "exact_match": acc})
        _log().info("packing teacher (digit chunks of up to %d, %s): exact match %.1f%%", chunk, direction, 100 * acc)
        if acc >= SUCCESS or args.preset == "tiny":
            break
    pack_teacher, chunk = run / "student", tried[-1]["digit_chunk"]
    student_tok = load_tokenizer(ModelSpec(config=dict(preset.student), tokenizer="byte"), "student")
    teacher_tok = load_tokenizer(ModelSpec(path=str(pack_teacher)), "teacher")
    teachers["packing"] = {"exact_match": tried[-1]["exact_match"], "digit_chunk": chunk,
                           "direction": tried[-1]["direction"], "tried": tried,
                           "vocab_size": len(teacher_tok),
                           "student_vocab_exact_share": exact_share(student_tok, teacher_tok),
                           "answer_pieces_example": [teacher_tok.decode([i]) for i in
                                                     teacher_tok(tests[0].response, add_special_tokens=False)[
                                                         "input_ids"]],
                           **unmatched_share(student_tok, teacher_tok, tests),
                           "teacher_mass_on_w_reach_per_answer_position":
                               reach_mass(pack_teacher, student_tok, teacher_tok, tests, work / "crosstok")}

    # The packing teacher's answers to the training prompts, one sample each at T = 1.
    gen_dir = work / "gen_samples"
    gcfg = GenerateConfig(
        out_dir=str(gen_dir), teacher=ModelSpec(path=str(pack_teacher)), prompts=PromptsConfig(source=str(train_jsonl)),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=max(len(p.response) for p in tests) + 1),
        n=1, scorer="none", keep="all", batch_size=256, shard_prompts=4096, progress=False)
    shutil.rmtree(gen_dir, ignore_errors=True)
    t0 = time.perf_counter()
    counts = generate.main(gcfg)
    timings["generate_samples"] = round(time.perf_counter() - t0, 1)
    records = [json.loads(line) for f in sorted(gen_dir.glob("shard-*.jsonl")) for line in f.read_text().splitlines()]
    generation = {**counts, "kept_correct": sum(arithmetic.verify(r["prompt"], r["response"]) for r in records)
                  / max(len(records), 1)}

    results: dict[str, dict] = {m: {} for m in args.methods_a}
    for seed in args.seeds:
        for method in args.methods_a:
            run_dir = work / f"{method}_seed{seed}"
            cfg = arithmetic.ground_truth_config(preset, data_dir, run_dir, role="student", seed=seed)
            update: dict = {}
            if method == "seq_kd":
                update["data"] = cfg.data.model_copy(update={"source": str(gen_dir), "truncate": True})
            elif method == "same_tokenizer_kd":
                update["teacher"] = ModelSpec(path=str(byte_teacher))
                update["loss"] = type(cfg.loss).model_validate({**cfg.loss.model_dump(), **KD_LOSS})
            elif method in CROSSTOK:
                update["teacher"] = ModelSpec(path=str(pack_teacher))
                update["loss"] = type(cfg.loss).model_validate({**cfg.loss.model_dump(), **KD_LOSS,
                                                                "crosstok": method})
            train_once(f"{method}_seed{seed}", cfg.model_copy(update=update))
            results[method][str(seed)] = accuracy(run_dir / "student", tests)
            _log().info("%s seed %d: exact match %.1f%%", method, seed, 100 * results[method][str(seed)])

    return {
        "preset": args.preset,
        "task": {"digits": preset.digits, "operators": list(preset.operators), "n_train": preset.n_train,
                 "n_test": preset.n_test},
        "teacher_arch": byte_cfg.student.config, "student_arch": preset.student, "student_steps": preset.student_steps,
        "teacher_steps": byte_cfg.train.max_steps, "teacher_lr": byte_cfg.optim.lr, "batch_size": preset.batch_size,
        "lr": preset.student_lr,
        "loss": KD_LOSS, "seeds": args.seeds, "teachers": teachers, "seq_kd_generation": generation,
        "methods": {m: summarize(r) for m, r in results.items()},
    }


def train_once_timed(args, name: str, cfg, timings: dict) -> None:
    """Train ``cfg`` unless ``--reuse`` finds it finished; record its seconds (a reused run: the time it took
    then, written beside it, else its logged step times)."""
    run = Path(cfg.out_dir)
    if args.reuse and finished(cfg):
        stamp = run / "bench_seconds.json"
        if stamp.is_file():
            timings[name] = json.loads(stamp.read_text())["seconds"]
        else:
            logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            logged = [r for r in logged if r.get("split") == "train" and "step_seconds" in r]
            steps = [r["step"] for r in logged]
            timings[name] = round(sum(r["step_seconds"] * (s - p) for r, s, p in
                                      zip(logged, steps, [0, *steps[:-1]], strict=True)), 1)
        return
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    training.train(cfg)
    timings[name] = round(time.perf_counter() - t0, 1)
    atomic_write_json(run / "bench_seconds.json", {"seconds": timings[name]})


def exact_share(student_tok, teacher_tok) -> float:
    """The share of the student's vocabulary with a teacher token of the same bytes (the pre-flight's share)."""
    from distill.crosstok import exact_matches, token_bytes

    s_table = token_bytes(student_tok)
    return len(exact_matches(s_table, token_bytes(teacher_tok))) / len(s_table)


def finished(cfg) -> bool:
    """Whether ``cfg.out_dir`` holds a finished run of exactly ``cfg`` (``--reuse``)."""
    import yaml

    run = Path(cfg.out_dir)
    if not (run / "student" / "distill_summary.json").is_file() or not (run / "config.yaml").is_file():
        return False
    return yaml.safe_load((run / "config.yaml").read_text()) == yaml.safe_load(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def summarize(per_seed: dict[str, float]) -> dict:
    vals = list(per_seed.values())
    return {"exact_match": per_seed, "mean": statistics.mean(vals), "success_count": sum(v >= SUCCESS for v in vals)}


# ------------------------------------------------------------------------------------------------ (b) quickstart


def qs_settings(preset_name: str):
    from dataclasses import replace

    from distill.commands import quickstart

    over = QS_SETTINGS.get(preset_name, {})
    preset = quickstart.PRESETS[over.get("preset", "fast")]
    preset = replace(preset, **{k: over[k] for k in ("max_files", "teacher_steps", "student_steps") if k in over})
    return preset, over.get("student_vocab", preset.vocab_size), over.get("teacher_vocab", QS_TEACHER_VOCAB)


def evaluate_text(model_dir: Path, tok_dir: Path, val_jsonl: Path, seq_len: int) -> dict:
    """Validation loss (per token of the model's own tokenizer) and bits per byte over every validation file."""
    from distill.config import DataConfig
    from distill.data import build_datasets, collate
    from distill.evaluation.metrics import eval_sums, metrics_from_sums, target_bytes, token_byte_lengths
    from distill.models import output_head

    tokenizer = load_tokenizer(ModelSpec(path=str(tok_dir)), "eval")
    val_ds, _ = build_datasets(DataConfig(source=str(val_jsonl), seq_len=seq_len, eval_fraction=0.0, format="text"),
                               tokenizer)
    n_bytes = target_bytes(val_ds, token_byte_lengths(tokenizer))
    model = load_model(ModelSpec(path=str(model_dir)), "eval")
    batches = (collate([val_ds[j] for j in range(i, min(i + 32, len(val_ds)))], tokenizer.pad_token_id)
               for i in range(0, len(val_ds), 32))
    m = metrics_from_sums(eval_sums(model, output_head(model, len(tokenizer)), batches), target_bytes=n_bytes)
    return {k: m[k] for k in ("val_loss", "bits_per_byte", "val_tokens")} | {"val_bytes": n_bytes}


def run_quickstart(args, work: Path, timings: dict) -> dict:
    from distill.commands import quickstart

    preset, s_vocab, t_vocab = qs_settings(args.preset)
    train_jsonl, val_jsonl, corpus_key = quickstart.write_corpus(work / "data", preset.max_files)
    s_tok = quickstart.train_tokenizer(train_jsonl, s_vocab, work / f"tokenizer_{s_vocab}")
    t_tok = quickstart.train_tokenizer(train_jsonl, t_vocab, work / f"tokenizer_{t_vocab}")

    def train_once(name: str, cfg) -> None:
        train_once_timed(args, name, cfg, timings)

    def config(name, tok, arch, steps, lr, seed):
        cfg = quickstart.run_config(preset, name, work, tok, train_jsonl, val_jsonl, arch, steps, lr, None)
        return cfg.model_copy(update={
            "student": cfg.student.model_copy(update={"seed": seed}),
            "train": cfg.train.model_copy(update={"seed": seed}),
            "eval": cfg.eval.model_copy(update={"every": 0})})  # every model is evaluated on every file below

    teacher_cfg = config("teacher", t_tok, preset.teacher, preset.teacher_steps, preset.teacher_lr, 0)
    train_once("teacher", teacher_cfg)
    teacher_dir = work / "teacher" / "student"
    teacher = evaluate_text(teacher_dir, t_tok, val_jsonl, preset.seq_len)
    _log().info("quickstart teacher: val loss %.3f, %.3f bits/byte", teacher["val_loss"], teacher["bits_per_byte"])

    results: dict[str, dict] = {m: {} for m in args.methods_b}
    for seed in args.seeds_b:
        for method in args.methods_b:
            cfg = config(f"{method}_seed{seed}", s_tok, preset.student, preset.student_steps, preset.student_lr, seed)
            if method in CROSSTOK:
                cfg = cfg.model_copy(update={
                    "teacher": ModelSpec(path=str(teacher_dir)),
                    "loss": type(cfg.loss).model_validate({**cfg.loss.model_dump(), **KD_LOSS, "crosstok": method})})
            else:
                cfg = cfg.model_copy(update={"loss": type(cfg.loss).model_validate({**cfg.loss.model_dump(),
                                                                                    "alpha": 1.0})})
            train_once(f"{method}_seed{seed}", cfg)
            results[method][str(seed)] = evaluate_text(Path(cfg.out_dir) / "student", s_tok, val_jsonl, preset.seq_len)
            _log().info("quickstart %s seed %d: %s", method, seed, results[method][str(seed)])

    return {
        "preset": "fast" if args.preset != "tiny" else "fast (tiny overrides)", "corpus": corpus_key,
        "max_files": preset.max_files, "seq_len": preset.seq_len, "batch_size": preset.batch_size,
        "student_vocab": s_vocab, "teacher_vocab": t_vocab,
        "student_vocab_exact_share": exact_share(load_tokenizer(ModelSpec(path=str(s_tok)), "student"),
                                                 load_tokenizer(ModelSpec(path=str(t_tok)), "teacher")),
        "teacher_arch": preset.teacher,
        "student_arch": preset.student, "teacher_steps": preset.teacher_steps, "student_steps": preset.student_steps,
        "lr": preset.student_lr, "loss": KD_LOSS, "scratch_loss": {"alpha": 1.0}, "seeds": args.seeds_b,
        "teacher": teacher,
        "methods": {m: {"per_seed": r,
                        "val_loss_mean": statistics.mean(v["val_loss"] for v in r.values()),
                        "bits_per_byte_mean": statistics.mean(v["bits_per_byte"] for v in r.values())}
                    for m, r in results.items()},
    }


# ------------------------------------------------------------------------------------------------ main


def _chunk_spec(value: str) -> str:
    if len(value) != 2 or value[0] not in DIRECTIONS or value[1] not in "23456789":
        raise argparse.ArgumentTypeError(f"{value!r}: l or r and a chunk size, e.g. l3 or r2")
    return value


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(arithmetic.PRESETS), default="student32",
                   help="the arithmetic preset (tiny: a smoke run of both parts)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="seeds of (a)")
    p.add_argument("--seeds-b", dest="seeds_b", type=int, nargs="+", default=[0, 1], help="seeds of (b)")
    p.add_argument("--only", nargs="+", choices=sorted(set(ARITH_METHODS + QS_METHODS)),
                   help="run only these methods (of either part)")
    p.add_argument("--teacher-arch", type=int, nargs=4, metavar=("HIDDEN", "LAYERS", "HEADS", "INTER"),
                   help="(a): both teachers' architecture (arithmetic.llama), instead of the preset's teacher")
    p.add_argument("--teacher-steps", type=int, help="(a): both teachers' steps, instead of the preset's")
    p.add_argument("--teacher-lr", type=float, help="(a): both teachers' learning rate, instead of the preset's")
    p.add_argument("--digit-chunks", nargs="+", default=["l3", "l2", "r2"],
                   type=_chunk_spec,
                   help="(a): the packing tokenizers to try in order until a teacher reaches 50%%: l3 = chunks of up "
                        "to 3 digits from the left (Llama 3), r2 = of up to 2 from the right")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "cross_tokenizer")
    p.add_argument("--reuse", action="store_true", help="keep the finished runs already in --work")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                   help="write one record of these records (their parts, and their seeds of a part) and stop")
    args = p.parse_args(argv)
    if args.combine:
        record = combine([json.loads(f.read_text()) for f in args.combine])
        atomic_write_json(args.out, record)
        print(table(record))
        return record
    args.methods_a = [m for m in ARITH_METHODS if not args.only or m in args.only]
    args.methods_b = [m for m in QS_METHODS if not args.only or m in args.only]
    t_start = time.perf_counter()
    record: dict = {"torch_threads": torch.get_num_threads()}
    for part in args.parts:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        work = args.work / args.preset / part
        section = (run_arithmetic if part == "arithmetic" else run_quickstart)(args, work, timings)
        section["seconds"] = timings  # each training run's wall seconds, when it ran (--reuse: as recorded then)
        section["training_seconds"] = round(sum(timings.values()), 1)
        section["total_seconds"] = round(time.perf_counter() - t0, 1)  # this invocation
        record[part] = section
    record["total_seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    print(table(record))
    return record


def combine(records: list[dict]) -> dict:
    """One record of runs that each wrote some parts, or some seeds of a part (same settings otherwise)."""
    out: dict = {"torch_threads": records[0].get("torch_threads"), "combined_from": len(records)}
    for part in PARTS:
        have = [r[part] for r in records if part in r]
        if not have:
            continue
        merged = json.loads(json.dumps(have[0]))
        for other in have[1:]:
            merged["seeds"] = sorted(set(merged["seeds"]) | set(other["seeds"]))
            merged["seconds"] = {**merged["seconds"], **other["seconds"]}
            merged["total_seconds"] += other["total_seconds"]
            merged["training_seconds"] = round(sum(merged["seconds"].values()), 1)
            for m, v in other["methods"].items():
                if m not in merged["methods"]:
                    merged["methods"][m] = v
                    continue
                key = "exact_match" if part == "arithmetic" else "per_seed"
                merged["methods"][m][key] = {**merged["methods"][m][key], **v[key]}
        for m, v in merged["methods"].items():
            if part == "arithmetic":
                merged["methods"][m] = summarize(v["exact_match"])
            else:
                r = v["per_seed"]
                merged["methods"][m] = {"per_seed": r,
                                        "val_loss_mean": statistics.mean(x["val_loss"] for x in r.values()),
                                        "bits_per_byte_mean": statistics.mean(x["bits_per_byte"] for x in r.values())}
        out[part] = merged
    out["total_seconds"] = sum(out[p]["total_seconds"] for p in PARTS if p in out)
    return out


# ------------------------------------------------------------------------------------------------ tables


def _ordered(methods: dict, order: tuple[str, ...]) -> list:
    """The methods in the order of ``order`` (a record's JSON has its keys sorted), others last."""
    return sorted(methods.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def table(record: dict) -> str:
    """The markdown tables of a record: (a) exact match per seed and success count, (b) val loss and bits/byte."""
    out = []
    if "arithmetic" in record:
        a = record["arithmetic"]
        seeds, pack, byte = a["seeds"], a["teachers"]["packing"], a["teachers"]["byte"]
        out.append(f"(a) arithmetic, preset `{a['preset']}`: packing teacher (digit chunks of up to "
                   f"{pack['digit_chunk']} {pack['direction']}, {pack['vocab_size']} tokens) {100 * pack['exact_match']:.1f}% exact match, "
                   f"byte-level teacher {100 * byte['exact_match']:.1f}%; "
                   f"{100 * pack['unmatched_answer_token_share']:.0f}% of the answer tokens are in a group with no "
                   "one-to-one exact match; the packing teacher's mean probability on the teacher tokens W reaches, "
                   "at each of its answer tokens: "
                   + ", ".join(f"{m:.2g}" for m in pack["teacher_mass_on_w_reach_per_answer_position"][:-1])
                   + f" (digits), {pack['teacher_mass_on_w_reach_per_answer_position'][-1]:.2f} (eos)")
        out.append("")
        out.append("| method | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean | seeds ≥ {SUCCESS:.0%} |")
        out.append("|---" * (len(seeds) + 3) + "|")
        for m, v in _ordered(a["methods"], ARITH_METHODS):
            cells = " | ".join(f"{100 * v['exact_match'][str(s)]:.1f}%" if str(s) in v["exact_match"] else "–"
                               for s in seeds)
            out.append(f"| {m} | {cells} | {100 * v['mean']:.1f}% | {v['success_count']}/{len(v['exact_match'])} |")
    if "quickstart" in record:
        b = record["quickstart"]
        if out:
            out.append("")
        seeds, t = b["seeds"], b["teacher"]
        out.append(f"(b) quickstart corpus, preset `{b['preset']}`: student BPE {b['student_vocab']} tokens, teacher "
                   f"BPE {b['teacher_vocab']} tokens ({100 * b['student_vocab_exact_share']:.0f}% of the student's "
                   f"vocabulary has an exact teacher token); teacher {t['val_loss']:.3f} nats/token (its own), "
                   f"{t['bits_per_byte']:.3f} bits/byte")
        out.append("")
        out.append("| student | " + " | ".join(f"val loss seed {s}" for s in seeds) + " | "
                   + " | ".join(f"bits/byte seed {s}" for s in seeds) + " | mean val loss | mean bits/byte |")
        out.append("|---" * (2 * len(seeds) + 3) + "|")
        for m, v in _ordered(b["methods"], QS_METHODS):
            r = v["per_seed"]
            loss = " | ".join(f"{r[str(s)]['val_loss']:.3f}" if str(s) in r else "–" for s in seeds)
            bpb = " | ".join(f"{r[str(s)]['bits_per_byte']:.3f}" if str(s) in r else "–" for s in seeds)
            out.append(f"| {m} | {loss} | {bpb} | {v['val_loss_mean']:.3f} | {v['bits_per_byte_mean']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    _log().setLevel(logging.INFO)
    main()
