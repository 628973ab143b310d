"""Jobs on a Ray cluster: :class:`RayExecutor` runs each (agent, task, seed) job as a Ray task.

A job travels as data (:class:`~.jobs.Job`: the resolved agent and task, the seed) and comes
back as its result record, so the worker needs the installed package and nothing of the
driver's files. Where its run folder is written:

- with ``storage`` (a folder that every node mounts at the same path, e.g. NFS), the run folders
  (the comparison's ``--out``, which must lie inside it) are written there directly by the
  workers; a partial run is resumed in place;
- without it, the worker trains in a temporary folder of its own node and returns the run folder
  packed (tar bytes) with the record; the driver unpacks it into a hidden folder beside the run
  folder and renames it into place, so the run folder is either the old one or the whole new
  one. A partial run folder on the driver travels to the worker packed, so resuming works too.

Either way the run folders end up under ``--out`` on the driver, and the summary, the plots and
the resumption of an interrupted comparison are those of the local executor.

Faults: a job whose worker process dies (killed, out of memory, node lost) is retried up to
``max_retries`` times (Ray's ``max_retries``: from the driver's state without storage, from
its last checkpoint with it); a job that raises is reported with its traceback and the others
go on. Before any job starts, one task per alive node builds the compiled CPU loops the grid's
cells need (:func:`cfc_rl.nn.cpu_extensions.build_all`), so no job waits on another's build or
counts it in its wall clock (a node that joins later builds in its first job).

Ray is imported inside the functions (it is the optional extra ``cfc-rl[ray]``): this module
imports without it, and asking for the Ray executor without it is a one-line
:class:`RayUnavailable` error that says what to install.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cfc_rl.envs import ConfigError

if TYPE_CHECKING:  # torch and SB3 load with them: imported where used (cfc-rl --help stays quick)
    from cfc_rl.experiment.executors import Executor, JobResult
    from cfc_rl.experiment.jobs import Job

__all__ = [
    "INSTALL_HINT",
    "RayExecutor",
    "RayUnavailable",
    "add_executor_arguments",
    "build_on_nodes",
    "connect",
    "executor_from_args",
    "executor_options",
    "extensions_for",
    "import_ray",
    "pack_folder",
    "unpack_folder",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[ray]"'
EXECUTORS = ("local", "ray")
SCRATCH_FOLDER = "cfc_rl_ray_jobs"  # under the worker node's temporary folder
INTERRUPT_WAIT_S = 60.0  # after Ctrl-C, how long the driver waits for runs to save checkpoints


class RayUnavailable(ConfigError):
    """Ray is not installed (a :class:`ConfigError`: the command prints one line)."""


def import_ray() -> ModuleType:
    """The ``ray`` module.

    :raises RayUnavailable: if Ray is not installed, saying how to install it
    """
    try:
        import ray
    except ImportError:
        raise RayUnavailable(
            f"the Ray executor needs Ray, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


# Command-line options.


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--executor``, ``--address``, ``--cpus-per-job``, ``--max-retries`` and
    ``--storage`` to a command's parser (``compare``, ``tune``).

    :param parser: the command's parser
    """
    group = parser.add_argument_group("where the jobs run")
    group.add_argument(
        "--executor",
        default="local",
        choices=EXECUTORS,
        help="local: processes on this machine (default); ray: tasks on a Ray cluster "
        f"(needs {INSTALL_HINT})",
    )
    group.add_argument(
        "--address",
        default=None,
        help="the Ray cluster: auto (the one started on this machine with `ray start`), "
        "HOST:6379 or ray://HOST:10001 (Ray Client); default: the cluster RAY_ADDRESS or "
        "`ray start` names, else a new Ray on this machine",
    )
    group.add_argument(
        "--cpus-per-job",
        type=float,
        default=1.0,
        help="CPUs Ray reserves for each run (default 1); a run keeps its one torch thread, "
        "as on this machine, so that its numbers do not depend on it",
    )
    group.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="times a run whose worker process dies is started again (default 2)",
    )
    group.add_argument(
        "--storage",
        default=None,
        help="a folder every node mounts at the same path (NFS, ...) holding --out: workers "
        "write the run folders there directly; without it each run folder travels back to "
        "the driver packed",
    )


