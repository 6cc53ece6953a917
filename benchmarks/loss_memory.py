"""Peak memory and time of one forward + backward of the distillation loss: chunked vs naive.

Each case (impl, divergence, vocab, tokens) runs in a fresh subprocess (``--worker``), so peak memory is
that case's alone. The measured step includes the output-layer matmuls of both models:

* naive:   ``s = h @ W.T``, ``t = h_t @ W_t.T`` (no grad), ``log_softmax`` of both at temperature T, the
           divergence written the textbook way (``F.kl_div(..., log_target=True)`` for forward KL), summed
           and divided by the token count, ``.backward()``.
* chunked: :func:`distill.losses.chunked.chunked_kd_loss` (automatic chunk size), ``.backward()``.
* liger:   (CUDA, JSD only, when ``liger-kernel`` is installed) Liger-Kernel's ``LigerFusedLinearJSD``,
           the fused chunked JSD of a live teacher, for comparison. Its loss is the unscaled
           ``beta KL(P||M) + (1-beta) KL(Q||M)``; ours divides by ``beta (1-beta)`` (docs/methods.md), so the
           recorded ``loss`` differs by that factor (4 at beta=0.5).
* torchtune: (forward KL only, CPU or CUDA, when ``torchtune`` is installed: the ``bench`` extra) torchtune's
           ``ForwardKLWithChunkedOutputLoss`` fed as its knowledge-distillation recipe feeds it: the student's
           and the teacher's logits as lists of ``num_output_chunks`` = 8 per-chunk output matmuls (its
           ``TransformerDecoder.chunked_output``), ``.backward()``. Its loss is the cross-entropy
           ``-sum p_t log q_s`` over tokens (``ForwardKLLoss`` leaves out the teacher's entropy), so the
           recorded ``loss`` is the forward KL plus the teacher's mean entropy; the record also has
           ``teacher_entropy`` and ``forward_kl`` (= loss - T^2 teacher_entropy), which equals the naive loss.

``--no-peers`` skips the peers (torchtune, Liger).

``--dtype bfloat16`` runs hidden states and weights in bf16 (the usual GPU setting); the losses still
accumulate in fp32.

Peak memory: on CPU, the growth of the process's peak RSS (``ru_maxrss``) over its RSS just before the
step (inputs allocated, a small warm-up done); on CUDA, ``torch.cuda.max_memory_allocated`` over the
allocated bytes before the step. Both include the gradients of W and h (``grad_bytes`` in the record).
By default (``--malloc hook``) an LD_PRELOAD shim counts live malloc'd bytes and their peak (the CPU
analogue of ``max_memory_allocated``); without a C compiler (or with ``--malloc pinned``) the CPU workers
run with glibc's mmap threshold fixed at 128 KiB, so that every tensor allocation is its own mapping,
returned on free, and RSS tracks live tensor bytes. With glibc's default dynamic threshold (``--malloc
default``) freed chunk temporaries are kept in the heap, which adds some fragmentation to the chunked
path's RSS (about +60 MiB at V=128k) but saves it page faults (about 25% faster); the naive path's
allocations are mmapped either way.

Time: the median over repeats (the first is the measured one; more run while the total is under
``--min-time`` seconds, up to ``--repeats``), after a small warm-up problem. On a shared machine other
processes distort wall time, and the chunked path (many short parallel ops) more than the naive one:
each record has ``cpu_utilization`` (the process's CPU seconds / (wall seconds x cores); ~0.9+ when the
machine is otherwise idle) and ``cpu_seconds``. Before each case the runner waits up to
``--quiet-wait`` seconds for idle CPUs, and re-runs a case that got less than ``--min-cpu-share`` up to
``--retries`` times. ``--merge`` re-runs a subset into an existing results file.

    python benchmarks/loss_memory.py            # full: V in {32k, 128k}, tokens {2048, 4096} (+8192 on GPU)
    python benchmarks/loss_memory.py --quick    # V=128k, 2048 tokens, forward KL only
    python benchmarks/loss_memory.py --calibrate  # V-sized temporaries per token of one chunk
    python benchmarks/loss_memory.py --peers-table --out benchmarks/results/loss_memory.json  # docs table

Writes a list of records (impl, divergence, vocab, tokens, hidden, peak_bytes, seconds, ...) to
``--out`` (default ``runs/benchmarks/loss_memory.json``; the committed record: ``--out benchmarks/results/loss_memory.json``) and prints a table with the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from distill.losses import DIVERGENCES  # the divergences the loss knows, in their order

# Quick or exploratory runs land here; the committed record is written only when asked: --out benchmarks/results/loss_memory.json
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "runs" / "benchmarks" / "loss_memory.json"
BETA, SKEW = 0.5, 0.1


# A tiny LD_PRELOAD shim that counts live malloc'd bytes (and their peak) by wrapping glibc's allocator,
# so that the peak of live tensor memory is measured without changing how glibc allocates (the CPU
# analogue of torch.cuda.max_memory_allocated); built with the system C compiler when there is one.
_MALLOC_PEAK_C = r"""
#include <stddef.h>
#include <stdatomic.h>
#include <malloc.h>
#include <errno.h>
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);
static _Atomic long live_ = 0, peak_ = 0;
static inline void add_(void *p) {
    if (!p) return;
    long n = (long)malloc_usable_size(p);
    long v = atomic_fetch_add_explicit(&live_, n, memory_order_relaxed) + n;
    long pk = atomic_load_explicit(&peak_, memory_order_relaxed);
    while (v > pk && !atomic_compare_exchange_weak(&peak_, &pk, v)) {}
}
static inline void sub_(void *p) {
    if (p) atomic_fetch_sub_explicit(&live_, (long)malloc_usable_size(p), memory_order_relaxed);
}
void *malloc(size_t n) { void *p = __libc_malloc(n); add_(p); return p; }
void *calloc(size_t a, size_t b) { void *p = __libc_calloc(a, b); add_(p); return p; }
void *realloc(void *q, size_t n) {
    sub_(q);
    void *p = __libc_realloc(q, n);
    if (p) add_(p); else if (q && n) add_(q);
    return p;
}
void free(void *p) { sub_(p); __libc_free(p); }
void *memalign(size_t a, size_t n) { void *p = __libc_memalign(a, n); add_(p); return p; }
void *aligned_alloc(size_t a, size_t n) { return memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    void *p = memalign(a, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
void *valloc(size_t n) { return memalign(4096, n); }
long distill_malloc_live(void) { return atomic_load(&live_); }
long distill_malloc_peak(void) { return atomic_load(&peak_); }
void distill_malloc_reset_peak(void) { atomic_store(&peak_, atomic_load(&live_)); }
"""


def build_malloc_hook() -> str | None:
    """Compile the shim (cached in the temp dir); None if there is no C compiler or it fails."""
    import hashlib
    import shutil
    import tempfile

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or not sys.platform.startswith("linux"):
        return None
    digest = hashlib.sha1(_MALLOC_PEAK_C.encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"distill_malloc_peak_{digest}.so"
    if not out.exists():
        src = out.with_suffix(".c")
        src.write_text(_MALLOC_PEAK_C)
        tmp = out.with_suffix(f".{os.getpid()}.so")
        res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], capture_output=True)
        if res.returncode != 0:
            return None
        os.replace(tmp, out)
    return str(out)


def _malloc_hook():
    """The shim's counters if this process was started with it preloaded, else None."""
    import ctypes

    lib = ctypes.CDLL(None)
    if not hasattr(lib, "distill_malloc_peak"):
        return None
    lib.distill_malloc_live.restype = ctypes.c_long
    lib.distill_malloc_peak.restype = ctypes.c_long
    return lib


# ----------------------------------------------------------------------------------------------- worker


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _limit_address_space(fraction: float) -> None:
    """Cap the address space so that a case that does not fit fails with an allocation error instead of
    waking the OOM killer (which might pick another process)."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = vm + int(_mem_available_bytes() * fraction)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def naive_loss(h, w, th, tw, kind, temperature, num_tokens):
    import torch
    import torch.nn.functional as F

    s = h @ w.T
    with torch.no_grad():
        t = th @ tw.T
    ls = F.log_softmax(s / temperature, dim=-1)
    lt = F.log_softmax(t / temperature, dim=-1)

    def kl(log_a, log_b):  # KL(a || b), summed
        return F.kl_div(log_b, log_a, reduction="sum", log_target=True)

    if kind == "forward_kl":
        div = kl(lt, ls)
    elif kind == "reverse_kl":
        div = kl(ls, lt)
    elif kind == "jeffreys":
        div = 0.5 * (kl(lt, ls) + kl(ls, lt))
    elif kind == "jsd":
        lm = torch.logaddexp(lt + math.log(BETA), ls + math.log1p(-BETA))
        div = (BETA * kl(lt, lm) + (1 - BETA) * kl(ls, lm)) / (BETA * (1 - BETA))
    elif kind == "skew_kl":
        lm = torch.logaddexp(lt + math.log(SKEW), ls + math.log1p(-SKEW))
        div = kl(lt, lm)
    elif kind == "skew_reverse_kl":
        lm = torch.logaddexp(lt + math.log1p(-SKEW), ls + math.log(SKEW))
        div = kl(ls, lm)
    elif kind == "tvd":
        div = 0.5 * (lt.exp() - ls.exp()).abs().sum()
    else:
        raise ValueError(kind)
    return div * temperature**2 / num_tokens


# torchtune's default num_output_chunks, the value its knowledge-distillation configs use.
TORCHTUNE_CHUNKS = 8


def torchtune_loss(h, w, th, tw, labels, temperature, num_chunks=TORCHTUNE_CHUNKS):
    """torchtune's ``ForwardKLWithChunkedOutputLoss`` (torchtune 0.6.1), fed as its recipe feeds it.

    As read in torchtune 0.6.1: ``recipes/knowledge_distillation_single_device.py`` (``_loss_step``) calls
    the student and (under ``no_grad``) the teacher with ``set_num_output_chunks(loss.num_output_chunks)``,
    so each returns ``TransformerDecoder.chunked_output(h)`` = ``[self.output(c) for c in h.chunk(n, dim=1)]``
    (``torchtune/modules/transformer.py``; ``output`` a bias-free ``nn.Linear``), and passes the two lists
    with labels of shape [b, s] to ``kd_loss_fn(logits, teacher_logits, labels)``
    (``torchtune/modules/loss/kd_losses.py``), which sums ``-sum_v p_t log q_s`` over each chunk's
    non-ignored tokens and divides by their count. Here b = 1 and no label is ignored, so it divides by the
    token count as the naive loss does; torchtune has no temperature, so logits are divided by T (only
    when T != 1) and the loss multiplied by T^2, as the naive path does.
    """
    import torch
    import torch.nn.functional as F
    from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

    loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=num_chunks)

    def chunked_output(hidden, weight):
        out = [F.linear(c, weight) for c in hidden.unsqueeze(0).chunk(num_chunks, dim=1)]
        return out if temperature == 1.0 else [o / temperature for o in out]

    logits = chunked_output(h, w)
    with torch.no_grad():
        teacher_logits = chunked_output(th, tw)
    return loss_fn(logits, teacher_logits, labels.unsqueeze(0)) * temperature**2


def teacher_entropy(th, tw, temperature, rows=256) -> float:
    """Mean entropy of the teacher's softmax(logits / T) over tokens, a few rows at a time."""
    import torch
    import torch.nn.functional as F

    total = 0.0
    with torch.no_grad():
        for c in th.split(rows):
            lt = F.log_softmax((c @ tw.T).float() / temperature, dim=-1)
            total += float(-(lt.exp() * lt).sum())
    return total / th.shape[0]


def _make_inputs(vocab, tokens, hidden, device, teacher, k=64, dtype="float32"):
    import torch

    from distill.losses import SparseTarget

    g = torch.Generator(device="cpu").manual_seed(0)
    # In-place init: no transient copies that would raise the process's peak RSS before the measurement.
    dt = getattr(torch, dtype)
    w = torch.empty(vocab, hidden).normal_(0.0, 0.03, generator=g).to(device, dt).requires_grad_()
    h = torch.randn(tokens, hidden, generator=g).to(device, dt).requires_grad_()
    labels = torch.randint(vocab, (tokens,), generator=g).to(device)
    inputs = {"w": w, "h": h, "labels": labels}
    if teacher == "dense":
        inputs["tw"] = torch.empty(vocab, hidden).normal_(0.0, 0.04, generator=g).to(device, dt)
        inputs["th"] = torch.randn(tokens, hidden, generator=g).to(device, dt)
    elif teacher == "sparse":
        ids = torch.randint(vocab, (tokens, k), generator=g)
        probs = torch.softmax(torch.randn(tokens, k, generator=g), -1) * 0.9
        inputs["sparse"] = SparseTarget(
            ids.to(device), probs.to(device), torch.full((tokens,), 0.1).to(device)
        )
    return inputs


def _step(impl, kind, inp, temperature, chunk_size, budget, grad=True, loss_chunk_size=None, log_kl=True):
    import torch

    from distill.losses import DenseSignal, LinearHead, LossSpec, chunked_kd_loss

    inp["w"].grad = None
    inp["h"].grad = None
    n = inp["h"].shape[0]
    with torch.set_grad_enabled(grad):
        if impl == "naive":
            loss = naive_loss(inp["h"], inp["w"], inp["th"], inp["tw"], kind, temperature, n)
        elif impl == "liger":
            from liger_kernel.transformers import LigerFusedLinearJSD

            if kind != "jsd":
                raise ValueError("liger: only jsd")
            loss = LigerFusedLinearJSD(jsd_beta=BETA, temperature=temperature)(
                inp["h"], inp["w"], inp["th"], inp["tw"], None
            )
        elif impl == "torchtune":
            if kind != "forward_kl":
                raise ValueError("torchtune: only forward_kl")
            loss = torchtune_loss(inp["h"], inp["w"], inp["th"], inp["tw"], inp["labels"], temperature)
        else:
            if "tw" in inp:
                teacher = DenseSignal(inp["th"], LinearHead(inp["tw"]))
            else:
                teacher = inp.get("sparse")
            loss, _ = chunked_kd_loss(
                inp["h"],
                LinearHead(inp["w"]),
                inp["labels"],
                teacher,
                n,
                LossSpec(kind, temperature=temperature, beta=BETA, skew=SKEW),
                chunk_size=chunk_size,
                loss_chunk_size=loss_chunk_size,
                memory_budget_bytes=budget,
                log_kl=log_kl,
            )
    if grad:
        loss.backward()
    if inp["h"].is_cuda:
        torch.cuda.synchronize()
    return float(loss)


def worker(args) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    grad = not args.no_grad
    if not cuda and args.mem_fraction > 0:
        _limit_address_space(args.mem_fraction)
    record = {
        "impl": args.impl,
        "divergence": args.divergence,
        "vocab": args.vocab,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "teacher": args.teacher,
        "temperature": args.temperature,
        "dtype": args.dtype,
        "log_kl": not args.no_log_kl,
        "device": device,
        "threads": torch.get_num_threads(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    hook = None if cuda else _malloc_hook()
    record["memory_method"] = (
        "cuda_max_memory_allocated" if cuda else ("malloc_live_peak" if hook is not None else "rss")
    )
    try:
        # Warm-up on a small problem (kernels, thread pools), then the real inputs.
        def step(inputs):
            return _step(
                args.impl,
                args.divergence,
                inputs,
                args.temperature,
                args.chunk_size,
                args.budget,
                grad,
                args.loss_chunk_size,
                not args.no_log_kl,
            )

        small = _make_inputs(512, 64, args.hidden, device, args.teacher, dtype=args.dtype)
        step(small)
        del small
        inp = _make_inputs(args.vocab, args.tokens, args.hidden, device, args.teacher, dtype=args.dtype)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_bytes()
            if hook is not None:
                hook.distill_malloc_reset_peak()
                hook_base = hook.distill_malloc_live()
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        loss = step(inp)
        times, cpu_times = [time.perf_counter() - t0], [_cpu_seconds() - cpu0]
        rss_peak = None if cuda else _maxrss_bytes() - base
        if cuda:
            peak = torch.cuda.max_memory_allocated() - base
        elif hook is not None:
            peak = hook.distill_malloc_peak() - hook_base
        else:
            peak = rss_peak
        grad_bytes = sum(
            t.grad.numel() * t.grad.element_size() for t in (inp["w"], inp["h"]) if t.grad is not None
        )
        while len(times) < args.repeats and sum(times) < args.min_time:
            cpu0, t0 = _cpu_seconds(), time.perf_counter()
            step(inp)
            times.append(time.perf_counter() - t0)
            cpu_times.append(_cpu_seconds() - cpu0)
        # Share of the machine's cores this process got while timed: well below 1 means other processes
        # competed for the CPU and the wall time is inflated. CPU seconds (user + sys, all threads) are
        # much less sensitive to such load.
        cpu_util = sum(cpu_times) / (sum(times) * max(1, os.cpu_count() or 1))
        record.update(
            peak_bytes=int(peak),
            rss_peak_bytes=None if rss_peak is None else int(rss_peak),
            seconds=statistics.median(times),
            times=times,
            loss=loss,
            grad_bytes=int(grad_bytes),
            cpu_utilization=round(cpu_util, 3),
            cpu_seconds=statistics.median(cpu_times),
            cpu_times=cpu_times,
        )
        if args.impl == "torchtune":
            # torchtune's value is the cross-entropy with the teacher: KL + the teacher's entropy.
            ent = teacher_entropy(inp["th"], inp["tw"], args.temperature)
            record.update(teacher_entropy=ent, forward_kl=loss - args.temperature**2 * ent)
    except (MemoryError, RuntimeError) as e:  # allocation failures under the address-space cap
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise
        record.update(peak_bytes=None, seconds=None, error=f"out of memory: {str(e).splitlines()[0][:200]}")
    return record


# ------------------------------------------------------------------------------------------------- main


def _run_case(
    script_args: list[str], timeout: float, malloc: str = "hook", hook_path: str | None = None
) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *script_args]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if malloc == "hook" and hook_path:
        env["LD_PRELOAD"] = " ".join(x for x in (hook_path, env.get("LD_PRELOAD", "")) if x)
    elif malloc in ("hook", "pinned"):
        # No shim: a fixed glibc mmap threshold (which also turns off its dynamic growth) gives every
        # allocation >= 128 KiB its own mapping, unmapped on free, so RSS follows live memory; it costs
        # the chunked path page faults (slower) that the default allocator avoids.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def _busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs busy (not idle / iowait) over ``seconds``, from /proc/stat."""

    def sample():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]

    (t0, i0), _ = sample(), time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def _wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to ``max_wait`` s) until other processes leave the CPUs idle. Returns seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        if _busy_fraction() <= threshold:
            break
        time.sleep(4.0)
    return time.perf_counter() - start


def _run_case_robust(extra: list[str], args, timeout: float) -> dict:
    """Run a case when the machine is quiet; re-run (up to ``--retries``) if it got too little CPU.

    Keeps the run with the highest CPU share (the least disturbed one), not the fastest.
    """
    best = None
    for attempt in range(1 + max(0, args.retries)):
        waited = _wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
        r = _run_case(extra, timeout=timeout, malloc=args.malloc, hook_path=args.hook_path)
        r["waited_for_quiet_s"] = round(waited, 1)
        r["attempt"] = attempt + 1
        util = r.get("cpu_utilization")
        if best is None or (util is not None and util > (best.get("cpu_utilization") or -1.0)):
            best = r
        if r.get("error") or util is None or util >= args.min_cpu_share:
            break
    return best


def _has_liger() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # not installed, or no triton / GPU to import it with
        return False
    return True


def _has_torchtune() -> bool:
    try:
        import torchtune.modules.loss  # noqa: F401
    except Exception:  # not installed, or a torchao that does not match it
        return False
    return True


IMPL_ORDER = {"naive": 0, "chunked": 1, "liger": 2, "torchtune": 3}


def _sorted(records: list[dict]) -> list[dict]:
    order = {d: i for i, d in enumerate(DIVERGENCES)}
    impls = IMPL_ORDER
    return sorted(
        records,
        key=lambda r: (
            r.get("dtype", "float32"), order.get(r["divergence"], 99), r["vocab"], r["tokens"], impls[r["impl"]]
        ),
    )


def _fmt_bytes(b):
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def _fmt_s(s):
    if s is None:
        return "-"
    return f"{s:.2f} s" if s >= 1 else f"{s * 1000:.1f} ms"


def print_table(records: list[dict]) -> None:
    by_key = {}
    for r in records:
        key = (r.get("dtype", "float32"), r["divergence"], r["vocab"], r["tokens"])
        by_key.setdefault(key, {})[r["impl"]] = r
    header = (
        f"{'dtype':<10}{'divergence':<24}{'V':>8}{'tokens':>8}{'naive mem':>12}{'chunked mem':>13}{'mem ratio':>11}"
        f"{'naive time':>12}{'chunked time':>14}{'time ratio':>12}{'cpu-s ratio':>13}{'cpu share':>11}"
    )
    print(header)
    print("-" * len(header))
    for (dt, div, v, n), group in by_key.items():
        nv = group.get("naive", {})
        for impl in ("chunked", "liger", "torchtune"):
            if impl not in group:
                continue
            ch = group[impl]
            nm, cm = nv.get("peak_bytes"), ch.get("peak_bytes")
            nt, ct = nv.get("seconds"), ch.get("seconds")
            mr = f"{cm / nm:.3f}" if nm and cm else ("<" if cm and nv.get("error") else "-")
            tr = f"{ct / nt:.2f}" if nt and ct else "-"
            nc, cc = nv.get("cpu_seconds"), ch.get("cpu_seconds")
            cr = f"{cc / nc:.2f}" if nc and cc and nv.get("device") == "cpu" else "-"
            nu, cu = nv.get("cpu_utilization"), ch.get("cpu_utilization")
            share = f"{nu:.2f}/{cu:.2f}" if nu is not None and cu is not None and cr != "-" else "-"
            name = div if impl == "chunked" else f"{div} ({impl})"
            print(
                f"{dt:<10}{name:<24}{v:>8}{n:>8}{_fmt_bytes(nm):>12}{_fmt_bytes(cm):>13}{mr:>11}"
                f"{_fmt_s(nt):>12}{_fmt_s(ct):>14}{tr:>12}{cr:>13}{share:>11}"
            )
    for r in records:
        where = f"{r['impl']} {r['divergence']} V={r['vocab']} N={r['tokens']}"
        if r.get("error"):
            print(f"  note: {where}: {r['error']}")
        elif r.get("device") == "cpu" and r.get("cpu_utilization") is not None and r["cpu_utilization"] < 0.8:
            print(
                f"  note: {where}: got {r['cpu_utilization']:.0%} of the CPU (other load): wall time inflated"
            )


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB"


def peers_table(records: list[dict]) -> str:
    """The markdown table of docs/benchmarks.md's "side by side with torchtune": for each case that has a
    torchtune record, the naive, chunked and torchtune rows of that case (same run), with the ratios to
    the naive row."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = (r.get("device", "cpu"), r.get("dtype", "float32"), r["divergence"], r["vocab"], r["tokens"])
        groups.setdefault(key, {})[r["impl"]] = r
    lines = [
        "| impl | V | tokens | peak | peak / naive | time (/ naive) | CPU time (/ naive) | CPU share | loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in sorted(k for k, g in groups.items() if "torchtune" in g and "naive" in g):
        group = groups[key]
        nv = group["naive"]
        for impl in sorted(group, key=lambda i: IMPL_ORDER.get(i, 99)):
            r = group[impl]
            if r.get("error") or r.get("peak_bytes") is None:
                continue
            loss = f"{r['loss']:.4f}"
            if impl == "torchtune":
                loss += f" (= {r['forward_kl']:.4f} + teacher entropy {r['teacher_entropy']:.4f})"
            lines.append(
                f"| {impl} | {r['vocab']:,} | {r['tokens']:,} | {_gib(r['peak_bytes'])} "
                f"| {r['peak_bytes'] / nv['peak_bytes']:.3f} "
                f"| {_fmt_s(r['seconds'])} ({r['seconds'] / nv['seconds']:.2f}) "
                f"| {_fmt_s(r['cpu_seconds'])} ({r['cpu_seconds'] / nv['cpu_seconds']:.2f}) "
                f"| {r['cpu_utilization']:.2f} | {loss} |"
            )
    return "\n".join(lines) + "\n"


def calibrate(args) -> None:
    """V-sized fp32 temporaries per token of one chunk (peak growth minus the gradients)."""
    vocab, rows, hidden = args.calib_vocab, args.calib_rows, 256
    cases = [("none", "forward_kl"), ("sparse", "forward_kl")] + [("dense", d) for d in DIVERGENCES]
    for teacher, div in cases:
        for grad in (True, False):
            extra = [
                "--impl",
                "chunked",
                "--divergence",
                div,
                "--vocab",
                str(vocab),
                "--tokens",
                str(rows),
                "--hidden",
                str(hidden),
                "--teacher",
                teacher,
                "--chunk-size",
                str(rows),
                "--loss-chunk-size",
                str(rows),
                "--repeats",
                "1",
                "--temperature",
                str(args.temperature),
            ]
            if not grad:
                extra.append("--no-grad")
            r = _run_case(extra, timeout=600, malloc=args.malloc, hook_path=args.hook_path)
            if r.get("error"):
                print(teacher, div, r["error"])
                continue
            work = r["peak_bytes"] - (r["grad_bytes"] if grad else 0)
            print(
                f"{teacher:<7}{div:<16} grad={grad!s:<6} temporaries/token = {work / (rows * vocab * 4):.2f}",
                flush=True,
            )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="V=128k, 2048 tokens, forward KL only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--divergences", nargs="*", default=None)
    p.add_argument("--vocabs", nargs="*", type=int, default=None)
    p.add_argument("--tokens-list", nargs="*", type=int, default=None)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--no-log-kl",
        action="store_true",
        help="chunked: skip the logging-only forward KL that it computes besides a non-forward-KL divergence "
        "(the naive path computes only the loss)",
    )
    p.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel's fused JSD on CUDA")
    p.add_argument(
        "--no-peers", action="store_true", help="skip the peers (torchtune's chunked forward KL, Liger's JSD)"
    )
    p.add_argument(
        "--peers-table", action="store_true", help="print the markdown peers table of --out and exit"
    )
    p.add_argument("--repeats", type=int, default=3, help="at most this many timed runs per case")
    p.add_argument("--min-time", type=float, default=20.0, help="stop repeating once this many seconds ran")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--loss-chunk-size", type=int, default=None)
    p.add_argument("--budget", type=int, default=None, help="chunked memory budget in bytes")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even if CUDA is available")
    p.add_argument(
        "--mem-fraction",
        type=float,
        default=0.85,
        help="CPU: cap each case's address space at this fraction of MemAvailable (0: no cap)",
    )
    p.add_argument(
        "--malloc",
        choices=("hook", "pinned", "default"),
        default="hook",
        help="CPU peak memory: 'hook' counts live malloc'd bytes with an LD_PRELOAD shim (glibc allocates as "
        "usual; falls back to 'pinned' without a C compiler); 'pinned' fixes glibc's mmap threshold so "
        "that RSS tracks live memory (slows the chunked path); 'default': RSS under glibc's defaults "
        "(includes heap retention)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each case, wait up to this many seconds for other processes to leave the CPU idle",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="re-run a case that got less than --min-cpu-share of the CPU (other load) this many times",
    )
    p.add_argument("--min-cpu-share", type=float, default=0.8)
    p.add_argument("--merge", action="store_true", help="replace only the re-run cases in an existing --out")
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--calib-vocab", type=int, default=32768)
    p.add_argument("--calib-rows", type=int, default=64)
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="chunked", help=argparse.SUPPRESS)
    p.add_argument("--divergence", default="forward_kl", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=131072, help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--teacher", default="dense", help=argparse.SUPPRESS)
    p.add_argument("--no-grad", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        rec = worker(args)
        print(json.dumps(rec), flush=True)
        return
    if args.peers_table:
        print(peers_table(json.loads(args.out.read_text())), end="")
        return

    args.hook_path = build_malloc_hook() if args.malloc == "hook" else None
    if args.malloc == "hook" and args.hook_path is None:
        print("no C compiler for the malloc shim: measuring RSS with a pinned mmap threshold instead")
    if args.calibrate:
        calibrate(args)
        return

    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if args.quick:
        divergences, vocabs, tokens_list = ["forward_kl"], [131072], [2048]
    else:
        divergences = list(DIVERGENCES)
        vocabs = [32768, 131072]
        tokens_list = [2048, 4096, 8192] if cuda else [2048, 4096]
    divergences = args.divergences or divergences
    vocabs = args.vocabs or vocabs
    tokens_list = args.tokens_list or tokens_list

    liger = cuda and not args.no_liger and not args.no_peers and _has_liger()
    torchtune = not args.no_peers and _has_torchtune()
    if not args.no_peers and not torchtune:
        print("torchtune not importable (pip install -e '.[bench]'): no torchtune rows")
    peer_of = {
        "liger": lambda d: liger and d == "jsd",
        "torchtune": lambda d: torchtune and d == "forward_kl",
    }
    cases = [
        (d, v, n, impl)
        for d in divergences
        for v in vocabs
        for n in tokens_list
        for impl in ("naive", "chunked", "liger", "torchtune")
        if impl not in peer_of or peer_of[impl](d)
    ]
    records: list[dict] = []
    kept: list[dict] = []
    if args.merge and args.out.exists():
        # Re-run a subset: keep the other cases of an earlier run, replace the re-run ones.
        todo = {(d, v, n, impl, args.hidden, args.dtype) for d, v, n, impl in cases}
        kept = [
            r
            for r in json.loads(args.out.read_text())
            if (r["divergence"], r["vocab"], r["tokens"], r["impl"], r["hidden"], r.get("dtype", "float32"))
            not in todo
        ]
    t_start = time.perf_counter()
    for i, (div, v, n, impl) in enumerate(cases, 1):
        extra = [
            "--impl",
            impl,
            "--divergence",
            div,
            "--vocab",
            str(v),
            "--tokens",
            str(n),
            "--hidden",
            str(args.hidden),
            "--temperature",
            str(args.temperature),
            "--dtype",
            args.dtype,
            *(["--no-log-kl"] if args.no_log_kl else []),
            "--repeats",
            str(args.repeats),
            "--min-time",
            str(args.min_time),
            "--mem-fraction",
            str(args.mem_fraction),
        ]
        if args.chunk_size:
            extra += ["--chunk-size", str(args.chunk_size)]
        if args.loss_chunk_size:
            extra += ["--loss-chunk-size", str(args.loss_chunk_size)]
        if args.budget:
            extra += ["--budget", str(args.budget)]
        if args.cpu:
            extra.append("--cpu")
        r = _run_case_robust(extra, args, timeout=1800)
        base = {"impl": impl, "divergence": div, "vocab": v, "tokens": n, "hidden": args.hidden, "dtype": args.dtype}
        r = {**base, "peak_bytes": None, "seconds": None, **r}
        records.append(r)
        status = r.get("error") or f"peak {_fmt_bytes(r['peak_bytes'])}, {_fmt_s(r['seconds'])}"
        print(
            f"[{i}/{len(cases)} {time.perf_counter() - t_start:6.0f}s] {impl:<8}{div:<16}V={v:<7}N={n:<6}{status}",
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_sorted(kept + records), indent=1) + "\n")

    # Sanity: the implementations give the same loss (torchtune's: once its teacher entropy is taken off).
    for r in records:
        if r["impl"] in ("chunked", "torchtune") and r.get("loss") is not None:
            twin = next(
                (
                    x
                    for x in records
                    if x["impl"] == "naive"
                    and x.get("loss") is not None
                    and (x["divergence"], x["vocab"], x["tokens"])
                    == (r["divergence"], r["vocab"], r["tokens"])
                ),
                None,
            )
            value = r["forward_kl"] if r["impl"] == "torchtune" else r["loss"]
            if twin is not None and not math.isclose(value, twin["loss"], rel_tol=1e-3, abs_tol=1e-5):
                print(
                    f"WARNING: loss differs for {r['divergence']} V={r['vocab']} N={r['tokens']}: "
                    f"{r['impl']} {value} vs naive {twin['loss']}"
                )
    print()
    print_table(_sorted(kept + records))
    print(f"\nwrote {args.out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
