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
    b, p = ids.shape
    streams = {name: (np.asarray([row_seed(s, name) & MASK64 for s in seeds], dtype=np.uint64) if seeds else None)
               for name in ("draft", "accept", "fix")}

    def u(name: str, counter: int) -> torch.Tensor | None:
        return None if streams[name] is None else torch.from_numpy(uniforms(streams[name], counter)).to(device)

    stop = set(params.stop_ids)
    t_dec, d_dec = Decoder(target), Decoder(draft)
    t_logits, d_logits = t_dec.prefill(ids, mask), d_dec.prefill(ids, mask)
    written: list[list[int]] = [[] for _ in range(b)]
    written_lp: list[list[float]] = [[] for _ in range(b)]
    alive = torch.ones(b, dtype=torch.bool, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    pending: torch.Tensor | None = None  # each row's last token, not yet in the target's cache
    stats = SpeculativeStats()
    rnd = 0
    while bool(alive.any()):
        # 1. The draft proposes gamma tokens (fed back one at a time, except the last).
        xs, qs, dl = [], [], d_logits
        for j in range(gamma):
            q = _distribution(dl, params)
            x = q.argmax(-1) if params.greedy else _draw(q, u("draft", rnd * gamma + j))
            xs.append(x)
            qs.append(q)
            if j < gamma - 1:
                dl = d_dec.append(x.unsqueeze(-1), alive.unsqueeze(-1))[:, -1]
        drafts = torch.stack(xs, 1)  # (B, gamma)
        # 2. The target scores them (after the pending token of the last round) in one pass.
        if pending is None:
            scored = t_dec.append(drafts, alive.unsqueeze(-1).expand(b, gamma))
            p_logits = torch.cat([t_logits.unsqueeze(1), scored], 1)  # (B, gamma + 1, V)
        else:
            block = torch.cat([pending.unsqueeze(-1), drafts], 1)
            p_logits = t_dec.append(block, alive.unsqueeze(-1).expand(b, gamma + 1))
        ps = [_distribution(p_logits[:, j], params) for j in range(gamma + 1)]
        # 3. Accept or reject, row by row (vectorized over rows, sequential over positions).
        n_acc = torch.zeros(b, dtype=torch.long, device=device)
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
        # The token after the accepted drafts: a draw from norm(max(0, p - q)) at the first rejection, or a
        # bonus draw from p when all were accepted.
        p_next = torch.stack(ps, 1)[torch.arange(b, device=device), n_acc]  # (B, V)
        q_pad = torch.stack([*qs, torch.zeros_like(qs[0])], 1)[torch.arange(b, device=device), n_acc]
        residual = (p_next - q_pad).clamp_min(0.0)
        empty = residual.sum(-1) <= 0
        residual = torch.where(empty.unsqueeze(-1), p_next, residual)  # bonus rows (q_pad = 0) and ties
        fix = residual.argmax(-1) if params.greedy else _draw(residual, u("fix", rnd))
        # 4. What each row wrote, up to its stop token and its budget.
        n_list, fix_list, alive_list = n_acc.tolist(), fix.tolist(), alive.tolist()
        drafts_list = drafts.tolist()
        lp = [torch.log(ps[j].gather(-1, torch.cat([drafts, fix.unsqueeze(-1)], 1)[:, j : j + 1])).squeeze(-1)
              for j in range(gamma + 1)]
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
            room = params.max_new_tokens - len(written[i])
            new, new_lp = new[:room], new_lp[:room]
            for k, tok in enumerate(new):
                if tok in stop:
                    new, new_lp = new[: k + 1], new_lp[: k + 1]
                    finished[i] = True
                    break
            written[i] += new
            written_lp[i] += new_lp
            stats.tokens += len(new)
            if finished[i] or len(written[i]) >= params.max_new_tokens:
                alive[i] = False
        # 5. Both caches keep the accepted drafts only; the new token is pending for the target and fed to
        # the draft (with the last draft when it was accepted: the draft had not seen it).
        keep = torch.arange(gamma, device=device).unsqueeze(0) < n_acc.unsqueeze(1)  # (B, gamma)
        t_dec.retract(keep)
        if gamma > 1:
            d_dec.retract(keep[:, : gamma - 1])
        pending = fix
        last_ok = (n_acc == gamma) & alive
        d_logits = d_dec.append(torch.stack([drafts[:, -1], fix], 1), torch.stack([last_ok, alive], 1))[:, -1]
        rnd += 1
    target.train(modes[0])
    draft.train(modes[1])

    width = max((len(w) for w in written), default=0)
    new_ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    comp = torch.zeros((b, width), dtype=torch.bool, device=device)
    lps = torch.zeros((b, width), dtype=torch.float32, device=device)
    for i, (w, lw) in enumerate(zip(written, written_lp, strict=True)):
        new_ids[i, : len(w)] = torch.as_tensor(w, dtype=torch.long)
        comp[i, : len(w)] = True
        lps[i, : len(w)] = torch.as_tensor(lw, dtype=torch.float32)
    zeros = torch.zeros((b, p), dtype=torch.float32, device=device)
    gen = Generation(
        sequences=torch.cat([ids, new_ids], 1),
        attention_mask=torch.cat([mask, comp.long()], 1),
        completion_mask=torch.cat([torch.zeros((b, p), dtype=torch.bool, device=device), comp], 1),
        logprobs=torch.cat([zeros, lps], 1),
        model_logprobs=torch.cat([zeros, torch.zeros_like(lps)], 1),
        finished=finished,
        prompt_width=p,
        prompt_lengths=[len(x) for x in prompts],
    )
    return gen, stats

