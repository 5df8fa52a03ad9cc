"""The ``csrc`` backend: autograd wrappers around the C++ (and, in a CUDA build, CUDA) kernels of
``csrc/``, built on first use by ``megatron_lite.extensions.load_extension``.

Each op reshapes its input to the 2-D/3-D/4-D contiguous layout the kernels take (a non-contiguous
input is copied), and falls back to the PyTorch reference for what the kernels do not cover: a
device the extension was not built for, or a dtype outside fp32/fp64/bf16 on CPU and fp32/fp16/bf16
on CUDA. Weight and bias gradients come back in the parameter's dtype; statistics stay in fp32.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from megatron_lite.extensions import CSRC_DIR, load_extension

from . import reference

CPU_SOURCES = ("bindings.cpp", "cpu/norms.cpp", "cpu/rotary.cpp", "cpu/activations.cpp", "cpu/softmax.cpp")
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cuda_sources() -> list[Path]:
    """The CUDA kernel files (compiled into the extension when the build has CUDA, see ``cuda_plan``)."""
    return sorted((CSRC_DIR / "cuda").glob("*.cu"))


# Compiled when no GPU is visible (e.g. `docker build`) and TORCH_CUDA_ARCH_LIST is unset: A100 and
# H100/H200. A visible GPU that none of these can run (another major version) is added.
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")


@dataclass(frozen=True)
class CudaPlan:
    """Whether the extension gets CUDA kernels, for which architectures, and if not, why."""

    with_cuda: bool
    arch_list: Optional[str] = None
    reason: str = ""


def cuda_arch_list() -> str:
    """``$TORCH_CUDA_ARCH_LIST`` if set, else ``DEFAULT_CUDA_ARCHS`` plus any visible GPU's
    architecture they cannot run (a cubin runs on GPUs of its major version with a minor ≥ its own)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    archs = list(DEFAULT_CUDA_ARCHS)
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(index)
        if not any(_arch(a)[0] == major and _arch(a)[1] <= minor for a in archs):
            archs.append(f"{major}.{minor}")
    return ";".join(sorted(set(archs), key=_arch))


def _arch(entry: str) -> tuple[int, int]:
    """(major, minor) of a TORCH_CUDA_ARCH_LIST entry such as ``9.0`` or ``9.0+PTX``."""
    match = re.match(r"(\d+)\.(\d+)", entry)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


TOOLKIT_HEADER = "include/cuda_runtime_api.h"


def is_cuda_toolkit(home: Optional[str | Path]) -> bool:
    """Whether ``home`` is a CUDA toolkit root the build can use: ``bin/nvcc`` and the runtime headers."""
    return bool(home) and (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / TOOLKIT_HEADER).is_file()


def find_cuda_home() -> Optional[str]:
    """The first CUDA toolkit root (``is_cuda_toolkit``) among ``$CUDA_HOME``, ``$CUDA_PATH``, torch's
    guess, the directory above the real ``nvcc`` on PATH (symlinks resolved), ``/usr/local/cuda`` and
    ``/usr/local/cuda-*`` (newest first). An ``nvcc`` wrapper on PATH (``/usr/bin/nvcc``) makes torch
    guess ``/usr``, which has no CUDA headers."""
    import glob
    import shutil

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None, "/usr/local/cuda",
                  *sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: _arch(Path(p).name[5:]), reverse=True)]
    return next((str(c) for c in candidates if is_cuda_toolkit(c)), None)


