"""Runtime switches: the accelerate Accelerator (precision, distributed CPU) and gradient checkpointing."""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.checkpoint import checkpoint

from ...core.config import DeltaConfigError


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively (CUDA with bf16, or a CPU with AVX512-BF16 or AMX): there
    bf16 autocast is about twice as fast as fp32; elsewhere it is emulated and slower."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str) -> str:
    """`auto` becomes bf16 where bf16 is native (see native_bf16) and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str = "cpu"):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    kind = torch.device(device).type
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(kind, dtype=dtype, enabled=dtype is not None)


# set by every launcher that really starts several processes: torchrun / accelerate --multi_gpu, MPI
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def lone_launch_warning(environ=os.environ) -> str | None:
    """The warning for a run that `accelerate launch` was asked to start in several processes but started
    alone, else None.

    Without `--multi_gpu` (or a multi-GPU / FSDP config) accelerate's simple launcher runs the script
    once, whatever `--num_processes` says; on a machine without GPUs `accelerate launch --num_processes 2`
    is that case. It marks its child with ACCELERATE_USE_CPU and, for more than one process, sets
    MASTER_ADDR, but sets no WORLD_SIZE (accelerate 1.15, utils/launch.py:
    prepare_simple_launcher_cmd_env); launchers that start the processes set WORLD_SIZE (or MPI's size).
    """
    simple_launch = "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ
    if not simple_launch or any(name in environ for name in WORLD_SIZE_VARS):
        return None
    return ("warning: accelerate launch was asked for several processes but started only this one (without "
            "--multi_gpu it runs the script once); training goes on in 1 process. For N processes use "
            "`accelerate launch --multi_gpu --num_processes N -m deltatune train ...` (also on CPU, with "
            "gloo) or `torchrun --nproc-per-node N -m deltatune train ...`")


def make_accelerator(precision: str, **options):
    """The run's Accelerator for a resolved `precision`; `options` go to it as they are (trackers:
    log_with). Warns on stderr when a launch meant for several processes started one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, DistributedType

    precision = resolve_precision(precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise DeltaConfigError("training.precision='fp16': fp16 autocast needs a CUDA GPU; use bf16 or fp32")
    mixed = {"fp32": "no"}.get(precision, precision)
    if (
        AcceleratorState._shared_state
        and AcceleratorState().distributed_type == DistributedType.NO
        and str(AcceleratorState().mixed_precision) != mixed
    ):
        AcceleratorState._reset_state()  # a second run in one process with another precision
    # accelerate treats a multi-process launch as distributed CPU (gloo) only when asked to use the CPU
    on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    warning = lone_launch_warning()
    if warning:
        print(warning, file=sys.stderr)
    return Accelerator(mixed_precision=mixed, cpu=on_cpu, **options)


def enable_gradient_checkpointing(model, offload: bool = False) -> None:
    """Recompute each layer's activations in backward instead of keeping them; with `offload`, the layer
    inputs kept for that recompute wait in host memory (pinned on CUDA) instead of on the device."""
    base = model.get_base_model()
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise DeltaConfigError("training.gradient_checkpointing=True: this model does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # the name since Transformers 5
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        for module in base.modules():  # the layers (and, before Transformers 5, the models) that checkpoint
            checkpoints = getattr(module, "gradient_checkpointing", False)
            if checkpoints and hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = offloaded_checkpoint
    # With a frozen embedding no activation requires grad, so checkpointed blocks would get no
    # gradient; making the embedding output require grad keeps the graph connected.
    base.enable_input_require_grads()


def offloaded_checkpoint(function, *args, **kwargs):
    """torch's non-reentrant checkpoint, with the inputs it saves for the recompute moved to host memory.

    The checkpoint saves its inputs outside its own saved-tensor hooks, so an enclosing `save_on_cpu`
    moves exactly those (the layer's hidden states) off the device and back for the recompute; what
    the layer saves inside is dropped and recomputed as usual. (Transformers' own offload pins memory
    even without an accelerator and fails on CPU-only machines.)
    """
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def compile_for_training(model) -> torch.nn.Module:
    """`training.compile`: torch.compile (Inductor: C++ on a CPU, Triton on CUDA) the Transformers model's
    decoder body in place, adapters included, and return the compiled module.

    In place (nn.Module.compile), so the DeltaModel, its loss path (core/linear_loss.py passes the head over)
    and accelerate's wrapper keep their types; the body, not the whole model, so the output head swap does
    not recompile. The first steps pay the compilation (tens of seconds); evaluation and generation run the
    compiled body too (new shapes recompile, then run with dynamic shapes). `model`: a DeltaModel.

    Measured on this project's 2-core CPU (`benchmarks/lora_step.py --compile`, 2026-12-01): slower than
    eager (LoRA without dropout, step time / floor 1.42-1.46 against 1.02-1.20) and more memory, so the
    training loop says so when it runs on a CPU; meant for CUDA (benchmarks/gpu.py measures it there)."""
    base = model.get_base_model()
    body = getattr(base, "base_model", base)  # LlamaForCausalLM.model: embeddings, decoder layers, final norm
    body.compile()
    return body
