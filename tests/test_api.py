"""The Python API (distill.api, as ``distill.train`` ...): a tiny run from Python, the same run through the CLI,
the callbacks, the result objects, and keyword settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import distill
from distill import cli
from distill.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
# Fields of metrics.jsonl that measure time or speed (they differ between any two runs).
TIMING = re.compile(r"seconds|per_s|elapsed|tok_s", re.IGNORECASE)


def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not TIMING.search(k)}
            for line in path.read_text().splitlines() if line.strip()]


def _weights(student_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(student_dir / "model.safetensors"))


def test_train_from_python_returns_the_final_metrics_and_the_cli_gives_the_same_run(tmp_path):
    steps, evals = [], []
    short = {"train.max_steps": 6, "eval.every": 3, "log.every": 2, "checkpoint.every": 3}
    result = distill.train(TINY / "train.yaml", out_dir=str(tmp_path / "api"), on_step=steps.append,
                           on_eval=evals.append, **short)

    # The result: the final evaluation (the last eval record of metrics.jsonl), the paths, the counts.
    history = [json.loads(line) for line in (tmp_path / "api" / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in history if r["split"] == "eval"][-1]
    assert result.metrics == {k: v for k, v in last_eval.items() if k not in ("step", "split")}
    assert {"val_loss", "val_ppl", "kl_to_teacher"} <= set(result.metrics)
    assert result.steps == 6 and result.tokens == history[-2]["tokens_seen"] > 0
    assert result.out_dir == tmp_path / "api" and result.student_dir == tmp_path / "api" / "student"
    assert result.history() == history
    assert isinstance(result.config, TrainConfig) and result.config.train.max_steps == 6
    model = AutoModelForCausalLM.from_pretrained(result.student_dir)  # an ordinary HF checkpoint
    assert model.config.hidden_size == 32

    # The callbacks saw exactly the records metrics.jsonl got, in order.
    assert steps == [r for r in history if r["split"] == "train"] and [r["step"] for r in steps] == [2, 4, 6]
    assert evals == [r for r in history if r["split"] == "eval"] and [r["step"] for r in evals] == [3, 6]

    # The CLI, given the same settings as key=value overrides, runs the same run.
    overrides = [f"{k}={v}" for k, v in short.items()]
    assert cli.main(["-q", "train", str(TINY / "train.yaml"), f"out_dir={tmp_path / 'cli'}", *overrides]) == 0
    assert _records(tmp_path / "cli" / "metrics.jsonl") == _records(tmp_path / "api" / "metrics.jsonl")
    a, b = _weights(tmp_path / "api" / "student"), _weights(tmp_path / "cli" / "student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_config_as_a_dict_or_an_object_with_overrides_and_keyword_settings(tmp_path):
    tree = yaml.safe_load((TINY / "train.yaml").read_text())
    cfg = load_config(TrainConfig, tree, ["loss.alpha=0.25", "optim.lr=1e-3"],
                      {"loss": {"temperature": 2.0}, "train.max_steps": 3, "out_dir": str(tmp_path)})
    assert (cfg.loss.alpha, cfg.optim.lr, cfg.loss.temperature, cfg.train.max_steps) == (0.25, 1e-3, 2.0, 3)
    assert cfg.loss.divergence == tree["loss"]["divergence"]  # a section given as a dict is merged, not replaced
    assert load_config(TrainConfig, cfg) == cfg  # a config object goes through as it is
    # Keyword settings win over key=value overrides, which win over the file.
    assert load_config(TrainConfig, tree, ["loss.alpha=0.25"], {"loss.alpha": 0.75}).loss.alpha == 0.75
    assert tree["loss"]["alpha"] == 0.5  # the caller's dict is left as it was


def test_a_bad_keyword_setting_is_refused_by_name_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"loss\.temprature: unknown key"):
        distill.train(TINY / "train.yaml", out_dir=str(tmp_path / "x"), **{"loss.temprature": 2})
    assert not (tmp_path / "x").exists()


def test_cache_evaluate_prune_and_generate_from_python(tmp_path):
    shards = []
    cached = distill.cache(TINY / "cache.yaml", out_dir=str(tmp_path / "cache"), on_step=shards.append)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert cached.out_dir == tmp_path / "cache" and set(cached.splits) == set(manifest["splits"])
    assert sorted((s["split"], s["shard"]) for s in shards) == sorted(
        (split, i) for split, info in manifest["splits"].items() for i in range(len(info["shards"])))
    assert all(Path(s["path"]).is_file() for s in shards)

    seen = []
    pruned = distill.prune(TINY / "prune.yaml", out_dir=str(tmp_path / "pruned"), on_eval=lambda n, r: seen.append(n))
    report = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert pruned.params == (report["plans"]["original"]["params"], report["plans"]["chosen"]["params"])
    assert pruned.params[1] < pruned.params[0]
    assert seen[:2] == ["original", "chosen"] and set(seen) == set(report["plans"])

    measured = []
    evaluated = distill.evaluate(TINY / "eval.yaml", out=str(tmp_path / "eval.json"), speculative=None,
                                 on_eval=lambda name, m: measured.append((name, m)))
    written = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated.models == written["models"] and dict(measured) == written["models"]
    assert evaluated.table().startswith("|")

    told = []
    generated = distill.generate(TINY / "generate.yaml", out_dir=str(tmp_path / "gen"), on_step=told.append)
    assert generated.counts == json.loads((tmp_path / "gen" / "manifest.json").read_text())["counts"]
    assert [Path(t["path"]) for t in told] == generated.files and generated.files
