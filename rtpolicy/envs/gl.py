"""MuJoCo's offscreen GL backend, chosen before ``mujoco`` is first imported.

Without a display, rendering uses EGL on a machine with an NVIDIA GPU and an EGL library, else
OSMesa (``apt-get install libosmesa6``), unless the user set ``MUJOCO_GL``. With OSMesa, Mesa's libraries loaded by mujoco
make a later ``import triton`` segfault inside libtriton (torch imports triton lazily, e.g. when
diffusers pulls in ``torch._dynamo``), so triton, when installed, is imported first: ~0.1 s.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def _has_gpu_egl() -> bool:
    """An NVIDIA device and an EGL library (checked without initializing CUDA, so forked workers stay safe)."""
    import ctypes.util

    return os.path.exists("/proc/driver/nvidia/version") and ctypes.util.find_library("EGL") is not None


def configure_gl() -> str | None:
    """Set ``MUJOCO_GL`` on a headless Linux machine unless set (egl with a GPU, else osmesa); returns the backend."""
    if sys.platform.startswith("linux") and "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl" if _has_gpu_egl() else "osmesa"
    backend = os.environ.get("MUJOCO_GL")
    if backend == "osmesa" and "triton" not in sys.modules and importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton")
    return backend