def cuda_plan() -> CudaPlan:
    """CUDA kernels are compiled whenever torch is a CUDA build and the CUDA toolkit (nvcc and its
    headers, under torch's ``CUDA_HOME``) is found, whether or not a GPU is visible, so an image or a
    login node can build what the GPU nodes run. ``MEGATRON_LITE_CUDA=0`` leaves them out."""
    from torch.utils import cpp_extension

    if os.environ.get("MEGATRON_LITE_CUDA") == "0":
        return CudaPlan(False, reason="MEGATRON_LITE_CUDA=0")
    if not torch.version.cuda:
        return CudaPlan(False, reason="torch is a CPU build")
    home = cpp_extension.CUDA_HOME
    if not home or not (Path(home) / "bin" / "nvcc").exists():
        return CudaPlan(False, reason="no CUDA toolkit found (set CUDA_HOME to a directory with bin/nvcc)")
    if not (Path(home) / TOOLKIT_HEADER).is_file():
        found = find_cuda_home()
        fix = f"export CUDA_HOME={found}" if found else "set CUDA_HOME to the toolkit's root"
        return CudaPlan(False, reason=f"CUDA_HOME={home} has bin/nvcc but no {TOOLKIT_HEADER} (an nvcc "
                                      f"wrapper?); {fix}")
    return CudaPlan(True, cuda_arch_list())


