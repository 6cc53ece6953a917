"""Shared fixtures: tiny configs built from configs/tiny/train.yaml, run in-process or through the CLI."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = REPO / "configs" / "tiny" / "train.yaml"
TINY_CACHE = REPO / "configs" / "tiny" / "cache.yaml"
# The cached-teacher tests run on the first 120 rows of the tiny data, in shards of 8 examples.
SMALL_DATA = ["data.max_examples=120"]
SMALL_CACHE = ["progress=false", *SMALL_DATA, "shard_examples=8"]
# The cached teacher: the tiny teacher with a larger init, so that its distribution is far from uniform
# (a student moving toward it is then distinguishable from one moving toward any flat target).
SHARP_TEACHER = ["teacher.config.initializer_range=0.2"]

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


def run_cli_here(*args: str) -> subprocess.CompletedProcess:
    """Run ``distill ARGS`` in this process: the command line's own parsing, logging and error path, without
    the seconds a fresh interpreter spends importing torch and transformers. Its stderr (log lines and
    error messages) is captured; the ``distill`` logger is left as it was found."""
    import contextlib
    import io
    import logging

    from distill import cli

    log = logging.getLogger("distill")
    saved = (list(log.handlers), log.level, log.propagate)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = cli.main(list(args))
    finally:
        log.handlers, log.level, log.propagate = saved[0], saved[1], saved[2]
    return subprocess.CompletedProcess(["distill", *args], rc, "", err.getvalue())


def kill_when(cmd: list[str], ready, *, env: dict | None = None, timeout: float = 120, group: bool = False) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true (a checkpoint or shard on disk), and wait for it.
    ``group``: kill its whole process group (a launcher and its workers)."""
    import signal
    import time

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=group)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "nothing appeared to kill the run at"
            time.sleep(0.02)
    finally:
        (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models run fastest so, and a busy machine does not stall OpenMP
    (a test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def http(url: str, body: dict | str | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """GET ``url`` (no body) or POST ``body`` as JSON; (status, the JSON answer), errors included."""
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def start_server(model_dir: Path, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """``distill serve MODEL_DIR --port PORT EXTRA`` as a subprocess, once ``/health`` answers."""
    proc = subprocess.Popen([sys.executable, "-m", "distill", "serve", str(model_dir), "--port", str(port), *extra],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while True:
        try:
            if http(f"http://127.0.0.1:{port}/health")[0] == 200:
                return proc
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"distill serve exited: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("distill serve did not come up")
        time.sleep(0.2)


@contextlib.contextmanager
def serving_in_process(model, tokenizer, name: str = "tiny", **engine_kwargs):
    """``distill serve``'s app on ``model``, in this process (uvicorn on a thread); yields its URL and stops it
    afterwards. ``engine_kwargs``: ``ServedModel``'s (``max_logprobs``, ``logprobs_mode``, ...)."""
    uvicorn = pytest.importorskip("uvicorn")
    from distill.server.app import ServedModel, build_app

    engine = ServedModel(model, tokenizer, name, **engine_kwargs)
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the in-process server did not come up"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class JsonHandler(BaseHTTPRequestHandler):
    """A stand-in HTTP server's handler: quiet, and ``_send`` answers a status with a JSON body."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` loaded as a module (the scripts are not a package), for tests that read their
    table functions."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def far_tail_problem(gap: float, dtype: torch.dtype):
    """Three rows over 30 ids whose target keeps ids 0-2 (p = 0.5, 0.3, 0.1, tail 0.1) while the student's other
    ids lie ``gap`` nats below them (the third row an ordinary one), and the float64 reference: ``(z, target,
    reference)`` with z float64 (3, 30) and ``reference(zr)`` the student's and the target's log-probabilities over
    the 3 ids + the tail class, the tail's a logsumexp over the tail ids (tests of the sparse tail's exactness)."""
    from distill.losses import SparseTarget

    v, k = 30, 3
    z = torch.zeros(3, v, dtype=torch.float64)
    z[:, :k] = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    z[:, k:] = -gap + torch.linspace(0.0, 3.0, v - k, dtype=torch.float64)
    z[2, k:] = -2.0  # an ordinary row beside the extreme ones
    ids = torch.arange(k).expand(3, k).contiguous()
    target = SparseTarget(ids, torch.tensor([0.5, 0.3, 0.1]).expand(3, k).to(dtype), torch.full((3,), 0.1, dtype=dtype))

    def reference(zr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.logsumexp(zr, -1, keepdim=True)
        lq = torch.cat([zr[:, :k] - lse, torch.logsumexp(zr[:, k:], -1, keepdim=True) - lse], -1)
        lp = torch.cat([target.probs.double(), target.tail.double()[:, None]], -1).log()
        return lq, lp

    return z, target, reference


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make the tiny config write into a temporary directory, quietly."""
    return [f"out_dir={tmp_path / 'run'}", "log.progress=false"]


@pytest.fixture(scope="session")
def tiny_caches(tmp_path_factory):
    """Caches of the sharp tiny teacher (configs/tiny/cache.yaml, the teacher of configs/tiny/train.yaml,
    with ``SHARP_TEACHER``) on the small data, train and eval splits, built once per session: ``topk`` (k = 64 + tail), ``topk_all``
    (k = V = 263 with 16-bit probability codes: the full distribution, nearly exactly) and ``sampled`` (N = 32).
    Each entry: ``{"out": Path, "cfg": CacheConfig, "summary": dict}``."""
    from distill.commands import cache as cache_recipe
    from distill.config import CacheConfig, load_config

    root = tmp_path_factory.mktemp("caches")
    built = {}
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny teacher is fastest so
    try:
        for name, extra in (("topk", []), ("topk_all", ["k=263", "prob_bits=16"]), ("sampled", ["mode=sampled", "n=32"])):
            cfg = load_config(CacheConfig, TINY_CACHE, [f"out_dir={root / name}", *SMALL_CACHE, *SHARP_TEACHER, *extra])
            built[name] = {"out": root / name, "cfg": cfg, "summary": cache_recipe.main(cfg)}
    finally:
        torch.set_num_threads(before)
    return built


def kill_train_then_resume(config: Path, out: Path, steps: list[str], kill_at: int, *, env: dict | None = None,
                           timeout: float = 120) -> subprocess.CompletedProcess:
    """``distill train CONFIG out_dir=OUT STEPS`` in a fresh process, SIGKILLed as soon as its checkpoint of step
    ``kill_at`` is on disk (and checked to have died before the end), then the same command with ``--resume`` in
    this process. Returns the resumed run, which must have succeeded. The killed process runs at this process's
    thread count unless ``env`` says otherwise, so both halves compute with the same reductions."""
    if env is None:
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "distill", "train", str(config), f"out_dir={out}", "log.progress=false", *steps]
    kill_when(cmd, lambda: (out / "checkpoints" / f"step_{kill_at:08d}").exists(), env=env, timeout=timeout)
    assert not (out / "student").exists(), "the run was not killed mid-way"
    res = run_cli_here("train", str(config), f"out_dir={out}", "log.progress=false", *steps, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def crash_after_checkpoint(monkeypatch, step: int) -> None:
    """Make the train recipe stop right after writing the checkpoint of ``step`` (a crash between steps, in
    process); ``monkeypatch.undo()`` before resuming."""
    from distill import training

    real = training.save_checkpoint

    def saving(accelerator, cfg, at, *args, **kwargs):
        path = real(accelerator, cfg, at, *args, **kwargs)
        if at == step:
            raise KeyboardInterrupt("crash")
        return path

    monkeypatch.setattr(training, "save_checkpoint", saving)
