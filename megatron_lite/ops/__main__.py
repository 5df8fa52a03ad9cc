"""Build the csrc extension ahead of time (or load it from the cache) and report it:
``python -m megatron_lite.ops`` — e.g. while building a container image."""

from megatron_lite.ops import csrc

built = csrc.extension()
if built is None:
    raise SystemExit("csrc extension: build failed (MEGATRON_LITE_BUILD_VERBOSE=1 shows the compiler output)")
print(f"csrc extension: {built.__file__} (CUDA kernels: {'yes' if built.with_cuda else 'no'})")
