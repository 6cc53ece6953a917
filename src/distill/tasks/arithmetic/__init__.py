"""Multi-digit arithmetic: a benchmark with exact answers for comparing sequence-level distillation.

A problem is two non-negative integers below ``10**digits`` and an operator (``+``, ``-``, ``*``). Both
operands are written with exactly ``digits`` digits (zero-padded), and the answer with a fixed number of
digits for the operator (``digits + 1`` for ``+``, ``digits`` for ``-``, ``2 * digits`` for ``*``), most
significant first, zero-padded too::

    prompt "04821+00397="   response "005218"      (digits=5)
    prompt "04821-00397="   response "04424"

Why this format: with fixed widths, digit k of each operand and of the answer are the same distance
apart in every problem, so a small Llama (whose attention sees relative positions, RoPE) finds them
with fixed attention offsets. On 3-digit addition, a 2-layer, 148k-parameter model trained for 1,500
steps of 64 problems reached 100% exact answers in this format, against 8% with unpadded operands and
the answer least significant digit first, 6% with padded operands and that reversed answer, 34% with
operands and answer all reversed (padded), and 1% with unpadded operands and the answer most significant
first (a 0.8M-parameter model, 1,000 steps).

Every answer takes several tokens that must all be right; the carry into a digit depends on all the
digits below it, which come later in the answer, so each digit needs a look ahead and one slip spoils
the whole answer: sequence-level accuracy is where distillation methods differ. The generator draws
``a - b`` with ``a >= b``; :func:`verify` still scores a negative answer, written as ``-`` and the
digits (``003-005=`` -> ``-002``).

- :func:`make_splits`: seeded, disjoint train/test(/validation) problems; :func:`write_splits`: ``train.jsonl``,
  ``test.jsonl`` and ``valid.jsonl`` (``prompt``, ``response``, ``answer``), written atomically.
- :func:`verify`: 1.0 for an exactly right completion, computed from the prompt alone.
- :func:`exact_match`: greedy decoding of each prompt, scored by :func:`verify`.
- :data:`PRESETS` and :func:`ground_truth_config`: the sizes of a teacher and a smaller student, and the
  ``TrainConfig`` that trains either on the ground truth with :func:`distill.training.train`.

The default preset (3-digit addition): its teacher (hidden 64, 2 layers, 148k parameters) reached 98.4% on
the 500 test problems after 1,500 steps (~1 min on one core; 100% on another CPU: a model this small moves
with the rounding); its student (hidden 24, 2 layers, 20k parameters, 7x fewer) trained on the ground truth
for the same steps stayed at 1.4, 3.8, 0.8 and 0.4% with seeds 0-3: it sits on a loss plateau that
cross-entropy does not leave in that budget. Matching the teacher's hidden states with token-level KD
(``loss.hidden``, ``loss.alpha=0.5``) lifted it to 91.4, 84.0, 80.0 and 99.0% on seeds 0-3
(``benchmarks/results/seqkd_4seeds.json``). The ``student32`` preset's student (hidden 32, 29k parameters) is
at the edge: with cross-entropy it reached 1.0, 97.4, 0.4 and 95.8% on seeds 0-3 (the plateau's length is
seed-dependent; ``benchmarks/results/seqkd_student32_4seeds.json``), so methods compared on it differ mostly
in how many seeds escape.

The training pipeline (``data.format: prompt_response``) prepends the tokenizer's bos token, supervises
only the response and appends eos; :func:`exact_match` prompts with the same ``[bos] prompt`` prefix.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.checkpoint import atomic_write_text
from distill.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelSpec,
    OptimConfig,
    TrainConfig,
    TrainLoopConfig,
)
from distill.generation.sampling import SamplingParams, sample

OPERATORS = ("+", "-", "*")
TRAIN_FILE, TEST_FILE, VALID_FILE = "train.jsonl", "test.jsonl", "valid.jsonl"

# The whole prompt: two ASCII digit strings, an operator, "=" (surrounding whitespace is tolerated).
_PROMPT = re.compile(r"([0-9]+)([+*-])([0-9]+)=")


# ------------------------------------------------------------------------------------------------ problems


@dataclass(frozen=True)
class Problem:
    """``a op b`` with both operands written with ``width`` digits (zero-padded)."""

    a: int
    op: str
    b: int
    width: int

    @property
    def prompt(self) -> str:
        return f"{self.a:0{self.width}d}{self.op}{self.b:0{self.width}d}="

    @property
    def answer(self) -> int:
        return apply(self.a, self.op, self.b)

    @property
    def response(self) -> str:
        return format_answer(self.answer, self.op, self.width)

    def record(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "answer": self.answer}

    def key(self) -> tuple[int, str, int]:
        """Identity for the train/test split: ``a+b`` and ``b+a`` are one problem (so are ``a*b``, ``b*a``)."""
        if self.op in ("+", "*"):
            return (min(self.a, self.b), self.op, max(self.a, self.b))
        return (self.a, self.op, self.b)


def apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}; use one of {', '.join(OPERATORS)}")


def answer_width(op: str, width: int) -> int:
    """Digits of every answer to ``op`` on ``width``-digit operands: enough for the largest one."""
    return {"+": width + 1, "-": width, "*": 2 * width}[op]


def format_answer(value: int, op: str, width: int) -> str:
    """The response text: ``answer_width(op, width)`` digits, zero-padded, most significant first, after a
    ``-`` when negative (``0397-0400=`` -> ``-0003``)."""
    digits = f"{abs(value):0{answer_width(op, width)}d}"
    return f"-{digits}" if value < 0 else digits


def parse_prompt(prompt: str) -> Problem:
    """``"4821+0397="`` -> ``Problem(4821, "+", 397, width=4)``; anything else is a ValueError.

    The width is the longer operand's length, so a prompt written without padding (``4821+397=``) is read
    as the same problem.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r:.80}")
    m = _PROMPT.fullmatch(prompt.strip())
    if m is None:
        raise ValueError(
            f"malformed arithmetic prompt {prompt!r:.80}: expected <digits><op><digits>= with op one of "
            f"{', '.join(OPERATORS)} (e.g. '4821+0397=')"
        )
    a, op, b = m.groups()
    return Problem(int(a), op, int(b), width=max(len(a), len(b)))


