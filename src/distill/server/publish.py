"""A training run's student on a sampling server: its weights published to the server, its completions sampled
there (``train.batches.sampler``, docs/onpolicy.md).

* **Publishing** writes the student as an ordinary Hugging Face checkpoint (atomically: a temporary directory,
  then renamed) and asks the server to load it with SGLang's ``POST /update_weights_from_disk`` (the request is
  SGLang's ``UpdateWeightFromDiskReqInput``, python/sglang/srt/managers/io_struct.py: ``model_path``,
  ``load_format``, ``weight_version``, ...; the answer ``{"success", "message", "num_paused_requests"}``, 200 or
  400, python/sglang/srt/entrypoints/http_server.py ``update_weights_from_disk``). ``distill serve`` answers the
  same endpoint (:mod:`distill.server.weights`).
* **Sampling** is one ``/v1/completions`` request per row, on token ids, with the row's own ``seed`` and
  ``return_token_ids`` (vLLM's extension, which ``distill serve`` implements): the completion's token ids, its
  stop token included.

A server that does not answer is retried (:class:`~distill.server.client.Client`), then the run stops with
:class:`~distill.errors.TeacherServerError`, which says to start the server again and rerun with ``--resume``.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distill import checkpoint as ckpt
from distill import lora
from distill.errors import TeacherServerError
from distill.generation.sampling import SamplingParams
from distill.models import save_pretrained
from distill.server.client import Client, ServerRefusal, explain

# What a refusal of a sampling request is about, as train.batches spells it.
SAMPLE_FIELDS = {"length": "data.seq_len or train.batches.max_new_tokens", "temperature": "train.batches.temperature"}


def write_weights(model, tokenizer, final: Path) -> Path:
    """``model`` and ``tokenizer`` as an ordinary HF checkpoint at ``final``, complete or absent."""
    tmp = ckpt.tmp_dir_for(final)
    shutil.rmtree(tmp, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, tokenizer, tmp)
    ckpt.commit_dir(tmp, final)
    return final


def write_adapter(model, final: Path) -> Path:
    """A LoRA ``model``'s adapters alone (peft's ``adapter_config.json`` + ``adapter_model.safetensors``) at
    ``final``, complete or absent."""
    tmp = ckpt.tmp_dir_for(final)
    shutil.rmtree(tmp, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    lora.save_adapter(model, tmp)
    ckpt.commit_dir(tmp, final)
    return final


class SamplingServer:
    """The student behind ``url``: :meth:`load` publishes a checkpoint directory, :meth:`complete` samples."""

    def __init__(self, url: str, *, model: str | None, api_key: str | None, timeout: float, retries: int,
                 max_in_flight: int):
        self.url, self.model, self.max_in_flight = url.rstrip("/"), model, max_in_flight
        self.client = Client(self.url, api_key=api_key, timeout=timeout, retries=retries)

    def load(self, directory: Path, version: str) -> dict:
        """Ask the server to load the weights in ``directory`` (SGLang's request); its answer."""
        body = {"model_path": str(Path(directory).resolve()), "weight_version": version}
        try:
            answer = self.client.request("POST", "/update_weights_from_disk", body)
        except ServerRefusal as exc:
            raise ValueError(
                f"train.batches.sampler.server={self.url} did not load the student's weights from {directory}: "
                f"{exc.message}. The server must run the student's architecture and read this path (a shared "
                "file system); start it on the student (distill serve DIR, or SGLang) and rerun with --resume"
            ) from None
        except TeacherServerError as exc:
            raise self.unreachable(exc) from None
        if not answer.get("success", False):
            raise ValueError(f"train.batches.sampler.server={self.url} refused the student's weights from "
                             f"{directory}: {answer.get('message')}")
        return answer

    def load_adapter(self, directory: Path, name: str) -> str:
        """Ask the server to load the LoRA adapter in ``directory`` as ``name``, in place (vLLM's
        ``/v1/load_lora_adapter``, vllm/entrypoints/serve/lora/protocol.py ``LoadLoRAAdapterRequest``); its answer
        (plain text)."""
        body = {"lora_name": name, "lora_path": str(Path(directory).resolve()), "load_inplace": True}
        try:
            return self.client.request("POST", "/v1/load_lora_adapter", body, text=True)
        except ServerRefusal as exc:
            raise ValueError(
                f"train.batches.sampler.server={self.url} did not load the student's adapter from {directory}: "
                f"{exc.message}. The server must serve the LoRA student's base model with runtime LoRA loading "
                "(vLLM: --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; --max-lora-rank at least the "
                "student's r) and read this path; or set train.batches.sampler.publish=weights"
            ) from None
        except TeacherServerError as exc:
            raise self.unreachable(exc) from None

    def complete(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams) -> list[list[int]]:
        """Each prompt's completion (token ids, the stop token included when it stopped), ``max_in_flight``
        requests at a time."""
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_in_flight, len(prompts)))) as pool:
            return list(pool.map(lambda a: self._one(a[0], a[1], params), zip(prompts, seeds, strict=True)))

    def _one(self, prompt: list[int], seed: int, p: SamplingParams) -> list[int]:
        body = {"prompt": prompt, "max_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
                "seed": seed & 0x7FFFFFFF, "stop_token_ids": list(p.stop_ids), "return_token_ids": True,
                **({"model": self.model} if self.model else {})}
        try:
            choice = (self.client.request("POST", "/v1/completions", body).get("choices") or [{}])[0]
        except ServerRefusal as exc:
            raise explain(exc, SAMPLE_FIELDS) from None
        except TeacherServerError as exc:
            raise self.unreachable(exc) from None
        tokens = choice.get("token_ids")
        if tokens is None:
            raise TeacherServerError(
                f"train.batches.sampler.server={self.url} returned no token_ids; it needs vLLM's return_token_ids "
                "(distill serve, vLLM >= 0.10.2)")
        tokens = list(tokens)
        if choice.get("finish_reason") == "stop" and p.stop_ids and (not tokens or tokens[-1] not in p.stop_ids):
            tokens.append(p.stop_ids[0])  # a server that leaves the stop token out: it is a label
        return tokens

    def unreachable(self, exc: TeacherServerError) -> TeacherServerError:
        return TeacherServerError(
            f"the student's sampling server train.batches.sampler.server={self.url} stopped answering ({exc}). "
            "The run stops here; its last checkpoint is intact: start the server again on the student's "
            "architecture and rerun with --resume")
