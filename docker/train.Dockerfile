# Training image: the render image's Python tree (same pins) run on NVIDIA GPUs, for
# `pretrain` / `finetune` / `evaluate` / `pipeline` and multi-node `torchrun`.
# PyPI's torch wheels bring their CUDA libraries (the nvidia-* pins in constraints.txt);
# the host only needs the NVIDIA driver and the NVIDIA Container Toolkit.
# Build the render image first, then from the repository root (see docker/README.md):
#   docker build -f docker/train.Dockerfile -t pvit-train:0.1.0 .
ARG RENDER_IMAGE=pvit-render:0.1.0
FROM ${RENDER_IMAGE}

ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    OMP_NUM_THREADS=1

# The code may have changed since the render image was built; the tree has not.
WORKDIR /opt/pvit
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# torchrun's c10d rendezvous (--rdzv-endpoint HOST:29500) on the first node.
EXPOSE 29500

CMD ["pvit", "--help"]
