"""Generate training text from a teacher (``distill generate``): sequence-level distillation and best-of-N.

    distill generate configs/tiny/generate.yaml out_dir=runs/gen          # tiny CPU run, seconds
    distill generate my.yaml n=8 scorer=verifier verifier=distill.tasks.arithmetic:verify keep=best
    distill train my_train.yaml data.source=runs/gen                      # train on what was kept

Prompts (a ``prompt`` text field, or chat ``messages`` rendered with the tokenizer's chat template) ->
``n`` samples per prompt from the model (``distill.generation.sampling.sample``: explicit sampling parameters, KV
cache, a seed per sample) -> scored (the model's mean log-prob of its sample, a verifier
``module:function(prompt, completion) -> float``, or none) -> kept (best-of-N, the top m, or all) ->
written as JSONL shards + ``manifest.json``.

Records: ``prompt`` and ``response`` (or ``messages`` with the assistant's answer appended, for chat
prompts), ``score``, ``sample`` (index among the prompt's n), ``prompt_index``, ``key``, token counts,
``finished`` (the sample ended with a stop token), ``error`` (a scorer that raised on it), and the prompt
row's other fields (e.g. a reference answer). The output directory trains directly: ``data.source: OUT``
(prompt tokens masked; the student's tokenizer re-tokenizes the text, so teacher and student may have
different tokenizers).

Files: ``plan.json`` (the run's identity, written first), ``shard-SSSSSS.jsonl`` (prompts ``[S * shard_prompts,
(S + 1) * shard_prompts)``, written to a temporary name and renamed, so a file with a shard's name is
complete), ``manifest.json`` (written last: identity, counts, each shard's size and sha256, and ``warnings``:
nothing kept, samples dropped because the verifier raised; ``distill generate`` exits 1 when nothing was
kept, since the output then holds no training data). Killed at any
moment and run again with the same settings, it writes only the missing shards; the batches are fixed per
shard and every sample's randomness comes from (seed, prompt key, sample index), so a local model's output
is byte-identical to an uninterrupted run. Other settings in a directory that holds a run are refused.
Each prompt's key hashes its token ids, the sampling parameters and the model's identity.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import numbers
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from distill.checkpoint import atomic_write_text
from distill.config import GenerateConfig
from distill.data import GENERATIONS_FORMAT, load_raw
from distill.engines import engine_identity, engine_tokenizer, open_engine
from distill.generation.sampling import SamplingParams
from distill.models import has_accelerator
from distill.tokenizer import tokenizer_fingerprint

logger = logging.getLogger("distill")

FORMAT_VERSION = 1
MANIFEST, PLAN = "manifest.json", "plan.json"


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.jsonl"


# --------------------------------------------------------------------------------------------- prompts


def load_prompts(cfg: GenerateConfig, tokenizer, limit: int | None) -> list[dict]:
    """Prompt rows as ``{"ids", "text" or "messages", "extra"}``, checked against the model's positions."""
    p = cfg.prompts
    raw = load_raw(p.source, p.split)
    if len(raw) == 0:
        raise ValueError(f"prompts.source {p.source} holds no prompts (0 rows)")
    if p.max_prompts is not None and p.max_prompts < len(raw):
        raw = raw.select(range(p.max_prompts))
    fmt = p.format
    if fmt == "auto":
        fmt = "messages" if p.messages_field in raw.column_names else "prompt"
    field = p.messages_field if fmt == "messages" else p.prompt_field
    if field not in raw.column_names:
        raise ValueError(
            f"prompts.source {p.source}: no column `{field}` (prompts.{'messages' if fmt == 'messages' else 'prompt'}"
            f"_field); the columns are {raw.column_names}"
        )
    if fmt == "messages" and tokenizer is not None and tokenizer.chat_template is None:
        raise ValueError(f"prompts.source {p.source} holds chat messages, but the tokenizer has no chat template")
    rows = []
    for i, row in enumerate(raw):
        value = row[field]
        if fmt == "messages":
            if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
                raise ValueError(f"prompts.source {p.source}, row {i}: `{field}` must be a list of {{role, content}}")
        elif not isinstance(value, str) or not value:
            raise ValueError(f"prompts.source {p.source}, row {i}: `{field}` must be a non-empty string, got {value!r:.60}")
        extra = {k: v for k, v in row.items() if k != field}
        if tokenizer is None:  # a server without a local tokenizer: the server tokenizes (text, chat messages)
            rows.append({"ids": None, "value": value, "format": fmt, "extra": extra})
            continue
        if fmt == "messages":
            text = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True,
                                                 **p.chat_template_kwargs)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tokenizer(value, add_special_tokens=False)["input_ids"])
            if tokenizer.bos_token_id is not None:  # as the training data's prompt_response format does
                ids = [tokenizer.bos_token_id, *ids]
        if limit is not None and len(ids) + cfg.sampling.max_new_tokens > limit:
            raise ValueError(
                f"prompts.source {p.source}, row {i}: the prompt is {len(ids)} tokens; with "
                f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} that exceeds the model's {limit} positions. "
                "Shorten or drop the prompt, or lower sampling.max_new_tokens"
            )
        rows.append({"ids": ids, "value": value, "format": fmt, "extra": extra})
    return rows


