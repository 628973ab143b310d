"""The run folder: where :func:`~cfc_rl.experiment.train.train` writes and what
:func:`~cfc_rl.experiment.evaluate.evaluate_run` and :mod:`~cfc_rl.experiment.compare` read.

Layout of ``runs/<task>/<agent>/seed_<n>/``::

    config.yaml          resolved agent + task + seed + package versions (enough to rebuild)
    model.zip            the final model              } written when the budget is reached
    vecnormalize.pkl     its normalisation statistics }
    result.json          final evaluation, wall clock, steps/s, parameters: the "done" marker
    checkpoints/         latest.json -> step_<n>.zip (+ _vecnormalize.pkl, _replay_buffer.pkl)
    best_model.zip       the model of the best periodic evaluation (+ best_vecnormalize.pkl,
    best.json            and its step count and mean return)
    monitor/             one Monitor CSV per training environment
    progress.csv         SB3's training log; tb/ holds the same as TensorBoard events
    progress.resumed_<n>.csv  the log of a session resumed at step n (merged when it ends)
    evaluations.csv/.npz periodic evaluations during training (returns, lengths)
    evaluation_episodes.csv   per-episode results of the final evaluation
    evaluate_episodes.csv     per-episode results of the latest ``cfc-rl evaluate``

Every file written whole is written atomically (:func:`atomic_write`): to a temporary file in
the same folder, then ``os.replace``, so an interruption leaves the old file or the new one,
never half of one. The logs that grow while training (``monitor/``, ``tb/`` and a session's CSV
log) are appended to. A resumed run drops the rows ``progress.csv`` holds past its checkpoint
(it trains those steps again); the Monitor files keep every episode played and ``tb/`` every
event, so they show the steps trained twice twice. ``best_model.zip`` is the best periodic
evaluation made, one by a session whose later steps were trained again included.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import platform
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

__all__ = [
    "RunError",
    "RunFolder",
    "atomic_write",
    "atomic_write_text",
    "load_model",
    "load_replay_buffer",
    "machine_description",
    "run_folder",
    "write_csv",
]


class RunError(ValueError):
    """A run folder that cannot be read: not a run folder, or one of its files is damaged."""


def _damaged(path: Path, error: BaseException) -> RunError:
    return RunError(f"{path} is damaged and cannot be read ({type(error).__name__}: {error})")


def load_model(algo: type, path: Path, **kwargs: Any) -> Any:
    """``algo.load(path, **kwargs)``, with a :class:`RunError` naming the file if it is damaged.

    :param algo: the SB3 algorithm class
    :param path: the saved model (``.zip``)
    :param kwargs: passed to ``algo.load``
    """
    try:
        return algo.load(path, **kwargs)
    # SB3 asserts on some truncations ("No data found in the saved file")
    except (
        ValueError,
        KeyError,
        EOFError,
        RuntimeError,
        OSError,
        AssertionError,
        zipfile.BadZipFile,
    ) as e:
        raise _damaged(path, e) from e


def load_replay_buffer(model: Any, path: Path) -> None:
    """``model.load_replay_buffer(path)``, with a :class:`RunError` naming the file if it is
    damaged."""
    try:
        model.load_replay_buffer(path)
    except (pickle.UnpicklingError, EOFError, ValueError, OSError, AttributeError) as e:
        raise _damaged(path, e) from e


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file so that readers see either the old content or the whole new one.

    :param path: the destination
    :param write: called with a binary file object open on a temporary file in the same folder
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder: os.replace is atomic only within one file system. The suffix keeps the
    # destination's extension, for writers that pick a format from it (imageio).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; runs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write` for text (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_csv(
    path: str | os.PathLike[str], rows: list[dict[str, Any]], empty_header: Sequence[str] = ()
) -> None:
    """Rows (dicts with the same keys) as a CSV file, written atomically.

    :param empty_header: the header when there are no rows
    """
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else list(empty_header))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run (see the module docstring).

    :param root: the run folder
    """

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def model(self) -> Path:
        return self.root / "model.zip"

    @property
    def vecnormalize(self) -> Path:
        return self.root / "vecnormalize.pkl"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest_checkpoint(self) -> Path:
        return self.checkpoints / "latest.json"

    @property
    def monitor(self) -> Path:
        return self.root / "monitor"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def evaluations(self) -> Path:
        return self.root / "evaluations.npz"

    @property
    def best_model(self) -> Path:
        """The model of the best periodic evaluation so far (``best.json`` says which)."""
        return self.root / "best_model.zip"

    @property
    def best_vecnormalize(self) -> Path:
        return self.root / "best_vecnormalize.pkl"

    @property
    def best_record(self) -> Path:
        return self.root / "best.json"

    @property
    def logs(self) -> tuple[Path, ...]:
        """The files a training session writes beside its model: logs, evaluations, the best
        model (what a run that starts over must not inherit)."""
        names = (
            "progress.csv",
            "evaluations.npz",
            "evaluations.csv",
            "evaluation_episodes.csv",
            "evaluate_episodes.csv",
            "best_model.zip",
            "best_vecnormalize.pkl",
            "best.json",
        )
        resumed = [path for _, path in self.resumed_progress()]
        return (*(self.root / name for name in names), *resumed)

    def resumed_progress_log(self, resumed_at: int) -> Path:
        """The CSV log of a session resumed at step ``resumed_at``, until it is merged into
        ``progress.csv``."""
        return self.root / f"progress.resumed_{resumed_at}.csv"

    def resumed_progress(self) -> list[tuple[int, Path]]:
        """The resumed sessions' logs not merged yet, with the step each resumed at, in order."""
        logs = [
            (int(path.stem.removeprefix("progress.resumed_")), path)
            for path in self.root.glob("progress.resumed_*.csv")
        ]
        return sorted(logs)

    def read_config(self) -> dict[str, Any]:
        """The resolved configuration the run was started with.

        :raises RunError: if the folder holds no run, or its config.yaml is damaged
        """
        if not self.config.exists():
            raise RunError(
                f"{self.root} is not a run folder: it has no config.yaml (cfc-rl train makes one)"
            )
        try:
            data = yaml.safe_load(self.config.read_text())
        except yaml.YAMLError as e:
            raise _damaged(self.config, e) from e
        if not isinstance(data, dict):
            raise RunError(f"{self.config} is damaged: expected a mapping, got {data!r}")
        return data

    def read_result(self) -> dict[str, Any] | None:
        """``result.json``, or None while the run has not reached its budget."""
        if not self.result.exists():
            return None
        return self._read_json(self.result)

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise _damaged(path, e) from e

    def is_complete(self, total_timesteps: int | None = None) -> bool:
        """Whether the run reached its budget (``total_timesteps``, when given)."""
        result = self.read_result()
        if result is None:
            return False
        return total_timesteps is None or result["total_timesteps"] == total_timesteps

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The latest checkpoint's record (file names, steps, elapsed seconds), or None."""
        if not self.latest_checkpoint.exists():
            return None
        return self._read_json(self.latest_checkpoint)


def run_folder(out: str | os.PathLike[str], task: str, agent: str, seed: int) -> RunFolder:
    """The run folder of one (task, agent, seed): ``<out>/<task>/<agent>/seed_<seed>``."""
    return RunFolder(Path(out) / task / agent / f"seed_{seed}")


def dump_yaml(data: Any) -> str:
    """YAML text with keys in insertion order."""
    stream = io.StringIO()
    yaml.safe_dump(data, stream, sort_keys=False)
    return stream.getvalue()


def machine_description(device: str) -> str:
    """The CPU model (or GPU name) the figures were measured on."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
