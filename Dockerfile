# megatron_lite on NVIDIA's PyTorch container, which already ships CUDA torch, apex and
# Transformer Engine (used automatically as fast paths). Build: docker build -t megatron_lite .
# Run:   docker run --gpus all --ipc=host -it megatron_lite bash scripts/pretrain_gpt.sh model=gpt2_124m
# 25.12: torch 2.10.0a0 (the package needs torch>=2.8), CUDA 13.1, Python 3.12.
FROM nvcr.io/nvidia/pytorch:25.12-py3
WORKDIR /workspace/megatron_lite
COPY . .
# The image pins its own packages in a pip constraint file (/etc/pip/constraint.txt, through
# PIP_CONSTRAINT), which can pin antlr4 to another version than hydra-core 1.3 needs. The constraints
# stay on for everything else, so nothing of the image is replaced, less the three packages pinned in
# benchmarks/gpu_check_wheels.txt. --no-deps keeps the container's own CUDA torch; the package is
# installed without build isolation (it builds with the image's setuptools, under the same pins).
RUN { grep -viE '^(hydra-core|omegaconf|antlr4-python3-runtime)([=<>!~ ]|$)' "${PIP_CONSTRAINT:-/etc/pip/constraint.txt}" \
      2> /dev/null || true; } > /tmp/constraint.txt \
 && PIP_CONSTRAINT=/tmp/constraint.txt pip install --no-cache-dir -r benchmarks/gpu_check_wheels.txt sentencepiece ninja \
 && PIP_CONSTRAINT=/tmp/constraint.txt pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && rm /tmp/constraint.txt
# The csrc kernels are compiled into the image, so a container starts with nothing to build. No GPU is
# visible during `docker build`: the CUDA kernels are compiled because torch is a CUDA build and the
# toolkit is in the image, for A100, H100/H200 and B200 cubins plus PTX for later GPUs (a GPU the build
# does not cover runs the PyTorch ops, after one warning); the same values at run time give the same
# cache key. The CPU objects use a portable -march (the image runs on other hosts than it was built on).
ENV MEGATRON_LITE_CACHE=/opt/megatron_lite/cache \
    TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0+PTX" \
    MEGATRON_LITE_CPU_ARCH=x86-64-v3 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
RUN MAX_JOBS=8 python -m megatron_lite.ops --require-cuda && chmod -R a+rwX /opt/megatron_lite
ENV OMP_NUM_THREADS=8
CMD ["bash", "scripts/pretrain_gpt.sh"]
