"""Evaluate students (``distill eval``): loss, calibration, distance to the teacher, and speed as a draft.

    distill eval configs/tiny/eval.yaml                       # the tiny models, seconds on CPU
    distill eval my.yaml models.distilled.path=runs/x/student speculative.gammas=[1,2,4]
    accelerate launch --num_processes 2 -m distill eval my.yaml   # the batches are split over processes

For every model, on the data section's ``split`` (the same ``data`` section ``distill train`` uses): loss,
perplexity, bits per byte, expected calibration error, top-1 accuracy; with a teacher, its distance to the
teacher as the teacher's kind allows (``docs/methods.md`` §3): forward KL and each of ``divergences``
(reverse KL, TVD, ...) with their standard deviation over positions, and top-1 agreement. All through the
memory-efficient loss, the batches spread over the processes. With ``speculative``, each model is also the
draft of the (live) teacher: acceptance rate, tokens per target call and wall-clock speed-up per gamma,
beside the offline prediction from alpha-hat = mean sum_v min(p, q) on the teacher's own samples.

Writes ``out`` (JSON) and prints a markdown table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

from distill.checkpoint import atomic_write_json
from distill.config import EvalRunConfig
from distill.data import build_datasets, collate
from distill.evaluation.harness import run_tasks
from distill.evaluation.metrics import (
    eval_batch_indices,
    eval_sums,
    measure_speculative,
    metrics_from_sums,
    target_bytes,
    token_byte_lengths,
)
from distill.evaluation.tables import eval_table
from distill.generation.sampling import SamplingParams
from distill.losses import IGNORE_INDEX, LossSpec
from distill.models import (
    check_tokenizers_agree,
    has_accelerator,
    load_model,
    load_tokenizer,
    max_positions,
    output_head,
)
from distill.teachers import open_teacher

logger = logging.getLogger("distill")


def prompt_of(example: dict, prompt_tokens: int, bos_id: int | None) -> list[int]:
    """A speculative-decoding prompt from an example: its unsupervised prefix (a prompt/response or chat
    example), else its first ``prompt_tokens`` tokens."""
    ids, labels = list(example["input_ids"]), list(example["labels"])
    first = next((t for t, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
    if first > 1 or (first == 1 and ids[0] != bos_id):
        return ids[:first]
    return ids[: min(prompt_tokens, len(ids))]


def _data_metrics(cfg: EvalRunConfig, accelerator, tokenizer, models: dict, teacher, results: dict):
    """Loss, calibration and distance to the teacher of every model on the data section's split (into
    ``results``); returns the split's dataset."""
    limits = [m for m in [max_positions(m) for m in models.values()] + [teacher and teacher.max_positions] if m]
    with accelerator.main_process_first():
        train_ds, eval_ds = build_datasets(cfg.data, tokenizer, max_positions=min(limits) if limits else None)
    if teacher is not None and teacher.check_data is not None:
        teacher.check_data(train_ds, eval_ds)
    dataset = eval_ds if cfg.split == "eval" else train_ds
    if dataset is None:
        raise ValueError("split=eval, but the data has no eval split (data.eval_fraction=0 and no data.eval_source); "
                         "set split=train or give one")
    split = cfg.split
    if teacher is not None and not teacher.covers(split):
        logger.warning("the teacher has no targets for the %s split: evaluating without it", split)
        teacher = None
        results["teacher"] = None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bs = cfg.batch_size
    chosen = eval_batch_indices(math.ceil(len(dataset) / bs), cfg.max_batches)
    mine = chosen[accelerator.process_index :: accelerator.num_processes]
    rows_used = [i for b in chosen for i in range(b * bs, min((b + 1) * bs, len(dataset)))]
    n_bytes = target_bytes((dataset[i] for i in rows_used), token_byte_lengths(tokenizer))
    divergences = tuple(cfg.divergences) if teacher is not None and teacher.eval_estimates != "sampled" else ()
    estimates = teacher.eval_estimates if teacher is not None else None

    results.update(split=split, examples=len(rows_used))
    for name, model in models.items():
        def batches():
            for b in mine:
                idx = list(range(b * bs, min((b + 1) * bs, len(dataset))))
                batch = {k: v.to(accelerator.device) for k, v in collate([dataset[i] for i in idx], pad).items()}
                yield {**batch, "index": idx, "split": split}

        sums = eval_sums(model, output_head(model, len(tokenizer)), batches(), teacher, divergences=divergences)
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
        results["models"][name] = metrics_from_sums(sums, estimates, target_bytes=n_bytes, divergences=divergences)
        logger.info("%s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in results["models"][name].items()
                                               if isinstance(v, float)))

    return dataset


def main(cfg: EvalRunConfig, on_eval: Callable[[str, dict], object] | None = None) -> dict:
    """Evaluate ``cfg.models`` (and the teacher) as the module docstring says; writes ``cfg.out`` and returns
    its results. ``on_eval`` is told of each model's metrics on the data, ``(name, metrics)``, once measured."""
    accelerator = Accelerator(cpu=not has_accelerator())
    names = list(cfg.models)
    tokenizer = load_tokenizer(cfg.models[names[0]], f"models.{names[0]}")
    for name in names[1:]:
        check_tokenizers_agree(tokenizer, load_tokenizer(cfg.models[name], f"models.{name}"),
                               f"models.{names[0]}", f"models.{name}")
    teacher, _ = open_teacher(cfg.teacher, tokenizer=tokenizer, student_ref=f"models.{names[0]}", loss=LossSpec(),
                              seq_len=cfg.data.seq_len if cfg.data else None, vocab_policy=cfg.vocab_policy,
                              device=accelerator.device)
    models = {}
    for name in names:
        model = load_model(cfg.models[name], f"models.{name}", tokenizer).to(accelerator.device).eval()
        models[name] = model
    results: dict = {"teacher": teacher.describe() if teacher else None, "models": {n: {} for n in names}}
    if cfg.data is not None:
        dataset = _data_metrics(cfg, accelerator, tokenizer, models, teacher, results)
        if on_eval is not None and accelerator.is_main_process:
            for name in names:
                on_eval(name, dict(results["models"][name]))
    if cfg.speculative is not None:
        if teacher is None or teacher.model is None:  # no model in this process to draft for
            raise ValueError("speculative: each model drafts for the teacher, which must be a live model "
                             "(teacher: {path: DIR} or {config: ...})")
        sp = cfg.speculative
        prompts = [prompt_of(dataset[i], sp.prompt_tokens, tokenizer.bos_token_id)
                   for i in range(min(sp.prompts, len(dataset)))]
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        params = SamplingParams(temperature=sp.temperature, top_p=sp.top_p, max_new_tokens=sp.max_new_tokens,
                                stop_ids=(eos,) if eos is not None else ())
        if accelerator.is_main_process:  # wall-clock measurements: one process, nothing else running
            results["speculative"] = {"params": params.to_json(), "prompts": len(prompts), "drafts": {}}
            for name, model in models.items():
                results["speculative"]["drafts"][name] = measure_speculative(
                    teacher.model, model, prompts, params, sp.gammas, [b for b in sp.batch_sizes if b <= len(prompts)],
                    pad_id=pad, seed=sp.seed, reps=sp.reps)
    if cfg.lm_eval is not None and accelerator.is_main_process:  # lm-eval runs one process on a given model
        results["lm_eval"] = {name: run_tasks(model, tokenizer, cfg.lm_eval, accelerator.device)
                              for name, model in models.items()}
    if accelerator.is_main_process:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(cfg.out), results)
        print(eval_table(results))
    accelerator.wait_for_everyone()
    return results
