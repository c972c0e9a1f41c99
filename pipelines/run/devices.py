"""Precision and devices of a training run: bf16 where the hardware has it, torchrun's process group."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("pipelines.run.training")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU (torch's probes, else ``/proc/cpuinfo`` flags)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``requested`` ("auto", "bf16", "fp32"); None means plain fp32."""
    if requested == "fp32":
        return None
    if requested not in ("auto", "bf16"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {requested!r}")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        native = cpu_has_native_bf16()
    else:
        native = False
    if requested == "auto":
        return torch.bfloat16 if native else None
    if not native:
        log.warning("bf16 requested on %s without native bf16 support: it will be slow", device)
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(requested: str = "auto") -> torch.device:
    """The torch device for ``--device``: ``cpu``; ``cuda`` (the first GPU) or ``cuda:N``; ``auto``, the first
    GPU where torch sees one, else the CPU. A GPU asked for where there is none is an error naming the choice."""
    text = str(requested).strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {requested!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {requested!r}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    n = int(index or 0)
    if n >= torch.cuda.device_count():
        raise ValueError(f"device {requested!r}: there are {torch.cuda.device_count()} CUDA GPU(s) here "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", n)


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of inference (reconstruct, evaluate): ``auto`` is bf16 on a GPU and fp32 on a CPU
    (reproducible numbers where speed matters less), ``bf16`` / ``fp32`` as asked."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return resolve_precision(precision, device)


def init_distributed(requested: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (gloo on CPU, nccl on GPU) on the device
    ``requested`` (:func:`resolve_device`; under torchrun each process takes the GPU of its local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested)
    cuda = device.type == "cuda"
    if cuda and world > 1:
        device = torch.device("cuda", local_rank)
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=world, local_rank=local_rank,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), device=device)