def _draw(seed: int, counter: int, n: int) -> int:
    """A uniform integer in ``[0, n)``, a pure function of (seed, counter).

    A hash rather than ``random.Random``: the same seed gives the same problems on every Python version
    (only ``random()`` and seeding are guaranteed stable there). 256 bits make the modulo bias negligible.
    """
    digest = hashlib.sha256(f"arithmetic:{seed}:{counter}".encode()).digest()
    return int.from_bytes(digest, "big") % n


def _check_settings(digits: int, operators: Sequence[str]) -> None:
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits={digits!r}: give a positive number of digits per operand (e.g. 3)")
    if not operators or any(op not in OPERATORS for op in operators):
        raise ValueError(f"operators={tuple(operators)!r}: give a non-empty subset of {OPERATORS}")


def generate(seed: int, digits: int, operators: Sequence[str] = ("+",)) -> Iterable[Problem]:
    """An endless, seeded stream of problems (with repeats): operands uniform in ``[0, 10**digits)``, the
    operator uniform over ``operators``; for ``-`` the larger operand comes first, so no answer is negative."""
    _check_settings(digits, operators)
    ops = tuple(operators)
    counter = 0
    while True:
        a = _draw(seed, counter, 10**digits)
        b = _draw(seed, counter + 1, 10**digits)
        op = ops[_draw(seed, counter + 2, len(ops))]
        counter += 3
        if op == "-" and b > a:
            a, b = b, a
        yield Problem(a, op, b, width=digits)


def _distinct(seed: int, digits: int, operators: Sequence[str], wanted: int) -> Iterable[Problem]:
    """The distinct problems (by :meth:`Problem.key`) of :func:`generate`'s stream, in order; refuses a request
    for more than the task has room for."""
    _check_settings(digits, operators)
    # How many distinct problems exist (one per unordered pair of operands and operator: `+` and `*`
    # commute, `-` puts the larger first), so an impossible request fails at once instead of looping forever.
    n_values = 10**digits
    available = len(set(operators)) * n_values * (n_values + 1) // 2
    if wanted > available // 2:  # leave room: the last few distinct problems would take very long to draw
        raise ValueError(
            f"{wanted} problems with digits={digits} and operators={tuple(operators)} "
            f"(only {available} distinct problems exist): use more digits or fewer problems"
        )
    seen: set[tuple[int, str, int]] = set()
    for problem in generate(seed, digits, operators):
        key = problem.key()
        if key not in seen:
            seen.add(key)
            yield problem


def make_splits(seed: int, digits: int, operators: Sequence[str], n_train: int, n_test: int, n_valid: int = 0
                ) -> tuple[list[Problem], list[Problem]] | tuple[list[Problem], list[Problem], list[Problem]]:
    """(train, test), or (train, test, valid) when ``n_valid > 0``: distinct problems, no problem in two
    splits, a pure function of the arguments. The stream's first ``n_test`` distinct problems are the test
    split, the next ``n_train`` the train split and the next ``n_valid`` the validation split, so the test
    split does not depend on ``n_train`` and neither depends on ``n_valid``. The validation split is what a
    training run may read while it trains (an eval loss, a schedule that reacts to it); the test split is
    for the reported numbers only."""
    if n_train < 1 or n_test < 1 or n_valid < 0:
        raise ValueError(f"n_train={n_train}, n_test={n_test}, n_valid={n_valid}: the train and test splits "
                         "need at least one problem")
    stream = iter(_distinct(seed, digits, operators, n_train + n_test + n_valid))
    test = [next(stream) for _ in range(n_test)]
    train = [next(stream) for _ in range(n_train)]
    if not n_valid:
        return train, test
    return train, test, [next(stream) for _ in range(n_valid)]


