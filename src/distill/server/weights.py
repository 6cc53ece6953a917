"""``distill serve``'s weight updates: ``POST /update_weights_from_disk``, as SGLang has it, so that a training
run can publish its student to the server that samples it (``train.batches.sampler``, docs/onpolicy.md).

The request is SGLang's ``UpdateWeightFromDiskReqInput`` (python/sglang/srt/managers/io_struct.py):
``model_path`` (a Hugging Face model directory), ``load_format``, ``abort_all_requests``, ``weight_version``,
``is_async``, ``torch_empty_cache``, ``keep_pause``, ``recapture_cuda_graph``, ``token_step``, ``flush_cache``
(distill serve reads ``model_path``, ``load_format`` and ``weight_version``; the rest concern SGLang's scheduler
and are accepted). The answer is SGLang's (python/sglang/srt/entrypoints/http_server.py,
``update_weights_from_disk``): ``{"success", "message", "num_paused_requests"}``, HTTP 200 on success and 400
otherwise.

``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` are vLLM's runtime LoRA API, for a LoRA student
whose adapters alone are published: the requests are vLLM's ``LoadLoRAAdapterRequest`` (``lora_name``,
``lora_path``, ``load_inplace``) and ``UnloadLoRAAdapterRequest`` (``lora_name``, ``lora_int_id``)
(vllm/entrypoints/serve/lora/protocol.py); the answers are vLLM's (vllm/entrypoints/openai/serving_models.py,
``OpenAIServingModels.load_lora_adapter`` / ``unload_lora_adapter``): plain text ``Success: LoRA adapter 'NAME'
added successfully.`` (``removed``), or its error body: 400 for an adapter already loaded without
``load_inplace``, 404 for a path with no adapter or an unknown name. Where vLLM keeps the base and serves each
adapter beside it, ``distill serve`` merges one adapter (``peft``) into a copy of the base weights it kept, and
serves that under both names; loading another name while one is loaded is refused (unload it first).

The new weights are read off the request path, checked against the served model (the same parameter names and
shapes: the architecture cannot change), then copied in while no batch runs: a batch is computed wholly with the
old weights or wholly with the new ones. Nothing waits in flight here (requests queue), so
``num_paused_requests`` is 0.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from distill.config import ModelSpec
from distill.models import DTYPES, load_model

logger = logging.getLogger("distill")


class UpdateWeightFromDiskRequest(BaseModel):
    """SGLang's ``UpdateWeightFromDiskReqInput`` (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    flush_cache: bool = True
    manifest: dict[str, Any] | None = None


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's ``LoadLoRAAdapterRequest`` (module docstring)."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's ``UnloadLoRAAdapterRequest`` (module docstring)."""

    lora_name: str
    lora_int_id: int | None = None


class AdapterError(Exception):
    """A refused adapter request: vLLM's status, error type and message."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {400: "BadRequestError", 404: "NotFoundError"}.get(self.status, "InternalServerError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


