"""Shared fixtures: tiny configs built from configs/tiny/train.yaml, run in-process or through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = REPO / "configs" / "tiny" / "train.yaml"

# Keep tests quiet, offline and reproducible.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m distill ARGS`` in a fresh process; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make the tiny config write into a temporary directory, quietly."""
    return [f"out_dir={tmp_path / 'run'}", "log.progress=false"]