def write_splits(out_dir: str | Path, seed: int, digits: int, operators: Sequence[str], n_train: int,
                 n_test: int, n_valid: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (and ``valid.jsonl`` when ``n_valid > 0``) under ``out_dir``,
    each complete or absent; returns the paths of the first two."""
    splits = make_splits(seed, digits, operators, n_train, n_test, n_valid)
    out = Path(out_dir)
    paths = []
    for name, problems in zip((TRAIN_FILE, TEST_FILE, VALID_FILE)[: len(splits)], splits, strict=True):
        path = out / name
        atomic_write_text(path, "".join(json.dumps(p.record()) + "\n" for p in problems))
        paths.append(path)
    return paths[0], paths[1]


def read_problems(path: str | Path) -> list[Problem]:
    """The problems of a written split (parsed from each record's ``prompt``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; write the splits first (write_splits)")
    return [parse_prompt(json.loads(line)["prompt"]) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ scoring


def verify(prompt: str, completion: str) -> float:
    """1.0 when ``completion`` (up to its first newline, surrounding whitespace ignored) is exactly the
    answer of the problem in ``prompt`` in this task's format (:func:`format_answer`; the answer width
    follows from the prompt's operand width), else 0.0.

    The answer is computed from the prompt, never looked up, so any prompt of the task's form can be scored.
    """
    problem = parse_prompt(prompt)
    if not isinstance(completion, str):
        raise ValueError(f"a completion must be a string, got {type(completion).__name__}: {completion!r:.80}")
    return 1.0 if completion.split("\n", 1)[0].strip() == problem.response else 0.0


def _prompt_of(item) -> str:
    if isinstance(item, Problem):
        return item.prompt
    if isinstance(item, Mapping):
        return item["prompt"]
    if isinstance(item, str):
        return item
    raise ValueError(f"expected a Problem, a record with 'prompt', or a prompt string; got {type(item).__name__}")


def completions(model, tokenizer, problems: Sequence, batch_size: int = 64, max_new_tokens: int | None = None
                ) -> list[str]:
    """The greedy completion of each problem (Problems, records with ``prompt``, or prompt strings), decoded
    up to its first eos (special tokens kept in the text, so a completion containing one is wrong).

    Each prompt is ``[bos] prompt`` as in training; decoding is :func:`distill.generation.sampling.sample` at
    temperature 0 (every setting explicit, so a checkpoint's ``generation_config`` cannot change it).
    ``max_new_tokens`` defaults to the longest answer + 1 (the eos).
    """
    prompts = [_prompt_of(p) for p in problems]
    if not prompts:
        raise ValueError("exact_match got no problems; pass at least one")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: give a positive batch size")
    if max_new_tokens is None:
        max_new_tokens = max(len(parse_prompt(p).response) for p in prompts) + 1
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; exact_match needs one to end completions")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=(eos,))
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [([bos] if bos is not None else []) + list(tokenizer(p, add_special_tokens=False)["input_ids"])
                   for p in chunk]
        out = sample(model, encoded, params, pad_id=pad, model_logprobs=False)
        for row in out.completions():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(tokenizer.decode(row, skip_special_tokens=False))
    return texts


@torch.no_grad()
def exact_match(model, tokenizer, problems: Sequence, batch_size: int = 64, max_new_tokens: int | None = None
                ) -> float:
    """Fraction of ``problems`` whose greedy completion (:func:`completions`) :func:`verify` accepts."""
    prompts = [_prompt_of(p) for p in problems]
    texts = completions(model, tokenizer, prompts, batch_size, max_new_tokens)
    return sum(verify(p, t) for p, t in zip(prompts, texts, strict=True)) / len(prompts)


# ------------------------------------------------------------------------------------------------ presets


def max_length(digits: int, operators: Sequence[str]) -> int:
    """Tokens of the longest example: bos, prompt, answer, eos (the byte tokenizer: one token per character)."""
    _check_settings(digits, operators)
    answer = max(answer_width(op, digits) for op in operators)
    return 1 + (2 * digits + 2) + answer + 1


def llama(hidden: int, layers: int, heads: int, inter: int, kv_heads: int | None = None, positions: int = 64,
          rope_theta: float = 30.0) -> dict:
    """A Llama config dict for ``ModelSpec(config=...)``.

    ``rope_theta`` is far below Llama's 10,000: the answer digits are found at fixed distances of up to
    ~2 * digits + 2 tokens, and a small RoPE base gives the attention heads rotation frequencies that
    tell such nearby offsets apart. With the default base, training sat on a loss plateau for a
    seed-dependent number of steps (3-digit addition: 1 of 3 seeds still stuck at 1% after 1,500 steps;
    with 30, that seed reached 100%).
    """
    return {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads or heads, "intermediate_size": inter,
            "max_position_embeddings": positions, "rope_theta": rope_theta, "tie_word_embeddings": True}


@dataclass(frozen=True)
class TaskPreset:
    digits: int
    operators: tuple[str, ...]
    n_train: int
    n_test: int
    teacher: dict
    student: dict
    teacher_steps: int
    student_steps: int
    batch_size: int
    teacher_lr: float
    student_lr: float
    warmup_steps: int = 0
    seed: int = 0
    n_valid: int = 500

    def write_data(self, out_dir: str | Path) -> tuple[Path, Path]:
        """``train.jsonl``, ``test.jsonl`` and ``valid.jsonl`` (:func:`write_splits`); returns the first two."""
        return write_splits(out_dir, self.seed, self.digits, self.operators, self.n_train, self.n_test, self.n_valid)


PRESETS = {
    "default": TaskPreset(
        digits=3, operators=("+",), n_train=20000, n_test=500,
        teacher=llama(64, 2, 4, 256), student=llama(24, 2, 4, 64),
        teacher_steps=1500, student_steps=1500, batch_size=64, teacher_lr=3e-3, student_lr=3e-3, warmup_steps=20,
    ),
    "student32": TaskPreset(
        digits=3, operators=("+",), n_train=20000, n_test=500,
        teacher=llama(64, 2, 4, 256), student=llama(32, 2, 4, 64),
        teacher_steps=1500, student_steps=1500, batch_size=64, teacher_lr=3e-3, student_lr=3e-3, warmup_steps=20,
    ),
    "tiny": TaskPreset(
        digits=2, operators=("+",), n_train=200, n_test=50,
        teacher=llama(32, 1, 2, 64), student=llama(16, 1, 2, 32),
        teacher_steps=4, student_steps=4, batch_size=16, teacher_lr=3e-3, student_lr=3e-3, n_valid=50,
    ),
}


def ground_truth_config(preset: TaskPreset, data_dir: str | Path, out_dir: str | Path, role: str = "teacher",
                        seed: int = 0, steps: int | None = None) -> TrainConfig:
    """The training run's config that trains ``role`` (``teacher`` or ``student``: which architecture, steps
    and lr of ``preset``) on the ground truth in ``data_dir`` (``train.jsonl``; its eval split, which a
    schedule such as DistiLLM's reads while training, is ``valid.jsonl``, never the reported ``test.jsonl``;
    :meth:`TaskPreset.write_data`) with plain cross-entropy. ``steps`` overrides the preset's."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role={role!r}: use 'teacher' or 'student'")
    data_dir = Path(data_dir)
    for name in (TRAIN_FILE, VALID_FILE):
        if not (data_dir / name).is_file():
            raise ValueError(f"{data_dir / name} does not exist; write the data first (preset.write_data(dir))")
    arch = preset.teacher if role == "teacher" else preset.student
    seq_len = max_length(preset.digits, preset.operators)
    if arch.get("max_position_embeddings", seq_len) < seq_len:
        raise ValueError(
            f"the {role} config has max_position_embeddings={arch['max_position_embeddings']}, fewer than the "
            f"{seq_len} tokens of the longest example at digits={preset.digits}; raise it"
        )
    max_steps = steps if steps is not None else (preset.teacher_steps if role == "teacher" else preset.student_steps)
    lr = preset.teacher_lr if role == "teacher" else preset.student_lr
    return TrainConfig(
        out_dir=str(out_dir),
        student=ModelSpec(config=dict(arch), tokenizer="byte", seed=seed),
        teacher=None,
        data=DataConfig(source=str(data_dir / TRAIN_FILE), eval_source=str(data_dir / VALID_FILE),
                        format="prompt_response", packing=False, seq_len=seq_len, eval_fraction=0.0),
        optim=OptimConfig(lr=lr, warmup_steps=min(preset.warmup_steps, max_steps - 1), weight_decay=0.0),
        train=TrainLoopConfig(max_steps=max_steps, batch_size=preset.batch_size, seed=seed),
        eval=EvalConfig(every=0, batch_size=64),
        checkpoint=CheckpointConfig(every=0, keep_last=1),
        log=LogConfig(every=max(1, min(50, max_steps)), progress=False),
    )