# --------------------------------------------------------------------------------------------- scoring


def load_verifier(ref: str):
    """``module:function`` -> the function (the working directory is importable, like ``python -m``)."""
    module_name, _, fn_name = ref.partition(":")
    if not module_name or not fn_name:
        raise ValueError(f"verifier={ref!r} must be `module:function` (e.g. distill.tasks.arithmetic:verify)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure: name the module and the cause
        raise ValueError(f"verifier={ref!r}: module {module_name!r} does not import ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"verifier={ref!r}: {module_name} has no function {fn_name!r}")
    return fn


def score_samples(cfg: GenerateConfig, verifier, prompt_text: str, samples: list[dict]) -> list[str]:
    """Fill ``score`` (and ``error``) of each sample of one prompt; returns the errors of the scorer calls that
    raised."""
    failures = []
    for s in samples:
        mean_logprob = s.pop("_mean_logprob")
        if cfg.scorer == "none":
            s["score"] = None
        elif cfg.scorer == "logprob":
            s["score"] = mean_logprob
        else:
            try:
                value = verifier(prompt_text, s["response"])
            except Exception as exc:  # a scorer failing on one sample must not stop the run
                s["score"], s["error"] = None, f"{type(exc).__name__}: {exc}"
                failures.append(s["error"])
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
                raise ValueError(
                    f"verifier={cfg.verifier!r} returned {value!r} ({type(value).__name__}), not a number, for "
                    f"prompt {prompt_text!r:.80}; a verifier returns a float score (e.g. 1.0 right, 0.0 wrong)"
                )
            s["score"] = float(value)
    return failures


def select(cfg: GenerateConfig, samples: list[dict]) -> list[dict]:
    """The samples of one prompt to keep: best-of-N, top m or all (ties: the lower sample index first)."""
    pool = [s for s in samples if cfg.keep_unfinished or s["finished"]]
    pool = [s for s in pool if "error" not in s] if cfg.keep != "all" else pool
    if cfg.keep == "all":
        return pool
    ranked = sorted(pool, key=lambda s: (-(s["score"] if s["score"] is not None else -math.inf), s["sample"]))
    return ranked[: 1 if cfg.keep == "best" else cfg.keep_top]


# --------------------------------------------------------------------------------------------- shards


def generate_shard(cfg: GenerateConfig, engine, params: SamplingParams, rows: list[dict], first: int,
                   identity_hash: str, verifier, on_batch=None) -> tuple[str, dict]:
    """One shard's JSONL text and its counts; each sample's seed is (seed, prompt key, sample index)."""
    keys = [hashlib.sha256(json.dumps([identity_hash, row["ids"] if row["ids"] is not None else row["value"]]
                                      ).encode()).hexdigest()[:32] for row in rows]
    samples = engine.sample(rows, keys, params, n=cfg.n, seed=cfg.seed, logprobs=cfg.scorer == "logprob",
                            batch_size=cfg.batch_size, on_batch=on_batch)
    lines, counts = [], {"prompts": len(rows), "samples": len(rows) * cfg.n, "kept": 0, "unfinished": 0,
                         "scorer_failures": 0}
    first_failure = None
    for r, row in enumerate(rows):
        # A verifier sees the prompt text; for chat prompts, the last user message.
        prompt_text = row["value"] if row["format"] == "prompt" else next(
            (m["content"] for m in reversed(row["value"]) if m["role"] == "user"), "")
        failures = score_samples(cfg, verifier, prompt_text, samples[r])
        counts["scorer_failures"] += len(failures)
        if failures and first_failure is None:
            first_failure = failures[0]
        counts["unfinished"] += sum(not s["finished"] for s in samples[r])
        for s in select(cfg, samples[r]):
            record = {**row["extra"], "prompt_index": first + r, "key": keys[r],
                      "prompt_tokens": len(row["ids"]) if row["ids"] is not None else None, **s}
            if row["format"] == "messages":
                record["messages"] = [*row["value"], {"role": "assistant", "content": s["response"]}]
            else:
                record["prompt"] = row["value"]
            lines.append(json.dumps(record, sort_keys=True, ensure_ascii=False))
            counts["kept"] += 1
    if first_failure is not None:
        counts["first_scorer_error"] = first_failure[:500]
    return "".join(line + "\n" for line in lines), counts


def output_warnings(cfg: GenerateConfig, counts: dict, first_error: str | None) -> list[str]:
    """What a finished run must say out loud (and write as manifest.json's ``warnings``): nothing kept, or
    samples dropped because the scorer raised."""
    notes = []
    failed, samples = counts.get("scorer_failures", 0), counts.get("samples", 0)
    error = f" (first error: {first_error})" if first_error else ""
    if not counts.get("kept"):
        if samples and failed == samples:
            why = (f"the verifier {cfg.verifier} raised on every sample{error}; check that it scores these prompts "
                   "(module:function(prompt, completion) -> float)")
        elif samples and counts.get("unfinished", 0) == samples and not cfg.keep_unfinished:
            why = (f"every sample hit sampling.max_new_tokens={cfg.sampling.max_new_tokens} without a stop token; "
                   "raise it, or set keep_unfinished=true")
        else:
            why = (f"every sample was dropped (unfinished: {counts.get('unfinished', 0)}, scorer failures: "
                   f"{failed}, of {samples}){error}")
        notes.append(f"NOTHING WAS KEPT: {why}")
    elif failed:
        notes.append(f"the verifier {cfg.verifier} raised on {failed} of {samples} samples{error}; they were dropped")
    return notes


# --------------------------------------------------------------------------------------------- the command


def main(cfg: GenerateConfig, on_step: Callable[[dict], object] | None = None) -> dict:
    """Sample, score and select ``cfg.n`` responses per prompt into ``cfg.out_dir`` (continuing a partial run);
    returns the counts. ``on_step`` is told of each shard this process writes, once it is on disk."""
    out_dir = Path(cfg.out_dir)
    accelerator = Accelerator(cpu=not has_accelerator())
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if not is_main:
        logger.setLevel(logging.WARNING)

    verifier = load_verifier(cfg.verifier) if cfg.scorer == "verifier" else None
    tokenizer = engine_tokenizer(cfg.teacher)  # None: a server that tokenizes (text and chat prompts)
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    params = SamplingParams(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, top_k=cfg.sampling.top_k,
                            max_new_tokens=cfg.sampling.max_new_tokens,
                            stop_ids=tuple(sorted({*cfg.sampling.stop_ids, *([eos] if eos is not None else [])})))
    engine = open_engine(cfg.teacher, tokenizer, vocab_policy=cfg.vocab_policy, device=accelerator.device)
    rows = load_prompts(cfg, tokenizer, engine.max_positions)
    identity = _identity(cfg, params, rows, tokenizer)
    identity_hash = hashlib.sha256(json.dumps([identity["teacher"], identity["sampling"]], sort_keys=True).encode()
                                   ).hexdigest()
    logger.info("generate: %d prompts x %d samples from %s; sampling: %s; scorer: %s; keep: %s",
                len(rows), cfg.n, engine.describe(), params.describe(),
                cfg.verifier if cfg.scorer == "verifier" else cfg.scorer,
                f"top {cfg.keep_top}" if cfg.keep == "top" else cfg.keep)

    manifest_path, plan_path = out_dir / MANIFEST, out_dir / PLAN
    if manifest_path.is_file():
        found = json.loads(manifest_path.read_text())
        _check_same(found, identity, out_dir)
        logger.info("%s already holds these generations complete; nothing to do", out_dir)
        for note in found.get("warnings", []):
            logger.warning("WARNING: %s", note)
        return found["counts"]
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if plan_path.is_file():
            _check_same(json.loads(plan_path.read_text()), identity, out_dir)
            logger.info("continuing the generations in %s", out_dir)
        else:
            atomic_write_text(plan_path, json.dumps(identity, indent=2, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()

    num_shards = -(-len(rows) // cfg.shard_prompts)
    t0 = time.perf_counter()
    tokens = _write_shards(cfg, engine, params, rows, [s for s in range(rank, num_shards, world)
                                                      if not (out_dir / _counts_name(s)).is_file()],
                           identity_hash, verifier, progress=cfg.progress and is_main, on_shard=on_step)
    accelerator.wait_for_everyone()
    manifest = None
    if is_main:
        manifest = _manifest(cfg, out_dir, identity, num_shards)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")  # last
    accelerator.wait_for_everyone()
    manifest = manifest or json.loads(manifest_path.read_text())
    seconds = time.perf_counter() - t0
    logger.info("generations written to %s: %s (%.1f s, %.0f new tokens/s on this process)", out_dir,
                ", ".join(f"{k}={v}" for k, v in manifest["counts"].items()), seconds, tokens / max(seconds, 1e-9))
    for note in manifest.get("warnings", []):
        logger.warning("WARNING: %s", note)
    return manifest["counts"]


def _identity(cfg: GenerateConfig, params: SamplingParams, rows: list[dict], tokenizer) -> dict:
    """What the generations are made of (the plan and the manifest record it; resuming with another is refused)."""
    return {
        "format": GENERATIONS_FORMAT,
        "version": FORMAT_VERSION,
        "teacher": engine_identity(cfg.teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "sampling": params.to_json(),
        "n": cfg.n, "seed": cfg.seed,
        "scorer": cfg.scorer, "verifier": cfg.verifier,
        "keep": cfg.keep, "keep_top": cfg.keep_top, "keep_unfinished": cfg.keep_unfinished,
        "batch_size": cfg.batch_size, "shard_prompts": cfg.shard_prompts,
        "prompts": {"source": cfg.prompts.source, "count": len(rows),
                    "sha256": hashlib.sha256(json.dumps([r["ids"] if r["ids"] is not None else r["value"]
                                                         for r in rows]).encode()).hexdigest()},
    }


def _write_shards(cfg: GenerateConfig, engine, params: SamplingParams, rows: list[dict], todo: list[int],
                  identity_hash: str, verifier, progress: bool,
                  on_shard: Callable[[dict], object] | None = None) -> int:
    """This process's missing shards, each written and then its counts (which mark it complete; ``on_shard`` is
    told then); returns the new tokens sampled."""
    out_dir = Path(cfg.out_dir)
    bar = tqdm(total=sum(min(cfg.shard_prompts, len(rows) - s * cfg.shard_prompts) for s in todo), unit="prompt",
               desc="generate", disable=not progress, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    t0, tokens = time.perf_counter(), 0

    def on_batch(new_tokens: int) -> None:
        nonlocal tokens
        tokens += new_tokens
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)

    for s in todo:
        first = s * cfg.shard_prompts
        shard_rows = rows[first : first + cfg.shard_prompts]
        text, counts = generate_shard(cfg, engine, params, shard_rows, first, identity_hash, verifier, on_batch)
        atomic_write_text(out_dir / shard_name(s), text)
        # The counts are written after the shard: their presence marks the shard complete.
        atomic_write_text(out_dir / _counts_name(s), json.dumps(counts, sort_keys=True) + "\n")
        bar.update(len(shard_rows))
        if on_shard is not None:
            on_shard({"shard": s, "prompts": [first, first + len(shard_rows)], "path": str(out_dir / shard_name(s)),
                      **counts})
    bar.close()
    return tokens


def _counts_name(shard: int) -> str:
    return f".{shard_name(shard)}.counts.json"


def _manifest(cfg: GenerateConfig, out_dir: Path, identity: dict, num_shards: int) -> dict:
    shards, totals, first_error = [], {}, None
    for s in range(num_shards):
        path, counts_path = out_dir / shard_name(s), out_dir / _counts_name(s)
        if not path.is_file() or not counts_path.is_file():
            raise RuntimeError(f"{path} is missing after generation; run the same command again")
        counts = json.loads(counts_path.read_text())
        shard_error = counts.pop("first_scorer_error", None)
        first_error = first_error or shard_error
        data = path.read_bytes()
        shards.append({"file": path.name, "records": counts["kept"], "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest(), **{k: v for k, v in counts.items() if k != "kept"}})
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    return {**identity, "shards": shards, "counts": totals,
            "warnings": output_warnings(cfg, totals, first_error)}


def _check_same(found: dict, identity: dict, out_dir: Path) -> None:
    if found.get("format") != GENERATIONS_FORMAT:
        raise ValueError(f"{out_dir} holds something that is not `distill generate` output; choose another out_dir")
    diff = sorted(k for k in identity if found.get(k) != identity[k])
    if diff:
        raise ValueError(
            f"{out_dir} holds generations made with other settings (differing: {', '.join(diff)}); use another "
            "out_dir, or delete it to start over"
        )
