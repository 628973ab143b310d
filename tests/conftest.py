"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def mujoco_log_outside_the_repo(tmp_path_factory: pytest.TempPathFactory):
    """Run the module in a temporary folder: MuJoCo writes MUJOCO_LOG.TXT into the working
    directory (HalfCheetah's XML uses a deprecated attribute)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("mujoco_log"))
        yield
