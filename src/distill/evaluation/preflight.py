"""The pre-flight report (``distill preflight``, and the same lines at the start of ``distill train``): on a few
batches of the run's own data, before any step, what the run starts from and what it costs.

* the teacher's loss (CE of the data under the teacher) and bits per byte, and the student's starting loss and
  bits per byte, per split: the gap is what distillation can transfer;
* vocabulary fit: the tokenizer's length against each output layer's rows (rows past the tokenizer are padding,
  dropped under ``loss.vocab_policy=truncate``), and how many of the sample's target tokens each output layer
  covers;
* cost: one teacher signal (a no-grad forward of a live teacher, a cache read, one scoring request to a server)
  against one student forward + backward on the same micro-batch, measured once; a cache's size on disk;
* what to expect, read off measurements the project already has (``QUICKSTART_RESULTS``, and the distillation
  map ``KD_MAP_RESULTS`` where present), never a promise.

The teacher's loss is read off its signal, whatever its kind: a dense signal (hidden states and output layer)
gives it exactly; a sparse one (top-k, sampled) only where it holds the probability of every target token at
temperature 1 (a server's top-k with the realized token does), else it is reported as not measurable.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from distill.caching.reader import TeacherCache
from distill.data import collate
from distill.evaluation.metrics import eval_batch_indices, target_bytes, token_byte_lengths
from distill.losses import IGNORE_INDEX, CrossTokSignal, DenseSignal, SparseTarget
from distill.models import final_hidden, flat_positions, output_head

QUICKSTART_RESULTS = Path("benchmarks/results/quickstart.json")
KD_MAP_RESULTS = Path("benchmarks/results/kd_map.json")  # benchmarks/kd_map.py: KD gain against the teacher's gap
_REPO = Path(__file__).resolve().parents[3]
_REPO_RESULTS = _REPO / QUICKSTART_RESULTS


def sample_batches(n_rows: int, batch_size: int, batches: int) -> list[list[int]]:
    """``batches`` micro-batches of example indices spread evenly over a split of ``n_rows`` examples."""
    chosen = eval_batch_indices(math.ceil(n_rows / batch_size), batches)
    return [list(range(b * batch_size, min((b + 1) * batch_size, n_rows))) for b in chosen]


def output_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def vocabulary_fit(tokenizer, student, teacher, labels: torch.Tensor, vocab_policy: str) -> dict:
    """The tokenizer's length, each output layer's rows (a teacher without a model in this process: unknown) and
    how many of the sample's target tokens ``labels`` (flat, supervised only) fall inside each."""
    vocab = len(tokenizer)
    out: dict = {"tokenizer": vocab, "sample_tokens": int(labels.numel()),
                 "distinct_sample_tokens": int(labels.unique().numel()), "vocab_policy": vocab_policy, "models": {}}
    models = {"student": student, "teacher": teacher.model if teacher is not None else None}
    own = getattr(teacher, "tokenizer", None)  # a teacher with a vocabulary of its own (loss.crosstok)
    if own is not None:
        models["teacher"] = None
        out["teacher_tokenizer"] = len(own)
    for name, model in models.items():
        if model is None:
            continue
        rows = output_rows(model)
        out["models"][name] = {"output_rows": rows, "padded_rows": max(rows - vocab, 0),
                               "missing_rows": max(vocab - rows, 0),
                               "uncovered_sample_tokens": int((labels >= rows).sum())}
    return out


@torch.no_grad()
def ce_sums(signal, labels: torch.Tensor, eval_temperature: float) -> tuple[float, int] | None:
    """(summed CE in float64, positions) of the target tokens ``labels`` (flat, supervised only, as the signal's
    rows) under a model's signal; None where the signal does not hold every target's probability at temperature
    1 (``temperature``: the one it is at)."""
    if isinstance(signal, DenseSignal):
        hidden = signal.hidden.reshape(-1, signal.hidden.shape[-1])
        logits = signal.head.logits(hidden).float()
        logp = torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
        return float(-logp.double().sum()), int(labels.numel())
    if isinstance(signal, SparseTarget) and abs(eval_temperature - 1.0) < 1e-12:
        ids = signal.ids.reshape(-1, signal.ids.shape[-1])
        probs = signal.probs.reshape(-1, signal.probs.shape[-1]).double()
        hit = (ids == labels[:, None]) & (probs > 0)
        if not bool(hit.any(-1).all()):
            return None
        return float(-(probs * hit).sum(-1).log().sum()), int(labels.numel())
    return None


