"""Sampling from causal LMs on token ids: the generation layer of sequence-level and on-policy distillation.

``sample(model, prompts, params, seeds=..., ...)`` decodes a batch of prompts (lists of token ids) with the
KV cache on and returns a :class:`Generation`: the sequences (prompts left-padded to one width, then what
the model wrote), the completion mask (exactly the positions the model wrote, its stop token included), the
sampler's log-probabilities of the written tokens, and the model's own log-probabilities at T = 1.

Choices, and why:

* **Every sampling parameter is explicit** (:class:`SamplingParams`). A checkpoint's ``generation_config``
  (transformers applies e.g. ``top_p=0.95`` from it unless told otherwise) is never read; callers log
  :meth:`SamplingParams.describe`.
* **Seeds are per row.** Each row draws its uniforms from its own counter-based stream (splitmix64 of the
  row's seed and the step), so a row's sample does not depend on the other rows of its batch, on the batch
  size or on the random state of the process: a resumed run draws the same samples. (Logits themselves
  can differ in the last bits with the batch's shape, so exact reproduction also keeps the batches.)
* **Stop tokens are labels.** The completion mask includes the stop token the model wrote, also when the
  pad id equals the eos id: a student that never sees EOS never learns to stop. After its stop token a row
  is padding (mask 0).
* **Our own loop, on the model's forward.** transformers' ``generate`` draws from the process's global
  random state for the whole batch and cannot give per-row streams, and the methods built on this module
  (SKD: the teacher corrects each student token; speculative decoding: the target verifies several draft
  tokens) need token-by-token control. :class:`Decoder` holds one model's incremental state (cache,
  positions, attention mask) and is the piece those methods reuse. Greedy decoding equals transformers'
  greedy ``generate`` token for token (tested).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from distill.losses import IGNORE_INDEX


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token: ``temperature`` (0 = greedy), ``top_k`` (0 = all), ``top_p`` (1 = all),
    at most ``max_new_tokens``, stopping at any of ``stop_ids`` (the tokenizer's eos is added by callers)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def describe(self) -> str:
        if self.greedy:
            how = "greedy"
        else:
            how = f"temperature={self.temperature:g}, top_p={self.top_p:g}, top_k={self.top_k or 'off'}"
        return f"{how}, max_new_tokens={self.max_new_tokens}, stop_ids={list(self.stop_ids)}"

    def to_json(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens, "stop_ids": list(self.stop_ids)}


@dataclass
class Generation:
    """A decoded batch. Widths: ``P`` (prompts, left-padded) + ``L`` (the longest completion).

    sequences: (B, P + L) long, pad where nothing was written; attention_mask: (B, P + L);
    completion_mask: (B, P + L) bool, the positions the model wrote (its stop token included);
    logprobs: (B, P + L) float32, the sampler's log-probability of each written token (after temperature,
    top-k and top-p; 0 for greedy); model_logprobs: the same under the model at T = 1;
    finished: (B,) bool, whether the row wrote a stop token (else it hit ``max_new_tokens``).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    model_logprobs: torch.Tensor
    finished: torch.Tensor
    prompt_width: int
    prompt_lengths: list[int] = field(default_factory=list)

    def completions(self) -> list[list[int]]:
        """The ids each row wrote, its stop token included."""
        return [row[mask].tolist() for row, mask in zip(self.sequences, self.completion_mask, strict=True)]

    def to_batch(self, pad_id: int) -> dict[str, torch.Tensor]:
        """A right-padded training batch (``data.collate``'s layout): ``input_ids`` = prompt + completion,
        ``labels`` = the completion's tokens (the stop token included) and IGNORE_INDEX elsewhere."""
        rows, labels = [], []
        for seq, attn, comp in zip(self.sequences, self.attention_mask, self.completion_mask, strict=True):
            keep = attn.bool()
            rows.append(seq[keep])
            labels.append(torch.where(comp[keep], seq[keep], torch.full_like(seq[keep], IGNORE_INDEX)))
        width = max(len(r) for r in rows)
        b = len(rows)
        input_ids = torch.full((b, width), pad_id, dtype=torch.long, device=self.sequences.device)
        label_ids = torch.full((b, width), IGNORE_INDEX, dtype=torch.long, device=self.sequences.device)
        attention = torch.zeros((b, width), dtype=torch.long, device=self.sequences.device)
        for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
            input_ids[i, : len(r)] = r
            label_ids[i, : len(r)] = lab
            attention[i, : len(r)] = 1
        return {"input_ids": input_ids, "labels": label_ids, "attention_mask": attention}


