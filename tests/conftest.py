"""Shared test setup.

Import order matters in one process: TensorFlow (imported by ``kubric``) loaded
before torch's triton (imported by torchvision/timm through ``torch._dynamo``)
crashes the interpreter. The pipeline never loads both in one process (Blender and
Kubric run in render workers), but pytest does, so load torch's side first.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401
