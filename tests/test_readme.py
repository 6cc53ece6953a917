"""The README and the docs pages it links, as a script: every command line of their code blocks is either run
here, in reading order (the README, then each page in the order the README links it), in a fresh directory
holding a copy of `configs/` (so `runs/` starts empty, as in a fresh clone), or listed with the reason it is not
run (a placeholder for the user's own config, minutes of work, several GPUs); then the README's Python blocks
run there too. A new command fails `test_every_readme_command_is_classified` until it is put in one of the two
classes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port, run_cli_here

README = REPO / "README.md"


def documents() -> list[Path]:
    """The README, then the docs pages it links, in the order it first links them."""
    pages = dict.fromkeys(re.findall(r"\]\((docs/[\w-]+\.md)\)", README.read_text()))
    return [README, *(REPO / page for page in pages)]


def documented_commands() -> list[str]:
    return [cmd for doc in documents() for cmd in readme_commands(doc.read_text())]


def python_blocks(text: str) -> list[str]:
    """The code of the ```python fences."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
TINY = REPO / "configs" / "tiny"
PREFIXES = ("distill ", "python ", "bash ", "curl ", "accelerate ", "taskset ")

# README command -> why this test does not run it.
MY = "placeholder config my.yaml (the user's own models and data)"
NOT_RUN = {
    "bash scripts/quickstart.sh": "takes ~9 minutes and installs into .venv: the full quickstart",
    "bash scripts/test.sh": "the test suite itself, this test included",
    "distill train my.yaml loss.divergence=jsd loss.beta=0.9": MY,
    "distill train my.yaml --resume": MY,
    "distill preflight my.yaml teacher.path=runs/big/student --batches 8 --json runs/preflight.json": MY,
    "accelerate launch --multi_gpu --num_processes 2 -m distill train my.yaml": MY,
    "distill generate my.yaml n=8 scorer=verifier verifier=distill.tasks.arithmetic:verify keep=best": MY,
    "distill train my.yaml train.batches=skd train.batches.skd_top_k=5": MY,
    "distill quickstart --fast": "takes ~3 minutes: the quickstart's fast run (tests/test_quickstart.py runs it)",
    "python benchmarks/multi_teacher.py --fast --seeds 0 1": "a benchmark: ~50 minutes",
    "taskset -c 1 python benchmarks/prune.py --threads 1": "a benchmark: ~15 minutes",
    "python benchmarks/prune.py --preset default --seeds 0": "a benchmark: longer than the fast preset's ~15 minutes",
    "distill eval my.yaml models.distilled.path=runs/d/student models.scratch.path=runs/s/student": MY,
    "distill eval my.yaml lm_eval.tasks=[tiny_sums] lm_eval.include_path=tasks": MY + ", and a tasks/ directory",
    "distill cache my.yaml teacher=null teacher.server=http://gpu-box:8000 teacher.tokenizer=DIR k=20":
        MY + " and a server on another machine (gpu-box)",
    "distill generate my.yaml teacher=null teacher.server=https://api.example.com teacher.api_key_env=KEY":
        MY + " and a hosted API (api.example.com)",
    "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8 -m distill train my.yaml":
        MY + " on 8 GPUs",
}

SERVE = "distill serve runs/tiny-corrected/student --port 8000 --max-logprobs 64 &"
CURL = ("curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' "
        "-d '{\"prompt\": \"def add(a, b):\", \"max_tokens\": 0, \"echo\": true, \"prompt_logprobs\": 3}'")
SERVED = "distill train configs/tiny/serve_teacher.yaml"
ARITH_PREPARE = "python -m distill.tasks.arithmetic prepare runs/arith"

# README command run here -> what it must leave behind (paths under the working directory) or print.
RUN = {
    "distill train configs/tiny/train.yaml out_dir=runs/tiny":
        ["runs/tiny/config.yaml", "runs/tiny/metrics.jsonl", "runs/tiny/student/config.json",
         "runs/tiny/checkpoints/step_00000020"],
    "distill preflight configs/tiny/train.yaml": ["losses (nats/token, bits/byte):", "vocabulary:", "cost (",
                                                  "what to expect"],
    "distill cache configs/tiny/cache.yaml out_dir=runs/tiny-cache": ["runs/tiny-cache/manifest.json"],
    "distill cache configs/tiny/cache.yaml out_dir=runs/tiny-sampled mode=sampled n=50":
        ["runs/tiny-sampled/manifest.json"],
    "distill cache configs/tiny/cache_hybrid.yaml out_dir=runs/tiny-hybrid": ["runs/tiny-hybrid/manifest.json"],
    "distill train configs/tiny/train.yaml teacher=null teacher.cache=runs/tiny-cache out_dir=runs/tiny-from-cache":
        ["runs/tiny-from-cache/student/config.json"],
    "distill generate configs/tiny/generate.yaml out_dir=runs/tiny-gen": ["runs/tiny-gen/manifest.json"],
    "distill train configs/tiny/seqkd.yaml out_dir=runs/tiny-seqkd teacher=null": ["runs/tiny-seqkd/student/config.json"],
    "distill train configs/tiny/seqkd.yaml out_dir=runs/tiny-seqkd-kd": ["runs/tiny-seqkd-kd/student/config.json"],
    ARITH_PREPARE: ["runs/arith/teacher.yaml", "runs/arith/student.yaml", "runs/arith/data/train.jsonl",
                    "runs/arith/data/valid.jsonl", "runs/arith/data/test.jsonl"],
    "distill train runs/arith/teacher.yaml": ["runs/arith/teacher-run/student/config.json"],
    "python -m distill.tasks.arithmetic score runs/arith/teacher-run/student runs/arith/data/test.jsonl":
        ["exact match: "],
    "distill train runs/arith/student.yaml": ["runs/arith/student-run/student/config.json"],
    "distill train runs/arith/student.yaml teacher.path=runs/arith/teacher-run/student loss.hidden.weight=1 "
    "out_dir=runs/arith/hidden": ["runs/arith/hidden/student/config.json"],
    "distill train configs/tiny/gkd.yaml out_dir=runs/tiny-gkd": ["runs/tiny-gkd/student/config.json"],
    "distill train configs/tiny/skd.yaml out_dir=runs/tiny-skd": ["runs/tiny-skd/student/config.json"],
    "distill train configs/tiny/distillm.yaml out_dir=runs/tiny-distillm": ["runs/tiny-distillm/student/config.json"],
    "distill prune configs/tiny/prune.yaml out_dir=runs/tiny-pruned":
        ["runs/tiny-pruned/config.json", "runs/tiny-pruned/prune_report.md"],
    "distill train configs/tiny/train.yaml student.path=runs/tiny-pruned student.config=null "
    "out_dir=runs/tiny-pruned-kd": ["runs/tiny-pruned-kd/student/config.json"],
    "distill train configs/tiny/teacher_correction.yaml out_dir=runs/tiny-corrected":
        ["runs/tiny-corrected/student/config.json"],
    "distill prune configs/tiny/prune.yaml model.path=runs/tiny-corrected/student model.config=null "
    "out_dir=runs/tiny-corrected-pruned": ["runs/tiny-corrected-pruned/config.json"],
    "distill train configs/tiny/train.yaml student.path=runs/tiny-corrected-pruned student.config=null "
    "teacher.path=runs/tiny-corrected/student teacher.config=null out_dir=runs/tiny-corrected-kd":
        ["runs/tiny-corrected-kd/student/config.json"],
    "distill eval configs/tiny/eval.yaml models.student.path=runs/tiny/student models.student.config=null "
    "models.pruned.path=runs/tiny-pruned-kd/student":
        ["runs/tiny-eval/eval.json", "| student |", "| pruned |", "speed-up, batch 1"],
    "distill report runs/tiny runs/tiny-pruned-kd --eval runs/tiny-eval/eval.json --out runs/tiny-report":
        ["runs/tiny-report/report.md", "runs/tiny-report/curves.png", "runs/tiny-report/speculative.png"],
    SERVE: [],
    CURL: [],
    SERVED: ["runs/tiny-served/student/config.json"],
}

# Commands run with a change, and why: one the README itself states, or a free port instead of 8000 (which
# another process on a test machine may hold). "{port}" is the port the server got.
CHANGED = {
    ARITH_PREPARE: (ARITH_PREPARE + " --preset tiny",
                    "the README's `--preset tiny` on the prepare line: the next four commands take seconds"),
    SERVE: (SERVE.replace("8000", "{port}"), "a free port"),
    CURL: (CURL.replace("8000", "{port}"), "a free port"),
    SERVED: (SERVED + " teacher.server=http://127.0.0.1:{port}", "a free port"),
}


def readme_commands(text: str) -> list[str]:
    """Command lines of the code blocks (``` fences and 4-space indented blocks), `\\` continuations joined,
    trailing `# comments` dropped, whitespace runs collapsed."""
    block: list[str | None] = []  # a code line, or None for prose
    fence = indented = False
    prev_blank = True
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.lstrip().startswith("```"):
            fence, indented = not fence, False
            block.append(None)
        elif fence:
            block.append(line)
        elif line.startswith("    ") and (prev_blank or indented):
            indented = True
            block.append(line[4:])
        elif line == "":
            block.append("")
        else:
            indented = False
            block.append(None)
        prev_blank = line == ""
    commands, i = [], 0
    while i < len(block):
        line = block[i]
        if line is not None and line.strip().startswith(PREFIXES):
            cmd = line.strip()
            while re.search(r"\\(\s+#.*)?$", cmd) and i + 1 < len(block):
                i += 1
                cmd = re.sub(r"\s*\\(\s+#.*)?$", "", cmd) + " " + (block[i] or "").strip()
            commands.append(" ".join(re.sub(r"\s+#\s.*$", "", cmd).split()))
        i += 1
    return commands


def test_readme_commands_are_extracted():
    text = ("Prose `distill train x.yaml` is not a command.\n\n"
            "    distill train a.yaml out_dir=runs/a      # a comment\n"
            "    python -m m \\\n        --flag 1   # continued\n\n"
            "```bash\ncurl -s http://h/x -d '{\"a\": 1}'\nls runs\n```\n"
            "    not code: this line follows prose\n")
    assert readme_commands(text) == ["distill train a.yaml out_dir=runs/a", "python -m m --flag 1",
                                     "curl -s http://h/x -d '{\"a\": 1}'"]


def test_every_readme_command_is_classified():
    assert len(documents()) > 5 and all(doc.is_file() for doc in documents())
    commands = documented_commands()
    assert len(commands) == len(set(commands)), "a README command appears twice; give the second its own out_dir"
    unclassified = [c for c in commands if c not in RUN and c not in NOT_RUN]
    assert not unclassified, ("README commands neither run by test_readme_runs_as_written (RUN) nor listed with a "
                              f"reason (NOT_RUN): {unclassified}")
    assert not set(RUN) & set(NOT_RUN)
    stale = sorted((set(RUN) | set(NOT_RUN) | set(CHANGED)) - set(commands))
    assert not stale, f"listed here but no longer in the README: {stale}"


def test_every_tiny_config_is_named_in_a_test():
    tests = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    unnamed = [p.name for p in sorted(TINY.glob("*.yaml")) if f"tiny/{p.name}" not in tests
               and f'"{p.name}"' not in tests]
    assert not unnamed, f"configs/tiny files no test loads: {unnamed}"


def test_seqkd_config_trains_on_a_generated_set():
    from distill.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, TINY / "seqkd.yaml", ["teacher=null"])
    assert cfg.teacher is None and cfg.data.source == "runs/tiny-gen"
    assert not cfg.data.packing and cfg.data.eval_fraction == 0 and cfg.eval.every == 0
    kd = load_config(TrainConfig, TINY / "seqkd.yaml")
    gen = __import__("yaml").safe_load((TINY / "generate.yaml").read_text())
    assert kd.teacher.config == gen["teacher"]["config"] and kd.teacher.seed == gen["teacher"]["seed"]


# ------------------------------------------------------------------------------------------- running it


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status


def _start_server(args: list[str], cwd: Path, port: int, log: Path) -> subprocess.Popen:
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "distill", *args], cwd=cwd, stdout=err, stderr=err,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while True:
        try:
            if _get(f"http://127.0.0.1:{port}/health") == 200:
                return proc
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"distill serve exited: {log.read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("distill serve did not come up in 120 s")
        time.sleep(0.2)


def _run(cmd: str, work: Path, port: int, servers: list[subprocess.Popen]) -> tuple[int, str]:
    """One README command in ``work``; returns its exit code and what it printed (stdout + stderr)."""
    args = shlex.split(cmd)
    if args[-1] == "&":  # a server in the background, kept until the test ends
        servers.append(_start_server(args[1:-1], work, port, work / "serve.log"))
        return 0, ""
    if args[0] == "curl":
        res = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=120)
        return res.returncode, res.stdout + res.stderr
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if args[:3] == ["python", "-m", "distill.tasks.arithmetic"]:
            from distill.tasks.arithmetic import cli as arithmetic_cli

            with contextlib.redirect_stderr(out):
                rc = arithmetic_cli.main(args[3:])
            return rc, out.getvalue()
        assert args[0] == "distill", f"no way to run {cmd!r} here"
        res = run_cli_here(*args[1:])
    return res.returncode, out.getvalue() + res.stderr


def _check_outputs(cmd: str, work: Path, printed: str) -> None:
    for want in RUN[cmd]:
        if want.startswith("runs/"):
            assert (work / want).exists(), f"{cmd!r} did not write {want}"
        else:
            assert want in printed, f"{cmd!r} did not print {want!r}"
    if cmd == CURL:
        resp = json.loads(printed)
        entries = resp["choices"][0]["prompt_logprobs"]
        assert entries[0] is None and len(entries) > 10
        assert all(3 <= len(e) <= 4 for e in entries[1:])  # the top 3 and the realized token
    elif "teacher.cache=runs/tiny-cache" in cmd:  # "reports KL on the cached eval split"
        rows = [json.loads(x) for x in (work / "runs/tiny-from-cache/metrics.jsonl").read_text().splitlines()]
        assert any(r.get("split") == "eval" and r["kl_to_teacher"] > 0 for r in rows)
    elif cmd.startswith("distill eval"):  # the speculative table of trained students means something
        drafts = json.loads((work / "runs/tiny-eval/eval.json").read_text())["speculative"]["drafts"]
        assert set(drafts) == {"student", "pruned"}
        for d in drafts.values():
            assert 0 < d["alpha_hat"] < 1 and d["gammas"]["1"]["acceptance_rate"] > 0
    elif cmd.startswith("distill report"):
        text = (work / "runs/tiny-report/report.md").read_text()
        assert "| tiny |" in text and "| tiny-pruned-kd |" in text and "| pruned |" in text


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path, monkeypatch):
    work = tmp_path / "clone"
    shutil.copytree(REPO / "configs", work / "configs")
    monkeypatch.chdir(work)
    port = free_port()
    servers: list[subprocess.Popen] = []
    t_all = time.perf_counter()
    try:
        for cmd in documented_commands():
            if cmd in NOT_RUN:
                print(f"[not run] {cmd}\n         ({NOT_RUN[cmd]})")
                continue
            run, why = CHANGED.get(cmd, (cmd, ""))
            run = run.replace("{port}", str(port))
            t0, c0 = time.perf_counter(), time.process_time()
            rc, printed = _run(run, work, port, servers)
            print(f"[{time.perf_counter() - t0:5.1f}s, cpu {time.process_time() - c0:5.1f}s] {cmd}"
                  + (f"\n         as: {run}\n         ({why})" if why else ""))
            assert rc == 0, f"{run!r} exited {rc}:\n{printed[-4000:]}"
            _check_outputs(cmd, work, printed)
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"README commands: {time.perf_counter() - t_all:.1f} s")
    blocks = python_blocks(README.read_text())
    assert blocks, "the README's Python API example is gone"
    for code in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md (python block)", "exec"), {"__name__": "__readme__"})
        assert "| student |" in out.getvalue() and (work / "runs/api/student/config.json").is_file()
