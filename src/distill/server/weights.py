"""``distill serve``'s weight updates: ``POST /update_weights_from_disk``, as SGLang has it, so that a training
run can publish its student to the server that samples it (``train.batches.sampler``, docs/onpolicy.md).

The request is SGLang's ``UpdateWeightFromDiskReqInput`` (python/sglang/srt/managers/io_struct.py):
``model_path`` (a Hugging Face model directory), ``load_format``, ``abort_all_requests``, ``weight_version``,
``is_async``, ``torch_empty_cache``, ``keep_pause``, ``recapture_cuda_graph``, ``token_step``, ``flush_cache``
(distill serve reads ``model_path``, ``load_format`` and ``weight_version``; the rest concern SGLang's scheduler
and are accepted). The answer is SGLang's (python/sglang/srt/entrypoints/http_server.py,
``update_weights_from_disk``): ``{"success", "message", "num_paused_requests"}``, HTTP 200 on success and 400
otherwise.

The new weights are read off the request path, checked against the served model (the same parameter names and
shapes: the architecture cannot change), then copied in while no batch runs: a batch is computed wholly with the
old weights or wholly with the new ones. Nothing waits in flight here (requests queue), so
``num_paused_requests`` is 0.
"""

from __future__ import annotations

import asyncio
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


class WeightSwap:
    """The served model's weights, replaced between batches: the engine runs each batch under its
    ``weights_lock``, and a swap copies the new tensors in under it."""

    def __init__(self, engine):
        self.engine, self.lock = engine, engine.weights_lock
        self.version: str | None = None

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
        logger.info("loaded weights from %s (weight_version %s)", req.model_path, req.weight_version)
        return True, f"Succeeded to update model weights (weight_version {req.weight_version})."


def add_weight_routes(app, engine) -> WeightSwap:
    """``POST /update_weights_from_disk`` on ``app`` (the module docstring), for ``engine``'s model."""
    from fastapi.responses import JSONResponse

    swap = WeightSwap(engine)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(req: UpdateWeightFromDiskRequest):
        success, message = await asyncio.to_thread(swap.load, req)
        return JSONResponse({"success": success, "message": message, "num_paused_requests": 0},
                            status_code=200 if success else 400)

    return swap
