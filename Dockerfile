# The Lodestar image: the gateway (`lodestar serve`), the Ray head and the Ray workers that host the
# model actors all run it. No models are baked in; mount them (see helm/lodestar/values.yaml).
#
#   docker build -t lodestar:0.1.0 .                                   # CPU
#   docker build --build-arg TORCH_VARIANT=cu128 -t lodestar:0.1.0-cuda .  # CUDA 12.8 (GPU nodes)
#   docker build --build-arg TORCH_VARIANT=cu128 --build-arg EXTRAS=vllm \
#       -t lodestar:0.1.0-cuda-vllm .                                  # CUDA + the vLLM engine
#
# EXTRAS names the package's optional dependencies to install (pyproject.toml), comma-separated;
# empty (the default) installs none. vllm==0.32.0 pins the same torch, so the CUDA torch installed
# first satisfies it.
#
# The CUDA build of torch carries its CUDA runtime as pip packages; the node only needs the NVIDIA
# driver and device plugin. Python and Ray versions must be equal on every pod of a cluster: both
# variants share them.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VARIANT=cpu
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/lodestar
ENV PATH=/opt/lodestar/bin:$PATH
# torch first, from the index of the chosen variant, so the package's pin resolves to it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/${TORCH_VARIANT}
COPY . /src
RUN pip install "/src${EXTRAS:+[$EXTRAS]}"

FROM python:${PYTHON_VERSION}-slim
# KubeRay's probes and generated start command use bash and wget.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 lodestar \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash lodestar
COPY --from=build /opt/lodestar /opt/lodestar
ENV PATH=/opt/lodestar/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER 1000:1000
WORKDIR /home/lodestar
EXPOSE 50051 9090
CMD ["lodestar", "--help"]
