"""What every benchmark records beside its timings: the CPU, its bf16 support and the thread count."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine() -> dict:
    import torch

    from fedcollm.models.loading import cpu_supports_bf16

    return {"cpu": cpu_model(), "avx512_bf16": cpu_supports_bf16(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
