"""C++ time loops for the CPU, compiled on first use.

At RL sizes (a few dozen samples, 64 units) a time loop of ATen operations costs more in
per-operation dispatch than in arithmetic. The files of ``csrc/`` run such loops in C++: the
matrix multiplies through ATen (the same BLAS calls), the elementwise work fused into
vectorised passes. :func:`load` compiles one of them with
:func:`torch.utils.cpp_extension.load` the first time it is needed (under a minute, once per
machine and torch version; the result is cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), for the CPU it runs on (``-march=native``, ``-mcpu=native`` on
ARM).

Where an extension cannot be built (no C++ compiler), or when the environment variable
``CFC_RL_CPU_EXTENSIONS=0`` is set, :func:`load` returns None (after one warning in the first
case) and the cells run their ATen loops instead: the same numbers, slower.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

SOURCES = Path(__file__).with_name("csrc")
ENV_SWITCH = "CFC_RL_CPU_EXTENSIONS"

# For the CPU the build runs on (x86 compilers call it -march, ARM ones -mcpu); -fno-trapping-math
# lets GCC vectorise float-to-int conversions (nothing here reads floating-point exception flags).
_NATIVE = "-mcpu=native" if platform.machine().lower() in {"arm64", "aarch64"} else "-march=native"
_CFLAGS = ["-O3", _NATIVE, "-fno-trapping-math"]


def _build_tag() -> str:
    """A short id of this CPU's instruction sets, the torch version and the shared headers:
    -march=native code built on one machine must not be loaded by another that shares the
    cache folder (a shared home directory), nor a build against one torch by another (its C++
    ABI changes); and torch rebuilds when a listed source changes, not when a header does."""
    import torch

    flags = platform.machine() + torch.__version__
    for header in sorted(SOURCES.glob("*.h")):
        flags += header.read_text()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _put_ninja_on_path() -> None:
    """torch builds with the ``ninja`` command. The ninja wheel (a dependency) installs it next
    to the Python in use, which is not on PATH when a virtual environment's Python runs
    without the environment being activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # the build fails with torch's own message, and load() says so
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def enabled() -> bool:
    """False when the user switched the extensions off (``CFC_RL_CPU_EXTENSIONS=0``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def load_for(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """:func:`load` for tensors on ``device`` of ``dtype``, where the loops apply: the CPU,
    float32 or float64 (their C++ is written for these two). None elsewhere (CUDA, half
    precision): the ATen operations run."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return None
    return load(name)


@cache
def load(name: str) -> ModuleType | None:
    """The compiled module of ``csrc/<name>.cpp``, or None where the extensions are switched
    off or it cannot be built."""
    if not enabled():
        return None
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        module_name = f"cfc_rl_{name}_{_build_tag()}"
        build_dir = Path(cpp_extension._get_build_directory(module_name, verbose=False))
        if not (build_dir / f"{module_name}.so").exists():  # a first build: say why we wait
            print(
                f"cfc_rl: compiling the C++ loops {name!r} for this CPU (once, about 30 s)...",
                file=sys.stderr,
                flush=True,
            )
        return cpp_extension.load(
            name=module_name,
            sources=[str(SOURCES / f"{name}.cpp")],
            extra_cflags=_CFLAGS,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, say why
        # A failed build's message ends with the compiler's; its last line says what failed.
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        warnings.warn(
            f"cfc_rl: the C++ extension {name!r} could not be built ({reason}); running the "
            f"slower ATen loops instead (set {ENV_SWITCH}=0 to skip the build)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
