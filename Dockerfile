# megatron_lite on NVIDIA's PyTorch container, which already ships CUDA torch, apex and
# Transformer Engine (used automatically as fast paths). Build: docker build -t megatron_lite .
# Run:   docker run --gpus all --ipc=host -it megatron_lite bash scripts/pretrain_gpt.sh model=gpt2_124m
FROM nvcr.io/nvidia/pytorch:25.01-py3
WORKDIR /workspace/megatron_lite
COPY . .
# --no-deps keeps the container's own CUDA torch; the other runtime deps are small.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "hydra-core>=1.3" "omegaconf>=2.3" sentencepiece ninja
# The csrc kernels are compiled into the image, so a container starts with nothing to build. No GPU is
# visible during `docker build`: the CUDA kernels are compiled because torch is a CUDA build and nvcc is
# in the image, for these architectures (A100, H100/H200); the same values at run time give the same
# cache key. The CPU objects use a portable -march (the image runs on other hosts than it was built on).
ENV MEGATRON_LITE_CACHE=/opt/megatron_lite/cache \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    MEGATRON_LITE_CPU_ARCH=x86-64-v3
RUN MAX_JOBS=8 python -m megatron_lite.ops --require-cuda && chmod -R a+rwX /opt/megatron_lite
ENV OMP_NUM_THREADS=8
CMD ["bash", "scripts/pretrain_gpt.sh"]
