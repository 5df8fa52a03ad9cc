# megatron_lite on NVIDIA's PyTorch container, which already ships CUDA torch, apex and
# Transformer Engine (used automatically as fast paths). Build: docker build -t megatron_lite .
# Run:   docker run --gpus all --ipc=host -it megatron_lite bash scripts/pretrain_gpt.sh model=gpt2_124m
FROM nvcr.io/nvidia/pytorch:25.01-py3
WORKDIR /workspace/megatron_lite
COPY . .
# --no-deps keeps the container's own CUDA torch; the other runtime deps are small.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "hydra-core>=1.3" "omegaconf>=2.3" sentencepiece ninja
ENV OMP_NUM_THREADS=8
CMD ["bash", "scripts/pretrain_gpt.sh"]
