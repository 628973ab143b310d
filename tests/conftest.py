"""Fixtures shared by several test modules."""

from __future__ import annotations

import warnings
from types import ModuleType

import pytest

from cfc_rl.nn import cpu_extensions


@pytest.fixture(scope="module")
def mujoco_log_outside_the_repo(tmp_path_factory: pytest.TempPathFactory):
    """Run the module in a temporary folder: MuJoCo writes MUJOCO_LOG.TXT into the working
    directory (HalfCheetah's XML uses a deprecated attribute)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("mujoco_log"))
        yield


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the same numbers on every machine, and fair to the
    other test jobs (a module opts in with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _built_extension(name: str) -> ModuleType:
    """The compiled loops ``csrc/<name>.cpp``, built into the machine's cache the first time
    (cpu_extensions.cache_dir()). A failed build fails the tests (a compiler error raises; a
    missing compiler warns, an error here): CI has a compiler, and a silent fallback would leave
    the fast path untested. Skips only where the user switched the extensions off."""
    if not cpu_extensions.enabled():
        pytest.skip(f"switched off with {cpu_extensions.ENV_SWITCH}=0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the build's warning, if any, becomes the failure
        module = cpu_extensions.load(name)
    assert module is not None
    return module


@pytest.fixture(scope="session")
def cfc_loops() -> ModuleType:
    return _built_extension("cfc_cpu")


@pytest.fixture(scope="session")
def ltc_loops() -> ModuleType:
    return _built_extension("ltc_cpu")
