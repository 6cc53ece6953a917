"""Speculative KD's sampling (SKD, Xu et al.): the student proposes each token and the teacher keeps it when it is
among its own top-K there, else replaces it by a sample of its own; both continue from the corrected prefix.

The teacher's side is a *corrector* (:class:`distill.engines.base.Corrector`), which the teacher's engine gives:
``engine.corrector(temperature)`` for a model in this process or behind a server.
"""

from __future__ import annotations

import numpy as np
import torch

from distill.generation.sampling import (
    MASK64,
    Decoder,
    Generation,
    SamplingParams,
    assemble_generation,
    left_pad,
    pick,
    row_seed,
    uniforms,
)


@torch.no_grad()
def corrected_sample(
    student,
    corrector,
    prompts: list[list[int]],
    params: SamplingParams,
    top_k: int,
    *,
    pad_id: int,
    seeds: list[int],
    device=None,
) -> tuple[Generation, int, int]:
    """Speculative KD's sampling: the student proposes each token (``params``: its temperature, top-p); the
    teacher (``corrector``: its engine's) keeps it when it is among its own top-K at
    that position and otherwise replaces it by a sample of its own; both continue from the corrected prefix.
    Batched, on token ids. Returns the generation, the number of tokens replaced and the number proposed.
    """
    if len(seeds) != len(prompts):
        raise ValueError("corrected_sample needs one seed per prompt")
    device = device if device is not None else next(student.parameters()).device
    was_training = student.training
    student.eval()
    ids, mask = left_pad(prompts, pad_id, device)
    b, p = ids.shape
    s_seeds = np.asarray([row_seed(s, "student") & MASK64 for s in seeds], dtype=np.uint64)
    t_seeds = np.asarray([row_seed(s, "teacher") & MASK64 for s in seeds], dtype=np.uint64)
    stop = torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long, device=device)
    decoder = Decoder(student)
    logits = decoder.prefill(ids, mask)
    corrector.prefill(ids, mask)
    tokens_out, sampler_lp, written = [], [], []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    replaced = proposed = 0
    for t in range(params.max_new_tokens):
        u_s = torch.from_numpy(uniforms(s_seeds, t)).to(device)
        u_t = torch.from_numpy(uniforms(t_seeds, t)).to(device)
        x, lp = pick(logits, params, u_s)
        alive = ~done
        inside, y = corrector.check(x, top_k, u_t, alive)
        tok = torch.where(inside, x, y)
        replaced += int((alive & ~inside).sum())
        proposed += int(alive.sum())
        tokens_out.append(torch.where(alive, tok, torch.full_like(tok, pad_id)))
        sampler_lp.append(torch.where(alive & inside, lp, torch.zeros_like(lp)))
        written.append(alive)
        hit = alive & torch.isin(tok, stop) if len(stop) else torch.zeros_like(alive)
        finished |= hit
        done |= hit
        if bool(done.all()) or t == params.max_new_tokens - 1:
            break
        logits = decoder.step(tokens_out[-1])
        corrector.step(tokens_out[-1])
    student.train(was_training)
    gen = assemble_generation(ids, mask, tokens_out, written, sampler_lp, None, finished, prompts)
    return gen, replaced, proposed

