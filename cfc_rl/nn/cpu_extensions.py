"""C++ time loops for the CPU, compiled once per machine and loaded from a cache.

What is built. At RL sizes (a few dozen samples, 64 units) a time loop of ATen operations
costs more in per-operation dispatch than in arithmetic. The files of ``csrc/`` run such loops
in C++: the matrix multiplies through ATen (the same BLAS calls), the elementwise work fused
into vectorised passes. Each ``csrc/<name>.cpp`` (:data:`EXTENSIONS`, with the shared headers
``csrc/*.h``) becomes one Python extension module, compiled with
:func:`torch.utils.cpp_extension.load` for the CPU it runs on (``-march=native``,
``-mcpu=native`` on ARM).

Where. Under :func:`cache_dir`: ``$CFC_RL_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/cfc_rl/extensions`` (by default ``~/.cache/cfc_rl/extensions``). One build
is one folder ``<name>-<key>/`` holding a copy of the sources, the module
``cfc_rl_<name>_<key>.so``, ``build.log`` (the compiler's output of the last build) and
``.lock``.

Keyed how, and why. The key is a SHA-256 over what the machine code depends on: the bytes of
the ``.cpp`` and of every ``csrc`` header, the compile flags, the torch version and its C++
ABI flag, the Python ABI (extension suffix), the machine type and the CPU's instruction-set
flags (``/proc/cpuinfo``). Not over any path: torch's own cache keys a build by its build
command, which names the source's absolute path, so two checkouts of this project (a clone
and an installed copy, two virtual environments) rebuilt each other's extension on every
switch, for a minute each time. Here the sources are copied into the build folder and compiled
there, so every checkout with the same sources shares one build, and a changed byte of a
source, another torch or another CPU sharing the home directory (a cluster) gets its own.

Loading a module that is built imports the ``.so`` directly: no build tool runs, no lock is
taken (milliseconds). Building takes an exclusive ``flock`` on the folder's ``.lock`` (the
kernel drops it when its holder dies, so a killed build blocks nobody; others wait for it at
most ``$CFC_RL_BUILD_TIMEOUT`` seconds, 900 by default), compiles in a scratch folder and
moves the finished module into place atomically (a killed build never leaves half a module).

Where no C++ compiler or no ``ninja`` exists, :func:`load` warns once and returns None, and
the cells run their ATen loops instead: the same numbers, slower. ``CFC_RL_CPU_EXTENSIONS=0``
switches the extensions off (no warning). A build that fails in the compiler raises
:class:`ExtensionBuildError`, naming the log. :func:`build_all` builds ahead of time (the
command ``cfc-rl build``). Progress goes to the ``cfc_rl.nn.cpu_extensions`` logger.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import socket
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

SOURCES = Path(__file__).with_name("csrc")
EXTENSIONS = ("cfc_cpu", "ltc_cpu")
ENV_SWITCH = "CFC_RL_CPU_EXTENSIONS"
ENV_CACHE_DIR = "CFC_RL_CACHE_DIR"
ENV_BUILD_TIMEOUT = "CFC_RL_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT = 900.0

logger = logging.getLogger(__name__)

# For the CPU the build runs on (x86 compilers call it -march, ARM ones -mcpu); -fno-trapping-math
# lets GCC vectorise float-to-int conversions (nothing here reads floating-point exception flags).
_NATIVE = "-mcpu=native" if platform.machine().lower() in {"arm64", "aarch64"} else "-march=native"
_CFLAGS = ["-O3", _NATIVE, "-fno-trapping-math"]
_LIB_EXT = ".pyd" if os.name == "nt" else ".so"  # what torch names the module it links
_SCRATCH = "build"  # torch's build folder, inside the build's folder
_POLL_S = 0.2

# Modules this process has loaded, by the path of their .so (a build imports its module).
_LOADED: dict[Path, ModuleType] = {}


class ExtensionBuildError(RuntimeError):
    """A C++ extension could not be built (the compiler failed) or its build could not start."""


class _Unavailable(Exception):
    """The machine cannot build (no compiler, no ninja, no writable cache): :func:`load` warns
    and falls back; :func:`build_all` raises."""


@dataclass(frozen=True)
class BuildReport:
    """One extension of :func:`build_all`: its module's path, and whether this call compiled it
    (False: it was already in the cache)."""

    name: str
    path: Path
    built: bool
    seconds: float


def enabled() -> bool:
    """False when the user switched the extensions off (``CFC_RL_CPU_EXTENSIONS=0``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def cache_dir() -> Path:
    """The folder of the builds: ``$CFC_RL_CACHE_DIR``, else ``$XDG_CACHE_HOME/cfc_rl/
    extensions``, else ``~/.cache/cfc_rl/extensions``."""
    explicit = os.environ.get(ENV_CACHE_DIR, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cfc_rl" / "extensions"


def _put_ninja_on_path() -> None:
    """torch builds with the ``ninja`` command. The ninja wheel (a dependency) installs it next
    to the Python in use, which is not on PATH when a virtual environment's Python runs
    without the environment being activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # the build reports that ninja is missing
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load_for(name: str, device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """:func:`load` for tensors on ``device`` of ``dtype``, where the loops apply: the CPU,
    float32 or float64 (their C++ is written for these two). None elsewhere (CUDA, half
    precision): the ATen operations run."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return None
    return load(name)


@cache
def load(name: str) -> ModuleType | None:
    """The compiled module of ``csrc/<name>.cpp``, built first if the cache lacks it. None
    where the extensions are switched off, or (after one warning) where this machine has no
    C++ compiler or ninja. Raises :class:`ExtensionBuildError` where the compiler fails."""
    if not enabled():
        return None
    try:
        return _load(name, SOURCES)
    except _Unavailable as reason:
        warnings.warn(
            f"cfc_rl: {reason}; running the slower ATen loops instead (set {ENV_SWITCH}=0 to "
            "run them without this warning)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def build_all(names: Sequence[str] = EXTENSIONS) -> list[BuildReport]:
    """Builds the extensions ``names`` that the cache lacks (ahead of time, rather than in the
    first forward pass) and says where each is. Raises :class:`ExtensionBuildError` where one
    fails, where the machine cannot build, or where the extensions are switched off."""
    if not enabled():
        raise ExtensionBuildError(
            f"cfc_rl: the C++ extensions are switched off ({ENV_SWITCH}="
            f"{os.environ.get(ENV_SWITCH)!r}); unset it to build them"
        )
    reports = []
    for name in names:
        try:
            reports.append(_ensure_built(name, SOURCES)[0])
        except _Unavailable as reason:
            raise ExtensionBuildError(f"cfc_rl: {reason}") from None
    return reports


# The build key and its folder.


def _cpu_flags() -> str:
    """The CPU's instruction-set line: -march=native code is for this CPU only."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor()  # macOS, Windows: no /proc


def _read_sources(name: str, source_dir: Path) -> dict[str, bytes]:
    """``<name>.cpp`` and every header of ``source_dir``, by file name: the bytes that are
    hashed are the bytes that are compiled."""
    files = {f"{name}.cpp": (source_dir / f"{name}.cpp").read_bytes()}
    for header in sorted(source_dir.glob("*.h")):
        files[header.name] = header.read_bytes()
    return files


def _build_key(name: str, sources: dict[str, bytes]) -> str:
    """SHA-256 over what the compiled module depends on, and nothing that names a path."""
    digest = hashlib.sha256()

    def add(label: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        digest.update(f"{label}:{len(data)}:".encode())
        digest.update(data)

    add("name", name)
    for file_name, data in sorted(sources.items()):
        add(f"file {file_name}", data)
    add("cflags", " ".join(_CFLAGS))
    add("torch", f"{torch.__version__} {getattr(torch.version, 'git_version', '')}")
    add("cxx11 abi", str(torch._C._GLIBCXX_USE_CXX11_ABI))
    add("python", f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}")
    add("machine", platform.machine())
    add("cpu", _cpu_flags())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Build:
    name: str
    key: str
    folder: Path
    sources: dict[str, bytes]

    @property
    def module_name(self) -> str:  # torch's TORCH_EXTENSION_NAME: PyInit_<module_name>
        return f"cfc_rl_{self.name}_{self.key[:12]}"

    @property
    def library(self) -> Path:
        return self.folder / f"{self.module_name}{_LIB_EXT}"

    @property
    def log(self) -> Path:
        return self.folder / "build.log"

    @property
    def lock(self) -> Path:
        return self.folder / ".lock"


def _plan(name: str, source_dir: Path = SOURCES, root: Path | None = None) -> _Build:
    sources = _read_sources(name, source_dir)
    key = _build_key(name, sources)
    folder = (root if root is not None else cache_dir()) / f"{name}-{key[:16]}"
    return _Build(name, key, folder, sources)


# Loading and building.


def _import(build: _Build) -> ModuleType:
    module = _LOADED.get(build.library)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(build.module_name, build.library)
    if spec is None or spec.loader is None:
        raise ExtensionBuildError(f"cfc_rl: {build.library} is not a Python extension module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        raise ExtensionBuildError(
            f"cfc_rl: the compiled C++ loops {build.name!r} in {build.library} do not load "
            f"({error}); delete {build.folder} to rebuild them, or set {ENV_SWITCH}=0 to run "
            "without them"
        ) from error
    _LOADED[build.library] = module
    return module


def _load(name: str, source_dir: Path, root: Path | None = None) -> ModuleType:
    _, build = _ensure_built(name, source_dir, root)
    return _import(build)


def _ensure_built(
    name: str, source_dir: Path = SOURCES, root: Path | None = None
) -> tuple[BuildReport, _Build]:
    """The module of ``source_dir/<name>.cpp`` in the cache, compiled first if missing."""
    start = time.perf_counter()
    build = _plan(name, source_dir, root)
    if build.library.exists():  # the common case: no lock, no build tool
        return BuildReport(name, build.library, False, time.perf_counter() - start), build
    try:
        build.folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _Unavailable(
            f"the C++ loops {name!r} cannot be built in {build.folder} ({error}); point "
            f"{ENV_CACHE_DIR} at a writable folder"
        ) from error
    with _exclusive(build):
        if build.library.exists():  # another process built it while this one waited
            return BuildReport(name, build.library, False, time.perf_counter() - start), build
        _check_toolchain(name)
        _compile(build)
    return BuildReport(name, build.library, True, time.perf_counter() - start), build


def _build_timeout() -> float:
    value = os.environ.get(ENV_BUILD_TIMEOUT, "").strip()
    try:
        return float(value) if value else DEFAULT_BUILD_TIMEOUT
    except ValueError:
        raise ExtensionBuildError(
            f"cfc_rl: {ENV_BUILD_TIMEOUT}={value!r} is not a number of seconds"
        ) from None


def _holder(lock_fd: int) -> str:
    """Who holds the lock, as its holder wrote it: ``<pid> <host>``."""
    try:
        text = os.pread(lock_fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if not text:
        return "process (unknown PID)"
    return f"process {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")


@contextlib.contextmanager
def _exclusive(build: _Build) -> Iterator[None]:
    """The build folder's ``.lock``, held exclusively with ``flock``: the kernel releases it
    when its holder exits or is killed, so a dead build never blocks anyone."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock (nor, usually, a `c++`); build without a lock
        yield
        return
    fd = os.open(build.lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        timeout = _build_timeout()
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    logger.info(
                        "waiting for %s, which is building the C++ loops %r (lock %s, at most "
                        "%.0f s)",
                        _holder(fd),
                        build.name,
                        build.lock,
                        timeout,
                    )
                if time.monotonic() >= deadline:
                    raise ExtensionBuildError(
                        f"cfc_rl: gave up after {timeout:g} s waiting for {_holder(fd)} to "
                        f"finish building the C++ loops {build.name!r} (lock file {build.lock}); "
                        f"end that process if it is stuck, or raise {ENV_BUILD_TIMEOUT}, or set "
                        f"{ENV_SWITCH}=0 to run without the compiled loops"
                    ) from None
                time.sleep(_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _check_toolchain(name: str) -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise _Unavailable(
            f"no C++ compiler ({compiler!r}) to build the C++ loops {name!r}: install one "
            "(g++ or clang++; Xcode's command line tools on macOS) or point CXX at it"
        )
    _put_ninja_on_path()
    if shutil.which("ninja") is None:
        raise _Unavailable(
            f"no `ninja` to build the C++ loops {name!r}: install it (pip install ninja)"
        )


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """File descriptors 1 and 2 (this process's and its children's: ninja's, the compiler's)
    appended to ``path`` for the duration."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with open(path, "ab", buffering=0) as log:
        saved: dict[int, int | None] = {}
        for fd in (1, 2):
            try:
                saved[fd] = os.dup(fd)
            except OSError:  # not open (a daemon): write there, then close it again
                saved[fd] = None
            os.dup2(log.fileno(), fd)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, copy in saved.items():
                if copy is None:
                    os.close(fd)
                else:
                    os.dup2(copy, fd)
                    os.close(copy)


def _remove_stale_state(build: _Build) -> None:
    """What a killed build left: torch's ``lock`` file (torch waits for it forever) and the
    scratch folder. Only called under the exclusive lock, so nobody is building."""
    scratch = build.folder / _SCRATCH
    for stale in (scratch / "lock", build.folder / "lock"):
        if stale.exists():
            logger.warning(
                "removed the stale lock %s of an earlier build of the C++ loops %r that did not "
                "finish (killed?)",
                stale,
                build.name,
            )
            stale.unlink()
    shutil.rmtree(scratch, ignore_errors=True)


def _error_line(log_text: str) -> str:
    """The compiler's first error (later ones often follow from it), else the last line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    noise = ("FAILED:", "ninja: build stopped", "collect2: error: ld returned")
    meaningful = [
        line
        for line in lines
        if not line.startswith(noise)
        and not line.startswith("[")  # ninja's "[1/2] <command>"
        and "-DTORCH_EXTENSION_NAME=" not in line  # a compile command (after FAILED:)
    ]
    for pattern in (r"\b(fatal )?error:", r"undefined reference|undefined symbol", r"\berror\b"):
        for line in meaningful:
            if re.search(pattern, line, re.IGNORECASE):
                return line
    return meaningful[-1] if meaningful else "no compiler output"


def _compile(build: _Build) -> None:
    """Compiles ``build`` in its scratch folder and moves the module into place. Called under
    the exclusive lock."""
    from torch.utils import cpp_extension

    _remove_stale_state(build)
    scratch = build.folder / _SCRATCH
    scratch.mkdir()
    # The sources next to the build: the build command names only paths of the cache folder.
    for file_name, data in build.sources.items():
        (build.folder / file_name).write_bytes(data)
    logger.info(
        "compiling the C++ loops %r for this CPU into %s (once per machine, about 30-60 s)",
        build.name,
        build.folder,
    )
    build.log.write_text(
        f"cfc_rl: building {build.module_name} (key {build.key})\n"
        f"torch {torch.__version__}, python {sys.version.split()[0]}, "
        f"CXX={os.environ.get('CXX', 'c++')}, flags {' '.join(_CFLAGS)}\n",
        encoding="utf-8",
    )
    # torch's in-process versioner renames a module whose name it built before from other
    # files (name_v1); the key in the name already tells builds apart.
    with contextlib.suppress(AttributeError):
        cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(build.module_name, None)
    start = time.perf_counter()
    try:
        with _output_to(build.log):
            module = cpp_extension.load(
                name=build.module_name,
                sources=[str(build.folder / f"{build.name}.cpp")],
                extra_cflags=_CFLAGS,
                build_directory=str(scratch),
                verbose=True,  # ninja's and the compiler's output, into the log
            )
    except Exception as error:
        log_text = build.log.read_text(encoding="utf-8", errors="replace")
        if isinstance(error, ImportError) or "Error building extension" not in str(error):
            log_text += f"\n{type(error).__name__}: {error}\n"
            build.log.write_text(log_text, encoding="utf-8")
        raise ExtensionBuildError(
            f"cfc_rl: building the C++ loops {build.name!r} failed: {_error_line(log_text)} "
            f"(full log: {build.log}); set {ENV_SWITCH}=0 to run without the compiled loops"
        ) from error
    os.replace(scratch / build.library.name, build.library)  # atomic: whole or absent
    shutil.rmtree(scratch, ignore_errors=True)
    module.__file__ = str(build.library)
    _LOADED[build.library] = module
    logger.info(
        "compiled the C++ loops %r in %.1f s (%s)",
        build.name,
        time.perf_counter() - start,
        build.library,
    )
