"""The Python API: every command of the ``distill`` CLI as a function (the CLI calls these).

    import distill

    result = distill.train("configs/tiny/train.yaml", out_dir="runs/tiny", loss={"divergence": "jsd"})
    result.metrics              # the final evaluation: {"val_loss": ..., "kl_to_teacher": ..., ...}
    result.student_dir          # the student as a Hugging Face checkpoint

A function takes its config as a YAML file's path, the dict such a file holds, or a config object
(:mod:`distill.config`); then ``key=value`` strings as the CLI takes them; then keyword settings, each a
section (a dict merged into it), a key (``out_dir="runs/x"``) or a dotted key (``**{"loss.alpha": 0.5}``).
Later ones win. Each returns a small result object; callbacks see the work as it happens:

* ``train``: ``on_step(record)`` with each train-log record, ``on_eval(record)`` with each evaluation (the
  records ``metrics.jsonl`` gets);
* ``cache`` and ``generate``: ``on_step(shard)`` as each shard is written;
* ``evaluate``: ``on_eval(name, metrics)`` as each model is measured;
* ``prune``: ``on_eval(name, row)`` as each plan's calibration loss is measured.

``preflight`` takes the config ``train`` takes and measures the run before it starts (no callbacks).

A bad config raises :class:`distill.config.ConfigError` (a ``ValueError``) naming the key and what to write.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from distill import training
from distill.commands import cache as cache_command
from distill.commands import eval as eval_command
from distill.commands import generate as generate_command
from distill.commands import preflight as preflight_command
from distill.commands import prune as prune_command
from distill.config import CacheConfig, EvalRunConfig, GenerateConfig, PruneConfig, TrainConfig, load_config
from distill.evaluation.tables import eval_table

ConfigSource = str | Path | dict | BaseModel | None
Callback = Callable[..., object]


@dataclass(frozen=True)
class TrainResult:
    """A finished training run."""

    out_dir: Path
    student_dir: Path  #: the trained student, an ordinary Hugging Face checkpoint
    steps: int
    tokens: int  #: training tokens seen (all processes)
    metrics: dict  #: the final evaluation (val_loss, val_ppl, kl_to_teacher, ...); empty without an eval split
    config: TrainConfig = field(repr=False)

    def history(self) -> list[dict]:
        """The run's ``metrics.jsonl``: one record per train log (``split: train``) and per evaluation
        (``split: eval``)."""
        path = self.out_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class CacheResult:
    """A complete teacher cache."""

    out_dir: Path
    splits: dict  #: per split: examples, positions, shards, bytes, bytes_per_token
    summary: dict = field(repr=False)  #: what ``distill cache`` logs (shards and tokens written, seconds)


@dataclass(frozen=True)
class GenerateResult:
    """Complete sequence-level KD data: the selected responses, one JSONL shard per ``shard_prompts``."""

    out_dir: Path
    counts: dict  #: prompts, samples, kept, scorer failures ...

    @property
    def files(self) -> list[Path]:
        """The shards a ``data.source`` of ``distill train`` reads (``source: jsonl``, ``path: out_dir``)."""
        return sorted(self.out_dir.glob("shard-*.jsonl"))


@dataclass(frozen=True)
class EvalResult:
    """What ``distill eval`` measured (also written to ``out`` as JSON)."""

    out: Path
    models: dict  #: name -> metrics on the data (loss, ppl, bits_per_byte, ece, kl, agreement ...)
    results: dict = field(repr=False)  #: the whole JSON: the teacher, speculative and lm-eval sections too

    def table(self) -> str:
        """The markdown table ``distill eval`` prints."""
        return eval_table(self.results)


@dataclass(frozen=True)
class PruneResult:
    """A pruned model, written as a Hugging Face checkpoint."""

    out_dir: Path
    params: tuple[int, int]  #: (original, pruned)
    calibration_loss: tuple[float, float]  #: (original, pruned), on the calibration data
    report: dict = field(repr=False)  #: ``prune_report.json``


def train(config: ConfigSource, *overrides: str, resume: bool = False, on_step: Callback | None = None,
          on_eval: Callback | None = None, **settings) -> TrainResult:
    """``distill train``: a student distilled from its teacher (or trained on data alone without one).
    ``resume``: continue the latest checkpoint in ``out_dir``."""
    cfg = load_config(TrainConfig, config, list(overrides), settings)
    summary = training.train(cfg, resume=resume, on_step=on_step, on_eval=on_eval)
    out_dir = Path(cfg.out_dir)
    return TrainResult(out_dir=out_dir, student_dir=out_dir / "student", steps=summary["steps"],
                       tokens=summary["tokens"],
                       metrics={k: v for k, v in summary.items() if k not in ("steps", "tokens")}, config=cfg)


@dataclass(frozen=True)
class PreflightResult:
    """What ``distill preflight`` measured on a sample of a training run's data, before any step."""

    splits: dict  #: per split: the student's and the teacher's loss and bits per byte, the gap, the examples used
    vocabulary: dict  #: the tokenizer's length, each output layer's rows, the sample's tokens each covers
    cost: dict  #: seconds of one teacher signal and of one student forward + backward, and their ratio
    report: dict = field(repr=False)  #: everything, as ``--json`` writes it (the cache's size, the reference)