# ------------------------------------------------------------------------------------------- randomness

MASK64 = (1 << 64) - 1


def row_seed(*parts) -> int:
    """A 64-bit seed from any parts (a global seed, a prompt's key, a sample index...)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def uniforms(seeds: np.ndarray, step: int) -> np.ndarray:
    """One uniform in [0, 1) per row for decoding step ``step``: splitmix64(seed + step * golden), a pure
    function of (seed, step), so a row's draws do not depend on its batch."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) + np.uint64((step + 1) * 0x9E3779B97F4A7C15 & MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# ------------------------------------------------------------------------------------------- picking


def processed_logprobs(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampler's distribution as log-probabilities (B, V): logits / T, then top-k, then top-p
    (the smallest set of most probable tokens whose mass reaches ``top_p``; at least one token)."""
    z = logits_BV.float() / params.temperature
    v = z.shape[-1]
    if params.top_k and params.top_k < v:
        kth = z.topk(params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token in the sorted order
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        z = z.masked_fill(drop, -math.inf)
    return torch.log_softmax(z, dim=-1)


def pick(logits_BV: torch.Tensor, params: SamplingParams, u_B: torch.Tensor | None):
    """Next tokens (B,) and the sampler's log-probabilities of them (B,). ``u_B``: the rows' uniforms."""
    if params.greedy:
        tokens = logits_BV.argmax(-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    logp = processed_logprobs(logits_BV, params)
    cdf = logp.exp().cumsum(-1)
    x = (u_B.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    tokens = tokens.clamp_max(cdf.shape[-1] - 1)
    # A uniform at the very top of the range can land past the last kept token after rounding: step back
    # to the last token with mass.
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if bool((chosen == -math.inf).any()):
        last_kept = (logp > -math.inf).long().cumsum(-1).argmax(-1)
        tokens = torch.where(chosen == -math.inf, last_kept, tokens)
        chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, chosen


# ------------------------------------------------------------------------------------------- decoding


def _cache_kwarg(model) -> str:
    """The keyword under which this transformers version passes the KV cache (``cache`` in recent 5.x
    releases, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as (B, P) ids and attention mask, left-padded (what incremental decoding needs)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


class Decoder:
    """One model's incremental decoding state over a batch: KV cache, attention mask, positions.

    ``prefill(ids, mask)`` runs the (left-padded) prompts and returns the logits of the next token (B, V);
    ``step(tokens_B)`` appends one token per row and returns the next logits; ``append(tokens_BK, valid_BK)``
    appends K tokens per row at once and returns the logits after each (B, K, V), for verifying several draft
    tokens in one pass; ``crop(length)`` drops the last positions of every row.

    Rows of a batch can advance by different amounts (speculative decoding accepts a different number of
    drafts per row): a token appended with ``valid = False``, or masked later by ``retract(keep_BK)``, is a
    hole: no later token attends to it and positions skip it, so each row reads as its valid tokens alone.
    """

    def __init__(self, model):
        self.model = model
        self.cache_kwarg = _cache_kwarg(model)
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (B,) the position of the last token of each row

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor, keep: int) -> torch.Tensor:
        kwargs = {self.cache_kwarg: self.cache} if self.cache is not None else {}
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=keep, **kwargs)
        self.cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out.logits

    @torch.no_grad()
    def prefill(self, ids_BP: torch.Tensor, mask_BP: torch.Tensor) -> torch.Tensor:
        self.cache, self.mask = None, mask_BP
        position_ids = (mask_BP.long().cumsum(-1) - 1).masked_fill(mask_BP == 0, 0)  # as transformers does
        self.positions = position_ids[:, -1]
        return self._forward(ids_BP, position_ids, keep=1)[:, -1]

    @torch.no_grad()
    def step(self, tokens_B: torch.Tensor) -> torch.Tensor:
        return self.append(tokens_B.unsqueeze(-1))[:, -1]

    @torch.no_grad()
    def append(self, tokens_BK: torch.Tensor, valid_BK: torch.Tensor | None = None) -> torch.Tensor:
        k = tokens_BK.shape[1]
        valid = torch.ones_like(tokens_BK, dtype=self.mask.dtype) if valid_BK is None else valid_BK.to(self.mask.dtype)
        self.mask = torch.cat([self.mask, valid], dim=-1)
        # A hole takes the position of the valid token before it; nothing attends to it anyway.
        position_ids = self.positions.unsqueeze(-1) + valid.long().cumsum(-1)
        self.positions = position_ids[:, -1]
        return self._forward(tokens_BK, position_ids, keep=k)

    def retract(self, keep_BK: torch.Tensor) -> None:
        """Mask out the last K appended tokens of each row where ``keep`` is False (rejected drafts)."""
        k = keep_BK.shape[1]
        tail = self.mask[:, -k:]
        dropped = (tail.bool() & ~keep_BK.bool()).sum(-1)
        self.mask = torch.cat([self.mask[:, :-k], tail * keep_BK.to(tail.dtype)], dim=-1)
        self.positions = self.positions - dropped

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (prompt width included)."""
        drop = self.mask.shape[1] - length
        if drop <= 0:
            return
        self.cache.crop(-drop)  # a negative size removes that many positions (every transformers 5 release)
        self.mask = self.mask[:, :length]
        self.positions = self.positions - drop


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    pad_id: int,
    seeds: list[int] | None = None,
    device=None,
    model_logprobs: bool = True,
) -> Generation:
    """Decode ``prompts`` (token ids) with ``model``; see the module docstring.

    seeds: one 64-bit seed per row (:func:`row_seed`); required unless ``params`` is greedy.
    model_logprobs: also return the model's own log-probabilities at T = 1 (a log-softmax per step unless
    the sampler's distribution is the model's; zeros when off).
    """
    if not params.greedy and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt (seeds=[row_seed(...) for each row])")
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, mask = left_pad(prompts, pad_id, device)
    b, p = ids.shape
    seed_arr = np.asarray([s & MASK64 for s in seeds], dtype=np.uint64) if seeds is not None else None
    stop = torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long, device=device)
    plain = params.temperature == 1.0 and params.top_k == 0 and params.top_p == 1.0

    decoder = Decoder(model)
    logits = decoder.prefill(ids, mask)
    tokens_out, sampler_lp, model_lp, written = [], [], [], []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for t in range(params.max_new_tokens):
        u = None if seed_arr is None else torch.from_numpy(uniforms(seed_arr, t)).to(device)
        tok, lp = pick(logits, params, u)
        if not model_logprobs:
            mlp = torch.zeros_like(lp)
        elif plain:
            mlp = lp  # the sampler's distribution is the model's
        else:
            mlp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        alive = ~done
        tokens_out.append(torch.where(alive, tok, torch.full_like(tok, pad_id)))
        sampler_lp.append(torch.where(alive, lp, torch.zeros_like(lp)))
        model_lp.append(torch.where(alive, mlp, torch.zeros_like(mlp)))
        written.append(alive)
        hit = alive & torch.isin(tok, stop) if len(stop) else torch.zeros_like(alive)
        finished |= hit
        done |= hit
        if bool(done.all()) or t == params.max_new_tokens - 1:
            break
        logits = decoder.step(tokens_out[-1])
    model.train(was_training)

    return assemble_generation(ids, mask, tokens_out, written, sampler_lp, model_lp, finished, prompts)


def assemble_generation(ids, mask, tokens_out: list, written: list, sampler_lp: list, model_lp: list | None,
                        finished, prompts: list[list[int]]) -> Generation:
    """A decoding loop's per-step lists (token, written?, log-probs; each (B,)) after the left-padded prompts
    ``ids``/``mask``, as a :class:`Generation`. ``model_lp`` None: zeros."""
    b, p = ids.shape
    comp = torch.stack(written, 1)
    zeros = torch.zeros((b, p), dtype=torch.float32, device=ids.device)
    sampled = torch.stack(sampler_lp, 1)
    return Generation(
        sequences=torch.cat([ids, torch.stack(tokens_out, 1)], 1),
        attention_mask=torch.cat([mask, comp.long()], 1),
        completion_mask=torch.cat([torch.zeros((b, p), dtype=torch.bool, device=ids.device), comp], 1),
        logprobs=torch.cat([zeros, sampled], 1),
        model_logprobs=torch.cat([zeros, torch.stack(model_lp, 1) if model_lp is not None
                                  else torch.zeros_like(sampled)], 1),
        finished=finished,
        prompt_width=p,
        prompt_lengths=[len(x) for x in prompts],
    )