def executor_from_args(args: argparse.Namespace) -> Executor:
    """The executor the parsed options ask for: :class:`~.executors.LocalExecutor` with
    ``--jobs`` processes, or :class:`RayExecutor`.

    :param args: parsed options of :func:`add_executor_arguments` (and ``--jobs``, ``--out``
        where the command has them)
    :raises RayUnavailable: for ``--executor ray`` without Ray installed
    :raises ConfigError: for options that do not fit together
    """
    kind = getattr(args, "executor", "local")
    check_executor_args(args)
    if kind == "local":
        from cfc_rl.experiment.executors import LocalExecutor

        return LocalExecutor(getattr(args, "jobs", 1) or 1)
    import_ray()
    out = getattr(args, "out", None)
    if args.storage is not None and out is not None:
        check_inside_storage(out, args.storage)
    return RayExecutor(
        args.address,
        cpus_per_job=args.cpus_per_job,
        max_retries=args.max_retries,
        storage=args.storage,
    )


def executor_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`add_executor_arguments` as keyword arguments of
    :func:`~cfc_rl.experiment.tune.search`, checked (:func:`check_executor_args`)."""
    check_executor_args(args)
    names = ("executor", "address", "cpus_per_job", "max_retries", "storage")
    return {name: getattr(args, name) for name in names}


def check_executor_args(args: argparse.Namespace) -> None:
    """Errors a user can fix in the options of :func:`add_executor_arguments`.

    :param args: the parsed options
    :raises ConfigError: naming the option
    """
    kind = getattr(args, "executor", "local")
    if kind not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if kind == "local":
        for option, value in (("--address", args.address), ("--storage", args.storage)):
            if value is not None:
                raise ConfigError(f"{option} is an option of the Ray executor: add --executor ray")
    if not args.cpus_per_job > 0:
        raise ConfigError(f"--cpus-per-job must be positive, got {args.cpus_per_job}")
    if args.max_retries < 0:
        raise ConfigError(f"--max-retries must be 0 or more, got {args.max_retries}")


def check_inside_storage(path: str | os.PathLike[str], storage: str | os.PathLike[str]) -> Path:
    """``path`` resolved, checked to lie inside the shared folder ``storage``.

    :param path: a run folder or an output folder
    :param storage: the folder all nodes share
    :return: the resolved path, as the workers will use it
    :raises ConfigError: if it lies outside
    """
    resolved, shared = Path(path).resolve(), Path(storage).resolve()
    if not resolved.is_relative_to(shared):
        raise ConfigError(
            f"--out {path} is not inside --storage {storage}: with --storage the workers write "
            f"the run folders in the shared folder, so put --out there (e.g. --out "
            f"{shared / Path(path).name})"
        )
    return resolved


# Packing run folders.


def pack_folder(folder: str | os.PathLike[str]) -> bytes:
    """The files of ``folder`` as an uncompressed tar archive (model files are zip already).

    :param folder: a run folder
    :return: the archive's bytes, member names relative to ``folder``
    """
    folder = Path(folder)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
    return buffer.getvalue()


def unpack_folder(archive: bytes, folder: str | os.PathLike[str]) -> None:
    """Extract an archive of :func:`pack_folder` into ``folder`` (created if missing).

    :param archive: the archive's bytes
    :param folder: where to extract it
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # no absolute paths, links out or devices
            tar.extractall(folder, filter="data")
        else:  # pragma: no cover - Python before 3.10.12
            tar.extractall(folder)