def preflight(config: ConfigSource, *overrides: str, batches: int = preflight_command.BATCHES,
              json_out: str | Path | None = None, **settings) -> PreflightResult:
    """``distill preflight``: the teacher's and the student's starting loss, the vocabulary's fit and the cost of
    the teacher, on ``batches`` micro-batches per split of the run's own data; ``config`` is a ``train`` config.
    Prints the report; ``json_out``: also write its numbers there."""
    if batches < 1:
        raise ValueError(f"preflight: batches={batches}; give 1 or more micro-batches per split (--batches N)")
    cfg = load_config(TrainConfig, config, list(overrides), settings)
    report = preflight_command.main(cfg, batches=batches, json_out=json_out)
    return PreflightResult(splits=report["splits"], vocabulary=report["vocabulary"], cost=report["cost"],
                           report=report)


def cache(config: ConfigSource, *overrides: str, on_step: Callback | None = None, **settings) -> CacheResult:
    """``distill cache``: the teacher's targets on the data, stored once for offline KD."""
    cfg = load_config(CacheConfig, config, list(overrides), settings)
    summary = cache_command.main(cfg, on_step=on_step)
    return CacheResult(out_dir=Path(cfg.out_dir), splits=summary["splits"], summary=summary)


def generate(config: ConfigSource, *overrides: str, on_step: Callback | None = None,
             **settings) -> GenerateResult:
    """``distill generate``: N responses per prompt from the teacher, scored, the best kept."""
    cfg = load_config(GenerateConfig, config, list(overrides), settings)
    counts = generate_command.main(cfg, on_step=on_step)
    return GenerateResult(out_dir=Path(cfg.out_dir), counts=counts)


def evaluate(config: ConfigSource, *overrides: str, on_eval: Callback | None = None, **settings) -> EvalResult:
    """``distill eval``: models (and a teacher) on a data split, as speculative drafts, on lm-eval tasks."""
    cfg = load_config(EvalRunConfig, config, list(overrides), settings)
    results = eval_command.main(cfg, on_eval=on_eval)
    return EvalResult(out=Path(cfg.out), models=results["models"], results=results)


def prune(config: ConfigSource, *overrides: str, on_eval: Callback | None = None, **settings) -> PruneResult:
    """``distill prune``: structured pruning into a smaller Hugging Face checkpoint to distill into."""
    cfg = load_config(PruneConfig, config, list(overrides), settings)
    report = prune_command.main(cfg, on_eval=on_eval)
    original, chosen = report["plans"]["original"], report["plans"]["chosen"]
    return PruneResult(out_dir=Path(cfg.out_dir), params=(original["params"], chosen["params"]),
                       calibration_loss=(original["loss"], chosen["loss"]), report=report)
