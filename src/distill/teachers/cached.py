"""A cached teacher: targets captured by ``distill cache`` (``teacher: {cache: DIR}``); sparse signal."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from distill.caching.codec import data_fingerprint
from distill.caching.reader import TeacherCache
from distill.config import TeacherCacheSpec
from distill.losses import LossSpec, SparseTarget
from distill.tokenizer import tokenizer_fingerprint


class CachedTeacher:
    """Targets from ``distill cache``, one :class:`~distill.caching.reader.TeacherCache` per captured split; sparse
    signal. Batches must be dataset examples (``batch["index"]``, ``batch["split"]``): each example is
    checked against the hash the cache stored for it."""

    kind = "cache"
    max_positions = None
    scores_any_text = False  # targets exist only for the dataset's examples
    # Capabilities it has not got (distill.teachers.base): no hidden states, no corrections of new tokens
    # (speculative KD), no members, no model in this process, nothing to diagnose (targets are checked when read).
    states = corrector = names = model = diagnose = None

    def __init__(self, spec: TeacherCacheSpec, tokenizer, loss: LossSpec, seq_len: int, device):
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[tuple, Future] = {}
        train = TeacherCache(spec.cache, "train", topk_tail=spec.topk_tail)
        self.path, self.device = train.path, device
        self.caches = {"train": train}
        if "eval" in train.manifest["splits"]:
            self.caches["eval"] = TeacherCache(spec.cache, "eval", topk_tail=spec.topk_tail)
        train.check_compatible(tokenizer_fingerprint(tokenizer), len(tokenizer), seq_len)
        if abs(train.temperature - loss.temperature) > 1e-9:
            raise ValueError(
                f"teacher.cache: the targets in {spec.cache} were captured at temperature {train.temperature}, but "
                f"loss.temperature={loss.temperature}; set loss.temperature={train.temperature} or rebuild the cache"
            )
        if loss.divergence == "sampled_reverse_kl":
            raise ValueError("loss.divergence=sampled_reverse_kl needs the teacher's probability of the tokens the "
                             "student samples, which a cache does not hold; use a live teacher or a server teacher")
        if train.mode != "topk" and not loss.tolerates_zero_teacher_mass:
            setting = f"loss.divergence={loss.divergence}"
            if loss.divergence == "jsd":
                setting += f" with loss.beta={loss.beta:g}"
            elif loss.divergence == "skew_reverse_kl":
                setting += f" with loss.skew={loss.skew:g}"
            raise ValueError(
                f"{setting} is infinite on {train.mode} targets (the teacher puts no mass outside the stored ids, "
                "and this divergence contains KL(q || p)); use forward_kl, skew_kl, tvd, jsd with loss.beta < 1 "
                "or skew_reverse_kl with loss.skew > 0"
            )
        self.mode = train.mode
        self.eval_temperature = train.temperature
        # hybrid targets are unbiased estimates like sampled ones: the same eval metrics hold for them
        self.eval_estimates = "sampled" if train.mode != "topk" else ("topk_tail" if spec.topk_tail else "topk")

    def describe(self) -> str:
        split_note = "" if "eval" in self.caches else " (no eval split: eval reports no KL to the teacher)"
        return f"{self.mode} targets from {self.path}, eval metrics: {self.eval_estimates}{split_note}"

    def check_data(self, train_ds, eval_ds) -> None:
        """Refuse targets of other data before training on them; forget a cached eval split that the run
        does not have."""
        self.caches["train"].check_compatible(data_fingerprint=data_fingerprint(train_ds), num_examples=len(train_ds))
        if "eval" in self.caches:
            if eval_ds is None:
                del self.caches["eval"]
            else:
                self.caches["eval"].check_compatible(data_fingerprint=data_fingerprint(eval_ds),
                                                     num_examples=len(eval_ds))

    def covers(self, split: str) -> bool:
        return split in self.caches

    def prefetch(self, batch: dict) -> None:
        """Read, check and decode the targets of ``batch`` (a dataset batch the run will train on later) on a
        helper thread; :meth:`signal` of that batch takes the result (or the error) from there."""
        if "index" not in batch or batch.get("split") not in self.caches:
            return
        key = _key(batch)
        if key not in self._ahead:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-cache")
            self._ahead[key] = self._pool.submit(self._targets, batch)

    def signal(self, batch: dict) -> SparseTarget:
        ahead = self._ahead.pop(_key(batch), None) if "index" in batch else None
        flat = ahead.result() if ahead is not None else self._targets(batch)
        return flat.to(self.device)

    def _targets(self, batch: dict) -> SparseTarget:
        """The batch's targets, flattened to its ``B * (T - 1)`` rows, on the CPU."""
        if "index" not in batch:
            raise ValueError(
                "a cached teacher can only score the dataset examples it was captured on; these batches are "
                "not dataset examples (use a live teacher for generated batches)"
            )
        cache = self.caches[batch["split"]]
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        lengths = batch["attention_mask"].sum(1).tolist()  # right-padded (data.collate)
        examples = [{"input_ids": ids[i, :n], "labels": labels[i, :n]} for i, n in enumerate(lengths)]
        target = cache.batch_target(batch["index"], examples, width=ids.shape[1])
        k = target.ids.shape[-1]
        return SparseTarget(target.ids.reshape(-1, k), target.probs.reshape(-1, k),
                            None if target.tail is None else target.tail.reshape(-1))


def _key(batch: dict) -> tuple:
    """A dataset batch's identity: its split and the examples it holds, in order."""
    index = batch["index"]
    return batch["split"], tuple(int(i) for i in (index.tolist() if hasattr(index, "tolist") else index))
