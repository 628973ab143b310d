"""How the C++ loops are built and cached (cfc_rl.nn.cpu_extensions): csrc compiles as C++17;
the cache is keyed by content, so two copies of the package share one build and load it without
building; a killed build blocks nobody, a live one is waited for a bounded time; a compiler
error is an exception that names its log; build_all builds ahead of time.

The builder is tried on a tiny extension of plain Python C API (no torch headers: it compiles
in under a second); the real loops are built once per machine, by the session fixtures."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import cfc_rl
from cfc_rl.nn import cpu_extensions
from cfc_rl.nn.cpu_extensions import BuildReport, ExtensionBuildError

TINY_CPP = """\
// A Python extension without torch's headers: it compiles in well under a second.
#include <Python.h>

#include "tiny.h"

#define TINY_CAT2(a, b) a##b
#define TINY_CAT(a, b) TINY_CAT2(a, b)
#define TINY_STR2(a) #a
#define TINY_STR(a) TINY_STR2(a)

static PyModuleDef tiny_module = {PyModuleDef_HEAD_INIT, TINY_STR(TORCH_EXTENSION_NAME), nullptr,
                                  -1, nullptr};

PyMODINIT_FUNC TINY_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&tiny_module);
  if (module != nullptr) PyModule_AddIntConstant(module, "answer", TINY_ANSWER);
  return module;
}
"""

# The package under test, for subprocesses (a checkout that is not installed works too).
PACKAGE_ROOT = Path(cfc_rl.__file__).resolve().parents[1]

# A process that holds a build's lock (through the library's own code) until it is ended.
HOLDER = """\
import sys, time
from pathlib import Path
from cfc_rl.nn import cpu_extensions
build = cpu_extensions._plan("tiny", Path(sys.argv[1]), Path(sys.argv[2]))
build.folder.mkdir(parents=True, exist_ok=True)
with cpu_extensions._exclusive(build):
    print("locked", flush=True)
    time.sleep(600)
