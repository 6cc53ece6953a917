"""Speculative decoding (Leviathan et al.), batched: a draft model proposes tokens, the target model checks them
in one pass; the output is distributed exactly as the target's own sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distill.generation.sampling import (
    MASK64,
    Decoder,
    Generation,
    SamplingParams,
    left_pad,
    processed_logprobs,
    row_seed,
    uniforms,
)


@dataclass
class SpeculativeStats:
    """Counts of a speculative decoding run (summed over the rows still writing in each round)."""

    rounds: int = 0  # target forward passes after the prompt (one per round)
    row_rounds: int = 0  # rounds summed over rows: a row's target calls
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target accepted
    tokens: int = 0  # tokens written (accepted drafts + one correction or bonus token per row-round)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_call(self) -> float:
        """Tokens each row writes per target call: the accepted drafts + 1."""
        return self.tokens / max(self.row_rounds, 1)

    def to_json(self) -> dict:
        return {"rounds": self.rounds, "row_rounds": self.row_rounds, "proposed": self.proposed,
                "accepted": self.accepted, "tokens": self.tokens, "acceptance_rate": self.acceptance_rate,
                "tokens_per_target_call": self.tokens_per_call}


def _distribution(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampler's probabilities (B, V) (one-hot at the argmax when greedy)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits_BV.argmax(-1), logits_BV.shape[-1]).float()
    return processed_logprobs(logits_BV, params).exp()


def _draw(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from (unnormalized) probabilities with the rows' uniforms."""
    cdf = probs_BV.double().cumsum(-1)
    x = (u_B.double() * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_max(probs_BV.shape[-1] - 1)
    # Rounding can land on a zero-probability id at the top of the range: take the last id with mass.
    bad = probs_BV.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(bad.any()):
        last = (probs_BV > 0).long().cumsum(-1).argmax(-1)
        idx = torch.where(bad, last, idx)
    return idx


@dataclass
class _Rows:
    """What each row has written so far (tokens and the target's log-probabilities) and whether it still writes."""

    written: list[list[int]]
    written_lp: list[list[float]]
    alive: torch.Tensor  # (B,) bool: still writing
    finished: torch.Tensor  # (B,) bool: stopped at a stop token

    @classmethod
    def start(cls, b: int, device) -> _Rows:
        return cls([[] for _ in range(b)], [[] for _ in range(b)], torch.ones(b, dtype=torch.bool, device=device),
                   torch.zeros(b, dtype=torch.bool, device=device))


@dataclass
class _Caches:
    """Both models' KV caches and what each is fed next."""

    target: Decoder
    draft: Decoder
    target_logits: torch.Tensor  # (B, V) the target's logits after the prompt (used in the first round only)
    draft_logits: torch.Tensor  # (B, V) the draft's logits for its next proposal
    pending: torch.Tensor | None = None  # (B,) each row's last token, not yet in the target's cache


class _Uniforms:
    """Each row's uniforms, one stream per use (the draft's draws, the acceptance tests, the corrections); none
    without seeds (greedy)."""

    def __init__(self, seeds: list[int] | None, device):
        self.device = device
        self.streams = {name: (np.asarray([row_seed(s, name) & MASK64 for s in seeds], dtype=np.uint64)
                               if seeds else None) for name in ("draft", "accept", "fix")}

    def __call__(self, name: str, counter: int) -> torch.Tensor | None:
        stream = self.streams[name]
        return None if stream is None else torch.from_numpy(uniforms(stream, counter)).to(self.device)


@torch.no_grad()
def speculative_sample(
    target,
    draft,
    prompts: list[list[int]],
    params: SamplingParams,
    gamma: int,
    *,
    pad_id: int,
    seeds: list[int] | None = None,
    device=None,
) -> tuple[Generation, SpeculativeStats]:
    """Leviathan et al.'s speculative sampling, batched: the ``draft`` proposes ``gamma`` tokens per round,
    the ``target`` scores them in one pass; token j is accepted with probability min(1, p(x)/q(x)) (greedy:
    when it is the target's argmax), the first rejected one is replaced by a draw from norm(max(0, p - q))
    (greedy: the target's argmax), and a round with every draft accepted adds one bonus token from the target.
    The output is distributed exactly as the target's own sampling (``params``), token for token equal to it
    when greedy. Rows advance by different amounts; the rejected drafts become holes in both KV caches.
    """
    if gamma < 1:
        raise ValueError(f"gamma={gamma}: the draft must propose at least one token per round")
    if not params.greedy and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("speculative sampling needs one seed per prompt")
    device = device if device is not None else next(target.parameters()).device
    modes = (target.training, draft.training)
    target.eval()
    draft.eval()
    ids, mask = left_pad(prompts, pad_id, device)
    u = _Uniforms(seeds, device)
    stop = set(params.stop_ids)
    t_dec, d_dec = Decoder(target), Decoder(draft)
    t_logits, d_logits = t_dec.prefill(ids, mask), d_dec.prefill(ids, mask)
    caches = _Caches(t_dec, d_dec, t_logits, d_logits)
    rows = _Rows.start(ids.shape[0], device)
    stats = SpeculativeStats()
    rnd = 0
    while bool(rows.alive.any()):
        drafts, qs = _propose(caches, params, gamma, rows.alive, u, rnd)
        ps = _score(caches, drafts, rows.alive, params)
        n_acc = _accept(ps, qs, drafts, params, rows.alive, u, rnd)
        fix = _next_token(ps, qs, n_acc, params, u, rnd)
        _write(rows, stats, drafts, fix, n_acc, ps, params, stop)
        _keep_accepted(caches, drafts, fix, n_acc, rows.alive)
        rnd += 1
    target.train(modes[0])
    draft.train(modes[1])
    return _generation(ids, mask, rows, pad_id, prompts), stats


def _propose(caches: _Caches, params: SamplingParams, gamma: int, alive: torch.Tensor, u: _Uniforms,
             rnd: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Step 1: the draft proposes ``gamma`` tokens, fed back one at a time except the last. Returns the drafts
    (B, gamma) and the draft's distribution at each ([(B, V)] * gamma)."""
    xs, qs, dl = [], [], caches.draft_logits
    for j in range(gamma):
        q = _distribution(dl, params)
        x = q.argmax(-1) if params.greedy else _draw(q, u("draft", rnd * gamma + j))
        xs.append(x)
        qs.append(q)
        if j < gamma - 1:
            dl = caches.draft.append(x.unsqueeze(-1), alive.unsqueeze(-1))[:, -1]
    return torch.stack(xs, 1), qs


def _score(caches: _Caches, drafts: torch.Tensor, alive: torch.Tensor, params: SamplingParams) -> list[torch.Tensor]:
    """Step 2: the target scores the drafts (after the pending token of the last round) in one pass. Returns
    its distribution before each draft and after the last ([(B, V)] * (gamma + 1))."""
    b, gamma = drafts.shape
    if caches.pending is None:
        scored = caches.target.append(drafts, alive.unsqueeze(-1).expand(b, gamma))
        p_logits = torch.cat([caches.target_logits.unsqueeze(1), scored], 1)  # (B, gamma + 1, V)
    else:
        block = torch.cat([caches.pending.unsqueeze(-1), drafts], 1)
        p_logits = caches.target.append(block, alive.unsqueeze(-1).expand(b, gamma + 1))
    return [_distribution(p_logits[:, j], params) for j in range(gamma + 1)]


def _accept(ps: list[torch.Tensor], qs: list[torch.Tensor], drafts: torch.Tensor, params: SamplingParams,
            alive: torch.Tensor, u: _Uniforms, rnd: int) -> torch.Tensor:
    """Step 3: accept or reject, row by row (vectorized over rows, sequential over positions). Returns the
    number of drafts each row accepted (B,), 0 for the rows no longer writing."""
    b, gamma = drafts.shape
    n_acc = torch.zeros(b, dtype=torch.long, device=alive.device)
    going = alive.clone()
    for j in range(gamma):
        pj = ps[j].gather(-1, drafts[:, j : j + 1]).squeeze(-1)
        qj = qs[j].gather(-1, drafts[:, j : j + 1]).squeeze(-1)
        if params.greedy:
            ok = pj > 0.5
        else:
            ok = u("accept", rnd * gamma + j) * qj < pj  # accept with probability min(1, p / q)
        going = going & ok
        n_acc += going.long()
    return n_acc


def _next_token(ps: list[torch.Tensor], qs: list[torch.Tensor], n_acc: torch.Tensor, params: SamplingParams,
                u: _Uniforms, rnd: int) -> torch.Tensor:
    """The token after the accepted drafts (B,): a draw from norm(max(0, p - q)) at the first rejection, or a
    bonus draw from p when all were accepted."""
    b = n_acc.shape[0]
    rows = torch.arange(b, device=n_acc.device)
    p_next = torch.stack(ps, 1)[rows, n_acc]  # (B, V)
    q_pad = torch.stack([*qs, torch.zeros_like(qs[0])], 1)[rows, n_acc]
    residual = (p_next - q_pad).clamp_min(0.0)
    empty = residual.sum(-1) <= 0
    residual = torch.where(empty.unsqueeze(-1), p_next, residual)  # bonus rows (q_pad = 0) and ties
    return residual.argmax(-1) if params.greedy else _draw(residual, u("fix", rnd))


def _write(rows: _Rows, stats: SpeculativeStats, drafts: torch.Tensor, fix: torch.Tensor, n_acc: torch.Tensor,
           ps: list[torch.Tensor], params: SamplingParams, stop: set[int]) -> None:
    """Step 4: what each row still writing wrote (its accepted drafts and the next token), up to its stop token
    and its budget, with the target's log-probabilities; the rows done stop writing."""
    b, gamma = drafts.shape
    n_list, fix_list, alive_list = n_acc.tolist(), fix.tolist(), rows.alive.tolist()
    drafts_list = drafts.tolist()
    chosen = torch.cat([drafts, fix.unsqueeze(-1)], 1)  # (B, gamma + 1)
    lp = [torch.log(ps[j].gather(-1, chosen[:, j : j + 1])).squeeze(-1) for j in range(gamma + 1)]
    lp_rows = torch.stack(lp, 1).tolist()
    stats.rounds += 1
    for i in range(b):
        if not alive_list[i]:
            continue
        stats.row_rounds += 1
        stats.proposed += gamma
        stats.accepted += n_list[i]
        new = [*drafts_list[i][: n_list[i]], fix_list[i]]
        new_lp = [*lp_rows[i][: n_list[i]], lp_rows[i][n_list[i]] if n_list[i] < gamma else lp_rows[i][gamma]]
        room = params.max_new_tokens - len(rows.written[i])
        new, new_lp = new[:room], new_lp[:room]
        for k, tok in enumerate(new):
            if tok in stop:
                new, new_lp = new[: k + 1], new_lp[: k + 1]
                rows.finished[i] = True
                break
        rows.written[i] += new
        rows.written_lp[i] += new_lp
        stats.tokens += len(new)
        if rows.finished[i] or len(rows.written[i]) >= params.max_new_tokens:
            rows.alive[i] = False


def _keep_accepted(caches: _Caches, drafts: torch.Tensor, fix: torch.Tensor, n_acc: torch.Tensor,
                   alive: torch.Tensor) -> None:
    """Step 5: both caches keep the accepted drafts only; the new token is pending for the target and fed to the
    draft (with the last draft when it was accepted: the draft had not seen it)."""
    gamma = drafts.shape[1]
    keep = torch.arange(gamma, device=n_acc.device).unsqueeze(0) < n_acc.unsqueeze(1)  # (B, gamma)
    caches.target.retract(keep)
    if gamma > 1:
        caches.draft.retract(keep[:, : gamma - 1])
    caches.pending = fix
    last_ok = (n_acc == gamma) & alive
    caches.draft_logits = caches.draft.append(torch.stack([drafts[:, -1], fix], 1),
                                              torch.stack([last_ok, alive], 1))[:, -1]


def _generation(ids: torch.Tensor, mask: torch.Tensor, rows: _Rows, pad_id: int,
                prompts: list[list[int]]) -> Generation:
    """The written rows after the left-padded prompts ``ids``/``mask``, as a :class:`Generation` (the model's
    own log-probabilities left at zero)."""
    b, p = ids.shape
    device = ids.device
    width = max((len(w) for w in rows.written), default=0)
    new_ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    comp = torch.zeros((b, width), dtype=torch.bool, device=device)
    lps = torch.zeros((b, width), dtype=torch.float32, device=device)
    for i, (w, lw) in enumerate(zip(rows.written, rows.written_lp, strict=True)):
        new_ids[i, : len(w)] = torch.as_tensor(w, dtype=torch.long)
        comp[i, : len(w)] = True
        lps[i, : len(w)] = torch.as_tensor(lw, dtype=torch.float32)
    zeros = torch.zeros((b, p), dtype=torch.float32, device=device)
    return Generation(
        sequences=torch.cat([ids, new_ids], 1),
        attention_mask=torch.cat([mask, comp.long()], 1),
        completion_mask=torch.cat([torch.zeros((b, p), dtype=torch.bool, device=device), comp], 1),
        logprobs=torch.cat([zeros, lps], 1),
        model_logprobs=torch.cat([zeros, torch.zeros_like(lps)], 1),
        finished=rows.finished,
        prompt_width=p,
        prompt_lengths=[len(x) for x in prompts],
    )