def install_folder(archive: bytes, run_dir: str | os.PathLike[str]) -> None:
    """Put the run folder packed in ``archive`` at ``run_dir``, replacing what is there: it is
    extracted into a hidden folder beside it first and renamed into place, so ``run_dir`` is
    never half written.

    :param archive: the archive's bytes (:func:`pack_folder`)
    :param run_dir: the run folder on this machine
    """
    run_dir = Path(run_dir)
    parent = run_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(dir=parent, prefix=f".{run_dir.name}.incoming-"))
    try:
        unpack_folder(archive, incoming)
        incoming.chmod(0o755)  # mkdtemp makes folders private; runs are meant to be shared
        if not run_dir.exists():
            os.rename(incoming, run_dir)
            return
        old = parent / f".{run_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(run_dir, old)
        try:
            os.rename(incoming, run_dir)
        except BaseException:
            os.rename(old, run_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise


def recover_folder(run_dir: str | os.PathLike[str]) -> None:
    """Undo what a driver killed inside :func:`install_folder` left: the previous run folder
    renamed aside comes back when the run folder is missing; extraction leftovers go.

    :param run_dir: the run folder on this machine
    """
    run_dir = Path(run_dir)
    if not run_dir.parent.is_dir():
        return
    for leftover in run_dir.parent.glob(f".{run_dir.name}.incoming-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in sorted(run_dir.parent.glob(f".{run_dir.name}.old-*")):
        if not run_dir.exists():
            logger.warning("restoring %s from %s (an interrupted copy)", run_dir, old)
            os.rename(old, run_dir)
        else:
            shutil.rmtree(old, ignore_errors=True)


# What runs on the workers.


def scratch_root() -> Path:
    """The folder of this node's job folders (under the system's temporary folder)."""
    return Path(tempfile.gettempdir()) / SCRATCH_FOLDER


def make_scratch(prefix: str = "job") -> Path:
    """A new private folder under :func:`scratch_root`, named after this process; first the
    folders of processes that no longer exist (killed workers) are removed.

    :param prefix: the folder's name starts with it
    :return: the new folder
    """
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():
        pid = stale.name.split("-")[1] if stale.name.count("-") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f"{prefix}-{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def run_on_worker(
    job: Job,
    archive: bytes | None,
    scratch: bool,
    runner: Callable[[Job], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The body of a job's Ray task: run it, and say what became of it.

    :param job: the job, its ``run_dir`` a path on this node (shared storage) or ignored
        (``scratch``)
    :param archive: the driver's partial run folder, packed, or None
    :param scratch: train in a temporary folder of this node and return the run folder packed
    :param runner: what runs the job (None: :func:`~.jobs.run_job`; tests pass wrappers)
    :return: ``status`` ("done", "failed" or "interrupted": cancelled by the driver's Ctrl-C,
        after saving a checkpoint), ``record``, ``error``, ``seconds``, ``host``, and
        ``archive`` (the run folder packed, with ``scratch``; None if it holds no run)
    """
    from cfc_rl.experiment.jobs import run_job

    runner = runner or run_job
    start = time.perf_counter()
    folder = make_scratch() if scratch else None
    try:
        if folder is not None:
            run_dir = folder / "run"
            if archive is not None:
                unpack_folder(archive, run_dir)
            job = dataclasses.replace(job, run_dir=str(run_dir))
        try:
            record, status, error = runner(job), "done", ""
        except KeyboardInterrupt as e:  # ray.cancel: TrainingInterrupted saved a checkpoint
            record, status, error = {}, "interrupted", str(e) or "interrupted"
        except Exception:
            record, status, error = {}, "failed", traceback.format_exc()
        packed = None
        if folder is not None and (Path(job.run_dir) / "config.yaml").exists():
            packed = pack_folder(job.run_dir)  # a failed job's partial run resumes next time
        return {
            "status": status,
            "record": record,
            "error": error,
            "seconds": time.perf_counter() - start,
            "host": socket.gethostname(),
            "archive": packed,
        }
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def build_on_node(names: Sequence[str]) -> dict[str, Any]:
    """The body of a node's build task: :func:`~cfc_rl.nn.cpu_extensions.build_all`.

    :param names: the extensions to build
    :return: ``host``, ``reports`` (name, built now, seconds) and ``error`` ("" if none)
    """
    from cfc_rl.nn import cpu_extensions

    host = socket.gethostname()
    if not cpu_extensions.enabled():
        return {"host": host, "reports": [], "error": "switched off"}
    try:
        reports = cpu_extensions.build_all(tuple(names))
    except cpu_extensions.ExtensionBuildError as e:
        return {"host": host, "reports": [], "error": str(e)}
    return {
        "host": host,
        "reports": [(r.name, r.built, r.seconds) for r in reports],
        "error": "",
    }


# The driver.


def connect(address: str | None = None, **init_kwargs: Any) -> bool:
    """Connect this process to Ray unless it is already.

    :param address: ``None`` (the cluster ``RAY_ADDRESS`` or ``ray start`` names, else a new Ray
        on this machine), ``"auto"``, ``"local"`` (a new private Ray), ``HOST:PORT`` or
        ``ray://HOST:PORT``
    :param init_kwargs: more arguments of ``ray.init`` (e.g. ``num_cpus`` for a new Ray)
    :return: whether this call connected (then the caller shuts Ray down when done)
    :raises RayUnavailable: without Ray
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    kwargs.update(init_kwargs)
    if address is not None and address.startswith("ray://"):
        kwargs.pop("include_dashboard")  # Ray Client takes no head-node options
    ray.init(address=address, **kwargs)
    resources = ray.cluster_resources()
    try:
        where = ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client: no GCS address on this side
        where = address
    logger.info(
        "ray: connected to %s: %d node(s), %g CPUs, %g GPUs",
        where or address or "a new Ray on this machine",
        len(alive_nodes(ray)),
        resources.get("CPU", 0),
        resources.get("GPU", 0),
    )
    return True


def alive_nodes(ray: ModuleType, min_cpus: float = 0.0) -> list[dict[str, Any]]:
    """The alive nodes of the cluster with at least ``min_cpus`` CPUs (``ray.nodes()`` rows).

    :param ray: the ray module
    :param min_cpus: the least number of CPUs
    """
    return [
        node
        for node in ray.nodes()
        if node.get("Alive") and node.get("Resources", {}).get("CPU", 0.0) >= min_cpus
    ]


def extensions_for(agents: Sequence[Mapping[str, Any]]) -> list[str]:
    """The compiled CPU loops the cells of these resolved agents use.

    :param agents: resolved agents as plain data (:attr:`Job.agent`)
    :return: extension names of :data:`cfc_rl.nn.cpu_extensions.EXTENSIONS`, each once
    """
    from cfc_rl.experiment.settings import AgentConfig
    from cfc_rl.nn import cell_spec

    names: dict[str, None] = {}
    for data in agents:
        data = dict(data)
        name, source = data.pop("name", "agent"), data.pop("source", "<dict>")
        agent = AgentConfig.from_dict(data, name=name, source=source)
        for cell in agent.cells:
            names.update(dict.fromkeys(cell_spec(cell).cls.cpu_kernels))
    return list(names)


def build_on_nodes(names: Sequence[str], cpus: float = 1.0) -> dict[str, dict[str, Any]]:
    """Build the extensions ``names`` on every alive node with CPUs, all nodes at once (one
    task per node, pinned with a ``NodeAffinitySchedulingStrategy``), and wait for them.

    A node where they cannot be built is logged and left out: its jobs build them themselves
    or run the slower ATen loops (and report a compiler error as their own).

    :param names: extension names (:func:`extensions_for`)
    :param cpus: CPUs each build task reserves (at most what a node has)
    :return: per node id, :func:`build_on_node`'s answer
    """
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not names:
        return {}
    nodes = alive_nodes(ray, min_cpus=1e-9)
    task = ray.remote(build_on_node)
    refs = {
        node["NodeID"]: task.options(
            num_cpus=min(cpus, node["Resources"]["CPU"]),
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            max_retries=0,
        ).remote(list(names))
        for node in nodes
    }
    answers = {}
    for node_id, ref in refs.items():
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayError as e:
            answer = {"host": node_id, "reports": [], "error": f"{type(e).__name__}: {e}"}
        answers[node_id] = answer
        if answer["error"]:
            logger.warning("ray: node %s: C++ loops not built: %s", answer["host"], answer["error"])
        for name, built, seconds in answer["reports"]:
            how = f"built in {seconds:.0f} s" if built else "already built"
            logger.info("ray: node %s: %s %s", answer["host"], name, how)
    return answers


class RayExecutor:
    """Jobs as Ray tasks, on a cluster or a Ray on this machine (see the module docstring).

    :param address: the cluster (see :func:`connect`); None: the one ``RAY_ADDRESS`` or
        ``ray start`` names, else a new Ray on this machine, shut down after the jobs
    :param cpus_per_job: CPUs each job reserves (its torch threads stay the job's own, 1 as
        :func:`~.compare.plan_jobs` makes them: the numbers do not depend on the cluster)
    :param gpus_per_job: GPUs each job with ``device="cuda"`` reserves (others reserve none)
    :param max_retries: times a job whose worker process dies is started again
    :param storage: a folder every node mounts at the same path, holding the jobs' run folders
        (then the workers write there directly); None: run folders travel packed
    :param runner: what runs a job on the worker (None: :func:`~.jobs.run_job`); it must be
        importable there, or picklable by value
    :param build: build the compiled loops the jobs' cells need on every node first
    :param init_kwargs: more arguments of ``ray.init`` when this executor connects
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus_per_job: float = 1.0,
        gpus_per_job: float = 1.0,
        max_retries: int = 2,
        storage: str | os.PathLike[str] | None = None,
        runner: Callable[[Job], dict[str, Any]] | None = None,
        build: bool = True,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not cpus_per_job > 0:
            raise ValueError(f"cpus_per_job must be positive, got {cpus_per_job}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        self.address = address
        self.cpus_per_job = cpus_per_job
        self.gpus_per_job = gpus_per_job
        self.max_retries = max_retries
        self.storage = None if storage is None else Path(storage)
        self.runner = runner
        self.build = build
        self.init_kwargs = dict(init_kwargs or {})

    def run(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        """Run every job as a Ray task and yield the results as jobs finish.

        :param jobs: the jobs (their ``run_dir`` paths on this machine)
        :raises ConfigError: with ``storage``, for a run folder outside it (before any job
            starts)
        :raises ExecutionInterrupted: on Ctrl-C, once the running jobs were cancelled (they
            save a checkpoint, which comes back packed without ``storage`` where Ray returns
            it; at most :data:`INTERRUPT_WAIT_S` seconds)
        """
        from cfc_rl.experiment.executors import ExecutionInterrupted

        jobs = list(jobs)
        if not jobs:
            return
        placed = [self._place(job) for job in jobs]  # storage errors before anything starts
        ray = import_ray()
        connected_here = connect(self.address, **self.init_kwargs)
        pending: dict[Any, tuple[Job, float]] = {}
        try:
            if self.build:
                build_on_nodes(extensions_for([job.agent for job in jobs]), self.cpus_per_job)
            task = ray.remote(run_on_worker)
            for job, (sent, archive) in zip(jobs, placed, strict=True):
                ref = task.options(
                    num_cpus=self.cpus_per_job,
                    num_gpus=self.gpus_per_job if job.device == "cuda" else 0,
                    max_retries=self.max_retries,
                    retry_exceptions=False,
                    name=job.name,
                ).remote(sent, archive, self.storage is None, self.runner)
                pending[ref] = (job, time.perf_counter())
            slots = self._slots(ray)
            logger.info(
                "ray: %d job(s) submitted, about %d at once (%g CPUs each)",
                len(jobs),
                slots,
                self.cpus_per_job,
            )
            done = failed = 0
            while pending:
                try:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                except KeyboardInterrupt:
                    saved = self._interrupt(ray, pending)
                    raise ExecutionInterrupted(
                        f"interrupted: {done + failed} of {len(jobs)} runs to train finished, "
                        f"{saved} saved a checkpoint to continue from"
                    ) from None
                job, submitted = pending.pop(ready[0])
                result = self._result(ray, ready[0], job, submitted)
                done += result.status == "done"
                failed += result.status != "done"
                running = min(len(pending), slots)
                logger.info(
                    "ray: %d/%d finished (%d done, %d failed), %d running, %d waiting",
                    done + failed,
                    len(jobs),
                    done,
                    failed,
                    running,
                    len(pending) - running,
                )
                yield result
        finally:
            for ref in pending:  # interrupted: stop what still runs
                ray.cancel(ref, force=True)
            if connected_here:
                ray.shutdown()

    def _interrupt(self, ray: ModuleType, pending: dict[Any, tuple[Job, float]]) -> int:
        """Cancel the pending jobs (a running one gets a KeyboardInterrupt and saves a
        checkpoint), take back what they return in time; returns how many saved one."""
        for ref in pending:
            ray.cancel(ref)
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=INTERRUPT_WAIT_S)
        saved = 0
        for ref in ready:
            job, submitted = pending.pop(ref)
            with contextlib.suppress(ray.exceptions.RayError):
                saved += self._result(ray, ref, job, submitted).status == "interrupted"
        return saved

    def _place(self, job: Job) -> tuple[Job, bytes | None]:
        """The job as the worker gets it, and the partial run folder it continues (packed)."""
        if self.storage is not None:
            run_dir = check_inside_storage(job.run_dir, self.storage)
            return dataclasses.replace(job, run_dir=str(run_dir)), None
        recover_folder(job.run_dir)
        run_dir = Path(job.run_dir)
        archive = pack_folder(run_dir) if (run_dir / "config.yaml").exists() else None
        return job, archive

    def _slots(self, ray: ModuleType) -> int:
        """About how many jobs run at once: the cluster's CPUs over each job's."""
        cpus = ray.cluster_resources().get("CPU", 0.0)
        return max(1, int(cpus // self.cpus_per_job))

    def _result(self, ray: ModuleType, ref: Any, job: Job, submitted: float) -> JobResult:
        from cfc_rl.experiment.executors import JobResult

        try:
            answer = ray.get(ref)
        except ray.exceptions.RayError as e:  # the worker died more than max_retries times
            error = f"{type(e).__name__}: {e}"
            if isinstance(e, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
                error = f"its worker died {self.max_retries + 1} time(s); last: {error}"
            return JobResult(job, "failed", time.perf_counter() - submitted, error)
        if answer["archive"] is not None:
            install_folder(answer["archive"], job.run_dir)
        if answer["status"] == "interrupted":
            return JobResult(job, "interrupted", answer["seconds"], answer["error"])
        if answer["status"] == "failed":
            error = f"on {answer['host']}:\n{answer['error']}"
            return JobResult(job, "failed", answer["seconds"], error)
        return JobResult(job, "done", answer["seconds"], record=answer["record"])
