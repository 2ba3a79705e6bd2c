# Render image: Blender 4.5 (pip `bpy`) + Kubric + this project, for `generate_dataset`
# (and `pipeline`) runs on docker/kubernetes work pools. Cycles renders on the CPU.
# Build from the repository root (see docker/README.md):
#   docker build -f docker/render.Dockerfile -t pvit-render:0.1.0 .
FROM python:3.11-slim-bookworm

# X11/GL libraries that bpy's shared objects link against, even headless. Not pinned
# one by one: the base tag fixes the Debian release, whose point releases replace them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libgl1 libglx0 libopengl0 libegl1 libice6 libsm6 libx11-6 libxext6 libxfixes3 \
        libxi6 libxkbcommon0 libxrender1 libxt6 libxxf86vm1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# prefect.yaml's image deployments change into this directory (set_working_directory).
WORKDIR /opt/pvit

# The resolved tree first, so a code change does not reinstall it: constraints.txt pins
# every package pyproject.toml needs (the same pins as the Makefile installs).
COPY constraints.txt ./
RUN pip install -r constraints.txt

COPY . .
# Editable, as the Makefile does: assets/ (the offline asset set) stays next to the code.
# Kubric without its declared deps (Beam, GCS clients, tfds); pyproject.toml lists the
# runtime subset it needs, installed above.
RUN pip install --no-deps -e . \
    && pip install --no-deps kubric-nightly==2023.12.27

CMD ["pvit", "--help"]
