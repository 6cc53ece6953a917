"""Run every ``configs/tiny/*.yaml`` through its command and write what came out, timings left out, as one JSON.

A change that must not change behaviour (a refactor) is checked by a snapshot before it and one after it:

    python scripts/snapshot_tiny.py --out before.json         # on the old commit
    python scripts/snapshot_tiny.py --out after.json          # on the new one
    python scripts/snapshot_tiny.py --compare before.json after.json   # each run's command line left out

Each command runs in process on one thread (so the numbers are reproducible on one machine), in a fresh
directory holding a copy of ``configs/``, in the order their inputs need (a cache before the run that reads
it, generations before the run that trains on them, a served teacher before the run that scores with it).
Recorded per run: every ``metrics.jsonl`` record, the final student's weights (sha256), the eval JSON, the
cache / generation manifests' shard hashes and counts, the prune report's plans; every key that measures
time or speed is dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING = re.compile(r"seconds|per_s|speedup|wall|elapsed|^time|_time$|tok_s|throughput", re.IGNORECASE)

# (name, command line after `distill`); `{port}` is the served teacher's port.
RUNS = [
    ("train", "train configs/tiny/train.yaml out_dir=runs/tiny"),
    ("cache_topk", "cache configs/tiny/cache.yaml out_dir=runs/tiny-cache"),
    ("cache_sampled", "cache configs/tiny/cache.yaml out_dir=runs/tiny-sampled mode=sampled n=50"),
    ("train_from_cache", "train configs/tiny/train.yaml teacher=null teacher.cache=runs/tiny-cache "
                         "out_dir=runs/tiny-from-cache"),
    ("train_from_sampled", "train configs/tiny/train.yaml teacher=null teacher.cache=runs/tiny-sampled "
                           "out_dir=runs/tiny-from-sampled"),
    ("generate", "generate configs/tiny/generate.yaml out_dir=runs/tiny-gen"),
    ("seqkd", "train configs/tiny/seqkd.yaml out_dir=runs/tiny-seqkd teacher=null"),
    ("seqkd_token_kd", "train configs/tiny/seqkd.yaml out_dir=runs/tiny-seqkd-kd"),
    ("gkd", "train configs/tiny/gkd.yaml out_dir=runs/tiny-gkd"),
    ("skd", "train configs/tiny/skd.yaml out_dir=runs/tiny-skd"),
    ("gkd_sampled_rkl", "train configs/tiny/gkd.yaml out_dir=runs/tiny-gkd-srkl loss.divergence=sampled_reverse_kl"),
    ("distillm", "train configs/tiny/distillm.yaml out_dir=runs/tiny-distillm train.batches.adaptive_init=0"),
    ("hidden", "train configs/tiny/hidden.yaml out_dir=runs/tiny-hidden"),
    ("multi_teacher", "train configs/tiny/multi_teacher.yaml out_dir=runs/tiny-multi"),
    ("self_distill", "train configs/tiny/self_distill.yaml out_dir=runs/tiny-self"),
    ("codistill", "train configs/tiny/codistill.yaml out_dir=runs/tiny-codistill"),
    ("lora", "train configs/tiny/lora.yaml out_dir=runs/tiny-lora"),
    ("prune", "prune configs/tiny/prune.yaml out_dir=runs/tiny-pruned"),
    ("teacher_correction", "train configs/tiny/teacher_correction.yaml out_dir=runs/tiny-corrected"),
    ("eval", "eval configs/tiny/eval.yaml out=runs/tiny-eval/eval.json"),
    ("serve_teacher", "train configs/tiny/serve_teacher.yaml out_dir=runs/tiny-served "
                      "teacher.server=http://127.0.0.1:{port}"),
]
SERVED = "runs/tiny-corrected/student"  # what serve_teacher's server serves (an earlier run's student)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if not TIMING.search(str(k))}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outputs(work: Path, line: str) -> dict:
    """What one command left behind, timings dropped."""
    out: dict = {}
    m = re.search(r"out_dir=(\S+)", line) or re.search(r"out=(\S+)", line)
    target = work / m.group(1)
    run = target if target.is_dir() else target.parent
    if (run / "metrics.jsonl").is_file():
        out["metrics"] = [_clean(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    for weights in sorted(run.glob("student*/*.safetensors")) + sorted(run.glob("*.safetensors")):
        out.setdefault("weights", {})[str(weights.relative_to(run))] = _sha(weights)
    for name in ("manifest.json", "prune_report.json"):
        if (run / name).is_file():
            out[name] = _clean(json.loads((run / name).read_text()))
    if target.is_file() and target.suffix == ".json":
        out["json"] = _clean(json.loads(target.read_text()))
    for shard in sorted(run.glob("shard-*")):
        out.setdefault("shards", {})[shard.name] = _sha(shard)
    return out


def snapshot(only: list[str] | None = None) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from distill import cli

    result: dict = {}
    work = Path(tempfile.mkdtemp(prefix="distill-snapshot-"))
    shutil.copytree(ROOT / "configs", work / "configs")
    cwd = os.getcwd()
    os.chdir(work)
    server = None
    try:
        for name, line in RUNS:
            if only and name not in only:
                continue
            port = None
            if "{port}" in line:
                port = _free_port()
                server = subprocess.Popen([sys.executable, "-m", "distill", "serve", SERVED, "--port", str(port)],
                                          env={**os.environ, "OMP_NUM_THREADS": "1",
                                               "PYTHONPATH": str(ROOT / "src")},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                _wait_for(port)
                line = line.format(port=port)
            t0 = time.perf_counter()
            rc = cli.main(["-q", *line.split(), "log.progress=false"] if line.startswith("train") else
                          ["-q", *line.split()])
            print(f"[{time.perf_counter() - t0:5.1f}s] exit {rc}: distill {line}", flush=True)
            result[name] = {"command": line if port is None else line.replace(str(port), "PORT"), "exit": rc,
                            **(_outputs(work, line) if rc == 0 else {})}
            if server is not None:
                server.terminate()
                server.wait()
                server = None
    finally:
        if server is not None:
            server.kill()
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    return result


def _wait_for(port: int, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the served teacher did not answer on port {port} within {timeout:.0f} s")


def compare(a: dict, b: dict, path: str = "") -> list[str]:
    """Every place where two snapshots differ (floats compared exactly: the same machine, one thread)."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{path}.{k}: only in the {'first' if k in a else 'second'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            diffs += compare(a[k], b[k], f"{path}.{k}")
        return diffs
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in compare(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the snapshot here")
    p.add_argument("--only", nargs="+", choices=[n for n, _ in RUNS], help="these runs only")
    p.add_argument("--compare", nargs=2, type=Path, metavar="JSON", help="print where two snapshots differ")
    args = p.parse_args(argv)
    if args.compare:
        # A run's command line may change with the config's spelling; what it wrote is compared, not how it was asked.
        a, b = ({name: {k: v for k, v in run.items() if k != "command"} for name, run in json.loads(f.read_text()).items()}
                for f in args.compare)
        diffs = compare(a, b)
        print("\n".join(diffs[:200]) if diffs else "identical")
        print(f"{len(diffs)} difference(s) in {len(set(a) | set(b))} runs")
        return 1 if diffs else 0
    if args.out is None:
        p.error("give --out (or --compare)")
    sys.path.insert(0, str(ROOT / "src"))
    result = snapshot(args.only)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    failed = [n for n, r in result.items() if r["exit"] != 0]
    print(f"wrote {args.out}: {len(result)} runs" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
