"""Build the csrc extension ahead of time (or load it from the cache) and say what it contains:
``python -m megatron_lite.ops [--require-cuda]``, e.g. while building a container image, where no GPU
is visible: the CUDA kernels are compiled whenever torch is a CUDA build and nvcc is found, for
``TORCH_CUDA_ARCH_LIST`` (default 8.0;9.0: A100, H100/H200)."""

import argparse
import sys
import time

from megatron_lite.ops import csrc

parser = argparse.ArgumentParser(prog="python -m megatron_lite.ops", description=__doc__.splitlines()[0])
parser.add_argument("--require-cuda", action="store_true",
                    help="exit 1 unless the extension has its CUDA kernels (images for GPU machines)")
args = parser.parse_args()
start = time.perf_counter()
built = csrc.extension()
if built is None:
    sys.exit("csrc extension: build failed (MEGATRON_LITE_BUILD_VERBOSE=1 shows the compiler output)")
print(f"csrc extension: {built.__file__}: {csrc.describe_build()} ({time.perf_counter() - start:.1f} s)")
if args.require_cuda and not csrc.has_cuda_kernels():
    sys.exit(f"csrc extension: --require-cuda, but it has {csrc.describe_build()}")