"""


def _env(package: Path = PACKAGE_ROOT) -> dict[str, str]:
    """This environment, with ``package`` (a folder holding ``cfc_rl``) first on the path."""
    paths = [str(package), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _tiny_sources(folder: Path, answer: int = 42, cpp: str = TINY_CPP) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.cpp").write_text(cpp)
    (folder / "tiny.h").write_text(f"#define TINY_ANSWER {answer}\n")
    return folder


def _needs_a_toolchain() -> None:
    cpu_extensions._put_ninja_on_path()
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja")


def _hold_lock(source: Path, root: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(source), str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_fast_math_is_cplusplus17(tmp_path: Path) -> None:
    # torch < 2.13 compiles extensions with -std=c++17; std::bit_cast is C++20.
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    program = tmp_path / "fast_math_17.cpp"
    program.write_text(
        textwrap.dedent("""\
        #include "fast_math.h"
        #include <cstdio>
        int main() {
          const float xs[] = {-100.0f, -20.0f, -1.5f, -0.25f, 0.0f, 0.5f, 2.0f, 10.0f, 80.0f};
          for (float x : xs)
            std::printf("%.9g %.9g %.9g %.9g %.9g\\n", x, cfc_rl::Math<float>::exp(x),
                        cfc_rl::Math<float>::tanh(x), cfc_rl::Math<float>::erf(x),
                        cfc_rl::sigmoid(x));
          float v[37];
          for (int k = 0; k < 37; ++k) v[k] = 0.5f * k;
          std::printf("%.9g %.9g\\n", cfc_rl::dot(v, v, 37), cfc_rl::sum(v, 37));
        }
        """)
    )
    binary = tmp_path / "fast_math_17"
    flags = ["-std=c++17", "-pedantic-errors", "-Wall", "-Werror", f"-I{cpu_extensions.SOURCES}"]
    subprocess.run(
        [compiler, *flags, "-fsyntax-only", "-x", "c++", str(program)],
        check=True,
        capture_output=True,
    )
    subprocess.run([compiler, *flags, "-O2", str(program), "-o", str(binary)], check=True)
    lines = subprocess.run([binary], check=True, capture_output=True, text=True).stdout.split("\n")
    for line in lines[:9]:  # the bit cast builds 2^n in exp: a wrong one is off by far more
        x, exp, tanh, erf, sigmoid = map(float, line.split())
        expected = math.exp(min(max(x, -87.3365448), 88.3762627))
        assert exp == pytest.approx(expected, rel=3e-7), x
        assert tanh == pytest.approx(math.tanh(x), abs=3e-7), x
        assert erf == pytest.approx(math.erf(x), abs=3e-7), x
        assert sigmoid == pytest.approx(1 / (1 + math.exp(-x)), abs=2e-7), x
    dot, total = map(float, lines[9].split())
    assert dot == sum((0.5 * k) ** 2 for k in range(37))
    assert total == sum(0.5 * k for k in range(37))


def test_the_build_key_follows_the_content_not_the_path(tmp_path: Path, monkeypatch) -> None:
    first, second = tmp_path / "one" / "csrc", tmp_path / "two" / "elsewhere"
    shutil.copytree(cpu_extensions.SOURCES, first)
    shutil.copytree(cpu_extensions.SOURCES, second)
    root = tmp_path / "cache"
    installed = cpu_extensions._plan("cfc_cpu", root=root)
    for copy in (first, second):
        build = cpu_extensions._plan("cfc_cpu", copy, root)
        assert build.key == installed.key
        assert build.folder == root / f"cfc_cpu-{installed.key[:16]}"
        assert build.module_name == f"cfc_rl_cfc_cpu_{installed.key[:12]}"
        assert build.library.parent == build.folder
    # one byte of the .cpp, of a header: another build
    cpp = second / "cfc_cpu.cpp"
    cpp.write_bytes(cpp.read_bytes() + b" ")
    edited_cpp = cpu_extensions._plan("cfc_cpu", second, root).key
    header = first / "fast_math.h"
    header.write_bytes(header.read_bytes().replace(b"0.5f", b"0.6f", 1))
    edited_header = cpu_extensions._plan("cfc_cpu", first, root).key
    assert len({installed.key, edited_cpp, edited_header}) == 3
    # another CPU, other flags: another build
    monkeypatch.setattr(cpu_extensions, "_cpu_flags", lambda: "flags : fpu sse2")
    other_cpu = cpu_extensions._plan("cfc_cpu", root=root).key
    monkeypatch.setattr(cpu_extensions, "_CFLAGS", ["-O2"])
    other_flags = cpu_extensions._plan("cfc_cpu", root=root).key
    assert len({installed.key, other_cpu, other_flags}) == 3


def test_the_cache_folder(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CFC_RL_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpu_extensions.cache_dir() == tmp_path / "home" / ".cache" / "cfc_rl" / "extensions"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_extensions.cache_dir() == tmp_path / "xdg" / "cfc_rl" / "extensions"
    monkeypatch.setenv("CFC_RL_CACHE_DIR", str(tmp_path / "mine"))
    assert cpu_extensions.cache_dir() == tmp_path / "mine"
    assert cpu_extensions._plan("ltc_cpu").folder.parent == tmp_path / "mine"


def test_two_copies_of_the_package_load_one_build_without_building(
    cfc_loops, tmp_path: Path
) -> None:
    library = cpu_extensions._plan("cfc_cpu").library
    assert library.is_file()
    script = textwrap.dedent("""\
        import logging, time
        logging.basicConfig(level=logging.DEBUG)
        import torch
        from cfc_rl.nn import cpu_extensions
        start = time.perf_counter()
        module = cpu_extensions.load("cfc_cpu")
        print(time.perf_counter() - start)
        print(cpu_extensions.__file__)
        print(module.__file__)
        """)
    for copy in ("checkout", "site-packages"):
        shutil.copytree(
            PACKAGE_ROOT / "cfc_rl",
            tmp_path / copy / "cfc_rl",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        run = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=120,  # a rebuild takes about a minute: fail, not wait
            cwd=tmp_path,
            env=_env(tmp_path / copy),
        )
        assert run.returncode == 0, run.stderr
        seconds, package, loaded = run.stdout.split("\n")[:3]
        assert Path(package).is_relative_to(tmp_path / copy)  # this copy's code ran
        assert Path(loaded) == library  # the one build
        assert "compiling" not in run.stderr and "ninja" not in run.stderr
        assert float(seconds) < 1.0  # an import, no build tool (milliseconds)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, BuildReport]:
    """The tiny extension, built once in a cache folder of its own."""
    _needs_a_toolchain()
    folder = tmp_path_factory.mktemp("tiny")
    source, root = _tiny_sources(folder / "src"), folder / "cache"
    report, _ = cpu_extensions._ensure_built("tiny", source, root)
    return source, root, report


def test_a_build_is_made_once_then_loaded(tiny) -> None:
    source, root, first = tiny
    assert first.built and first.path.is_file() and first.name == "tiny"
    build = cpu_extensions._plan("tiny", source, root)
    assert first.path == build.library
    assert cpu_extensions._import(build).answer == 42
    # the compiler's command line, from ninja (a subprocess), went into the log
    log = build.log.read_text()
    assert re.search(r"\[1/2\] .*-c .*tiny-[0-9a-f]{16}/tiny\.cpp", log), log
    assert str(source) not in log  # the copy in the cache was compiled, not the checkout's
    assert not (build.folder / "build").exists()  # the scratch folder is gone
    again, _ = cpu_extensions._ensure_built("tiny", source, root)
    assert again == BuildReport("tiny", build.library, False, again.seconds)
    assert again.seconds < 0.5


def test_a_compiler_error_names_its_log(tmp_path: Path) -> None:
    _needs_a_toolchain()
    source = _tiny_sources(tmp_path / "src", cpp="int broken( {\n")
    build = cpu_extensions._plan("tiny", source, tmp_path / "cache")
    with pytest.raises(ExtensionBuildError) as raised:
        cpu_extensions._ensure_built("tiny", source, tmp_path / "cache")
    message = str(raised.value)
    assert "\n" not in message
    assert "'tiny'" in message and "error" in message and "tiny.cpp:1:" in message
    assert f"full log: {build.log}" in message and "CFC_RL_CPU_EXTENSIONS=0" in message
    assert "tiny.cpp:1:" in build.log.read_text()  # the compiler's own words are kept
    assert not build.library.exists()


def test_a_killed_build_blocks_nobody(tiny, tmp_path: Path) -> None:
    # A build killed hard: its flock is gone with it, torch's `lock` file stays behind (torch
    # would wait for it forever).
    source, root, _ = tiny
    source = _tiny_sources(tmp_path / "src", answer=7)
    build = cpu_extensions._plan("tiny", source, root)
    holder = _hold_lock(source, root)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    (build.folder / "build").mkdir()
    (build.folder / "build" / "lock").touch()
    script = textwrap.dedent("""\
        import logging, sys
        from pathlib import Path
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        from cfc_rl.nn import cpu_extensions
        report, build = cpu_extensions._ensure_built("tiny", Path(sys.argv[1]), Path(sys.argv[2]))
        print(report.built, cpu_extensions._import(build).answer)
        """)
    run = subprocess.run(
        [sys.executable, "-c", script, str(source), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "7"]
    assert re.search(r"WARNING removed the stale lock .*/build/lock", run.stderr), run.stderr
    assert "waiting" not in run.stderr  # the kernel had released the dead holder's flock
    assert build.library.is_file()


def test_a_live_build_is_waited_for_a_bounded_time(tiny, tmp_path: Path, monkeypatch, caplog):
    source, root, _ = tiny
    pending = _tiny_sources(tmp_path / "src", answer=8)
    holder = _hold_lock(pending, root)
    try:
        monkeypatch.setenv("CFC_RL_BUILD_TIMEOUT", "0.5")
        lock = cpu_extensions._plan("tiny", pending, root).lock
        start = time.monotonic()
        caplog.set_level(logging.INFO, logger="cfc_rl.nn.cpu_extensions")
        with pytest.raises(ExtensionBuildError) as raised:
            cpu_extensions._ensure_built("tiny", pending, root)
        assert time.monotonic() - start < 10
        message = str(raised.value)
        assert f"lock file {lock}" in message and f"process {holder.pid} " in message
        assert "CFC_RL_BUILD_TIMEOUT" in message
        waiting = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
        assert len(waiting) == 1 and f"process {holder.pid} " in waiting[0], waiting
        # a build that exists is loaded without the lock, whoever holds it
        other = _hold_lock(source, root)
        try:
            assert not cpu_extensions._ensure_built("tiny", source, root)[0].built
        finally:
            other.kill()
            other.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_build_all_reports_both_extensions(cfc_loops, ltc_loops) -> None:
    reports = cpu_extensions.build_all()
    assert [report.name for report in reports] == list(cpu_extensions.EXTENSIONS)
    for report in reports:
        assert report.path == cpu_extensions._plan(report.name).library
        assert report.path.is_file() and not report.built  # the fixtures built them


def test_build_all_refuses_what_it_cannot_do(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CFC_RL_CPU_EXTENSIONS", "0")
    with pytest.raises(ExtensionBuildError, match="switched off"):
        cpu_extensions.build_all()
    monkeypatch.setenv("CFC_RL_CPU_EXTENSIONS", "1")
    monkeypatch.setenv("CFC_RL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(ExtensionBuildError, match=r"no C\+\+ compiler"):
        cpu_extensions.build_all(["cfc_cpu"])
