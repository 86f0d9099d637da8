"""The CPU a benchmark ran on, named the same way by every script in this folder.

The CPU under this project's machines changes between sessions (docs/BENCHMARKS.md), and what a
figure means depends on it: bf16 products are 50-300x slower than fp32 on an AVX2-only AMD EPYC
and several times faster on a CPU with AVX512_BF16 or AMX. So every table names the model, the
family/model numbers and the flags that decide the product precision."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# CPU flags that decide what a bf16 product costs (see pss_cli.core.precision).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# Variables that cap the instruction sets the libraries use, whatever the CPU has: oneDNN (torch's
# bf16 GEMM on CPU), torch's own kernels, MKL (fp32 GEMM, LAPACK). With ONEDNN_MAX_CPU_ISA=AVX2
# ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2, an Intel Xeon with AMX multiplied
# (2048 x 2048) @ (2048 x 32) in bf16 49x slower than in fp32, as an AVX2-only CPU does.
ISA_CAPS = (
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
)


def cpu_fields() -> dict[str, str]:
    """/proc/cpuinfo's fields of the first CPU (empty where there is no /proc)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """E.g. "AMD EPYC (family 25 model 17)"."""
    fields = cpu_fields()
    cpu = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return cpu


def cpu_flags() -> str:
    """E.g. "avx2: yes, avx512f: yes, avx512_bf16: yes, amx_bf16: no, amx_tile: no"."""
    flags = set(cpu_fields().get("flags", "").split())
    return ", ".join(f"{f}: {'yes' if f in flags else 'no'}" for f in CPU_FLAGS)


def isa_caps() -> str:
    """The instruction-set caps in effect, e.g. "none" or "ONEDNN_MAX_CPU_ISA=AVX2 (torch's
    kernels: AVX2)": a figure measured under caps is not a figure of an older CPU, and says so."""
    import torch  # every benchmark has it loaded already

    caps = [f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name)]
    kernels = torch.backends.cpu.get_cpu_capability()
    return f"{', '.join(caps) if caps else 'none'} (torch's kernels: {kernels})"