class WeightSwap:
    """The served model's weights, replaced between batches: the engine runs each batch under its
    ``weights_lock``, and a swap copies the new tensors in under it."""

    def __init__(self, engine):
        self.engine, self.lock = engine, engine.weights_lock
        self.version: str | None = None
        self.base: dict[str, torch.Tensor] | None = None  # the weights without an adapter, while one is loaded

    def load_adapter(self, req: LoadLoRAAdapterRequest) -> str:
        """Merge the adapter at ``req.lora_path`` into the base weights and serve them as ``req.lora_name``
        too; the success message, or :class:`AdapterError` (module docstring)."""
        name, adapters = req.lora_name, self.engine.adapters
        if not name or not req.lora_path:
            raise AdapterError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name == self.engine.name:
            raise AdapterError(400, f"The lora adapter name '{name}' conflicts with a served base model.", "lora_name")
        if name in adapters and not req.load_inplace:
            raise AdapterError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                    "adapter in place, set 'load_inplace' to True.", "lora_name")
        if adapters and name not in adapters:
            raise AdapterError(400, f"distill serve merges one adapter into its weights and `{next(iter(adapters))}` "
                                    "is loaded; unload it first (/v1/unload_lora_adapter)", "lora_name")
        if not (Path(req.lora_path) / "adapter_config.json").is_file():
            raise AdapterError(404, f"Loading lora {name} failed: No adapter found for {req.lora_path}")
        from peft import PeftModel  # the lora extra

        model = self.engine.model
        base = self.base if self.base is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}
        scratch = copy.deepcopy(model)
        scratch.load_state_dict(base)
        merged = PeftModel.from_pretrained(scratch, req.lora_path).merge_and_unload().state_dict()
        self._copy_in(merged, f"lora_path={req.lora_path}")
        self.base, adapters[name] = base, req.lora_path
        logger.info("loaded LoRA adapter %s from %s (merged into the served weights)", name, req.lora_path)
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, req: UnloadLoRAAdapterRequest) -> str:
        """Serve the base weights again; the success message, or :class:`AdapterError`."""
        if req.lora_name not in self.engine.adapters:
            raise AdapterError(404, f"The lora adapter '{req.lora_name}' cannot be found.", "lora_name")
        self._copy_in(self.base, "the base weights")
        del self.engine.adapters[req.lora_name]
        self.base = None
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    def _copy_in(self, state: dict[str, torch.Tensor], what: str) -> None:
        mine = self.engine.model.state_dict()
        wrong = sorted(k for k in mine if k not in state or state[k].shape != mine[k].shape)
        if wrong:
            raise AdapterError(400, f"{what} does not fit the served model (parameters {', '.join(wrong[:3])})")
        with self.lock, torch.no_grad():
            for key, tensor in mine.items():
                tensor.copy_(state[key])

    def load(self, req: UpdateWeightFromDiskRequest) -> tuple[bool, str]:
        """(success, message): the weights of ``req.model_path`` in the served model, or why not."""
        if req.load_format not in (None, "auto", "safetensors"):
            return False, f"load_format={req.load_format!r}: distill serve reads Hugging Face directories (auto)"
        if not (Path(req.model_path) / "config.json").is_file():
            return False, f"model_path={req.model_path}: no Hugging Face model directory (config.json) there"
        model = self.engine.model
        dtype = next(k for k, v in DTYPES.items() if v == next(model.parameters()).dtype)
        try:
            new = load_model(ModelSpec(path=req.model_path, dtype=dtype), "model_path").state_dict()
        except ValueError as exc:
            return False, str(exc)
        mine = model.state_dict()
        wrong = [k for k in mine if k not in new or new[k].shape != mine[k].shape]
        if wrong or len(new) != len(mine):
            extra = sorted(set(new) - set(mine))
            return False, (f"model_path={req.model_path} is another architecture than the served model "
                           f"(parameters {', '.join((wrong + extra)[:3])} differ); serve it with distill serve instead")
        with self.lock, torch.no_grad():
            for name, tensor in mine.items():
                tensor.copy_(new[name])
            self.version = req.weight_version
        if self.engine.adapters:  # new base weights: an adapter merged into the old ones no longer applies
            logger.info("the new weights replace LoRA adapter(s) %s", ", ".join(self.engine.adapters))
            self.engine.adapters.clear()
            self.base = None
        logger.info("loaded weights from %s (weight_version %s)", req.model_path, req.weight_version)
        return True, f"Succeeded to update model weights (weight_version {req.weight_version})."


def add_weight_routes(app, engine) -> WeightSwap:
    """``POST /update_weights_from_disk`` on ``app`` (the module docstring), for ``engine``'s model."""
    from fastapi.responses import JSONResponse

    swap = WeightSwap(engine)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest):
        return await _adapter_answer(swap.load_adapter, req)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest):
        return await _adapter_answer(swap.unload_adapter, req)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(req: UpdateWeightFromDiskRequest):
        success, message = await asyncio.to_thread(swap.load, req)
        return JSONResponse({"success": success, "message": message, "num_paused_requests": 0},
                            status_code=200 if success else 400)

    return swap


async def _adapter_answer(fn, req):
    """vLLM's answer to an adapter request: the message as plain text, or its error body."""
    from fastapi.responses import JSONResponse, PlainTextResponse

    try:
        return PlainTextResponse(await asyncio.to_thread(fn, req))
    except AdapterError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
