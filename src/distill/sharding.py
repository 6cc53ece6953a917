"""Sharded runs through accelerate: FSDP2 for the student and the teacher; DeepSpeed refused (why below).

Launch with an accelerate config (``configs/accelerate/fsdp.yaml``); the training run reads what the launcher
set (``ACCELERATE_USE_FSDP`` ...) like any accelerate program:

* **the student** is sharded by ``accelerator.prepare`` (FSDP2, ``fully_shard`` per decoder layer and the
  root). The memory-efficient loss reads the output layer's weight outside the module's forward; FSDP2 keeps
  the root unit (embeddings, final norm, output layer) unsharded from its forward until its post-backward, so
  :func:`gathered_output_layer` only has to make sure the root is unsharded (``unshard()``, a no-op right after
  the forward; needed before evaluation) and the loss then reads, and accumulates the gradient into, the
  unsharded weight, which FSDP reduce-scatters with every other gradient of the root unit.
* **a live teacher** is sharded for inference by :func:`shard_for_inference`: each decoder layer, the output
  layer and the root its own unit, gathered one at a time in the forward and freed after it; the teacher is
  never whole on one process. Its output layer is gathered for each step's loss (:func:`full_weight`, an
  all-gather into a temporary that is freed with the step's signal).
* checkpoints are saved sharded (accelerate's FSDP state: ``pytorch_model_fsdp_0/``, distributed checkpoint
  files) and resumed the same way; the final student is gathered (``get_state_dict``) into an ordinary HF
  checkpoint written by the main process.

Every process must then run the same forward passes (they are collective): training already gives every
process the same number of micro-batches; evaluation pads the shorter processes with empty batches.

CPU. accelerate 1.15 turns FSDP on only for GPU-like devices: on CPU it silently makes a ``MULTI_CPU`` (DDP)
run instead, although torch's FSDP2 runs on CPU with gloo. :func:`enable_cpu_fsdp` sets the FSDP state
accelerate would have set on a GPU, so the same code and configs are tested on CPU.

DeepSpeed ZeRO-3 is refused (:func:`check_supported`): the memory-efficient loss needs the output layer's
full weight outside the module's forward and puts its gradient there itself; under ZeRO-3 that weight is an
empty placeholder outside the forward, and a gradient written to a gathered copy
(``deepspeed.zero.GatheredParameters``) is not reduced into the partitioned gradients; ``loss.chunked=false``
reads the same weight. Use FSDP. DeepSpeed is also not installed in the CPU test environment, so nothing
about it could be verified here.
"""

from __future__ import annotations

import os

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from distill.config import TrainConfig, shares_student

__all__ = ["check_supported", "enable_cpu_fsdp", "fsdp_requested", "full_weight", "gathered_output_layer",
           "is_sharded", "shard_for_inference"]


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_supported(cfg: TrainConfig) -> None:
    """Refuse the sharded setups that do not work, before any model is loaded."""
    lora = cfg.student.lora is not None
    on_student = shares_student(cfg.teacher)  # a teacher on the student's own weights, or None
    if deepspeed_requested():
        raise ValueError(
            "DeepSpeed (accelerate launch with a deepspeed config) is not supported by distill train: its "
            "memory-efficient loss reads the output layer's full weight and writes that weight's gradient itself, "
            "which ZeRO-3's partitioned parameters do not allow outside the module's forward. Launch with FSDP "
            "instead (configs/accelerate/fsdp.yaml)")
    if fsdp_requested():
        if lora:
            raise ValueError("student.lora with FSDP is not supported yet (untested); run LoRA students with "
                             "data parallelism (accelerate launch --multi_gpu) or without student.lora")
        if on_student:
            raise ValueError(f"a {on_student} teacher with FSDP is not supported yet: it shares or follows the "
                             "student's sharded weights; use a live, cached or server teacher")


def enable_cpu_fsdp(accelerator) -> bool:
    """Under an FSDP launch on a CPU-only machine (``Accelerator(cpu=True)`` made a ``MULTI_CPU`` state), set the
    state accelerate sets for FSDP on GPUs; returns whether it did."""
    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = getattr(accelerator.state, "__dict__", {}).get("fsdp_plugin") or FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # AcceleratorState copies PartialState's fields whenever it is built again (e.g. in prepare)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def is_sharded() -> bool:
    """Whether this process runs sharded (FSDP across processes)."""
    state = PartialState()
    return state.distributed_type == DistributedType.FSDP and state.num_processes > 1


def _decoder_layers(model) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (frozen, no optimizer) sharded over the processes with FSDP2: every decoder layer, the output
    layer and the root its own unit, resharded after each forward."""
    for layer in _decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True)
    output = model.get_output_embeddings()
    if output is not None and output is not model.get_input_embeddings():
        fully_shard(output, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    return model


def full_weight(t: torch.Tensor | None) -> torch.Tensor | None:
    """A sharded tensor (DTensor) gathered whole (a temporary); anything else as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered_output_layer(model) -> None:
    """Make sure the FSDP unit holding ``model``'s output layer is unsharded (see the module docstring)."""
    output = model.get_output_embeddings()
    if not isinstance(output.weight, DTensor):
        return
    owner = output if isinstance(output, FSDPModule) else model
    assert isinstance(owner, FSDPModule), "a sharded output layer outside any FSDP unit"
    owner.unshard()