def covers(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether kernels built for ``arch_list`` (``TORCH_CUDA_ARCH_LIST`` syntax) run on a GPU of
    ``capability``: a cubin ``M.m`` on major M with minor ≥ m; ``M.m+PTX`` also on any later GPU
    (the driver compiles the PTX)."""
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        arch = _arch(entry)
        if (arch[0] == capability[0] and arch[1] <= capability[1]) or ("+PTX" in entry and arch <= capability):
            return True
    return False


@functools.lru_cache(maxsize=None)
def covers_device(index: int) -> bool:
    """Whether the built CUDA kernels run on GPU ``index``; if not, says so once (that GPU's tensors
    then take the PyTorch reference ops instead of failing at the first kernel launch)."""
    arch_list = cuda_plan().arch_list or ""
    capability = torch.cuda.get_device_capability(index)
    if covers(arch_list, capability):
        return True
    sm = "%d.%d" % capability
    warnings.warn(f"the csrc CUDA kernels are built for sm {arch_list}, which does not cover GPU {index} "
                  f"({torch.cuda.get_device_name(index)}, sm {sm}): its tensors run the PyTorch reference ops; "
                  f"rebuild with TORCH_CUDA_ARCH_LIST=\"{sm}\" python -m megatron_lite.ops --require-cuda",
                  stacklevel=2)
    return False


def cpu_arch() -> str:
    """The -march of the CPU objects: ``$MEGATRON_LITE_CPU_ARCH`` or ``native`` (this machine's CPU;
    a container image built on one host and run on others sets a portable one, e.g. x86-64-v3)."""
    return os.environ.get("MEGATRON_LITE_CPU_ARCH", "native")


def _cpu_isa() -> str:
    """What -march means here: this CPU's instruction set for ``native``, else the named arch."""
    if cpu_arch() != "native":
        return cpu_arch()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    isa = sorted({ln for ln in lines if ln.startswith(("flags", "Features", "model name"))})
    return hashlib.sha256("\n".join(isa).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def extension() -> Optional[ModuleType]:
    """The compiled extension (with CUDA kernels when ``cuda_plan()`` says so), or None if it cannot be
    built (``load_extension`` has then warned once)."""
    plan = cuda_plan()
    cflags = ["-O3", "-fopenmp", f"-march={cpu_arch()}"]
    sources: list[str | Path] = list(CPU_SOURCES)
    cuda_cflags = None
    if plan.with_cuda:
        sources += cuda_sources()
        cflags.append("-DWITH_CUDA")
        cuda_cflags = ["-O3", "-DWITH_CUDA", "-std=c++17"]
    # The CUDA headers matter only to a build with CUDA kernels (bindings.cpp includes them under WITH_CUDA).
    headers = sorted((CSRC_DIR / "cpu").glob("*.h"))
    if plan.with_cuda:
        headers += sorted((CSRC_DIR / "cuda").glob("*.h")) + sorted((CSRC_DIR / "cuda").glob("*.cuh"))
    return load_extension("megatron_lite_kernels", sources, extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                          extra_cuda_cflags=cuda_cflags, depends=headers, cuda_arch_list=plan.arch_list,
                          key_extra={"cpu_isa": _cpu_isa()})


def available() -> bool:
    """Whether the extension builds (and loads) on this machine."""
    return extension() is not None


def has_cuda_kernels() -> bool:
    """Whether the loaded extension contains the CUDA kernels."""
    ext = extension()
    return ext is not None and bool(ext.with_cuda)


def describe_build() -> str:
    """The extension in a few words: ``CUDA kernels for sm 8.0;9.0``, ``CPU kernels only: torch is a
    CPU build`` or ``not built``."""
    if extension() is None:
        return "not built"
    plan = cuda_plan()
    if has_cuda_kernels():
        uncovered = [i for i in range(torch.cuda.device_count()) if not covers_device(i)]
        return f"CUDA kernels for sm {plan.arch_list}" + (
            f", not covering this GPU (sm {'%d.%d' % torch.cuda.get_device_capability(uncovered[0])}): "
            "torch ops on CUDA" if uncovered else "")
    return f"CPU kernels only: {plan.reason or 'built without CUDA'}"


def _usable(x: torch.Tensor) -> bool:
    """Whether the built kernels handle x's device and dtype (else the reference runs)."""
    ext = extension()
    if ext is None:
        return False
    if x.device.type == "cpu":
        return x.dtype in CPU_DTYPES
    return x.is_cuda and ext.with_cuda and x.dtype in CUDA_DTYPES and covers_device(x.device.index or 0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., h] as a contiguous [rows, h] tensor (a copy only when x is not contiguous; h = 0 and
    no rows are fine)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def _grad_for(grad: Optional[torch.Tensor], param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A kernel's fp32/fp64 parameter gradient in the parameter's dtype (None when not wanted)."""
    if grad is None or param is None or not param.requires_grad:
        return None
    return grad.to(param.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = extension().rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = extension().rms_norm_bwd(dy.contiguous(), x, weight, rstd)
        return dx, _grad_for(dw, weight), None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = extension().layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = extension().layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd)
        return dx, _grad_for(dw, weight), _grad_for(db, bias), None


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return extension().rotary(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return extension().rotary(dy.contiguous(), cos, sin, True), None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return extension().swiglu_fwd(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return extension().swiglu_bwd(dy.contiguous(), x)


class _BiasGeLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return extension().bias_gelu_fwd(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        want_dbias = bias is not None and ctx.needs_input_grad[1]
        dx, dbias = extension().bias_gelu_bwd(dy.contiguous(), x, bias, want_dbias)
        return dx, _grad_for(dbias if want_dbias else None, bias)


class _CausalSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, scale):
        y = extension().causal_softmax_fwd(scores, scale)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return extension().causal_softmax_bwd(dy.contiguous(), y, ctx.scale), None


# Front ends: the signatures and semantics of ``reference`` (see there for shapes).


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not _usable(x):
        return reference.rms_norm(x, weight, eps)
    return _RMSNorm.apply(_rows(x), weight, eps).view(x.shape)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    if not _usable(x):
        return reference.layer_norm(x, weight, bias, eps)
    return _LayerNorm.apply(_rows(x), weight, bias, eps).view(x.shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # cos/sin are position tables (buffers); gradients through them are left to the reference.
    if not _usable(x) or x.dim() != 4 or cos.requires_grad or sin.requires_grad:
        return reference.rotary(x, cos, sin)
    return _Rotary.apply(x.contiguous(), cos, sin)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    if not _usable(x):
        return reference.swiglu(x)
    return _SwiGLU.apply(_rows(x)).view(*x.shape[:-1], x.shape[-1] // 2)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not _usable(x):
        return reference.bias_gelu(x, bias)
    return _BiasGeLU.apply(_rows(x), bias).view(x.shape)


def causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    if not _usable(scores):
        return reference.causal_softmax(scores, scale)
    sq, sk = scores.shape[-2:]
    batch = math.prod(scores.shape[:-2])
    return _CausalSoftmax.apply(scores.reshape(batch, sq, sk).contiguous(), float(scale)).view(scores.shape)

