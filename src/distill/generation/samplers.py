"""Where ``distill generate``'s samples come from: a model in this process (:class:`LocalSampler`) or a model
behind a server (:class:`ServerSampler`). Both give, for each prompt row, its ``n`` samples as records
(``sample``, ``response``, ``response_tokens``, ``finished``, ``_mean_logprob``) for the command to score.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from distill.config import GenerateConfig
from distill.errors import TeacherServerError
from distill.generation.sampling import SamplingParams, row_seed, sample
from distill.server.client import Client


class LocalSampler:
    """Samples from a model in this process: (prompt, sample) sequences in batches of ``batch_size``."""

    def __init__(self, model, tokenizer, params: SamplingParams, pad_id: int, device):
        self.model, self.tokenizer, self.params, self.pad_id, self.device = model, tokenizer, params, pad_id, device

    def samples(self, cfg: GenerateConfig, rows: list[dict], keys: list[str], on_batch=None) -> list[list[dict]]:
        jobs = [(r, key, j) for r, key in enumerate(keys) for j in range(cfg.n)]
        out: list[list[dict]] = [[] for _ in rows]
        stop = set(self.params.stop_ids)
        for b0 in range(0, len(jobs), cfg.batch_size):
            batch = jobs[b0 : b0 + cfg.batch_size]
            gen = sample(self.model, [rows[r]["ids"] for r, _, _ in batch], self.params, pad_id=self.pad_id,
                         device=self.device, seeds=[row_seed(cfg.seed, key, j) for _, key, j in batch],
                         model_logprobs=cfg.scorer == "logprob")
            for (r, _key, j), ids, lp, fin in zip(batch, gen.completions(), _masked_rows(gen),
                                                 gen.finished.tolist(), strict=True):
                text_ids = ids[:-1] if fin and ids and ids[-1] in stop else ids
                out[r].append({"sample": j, "response": self.tokenizer.decode(text_ids, skip_special_tokens=False),
                               "response_tokens": len(ids), "finished": bool(fin), "_mean_logprob": lp})
            if on_batch is not None:
                on_batch(int(gen.completion_mask.sum()))
        return out


class ServerSampler:
    """Samples from a model behind a server: one request per prompt (``n`` samples, a seed from the prompt's
    key), ``max_in_flight`` at a time. Token ids when a local tokenizer is given, else text (chat prompts
    through /v1/chat/completions): API-only teachers work too."""

    def __init__(self, spec, params: SamplingParams):
        key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        if spec.api_key_env and not key:
            raise ValueError(f"teacher.api_key_env={spec.api_key_env}: that environment variable is not set")
        self.spec, self.params = spec, params
        self.client = Client(spec.server, api_key=key, timeout=spec.timeout, retries=spec.retries)

    def _one(self, cfg: GenerateConfig, row: dict, key: str) -> list[dict]:
        p = self.params
        body = {"n": cfg.n, "seed": row_seed(cfg.seed, key) & 0x7FFFFFFF, "temperature": p.temperature,
                "top_p": p.top_p, "max_tokens": p.max_new_tokens, **({"model": self.spec.model} if self.spec.model else {})}
        if p.top_k:
            body["top_k"] = p.top_k
        if row["ids"] is None and row["format"] == "messages":
            body.update(messages=row["value"], logprobs=cfg.scorer == "logprob")
            resp = self.client.request("POST", "/v1/chat/completions", body)
        else:
            body.update(prompt=row["ids"] if row["ids"] is not None else row["value"],
                        stop_token_ids=list(p.stop_ids) if row["ids"] is not None else [])
            if cfg.scorer == "logprob":
                body["logprobs"] = 1
            resp = self.client.request("POST", "/v1/completions", body)
        out = []
        for j, choice in enumerate(sorted(resp.get("choices", []), key=lambda c: c.get("index", 0))):
            if "message" in choice:
                text = choice["message"].get("content") or ""
                lps = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
            else:
                text = choice.get("text", "")
                lps = (choice.get("logprobs") or {}).get("token_logprobs") or []
            out.append({"sample": j, "response": text, "response_tokens": len(lps) or None,
                        "finished": choice.get("finish_reason") == "stop",
                        "_mean_logprob": sum(lps) / len(lps) if lps else None})
        if len(out) != cfg.n:
            raise TeacherServerError(f"teacher server {self.spec.server} returned {len(out)} samples, not n={cfg.n}")
        return out

    def samples(self, cfg: GenerateConfig, rows: list[dict], keys: list[str], on_batch=None) -> list[list[dict]]:
        with ThreadPoolExecutor(max_workers=self.spec.max_in_flight) as pool:
            futures = [pool.submit(self._one, cfg, row, key) for row, key in zip(rows, keys, strict=True)]
            out = []
            for f in futures:
                out.append(f.result())
                if on_batch is not None:
                    on_batch(sum(s["response_tokens"] or 0 for s in out[-1]))
        return out


def _masked_rows(gen) -> list[float]:
    """Each row's mean model log-prob over the tokens it wrote."""
    total = (gen.model_logprobs * gen.completion_mask).sum(1)
    count = gen.completion_mask.sum(1).clamp_min(1)
    return (total / count).tolist()
