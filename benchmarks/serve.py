"""Scoring through `distill serve` on loopback against the same teacher's forward in this process.

Two random-init teachers (or ``--teacher DIR``): ``small``, the quickstart teacher's shape (hidden 192,
4 layers, V = 4,096, 2.4M parameters), and ``medium`` (hidden 512, 8 layers, V = 32,000, 41M parameters);
batches of 16 sequences of 256 tokens, top_k = 20:

* ``in_process``: what a live teacher costs for the same information: the forward (final hidden states),
  the output layer, the log-softmax and the top-20 + realized token per position;
* ``server``: a server teacher's signal for the same batch (requests to a
  ``distill serve`` subprocess on 127.0.0.1: JSON encoding, HTTP, parsing included), with 1, 4 and 16
  requests in flight (``max_in_flight``; the server batches concurrent requests on the model).

Reports scored tokens/s, the ratio to in-process, and the response bytes per scored token. The HTTP path
costs about the same per scored token whatever the teacher (encoding, transfer and parsing of ~1.5 kB of
JSON), so its ratio to the in-process forward grows with the teacher's size.

    python benchmarks/serve.py [--quick] [--teacher DIR]

Writes ``--out`` (default ``runs/benchmarks/serve.json``; the committed record: ``--out benchmarks/results/serve.json``). The server, the client and the in-process forward
each run with one intra-op thread: the same compute on both paths, and the server and its client do not
fight for the 2 cores.

``--signals`` measures instead what each server signal costs on the wire, against a ``distill serve
--max-logprobs -1`` subprocess: the response bytes per scored token of ``top_k: 20`` (JSON), ``top_k: all``
(JSON, every id at every position) and ``signal: hidden`` (the final hidden states as base64 of float32,
and of bfloat16 from a second server started with ``--dtype bfloat16``), the one-time download of the output
layer, and the client's scored tokens/s for each (one scoring each: indicative). Every mode scores the
same batch, except ``top_k: all``, which scores its first sequence cut to ``1 + 2**19 // V`` tokens (half a
million entries: the bytes per token do not depend on the count, the client's memory does). Default
``--out``: ``runs/benchmarks/serve_signals.json``.

    python benchmarks/serve.py --signals [--out benchmarks/results/serve_signals.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distill.checkpoint import atomic_write_json  # noqa: E402
from distill.config import ModelSpec, ServerTeacherSpec  # noqa: E402
from distill.engines import open_engine  # noqa: E402
from distill.losses import LossSpec  # noqa: E402
from distill.models import final_hidden, load_model, load_tokenizer, output_head  # noqa: E402
from distill.server.client import Client  # noqa: E402
from distill.teachers.engine import EngineTeacher  # noqa: E402

# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/serve.json
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "serve.json"
SIGNALS_OUT = ROOT / "runs" / "benchmarks" / "serve_signals.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# name -> (vocabulary, hidden, intermediate, layers, heads, kv heads)
SIZES = {"small": (4096, 192, 512, 4, 6, 2), "medium": (32000, 512, 1376, 8, 8, 4)}


def make_teacher(work: Path, size: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    v, hidden, inter, layers, heads, kv = SIZES[size]
    vocab = {f"t{i}": i for i in range(v - 3)} | {"<bos>": v - 3, "<eos>": v - 2, "<pad>": v - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    cfg = AutoConfig.for_model("llama", vocab_size=v, hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                               max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=v - 3,
                               eos_token_id=v - 2, pad_token_id=v - 1)
    torch.manual_seed(0)
    out = work / f"teacher-{size}"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    hf.save_pretrained(out)
    return out


def start_server(teacher_dir: Path, max_logprobs: int, dtype: str = "float32") -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "distill", "serve", str(teacher_dir), "--port", str(port),
                               "--max-logprobs", str(max_logprobs), "--dtype", dtype],
                              env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return server, url


def measure_signals(teacher_dir: Path, args) -> dict:
    """Response bytes and scored tokens/s of each server signal (module docstring, ``--signals``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(ModelSpec(path=str(teacher_dir)), "teacher")
    v = len(tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, v - 3, (args.batch, args.seq_len), generator=g)
    short = ids[:1, : min(args.seq_len, 1 + 2**19 // v)]
    # (server dtype, settings, batch): the bf16 server sends its hidden states as bf16, 2 bytes a value.
    modes = {"top_20_json": ("float32", {"top_k": 20}, ids),
             "whole_vocabulary_json": ("float32", {"top_k": "all"}, short),
             "hidden_float32": ("float32", {"signal": "hidden"}, ids),
             "hidden_bfloat16": ("bfloat16", {"signal": "hidden"}, ids)}
    record: dict = {"vocab": v, "modes": {}, "output_head_bytes": {}}
    for dtype in ("float32", "bfloat16"):
        server, url = start_server(teacher_dir, -1, dtype)
        try:
            head_client = Client(url)
            head_client.request("GET", "/v1/output_head")
            record["output_head_bytes"][dtype] = head_client.received_bytes  # once per run (signal: hidden)
            for name, (_, settings, batch_ids) in ((n, m) for n, m in modes.items() if m[0] == dtype):
                record["modes"][name] = score_once(url, tokenizer, settings, batch_ids)
        finally:
            server.terminate()
            server.wait(timeout=30)
    torch.set_num_threads(threads)
    return record


def score_once(url: str, tokenizer, settings: dict, batch_ids: torch.Tensor) -> dict:
    """One scoring of ``batch_ids`` by a server teacher with ``settings``: its bytes and tokens/s."""
    spec = ServerTeacherSpec(server=url, check_tokenizer=False, **settings)
    engine = open_engine(spec, tokenizer, temperature=LossSpec().temperature)
    batch = {"input_ids": batch_ids, "attention_mask": torch.ones_like(batch_ids)}
    tokens = batch_ids.shape[0] * (batch_ids.shape[1] - 1)
    start = engine.client.received_bytes
    t0 = time.perf_counter()
    engine.score(batch)
    seconds = time.perf_counter() - t0
    return {"sequences": batch_ids.shape[0], "seq_len": batch_ids.shape[1], "scored_tokens": tokens,
            "response_bytes_per_token": (engine.client.received_bytes - start) / tokens,
            "tokens_per_s": tokens / seconds}


def json_codec(client: Client, seq: list[int], k: int, reps: int = 5) -> dict:
    """Seconds per MB to encode and to decode one scoring response (a sequence's top-k prompt log-probs),
    with the standard library's json and with orjson (what the server and the client use)."""
    body = client.request("POST", "/v1/completions", {"prompt": seq, "max_tokens": 0, "echo": True,
                                                      "prompt_logprobs": k})
    text = json.dumps(body, separators=(",", ":"))
    mb = len(text) / 1e6
    timings = {"json_dumps": lambda: json.dumps(body, separators=(",", ":")), "json_loads": lambda: json.loads(text),
               "orjson_dumps": lambda: orjson.dumps(body), "orjson_loads": lambda: orjson.loads(text)}
    out = {"megabytes": mb}
    for name, fn in timings.items():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_seconds_per_mb"] = statistics.median(times) / mb
    return out


def measure(teacher_dir: Path, args, reps: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's forward runs on one thread too: the same compute on both paths
    tokenizer = load_tokenizer(ModelSpec(path=str(teacher_dir)), "teacher")
    model = load_model(ModelSpec(path=str(teacher_dir)), "teacher").eval()
    head = output_head(model, len(tokenizer))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer) - 3, (args.batch, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = args.batch * (args.seq_len - 1)

    @torch.no_grad()
    def in_process():
        h = final_hidden(model, batch)[:, :-1].reshape(-1, head.weight.shape[1])
        for c0 in range(0, h.shape[0], 512):
            lp = torch.log_softmax(head.logits(h[c0 : c0 + 512]).float(), -1)
            lp.topk(args.top_k, -1)
            lp.gather(-1, ids[:, 1:].reshape(-1, 1)[c0 : c0 + 512])

    @torch.no_grad()
    def in_process_hidden():  # what a live teacher's dense signal costs before the loss: the forward
        final_hidden(model, batch)

    server, url = start_server(teacher_dir, max(args.top_k, 20))
    try:
        results = {"in_process": [], "in_process_hidden": []}
        for key, fn in (("in_process", in_process), ("in_process_hidden", in_process_hidden)):
            fn()
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                results[key].append(time.perf_counter() - t0)
        per_token: dict[str, float] = {}
        for flight, signal in ((1, "logprobs"), (4, "logprobs"), (16, "logprobs"), (4, "hidden"), (16, "hidden")):
            spec = ServerTeacherSpec(server=url, top_k=args.top_k, max_in_flight=flight, check_tokenizer=False,
                                     signal=signal)
            teacher = EngineTeacher(open_engine(spec, tokenizer, temperature=LossSpec().temperature), "server")
            teacher.signal(batch)
            key = f"server_in_flight_{flight}" + ("_hidden" if signal == "hidden" else "")
            results[key] = []
            start_bytes = teacher.engine.client.received_bytes
            for _ in range(reps):
                t0 = time.perf_counter()
                teacher.signal(batch)
                results[key].append(time.perf_counter() - t0)
            per_token[signal] = (teacher.engine.client.received_bytes - start_bytes) / (reps * tokens)
        codec = json_codec(Client(url), ids[0].tolist(), args.top_k)
        record = {
            "batch": args.batch, "seq_len": args.seq_len, "top_k": args.top_k, "vocab": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": {k: tokens / statistics.median(v) for k, v in results.items()},
            "response_bytes_per_token": per_token["logprobs"], "hidden_response_bytes_per_token": per_token["hidden"],
            "json_codec": codec,
        }
        tps = record["tokens_per_s"]
        # Each server signal against what the same signal costs in process: top-k log-probs against the forward,
        # head, log-softmax and top-k; hidden states against the forward (the output layer runs in the loss, in
        # both cases).
        record["ratio_to_in_process"] = {
            k: v / tps["in_process_hidden" if k.endswith("_hidden") else "in_process"]
            for k, v in tps.items() if not k.startswith("in_process")}
    finally:
        server.terminate()
        server.wait(timeout=30)
    torch.set_num_threads(threads)
    return record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--teacher", type=Path, default=None, help="an HF model directory (default: random init)")
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "medium"],
                   help="random-init teachers: small = the quickstart teacher's shape, medium = 41M parameters")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--signals", action="store_true",
                   help="bytes per scored token of top-20 JSON, whole-vocabulary JSON and hidden states")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.signals:
        return signals_main(args)
    args.out = args.out or DEFAULT_OUT
    reps = args.reps or (2 if args.quick else 5)
    work = Path(tempfile.mkdtemp(prefix="distill-serve-bench-"))
    teachers = {"given": args.teacher} if args.teacher else {size: None for size in args.sizes}
    records = {}
    for size, teacher_dir in teachers.items():
        records[size] = measure(teacher_dir or make_teacher(work, size), args, reps)
    record = {"sizes": records, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    for size, r in record["sizes"].items():
        print(f"{size}: {r['parameters'] / 1e6:.1f}M parameters, V = {r['vocab']}")
        for k, v in r["tokens_per_s"].items():
            print(f"  {k:22s} {v:9.0f} tok/s  {r['ratio_to_in_process'].get(k, 1.0):.3f}x")
        print(f"  response: {r['response_bytes_per_token']:.0f} bytes per scored token (JSON, top-{args.top_k}), "
              f"{r['hidden_response_bytes_per_token']:.0f} (hidden states)")
        c = r["json_codec"]
        print("  JSON, seconds per MB: " + ", ".join(f"{n} {c[n + '_seconds_per_mb']:.4f}" for n in
                                                       ("json_dumps", "orjson_dumps", "json_loads", "orjson_loads")))
    return record


def signals_main(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="distill-serve-bench-"))
    teachers = {"given": args.teacher} if args.teacher else {size: None for size in args.sizes}
    records = {size: measure_signals(teacher_dir or make_teacher(work, size), args)
               for size, teacher_dir in teachers.items()}
    record = {"sizes": records, "batch": args.batch, "seq_len": args.seq_len,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__}
    out = args.out or SIGNALS_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, record)
    for size, r in records.items():
        heads = ", ".join(f"{d} {b / 1e6:.1f} MB" for d, b in r["output_head_bytes"].items())
        print(f"{size}: V = {r['vocab']}, output layer once: {heads}")
        for name, m in r["modes"].items():
            print(f"  {name:22s} {m['response_bytes_per_token']:12.0f} bytes per scored token  "
                  f"{m['tokens_per_s']:9.0f} tok/s")
    return record


if __name__ == "__main__":
    main()
