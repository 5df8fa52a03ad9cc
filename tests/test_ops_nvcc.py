"""Every CUDA kernel file compiles with the machine's nvcc for sm_80 and sm_90, warnings as errors,
with the half/bf16 macros torch's extension build defines — so a CUDA syntax or type error fails
CI on machines without a GPU. The kernels include only CUDA headers, so this takes seconds."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_lite.ops.csrc import cuda_sources

NVCC = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if Path(p).exists()), None)
TORCH_MACROS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or /usr/local/cuda/bin)")
def test_every_cu_file_compiles_for_sm80_and_sm90(tmp_path):
    sources = cuda_sources()
    assert {p.name for p in sources} >= {"norms.cu", "rotary.cu", "activations.cu", "softmax.cu"}

    def compile_one(source: Path) -> tuple[str, int, str]:
        cmd = [NVCC, "-c", "-std=c++17", "-O2", "-Werror", "all-warnings", "-Xcompiler", "-Wall",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               *TORCH_MACROS, str(source), "-o", str(tmp_path / f"{source.stem}.o")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return source.name, done.returncode, done.stdout + done.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, sources))
    failures = [f"{name}:\n{log}" for name, code, log in results if code != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    for source in sources:
        assert (tmp_path / f"{source.stem}.o").stat().st_size > 0