def _batch(dataset, indices: list[int], pad_id: int, split: str, device) -> dict:
    batch = {k: v.to(device) for k, v in collate([dataset[i] for i in indices], pad_id).items()}
    return {**batch, "index": indices, "split": split}


def _targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat next-token targets of a batch and which of them are supervised."""
    labels = batch["labels"][:, 1:].reshape(-1)
    return labels, labels != IGNORE_INDEX


def split_losses(student, tokenizer, teacher, dataset, batches: list[list[int]], split: str, device) -> dict:
    """The student's and the teacher's loss and bits per byte on ``batches`` of ``dataset``, both read off a
    signal by :func:`ce_sums` (the student's: its hidden states and output layer), so that a teacher equal to
    the student has a gap of exactly 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab = len(tokenizer)
    n_bytes = target_bytes((dataset[i] for b in batches for i in b), token_byte_lengths(tokenizer))
    out: dict = {"examples": [i for b in batches for i in b], "target_bytes": n_bytes}
    batch_list = [_batch(dataset, b, pad, split, device) for b in batches]
    if output_rows(student) >= vocab:
        head = output_head(student, vocab)
        was_training = student.training
        student.eval()
        out["student"] = _loss(lambda batch: DenseSignal(flat_positions(final_hidden(student, batch)), head),
                               batch_list, 1.0, n_bytes)
        student.train(was_training)
    own = getattr(teacher, "tokenizer", None)  # a teacher with a vocabulary of its own (loss.crosstok)
    if teacher is not None and teacher.covers(split):
        own_bytes = token_byte_lengths(own) if own is not None else None
        out["teacher"] = _loss(teacher.signal, batch_list, teacher.eval_temperature, n_bytes, own_bytes)
    if out.get("teacher") and out.get("student"):
        if own is None:
            out["gap"] = out["student"]["loss"] - out["teacher"]["loss"]
        else:  # per token of two tokenizations: only bits per byte compare
            out["gap_bits_per_byte"] = out["student"]["bits_per_byte"] - out["teacher"]["bits_per_byte"]
    return out


@torch.no_grad()
def _loss(signal_of, batches: list[dict], temperature: float, n_bytes: int,
          own_bytes: torch.Tensor | None = None) -> dict | None:
    """Loss (nats per target token), bits per byte and tokens of a signal over ``batches``; None where the
    signal cannot give it. A teacher of another tokenizer (:class:`~distill.losses.CrossTokSignal`) is read on
    its own tokens of the same text, the targets of its aligned groups, with their bytes from ``own_bytes``
    (UTF-8 bytes per id of its tokenizer, :func:`~distill.evaluation.metrics.token_byte_lengths`): its loss is per teacher token, its bits per byte compare with the
    student's."""
    total, count, crossed_bytes = 0.0, 0, 0
    for batch in batches:
        signal = signal_of(batch)
        if isinstance(signal, CrossTokSignal) and own_bytes is not None:
            labels = signal.groups.teacher_labels
            mask = labels != IGNORE_INDEX
            signal = signal.teacher
            crossed_bytes += int(own_bytes[labels[mask].cpu()].sum())
        else:
            labels, mask = _targets(batch)
        got = ce_sums(_rows(signal, mask), labels[mask], temperature)
        if got is None:
            return None
        total, count = total + got[0], count + got[1]
    n_bytes = crossed_bytes if own_bytes is not None else n_bytes
    return {"loss": total / max(count, 1), "bits_per_byte": total / (n_bytes * math.log(2)) if n_bytes else None,
            "tokens": count, **({"own_tokens": True} if own_bytes is not None else {})}


def _rows(signal, mask: torch.Tensor):
    """A signal's supervised rows (dense or sparse); other signals as they are."""
    index = mask.nonzero().squeeze(1)
    if isinstance(signal, DenseSignal):
        hidden = signal.hidden.reshape(-1, signal.hidden.shape[-1])
        return DenseSignal(hidden.index_select(0, index.to(hidden.device)), signal.head)
    if isinstance(signal, SparseTarget):
        k = signal.ids.shape[-1]
        return SparseTarget(signal.ids.reshape(-1, k)[index], signal.probs.reshape(-1, k)[index],
                            None if signal.tail is None else signal.tail.reshape(-1)[index])
    return signal


def step_cost(student, tokenizer, teacher, batch: dict) -> dict:
    """Seconds of one teacher signal (no grad) and of one student forward + backward on ``batch``, each timed
    once after one untimed call; the ratio is one sample, not a benchmark."""
    vocab = len(tokenizer)
    out: dict = {"batch_examples": len(batch["index"]), "batch_tokens": int(batch["attention_mask"].sum())}
    if output_rows(student) >= vocab:
        head = output_head(student, vocab)
        labels, mask = _targets(batch)

        def student_step() -> None:
            hidden = flat_positions(final_hidden(student, batch))[mask]
            loss = torch.nn.functional.cross_entropy(head.logits(hidden).float(), labels[mask])
            loss.backward()

        was_training = student.training
        student.train()
        out["student_step_s"] = _timed(student_step)
        student.zero_grad(set_to_none=True)
        student.train(was_training)
    if teacher is not None and teacher.covers(batch["split"]):
        with torch.no_grad():
            out["teacher_signal_s"] = _timed(lambda: teacher.signal(batch))
        out["teacher_kind"] = teacher.kind
    if out.get("student_step_s") and out.get("teacher_signal_s") is not None:
        out["ratio"] = out["teacher_signal_s"] / out["student_step_s"]
    return out


def _timed(fn) -> float:
    fn()  # untimed: first-call allocations and lazy set-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def cache_size(cache_dir: str | None) -> dict | None:
    """A teacher cache's size per split from its manifest: bytes, stored positions, bytes per token."""
    if cache_dir is None:
        return None
    train = TeacherCache(cache_dir, "train")
    return {split: TeacherCache(cache_dir, split).stats() if split != "train" else train.stats()
            for split in train.manifest["splits"]}


def quickstart_reference() -> dict | None:
    """The quickstart's measured losses (``QUICKSTART_RESULTS``), where this is a checkout that has them."""
    if not _REPO_RESULTS.is_file():
        return None
    d = json.loads(_REPO_RESULTS.read_text())
    teacher, scratch, distilled = (d[k]["val_loss"] for k in ("teacher", "scratch", "distilled"))
    return {"path": str(QUICKSTART_RESULTS), "teacher": teacher, "scratch": scratch, "distilled": distilled,
            "alpha": d["settings"]["loss"]["alpha"]}


def kd_map_reference(path: Path | None = None) -> dict | None:
    """The distillation map's part (a) (``KD_MAP_RESULTS``, written by ``benchmarks/kd_map.py``), where this is a
    checkout that has it: per measured teacher, its gap to the student trained alone and the KD gain over that
    student per ``loss.alpha`` (means over the seeds, and each seed's)."""
    path = path if path is not None else _REPO / KD_MAP_RESULTS
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    if not d.get("a"):
        return None
    points: dict = {}
    for row in d["a"]["map"]:
        p = points.setdefault(row["teacher"], {"teacher": row["teacher"], "teacher_gap": row["teacher_gap"]["mean"],
                                               "teacher_val_loss": row["teacher_val_loss"], "gain": {},
                                               "gain_per_seed": {}})
        alpha = format(row["alpha"], "g")
        p["gain"][alpha] = row["gain"]["mean"]
        p["gain_per_seed"][alpha] = [v["gain"] for v in row["per_seed"].values()]
    return {"path": str(KD_MAP_RESULTS), "student_steps": d["a"]["student_steps"], "seeds": d["seeds"],
            "points": sorted(points.values(), key=lambda p: p["teacher_gap"])}


def measure(student, tokenizer, teacher, datasets: dict, *, batch_size: int, batches: int, device,
            vocab_policy: str, teacher_spec=None) -> dict:
    """The whole report as numbers: ``datasets`` maps split names to datasets (a missing eval split: None);
    ``teacher_spec``: the config's teacher section, whose ``cache`` directory (where it names one) is measured."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report: dict = {"teacher": teacher.describe() if teacher is not None else None, "batch_size": batch_size,
                    "batches": batches, "splits": {}}
    labels = []
    with torch.random.fork_rng(devices=[]):  # a run that follows draws the same numbers as without the report
        for split, dataset in datasets.items():
            if dataset is None or len(dataset) == 0:
                continue
            chosen = sample_batches(len(dataset), batch_size, batches)
            report["splits"][split] = split_losses(student, tokenizer, teacher, dataset, chosen, split, device)
            for b in chosen:
                for i in b:
                    ex = torch.as_tensor(dataset[i]["labels"][1:], dtype=torch.long)
                    labels.append(ex[ex != IGNORE_INDEX])
        report["vocabulary"] = vocabulary_fit(tokenizer, student, teacher, torch.cat(labels) if labels else
                                              torch.zeros(0, dtype=torch.long), vocab_policy)
        first = sample_batches(len(datasets["train"]), batch_size, 1)[0]
        report["cost"] = step_cost(student, tokenizer, teacher, _batch(datasets["train"], first, pad, "train", device))
    report["cache"] = cache_size(getattr(teacher_spec, "cache", None))  # the YAML key, read as the user wrote it
    report["reference"] = quickstart_reference()
    report["kd_map"] = kd_map_reference()
    return report


def _num(x, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def render(report: dict) -> list[str]:
    """The report as lines of text, section by section."""
    lines = [f"teacher: {report['teacher'] or 'none (plain CE: nothing to distill)'}",
             f"sample: {report['batches']} batch(es) of {report['batch_size']} examples per split", "", "losses (nats/token, bits/byte):"]
    for split, s in report["splits"].items():
        stu, tea = s.get("student"), s.get("teacher")
        if tea and tea.get("own_tokens"):  # a teacher of another tokenizer: per token of its own; bpb compare
            gap = f"gap {_num(s.get('gap_bits_per_byte'), '.3f')} bpb (the teacher's loss is per token of its own tokenizer)"
        else:
            gap = f"gap {_num(s.get('gap'))}"
        lines.append(f"  {split}: student {_num(stu and stu['loss'])} ({_num(stu and stu['bits_per_byte'], '.3f')} "
                     f"bpb), teacher {_num(tea and tea['loss'])} ({_num(tea and tea['bits_per_byte'], '.3f')} bpb), "
                     f"{gap} over {stu['tokens'] if stu else tea['tokens'] if tea else 0} tokens")
        if "teacher" in s and tea is None:
            lines.append(f"  {split}: the teacher's signal does not hold every target's probability at temperature 1"
                         " (sampled or top-k targets, a mixture, a teacher not speaking yet): its loss"
                         " is not measured")
    v = report["vocabulary"]
    lines += ["", f"vocabulary: tokenizer {v['tokenizer']} tokens; the sample has {v['sample_tokens']} target tokens "
                  f"({v['distinct_sample_tokens']} distinct)"]
    for name, m in v["models"].items():
        note = (f", {m['padded_rows']} padding rows past the tokenizer (vocab_policy={v['vocab_policy']}: "
                + ("dropped)" if v["vocab_policy"] == "truncate" else "refused)") if m["padded_rows"] else "")
        if m["missing_rows"]:
            note += f", {m['missing_rows']} tokenizer tokens without a row: training refuses this model"
        lines.append(f"  {name}: {m['output_rows']} output rows{note}; covers "
                     f"{v['sample_tokens'] - m['uncovered_sample_tokens']} of {v['sample_tokens']} sample tokens")
    if "teacher_tokenizer" in v:
        lines.append(f"  teacher: a tokenizer of its own, {v['teacher_tokenizer']} tokens (loss.crosstok: the text is "
                     "re-tokenized for it; see the cross-tokenizer line of the run's log)")
    lines += ["", *_cost_lines(report), "", *expectation(report)]
    return lines


def _cost_lines(report: dict) -> list[str]:
    c = report["cost"]
    lines = [f"cost (one micro-batch of {c['batch_examples']} examples, {c['batch_tokens']} tokens; measured once):"]
    lines.append(f"  student forward + backward: {_num(c.get('student_step_s'), '.4f')} s")
    if "teacher_signal_s" in c:
        lines.append(f"  teacher signal ({c['teacher_kind']} teacher, no grad): {c['teacher_signal_s']:.4f} s"
                     + (f" = {c['ratio']:.2f}x the student's step" if "ratio" in c else ""))
    for split, s in (report.get("cache") or {}).items():
        lines.append(f"  cache on disk, {split}: {s['bytes']:,} bytes, {s['positions']:,} positions, "
                     f"{s['bytes_per_token']:.2f} bytes/token")
    return lines


def expectation(report: dict) -> list[str]:
    """What to expect, read off the quickstart's measurement: a statement of what happened there, not a promise."""
    ref = report["reference"]
    split = report["splits"].get("eval") or report["splits"].get("train") or {}
    gap = split.get("gap")
    lines = ["what to expect (past measurements, not a promise):"]
    if ref is None:
        return lines + ["  (the quickstart's results are not in this installation)"]
    ref_gap, gain = ref["scratch"] - ref["teacher"], ref["scratch"] - ref["distilled"]
    lines.append(f"  in the quickstart's measurement ({ref['path']}) a teacher {ref_gap:.2f} nats better than the "
                 f"student trained alone (teacher {ref['teacher']:.3f}, scratch student {ref['scratch']:.3f}) gave a "
                 f"distilled student {gain:.2f} nats better than scratch (loss.alpha={ref['alpha']:g}); a teacher much "
                 "closer to the student would be expected to give little")
    if gap is not None and gap <= 0:
        lines.append(f"  here the teacher's loss is not below the untrained student's (gap {gap:.2f} nats): by that "
                     "measurement it would be expected to give nothing (an untrained or random teacher?)")
    elif gap is not None:
        lines.append(f"  here the teacher is {gap:.2f} nats better than the untrained student; the student trained "
                     "alone closes part of that, so the gap that counts (to the student trained alone) would be smaller")
    return lines + kd_map_lines(report.get("kd_map"), gap)


def _best_alpha(point: dict) -> str:
    return max(point["gain"], key=point["gain"].get)


def kd_map_lines(kd_map: dict | None, gap: float | None) -> list[str]:
    """What the distillation map measured: each teacher's gap to the student trained alone against the KD gain at
    the best alpha; and, for a measured ``gap``, the map's teacher whose gap is nearest it."""
    if kd_map is None:
        return []
    seeds = ", ".join(map(str, kd_map["seeds"]))
    summary = "; ".join(f"{p['teacher_gap']:+.2f} -> {p['gain'][_best_alpha(p)]:+.2f} (loss.alpha={_best_alpha(p)})"
                        for p in kd_map["points"])
    lines = [f"  in the distillation map ({kd_map['path']}: the quickstart's fast student, {kd_map['student_steps']} "
             f"steps, seeds {seeds}; gaps and gains in nats/token), the teacher's gap to the student trained alone "
             f"-> KD gain over it at the best alpha: {summary}"]
    if gap is None:
        return lines
    p = min(kd_map["points"], key=lambda p: abs(p["teacher_gap"] - gap))
    best = _best_alpha(p)
    gains = ", ".join(f"{g:+.2f} at loss.alpha={a} (seeds: {', '.join(f'{x:+.2f}' for x in p['gain_per_seed'][a])})"
                      for a, g in p["gain"].items())
    verdict = (f"loss.alpha={best} did best there" if p["gain"][best] > 0
               else "no alpha beat the student trained alone there")
    lines.append(f"  the map's teacher nearest this gap ({gap:.2f}) is '{p['teacher']}', {p['teacher_gap']:+.2f} nats "
                 f"from the student trained alone: KD gave {gains}; {verdict}. This run's gap is to the untrained "
                 "student, an upper bound on the map's kind of gap, so the nearest point may flatter the teacher")
    return lines
