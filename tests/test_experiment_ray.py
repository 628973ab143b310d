"""Past one machine: the Ray executor of compare (same numbers as the local one, a killed
worker retried, an interrupted grid resumed, run folders packed back or written to shared
storage, the compiled loops built per node) and the hyperparameter search of ``cfc-rl tune``.

Runs on a Ray started here (2 CPUs, no dashboard) with tiny agents and tasks. Skipped only where
Ray is not installed (``pip install -e ".[ray]"``); CI installs it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cfc_rl.envs import ConfigError
from cfc_rl.experiment import ray_executor
from cfc_rl.experiment.compare import compare, plan_jobs
from cfc_rl.experiment.executors import LocalExecutor
from cfc_rl.experiment.jobs import Job, run_job
from cfc_rl.experiment.ray_executor import (
    RayExecutor,
    RayUnavailable,
    add_executor_arguments,
    executor_from_args,
    scratch_root,
)
from cfc_rl.experiment.runs import RunFolder
from cfc_rl.experiment.settings import load_agent_config
from cfc_rl.experiment.train import resolve, train
from cfc_rl.experiment.tune import (
    SEED_START,
    _search_state,
    add_tune_arguments,
    best_row,
    make_plan,
    read_rows,
    search,
    train_seeds,
    tune_command,
)

ray = pytest.importorskip(
    "ray", reason='Ray is not installed (pip install -e ".[ray]"); CI installs it'
)

ROOT = Path(__file__).resolve().parent.parent
MLP = "algo: ppo\npolicy: MlpPolicy\nhyperparams: {n_steps: 64, batch_size: 64, n_epochs: 1}\n"
CFC = (
    "algo: recurrent_ppo\npolicy: RecurrentCellPolicy\n"
    "hyperparams: {n_steps: 64, batch_size: 64, n_epochs: 1}\n"
    "policy_kwargs: {cell: cfc, hidden_size: 8, backbone_units: 16, net_arch: {pi: [], vf: [8]}}\n"
)


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of its own on this machine for the module, and for the commands it starts (not a
    cluster `ray start` began here); the workers unpickle this module's job wrappers by value
    (they cannot import a test module)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", "local")
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()


pytestmark = pytest.mark.usefixtures("one_thread")


def _files(folder: Path) -> tuple[Path, Path, Path]:
    """A tiny PPO-MLP and a tiny CfC agent beside a copy of the settings, and a 256-step
    CartPole task with an evaluation every 128 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "agents" / "settings", folder / "settings")
    (folder / "mlp.yaml").write_text(MLP)
    (folder / "cfc.yaml").write_text(CFC)
    data = yaml.safe_load((ROOT / "envs" / "cartpole_p.yaml").read_text())
    data["train"] = {**data["train"], "total_timesteps": 256, "n_envs": 2}
    data["eval"] = {"episodes": 2, "every_steps": 128, "deterministic": True}
    (folder / "cartpole_p.yaml").write_text(yaml.safe_dump(data))
    return folder / "mlp.yaml", folder / "cfc.yaml", folder / "cartpole_p.yaml"


# Job wrappers that run on the Ray workers: they note each attempt in a log beside the files.


def _note(log: str, job: Job, what: str) -> None:
    with open(log, "a") as f:
        f.write(
            json.dumps({"seed": job.seed, "pid": os.getpid(), "what": what, "dir": job.run_dir})
        )
        f.write("\n")


def _attempts(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _killed_once(job: Job, log: str, victim: int) -> dict:
    """Seed ``victim``'s first attempt kills its own process at its first evaluation."""
    first = job.seed == victim and not any(a["seed"] == victim for a in _attempts(Path(log)))
    _note(log, job, "start")

    def evaluated(steps: int, mean_return: float) -> None:
        if first:
            os.kill(os.getpid(), signal.SIGKILL)

    return run_job(job, on_evaluation=evaluated)


def _failing_if_marked(job: Job, log: str, markers: str) -> dict:
    """Raises while ``<markers>/fail_seed_<n>`` exists; notes where it trains and what it
    resumes."""
    result = RunFolder(Path(job.run_dir)).read_result()
    _note(log, job, f"resumes {result['num_timesteps']}" if result else "start")
    if (Path(markers) / f"fail_seed_{job.seed}").exists():
        raise RuntimeError("marked to fail")
    return run_job(job)


def _recording(tmp_path: Path, **kwargs) -> RayExecutor:
    """A Ray executor whose jobs note their attempts in ``tmp_path/attempts.jsonl`` and fail
    while ``tmp_path/fail_seed_<n>`` exists."""
    runner = functools.partial(
        _failing_if_marked, log=str(tmp_path / "attempts.jsonl"), markers=str(tmp_path)
    )
    return RayExecutor(runner=runner, **kwargs)


def _finals(results) -> dict[tuple[str, int], float]:
    return {(r.job.agent["name"], r.job.seed): r.record["final_mean_return"] for r in results}


def test_the_ray_executor_gives_the_numbers_of_the_local_one(local_ray, tmp_path, caplog):
    mlp, cfc, task = _files(tmp_path / "files")
    start = time.perf_counter()
    local = list(
        LocalExecutor(1).run(plan_jobs([mlp, cfc], [task], seeds=2, out=tmp_path / "local"))
    )
    local_s = time.perf_counter() - start
    caplog.set_level(logging.INFO, logger="cfc_rl")
    start = time.perf_counter()
    remote, rows = compare(
        [mlp, cfc], [task], seeds=2, out=tmp_path / "ray", executor=RayExecutor()
    )
    ray_s = time.perf_counter() - start
    print(f"2 agents x 1 task x 2 seeds: local {local_s:.1f} s, ray {ray_s:.1f} s (with summary)")
    assert [r.status for r in remote] == ["done"] * 4
    assert len(_finals(remote)) == 4 and _finals(remote) == _finals(local)
    assert {(r["agent"], r["seeds"]) for r in rows} == {("mlp", 2), ("cfc", 2)}
    for result in remote:  # the run folders came back whole, with the same configuration
        run = RunFolder(Path(result.job.run_dir))
        assert run.root.is_relative_to(tmp_path / "ray") and run.is_complete(256)
        assert run.model.exists() and run.evaluations.exists() and run.read_checkpoint()
        twin = RunFolder(tmp_path / "local" / run.root.relative_to(tmp_path / "ray"))
        assert run.read_config()["agent"] == twin.read_config()["agent"]
    assert (tmp_path / "ray" / "summary.md").exists()
    # The CfC's compiled loops were built (or found) on the node before the jobs started.
    built = [r.getMessage() for r in caplog.records if "cfc_cpu" in r.getMessage()]
    assert built and all("ray: node" in line for line in built)


def test_a_killed_worker_is_retried_and_the_comparison_completes(local_ray, tmp_path):
    mlp, _, task = _files(tmp_path / "files")
    log = tmp_path / "attempts.jsonl"
    executor = RayExecutor(
        max_retries=2, runner=functools.partial(_killed_once, log=str(log), victim=1)
    )
    results, rows = compare([mlp], [task], seeds=2, out=tmp_path / "out", executor=executor)
    assert sorted((r.job.seed, r.status) for r in results) == [(0, "done"), (1, "done")]
    assert rows[0]["seeds"] == 2  # the summary holds every run
    attempts = _attempts(log)
    assert [a["seed"] for a in attempts].count(1) == 2  # killed, then retried
    assert [a["seed"] for a in attempts].count(0) == 1
    killed = next(a["pid"] for a in attempts if a["seed"] == 1)
    # the killed attempt's scratch folder was cleared by a later job on the node
    assert not list(scratch_root().glob(f"job-{killed}-*"))


def test_a_killed_worker_beyond_its_retries_is_a_failed_run(local_ray, tmp_path):
    mlp, _, task = _files(tmp_path / "files")
    log = tmp_path / "attempts.jsonl"
    executor = RayExecutor(
        max_retries=0, runner=functools.partial(_killed_once, log=str(log), victim=0)
    )
    results, rows = compare([mlp], [task], seeds=1, out=tmp_path / "out", executor=executor)
    assert [r.status for r in results] == ["failed"]
    assert "worker died 1 time(s)" in results[0].error
    assert rows == []


def test_an_interrupted_comparison_trains_only_what_is_missing(local_ray, tmp_path):
    mlp, _, task = _files(tmp_path / "files")
    out, marker = tmp_path / "out", tmp_path / "fail_seed_1"
    marker.touch()
    first, rows = compare([mlp], [task], seeds=2, out=out, executor=_recording(tmp_path))
    assert {r.job.seed: r.status for r in first} == {0: "done", 1: "failed"}
    assert "marked to fail" in next(r.error for r in first if r.job.seed == 1)
    assert rows[0]["seeds"] == 1  # the summary of what finished
    done_at = (out / "cartpole_p" / "mlp" / "seed_0" / "result.json").stat().st_mtime_ns
    # The same command again: only the missing run trains.
    marker.unlink()
    second, rows = compare([mlp], [task], seeds=2, out=out, executor=_recording(tmp_path))
    assert {r.job.seed: r.status for r in second} == {0: "skipped", 1: "done"}
    assert rows[0]["seeds"] == 2
    assert (out / "cartpole_p" / "mlp" / "seed_0" / "result.json").stat().st_mtime_ns == done_at
    seeds = [a["seed"] for a in _attempts(tmp_path / "attempts.jsonl")]
    assert sorted(seeds) == [0, 1, 1]


def test_without_storage_run_folders_travel_packed_both_ways(local_ray, tmp_path):
    mlp, _, task = _files(tmp_path / "files")
    out = tmp_path / "out"
    compare([mlp], [task], seeds=1, steps=128, out=out)  # a run to continue, on the driver
    results, _ = compare([mlp], [task], seeds=1, steps=256, out=out, executor=_recording(tmp_path))
    assert [r.status for r in results] == ["done"]
    (attempt,) = _attempts(tmp_path / "attempts.jsonl")
    assert attempt["what"] == "resumes 128"  # the partial run went to the worker packed
    worker_dir = Path(attempt["dir"])
    assert not worker_dir.is_relative_to(out) and not worker_dir.exists()  # a scratch folder
    run = RunFolder(out / "cartpole_p" / "mlp" / "seed_0")
    assert run.read_result()["num_timesteps"] >= 256 and run.read_result()["total_timesteps"] == 256
    assert run.model.exists() and (run.root / "progress.csv").exists() and run.monitor.is_dir()
    assert not list(run.root.parent.glob(".seed_0.*"))  # nothing left of the copy


def test_with_storage_workers_write_the_run_folders_in_place(local_ray, tmp_path):
    mlp, _, task = _files(tmp_path / "files")
    shared, log = tmp_path / "shared", tmp_path / "attempts.jsonl"
    outside = _recording(tmp_path, storage=shared)
    with pytest.raises(ConfigError, match="is not inside --storage"):
        compare([mlp], [task], seeds=1, out=tmp_path / "elsewhere", executor=outside)
    assert not log.exists()  # nothing started
    out = shared / "compare"
    executor = _recording(tmp_path, storage=shared)
    results, rows = compare([mlp], [task], seeds=1, out=out, executor=executor)
    assert [r.status for r in results] == ["done"] and rows[0]["seeds"] == 1
    (attempt,) = _attempts(log)
    assert Path(attempt["dir"]) == (out / "cartpole_p" / "mlp" / "seed_0").resolve()


def test_the_executor_options(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(tmp_path / "out"))
    parser.add_argument("-j", "--jobs", type=int, default=2)
    add_executor_arguments(parser)
    args = parser.parse_args([])
    assert (args.executor, args.address, args.cpus_per_job, args.max_retries, args.storage) == (
        "local",
        None,
        1.0,
        2,
        None,
    )
    local = executor_from_args(args)
    assert isinstance(local, LocalExecutor) and local.jobs == 2
    args = parser.parse_args(
        ["--executor", "ray", "--address", "auto", "--cpus-per-job", "2", "--max-retries", "5"]
    )
    executor = executor_from_args(args)
    assert isinstance(executor, RayExecutor)
    assert (executor.address, executor.cpus_per_job, executor.max_retries) == ("auto", 2.0, 5)
    with pytest.raises(ConfigError, match="--address is an option of the Ray executor"):
        executor_from_args(parser.parse_args(["--address", "auto"]))
    with pytest.raises(ConfigError, match="--max-retries must be 0 or more"):
        executor_from_args(parser.parse_args(["--executor", "ray", "--max-retries", "-1"]))
    with pytest.raises(ConfigError, match="is not inside --storage"):
        executor_from_args(
            parser.parse_args(["--executor", "ray", "--storage", str(tmp_path / "s")])
        )


def test_without_ray_the_ray_executor_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    parser = argparse.ArgumentParser()
    add_executor_arguments(parser)
    with pytest.raises(RayUnavailable) as error:
        executor_from_args(parser.parse_args(["--executor", "ray"]))
    message = str(error.value)
    assert 'pip install -e ".[ray]"' in message and "\n" not in message
    assert isinstance(error.value, ConfigError)  # cfc-rl prints it as one line, exit code 2
    mlp, _, task = _files(tmp_path / "files")
    space = tmp_path / "space.yaml"
    space.write_text("hyperparams.learning_rate: {loguniform: [1.0e-4, 1.0e-3]}\n")
    with pytest.raises(RayUnavailable, match=r'pip install -e "\.\[ray\]"'):
        search(mlp, task, space, trials=1, out=tmp_path / "tune")
    # and both modules import without it
    code = (
        "import sys; sys.modules['ray'] = None; "
        "import cfc_rl.experiment.ray_executor, cfc_rl.experiment.tune"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_node_builds_the_loops_of_the_grids_cells(local_ray):
    from cfc_rl.nn import cpu_extensions

    if not cpu_extensions.enabled():
        pytest.skip(f"switched off with {cpu_extensions.ENV_SWITCH}=0")
    answers = ray_executor.build_on_nodes(["cfc_cpu"])
    assert len(answers) == len(ray_executor.alive_nodes(ray))
    for answer in answers.values():
        assert answer["error"] == "" and [r[0] for r in answer["reports"]] == ["cfc_cpu"]
    agent = yaml.safe_load(CFC) | {"name": "cfc"}
    assert ray_executor.extensions_for([agent, {"name": "mlp", **yaml.safe_load(MLP)}]) == [
        "cfc_cpu"
    ]


# cfc-rl tune


def test_the_seeds_of_a_trial_report_the_mean_of_each_evaluation(tmp_path):
    mlp, _, task = _files(tmp_path / "files")
    agent, task_cfg = resolve(mlp, task)
    jobs = [Job.create(agent, task_cfg, s, tmp_path / f"seed_{s}") for s in (1000, 1001)]
    reports = []
    final = train_seeds(jobs, reports.append, budget=256)
    alone = [
        RunFolder(tmp_path / f"seed_{s}").read_result()["final_mean_return"] for s in (1000, 1001)
    ]
    assert final["final"] and final["score"] == pytest.approx(sum(alone) / 2)
    assert final["steps"] >= 256
    (report,) = reports  # the evaluation at 128 (the one at the budget is the final score)
    evaluations = []
    for s in (1000, 1001):
        with open(tmp_path / f"seed_{s}" / "evaluations.csv") as f:
            evaluations.append(float(f.read().splitlines()[1].split(",")[1]))
    assert report == {"score": pytest.approx(sum(evaluations) / 2), "steps": 128, "final": False}


def test_tune_writes_the_best_agent_file_the_table_and_the_plot(local_ray, tmp_path, capsys):
    mlp, _, task = _files(tmp_path / "files")
    space = tmp_path / "space.yaml"
    space.write_text(
        textwrap.dedent(
            """\
            hyperparams.learning_rate: {loguniform: [1.0e-4, 3.0e-3]}
            hyperparams.n_epochs: {randint: [1, 3]}
            policy_kwargs.net_arch: {choice: [[16], [32, 32]]}
            """
        )
    )
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    out = tmp_path / "tune"
    args = parser.parse_args(
        ["--agent", str(mlp), "--task", str(task), "--space", str(space), "--trials", "4",
         "--seeds", "1", "--out", str(out), "--executor", "ray"]
    )  # fmt: skip
    ctrl_c = signal.getsignal(signal.SIGINT)
    assert tune_command(args, parser) == 0
    # Ray Tune's own Ctrl-C handler is gone: a Ctrl-C after the search stops what comes next
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    printed = capsys.readouterr().out
    assert "| trial |" in printed and "train it with: cfc-rl train --agent" in printed
    for name in ("trials.csv", "trials.md", "scores.png", "mlp_tuned_cartpole_p.yaml"):
        assert (out / name).stat().st_size > 0, name
    plan = make_plan(mlp, task, space)
    rows = read_rows(out / "trials.csv", plan)
    assert [r["trial"] for r in rows] == [0, 1, 2, 3, 4]
    assert {r["status"] for r in rows} <= {"complete", "pruned"}
    # trial 0: the agent as it is (the settings' learning rate, its own n_epochs, the policy's
    # default net_arch), trained in full
    as_is, _ = resolve(mlp, task)
    assert rows[0]["status"] == "complete" and rows[0]["steps"] >= 256
    assert rows[0]["hyperparams.learning_rate"] == as_is.hyperparams["learning_rate"]
    assert rows[0]["hyperparams.n_epochs"] == 1 and rows[0]["policy_kwargs.net_arch"] is None
    complete = [r for r in rows if r["status"] == "complete"]
    assert all(r["steps"] >= 256 for r in complete)
    best = best_row(rows)
    assert best["score"] == max(r["score"] for r in complete)
    markdown = (out / "trials.md").read_text()
    assert "(best)" in markdown and "| 0 (before the search)" in markdown
    # The written agent file holds the best trial's values and trains with cfc-rl train.
    written = out / "mlp_tuned_cartpole_p.yaml"
    agent, _ = resolve(load_agent_config(written), task)
    chosen, _ = plan.resolve({k: v for k, v in best.items() if k in plan.space.keys and v})
    assert agent.hyperparams == chosen.hyperparams and agent.policy_kwargs == chosen.policy_kwargs
    assert agent.hyperparams["gamma"] == 0.98  # the settings still apply (the copy beside it)
    run = train(written, task, steps=128, out=tmp_path / "runs")
    assert run.is_complete(128)
    assert yaml.safe_load(written.read_text())["overrides"]["cfc_rl/CartPole-P-v1"]
    # --executor ray without --storage: the trials trained in scratch folders of the workers
    assert not (out / "trials").exists() and f"({SEED_START}..{SEED_START})" in printed


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("hyperparams.learning_rat: {loguniform: [1.0e-4, 1.0e-3]}", "unknown key"),
        ("policy_kwargs.net_arch: {choice: [[16], [0]]}", r"policy_kwargs.net_arch: \[0\]"),
        ("hyperparams.learning_rate: {loguniform: [1.0e-3, 1.0e-4]}", "is empty"),
        ("hyperparams.n_epochs: {randint: [4, 4]}", "is empty"),
        ("hyperparams.n_steps: {choice: []}", "choices is empty"),
        ("hyperparams.n_steps: {uniform: [32, 64]}", "must be an integer"),
        ("hyperparams.n_steps: {between: [32, 64]}", "unknown kind 'between'"),
        ("hyperparams.a.b: {choice: [1]}", "is not a path into an agent file"),
    ],
)
def test_bad_input_to_tune_is_an_error_before_any_trial(tmp_path, space, message):
    mlp, _, task = _files(tmp_path / "files")
    (tmp_path / "space.yaml").write_text(space + "\n")
    with pytest.raises(ConfigError, match=message):
        search(mlp, task, tmp_path / "space.yaml", trials=2, out=tmp_path / "tune")
    assert not (tmp_path / "tune").exists()  # nothing started


def test_tune_rejects_an_agent_that_cannot_run_the_task(tmp_path):
    _, _, task = _files(tmp_path / "files")
    space = tmp_path / "space.yaml"
    space.write_text("hyperparams.learning_rate: {loguniform: [1.0e-4, 1.0e-3]}\n")
    with pytest.raises(ConfigError, match="needs continuous actions"):
        make_plan(ROOT / "agents" / "sac_mlp.yaml", task, space)


def test_a_search_can_evaluate_its_trials_at_an_interval_of_its_own(tmp_path):
    mlp, _, task = _files(tmp_path / "files")
    space = tmp_path / "space.yaml"
    space.write_text("hyperparams.learning_rate: {loguniform: [1.0e-4, 1.0e-3]}\n")
    default = make_plan(mlp, task, space, steps=256)
    plan = make_plan(mlp, task, space, steps=256, eval_every=32)
    assert plan.resolve({})[1].eval.every_steps == 32
    assert default.resolve({})[1].eval.every_steps == 128
    # a search left unfinished at the other interval is not resumed by this one
    assert _search_state(plan, 4, 0, None, False) != _search_state(default, 4, 0, None, False)


def test_the_example_spaces_fit_their_agents_and_have_the_same_size():
    shapes = {}
    for family, agent in [("cfc", "ppo_cfc"), ("ltc", "ppo_ltc"), ("lstm", "ppo_lstm"),
                          ("gru", "ppo_lstm_cell"), ("gru", "ppo_gru"), ("ctrnn", "ppo_ctrnn"),
                          ("framestack", "ppo_framestack"), ("mlp", "ppo_mlp")]:  # fmt: skip
        plan = make_plan(
            ROOT / "agents" / f"{agent}.yaml",
            ROOT / "envs" / "pendulum_p.yaml",
            ROOT / "agents" / "spaces" / f"{family}.yaml",
        )
        shapes[agent] = [(d.kind, len(d.corners())) for d in plan.space.dimensions]
    assert len({tuple(shape) for shape in shapes.values()}) == 1, shapes
    # every agent of the benchmark's PPO family has a space
    assert len(shapes) == 8


def test_the_sac_spaces_fit_their_agents_and_have_the_same_size():
    shapes = {}
    pairs = [("sac_mlp", "sac_mlp"), ("sac_window", "sac_cfc")] + [
        ("sac_recurrent", f"sac_rec_{cell}") for cell in ("cfc", "ltc", "lstm", "gru")
    ]
    for family, agent in pairs:
        plan = make_plan(
            ROOT / "agents" / f"{agent}.yaml",
            ROOT / "envs" / "pendulum_p.yaml",
            ROOT / "agents" / "spaces" / f"{family}.yaml",
            steps=50_000,
        )
        shapes[agent] = [(d.kind, len(d.corners())) for d in plan.space.dimensions]
    assert len({tuple(shape) for shape in shapes.values()}) == 1, shapes


def test_benchmark_tune_searches_once_and_writes_the_choice_into_the_agent_file(
    local_ray, tmp_path
):
    from cfc_rl.experiment.benchmark import load_grid, select, tune_cells

    mlp, _, task = _files(tmp_path / "files")
    space = tmp_path / "space.yaml"
    space.write_text(
        "hyperparams.learning_rate: {loguniform: [1.0e-4, 3.0e-3]}\n"
        "policy_kwargs.net_arch: {choice: [[16], [32, 32]]}\n"
    )
    grid_file = tmp_path / "study" / "grid.yaml"
    grid_file.parent.mkdir()
    tasks = [{"task": str(task), "steps": 256, "agents": [str(mlp)]}]
    tier = {"seeds": 1, "zero": "mlp", "tasks": tasks}
    tuning = {"trials": 2, "seeds": 1, "spaces": {"mlp": str(space)}}
    grid_file.write_text(yaml.safe_dump({"tuning": tuning, "tiers": {"tiny": tier}}))
    grid = load_grid(grid_file)
    done = []
    tune_cells(grid, select(grid), on_done=lambda *a: done.append(a), executor="ray")
    assert done == [("cartpole_p", "mlp", f"searched; {mlp}: overrides.cartpole_p written")]
    search = grid.searches / "cartpole_p" / "mlp"
    with open(search / "trials.csv") as f:
        assert [row["trial"] for row in csv.DictReader(f)] == ["0", "1", "2"]
    chosen = yaml.safe_load((search / "mlp_tuned_cartpole_p.yaml").read_text())["overrides"]
    assert yaml.safe_load(mlp.read_text())["overrides"] == {
        "cartpole_p": next(iter(chosen.values()))
    }
    agent, _ = resolve(load_agent_config(mlp), task)
    assert (
        agent.hyperparams["learning_rate"]
        == next(iter(chosen.values()))["hyperparams"]["learning_rate"]
    )
    # searched cells are not searched again
    before = mlp.read_text()
    done.clear()
    tune_cells(grid, select(grid), on_done=lambda *a: done.append(a), executor="ray")
    assert done == [("cartpole_p", "mlp", f"searched before; {mlp} has its values")]
    assert mlp.read_text() == before
    # A search written before searches had trial 0 gets it, without its sampled trials again;
    # here they scored too low to keep: trial 0 (the agent before the search, not with the
    # values adopted since) becomes the choice, and the agent file takes it in place of theirs
    # (unless trial 0 was the choice already).
    plan = make_plan(mlp, task, space, steps=256, before_search=True)
    first_choice = best_row(read_rows(search / "trials.csv", plan))["trial"]
    with open(search / "trials.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, old = reader.fieldnames, [r for r in reader if r["trial"] != "0"]
    with open(search / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({**r, "score": "-1000000.0"} for r in old)
    assert not grid.searched("cartpole_p", "mlp")
    done.clear()
    tune_cells(grid, select(grid), on_done=lambda *a: done.append(a), executor="ray")
    adopted = f"{mlp}: overrides.cartpole_p written again"
    if first_choice == 0:
        adopted = f"{mlp} has its values"
    assert done == [("cartpole_p", "mlp", f"trial 0 added to its search; {adopted}")]
    rows = read_rows(search / "trials.csv", plan)
    assert [r["trial"] for r in rows] == [0, 1, 2] and best_row(rows)["trial"] == 0
    assert [r["trial_id"] for r in rows[1:]] == [r["trial_id"] for r in old]
    as_was = plan.reference_values()
    assert as_was["policy_kwargs.net_arch"] is None  # left to the default: not written
    assert yaml.safe_load(mlp.read_text())["overrides"] == {
        "cartpole_p": {"hyperparams": {"learning_rate": as_was["hyperparams.learning_rate"]}}
    }
    assert grid.searched("cartpole_p", "mlp")


def test_a_sampled_trial_replaces_trial_0_only_by_scoring_higher():
    def row(trial, score, status="complete"):
        return {"trial": trial, "score": score, "status": status}

    assert best_row([row(0, 500.0), row(1, 500.0), row(2, 499.0)])["trial"] == 0
    assert best_row([row(0, 499.0), row(1, 500.0), row(2, 500.0)])["trial"] == 1
    assert best_row([row(0, 10.0), row(1, 900.0, "pruned"), row(2, None, "error")])["trial"] == 0
    assert best_row([row(1, 900.0, "pruned")]) is None


def test_trial_0_alone_needs_a_search_of_the_space_without_it(tmp_path):
    mlp, _, task = _files(tmp_path / "files")
    space = tmp_path / "space.yaml"
    space.write_text("hyperparams.learning_rate: {loguniform: [1.0e-4, 1.0e-3]}\n")
    out = tmp_path / "tune"
    with pytest.raises(ConfigError, match=r"no trials\.csv"):
        search(mlp, task, space, out=out, only_trial_0=True)
    assert not out.exists()
    out.mkdir()
    header = "trial,hyperparams.learning_rate,score,steps,status,trial_id,error\n"
    (out / "trials.csv").write_text(header + "0,0.001,10.0,256,complete,a,\n")
    with pytest.raises(ConfigError, match="already has trial 0"):
        search(mlp, task, space, out=out, only_trial_0=True)
    (out / "trials.csv").write_text(header.replace("learning_rate", "n_epochs") + "1,2,1,1,x,b,\n")
    with pytest.raises(ConfigError, match="are not those of a search of"):
        search(mlp, task, space, out=out, only_trial_0=True)
    assert sorted(p.name for p in out.iterdir()) == ["trials.csv"]  # nothing else written


def test_a_stopped_search_resumes_with_the_trials_it_finished(local_ray, tmp_path):
    mlp, _, task = _files(tmp_path / "files")
    space = tmp_path / "space.yaml"
    space.write_text("hyperparams.learning_rate: {loguniform: [1.0e-4, 3.0e-3]}\n")
    out = tmp_path / "tune"
    options = ["--trials", "6", "--seeds", "1", "--steps", "2048", "--out", str(out)]
    argv = ["tune", "--agent", str(mlp), "--task", str(task), "--space", str(space), *options]
    # Ctrl-C to the whole command (its Ray and trials too) once trial 0 is complete; it trains
    # beside the first sampled trial, so others are still to come
    command = subprocess.Popen(
        [sys.executable, "-m", "cfc_rl.experiment.cli", *argv],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    trained_trial_0 = None
    while trained_trial_0 is None:
        assert command.poll() is None and time.monotonic() < deadline, command.communicate()
        time.sleep(0.2)
        trained_trial_0 = next(_trial_0_runs(out), None)
    os.killpg(command.pid, signal.SIGINT)
    _, err = command.communicate(timeout=120)
    assert command.returncode == 130, err
    assert f"search stopped: {out} keeps its finished trials" in err
    assert f"continue with: cfc-rl {' '.join(argv)}" in err
    assert (out / "search_state.yaml").exists() and not (out / "trials.csv").exists()
    trial_0 = trained_trial_0.parent.parent
    trained = trained_trial_0.stat().st_mtime_ns

    # The same search resumes: trial 0 keeps its result (not trained again), the sampled trials
    # (those that began before Ctrl-C among them) are numbered 1 to 6, and the folder is left as
    # a complete one.
    outcome = search(mlp, task, space, trials=6, seeds=1, steps=2048, out=out)
    assert [(r["trial"], r["status"] != "error") for r in outcome.rows] == [
        (n, True) for n in range(7)
    ]
    assert outcome.rows[0]["trial_id"] == trial_0.name
    assert trained_trial_0.stat().st_mtime_ns == trained
    started = (out / "ray_results" / "mlp_cartpole_p").glob("run_trial_*")
    assert sorted(r["trial_id"] for r in outcome.rows) == sorted(
        d.name.split("_")[2] for d in started
    )
    assert not (out / "search_state.yaml").exists() and not (out / "trial_order.txt").exists()

    # Any other search in the folder starts afresh, trial 0 included.
    outcome = search(mlp, task, space, trials=1, seeds=1, steps=2048, out=out)
    assert [r["trial"] for r in outcome.rows] == [0, 1]
    assert outcome.rows[0]["trial_id"] != trial_0.name
    assert len(list((out / "ray_results" / "mlp_cartpole_p").glob("run_trial_*"))) == 2


def _trial_0_runs(out: Path):
    """The result.json of trial 0's run, once it is complete (its params.json says trial 0)."""
    for params in (out / "ray_results" / "mlp_cartpole_p").glob("run_trial_*/params.json"):
        if json.loads(params.read_text()).get("reference"):
            trial_id = params.parent.name.split("_")[2]
            yield from (out / "trials" / trial_id / "seed_1000").glob("result.json")


def test_a_trial_asha_stopped_reaches_tpe_as_pruned_not_scored_early():
    import optuna
    from ray import tune as ray_tune
    from ray.tune.search.optuna import OptunaSearch

    from cfc_rl.experiment.tune import REFERENCE, _trial_0_first

    tpe = OptunaSearch(
        space={"x": ray_tune.uniform(0.0, 1.0)},
        metric="score",
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    searcher = _trial_0_first({REFERENCE: True, "x": None}, tpe)
    for trial_id in ("trial 0", "complete", "stopped at a rung", "failed"):
        searcher.suggest(trial_id)
    searcher.on_trial_complete("complete", {"score": 5.0, "steps": 100, "final": True})
    searcher.on_trial_complete("stopped at a rung", {"score": 9.0, "steps": 10, "final": False})
    searcher.on_trial_complete("failed", None, error=True)
    State = optuna.trial.TrialState
    assert [(t.state, t.value) for t in tpe._ot_study.trials] == [
        (State.COMPLETE, 5.0),
        (State.PRUNED, None),
        (State.FAIL, None),
    ]


def test_trial_0_is_suggested_first_and_neither_tpe_nor_asha_sees_it():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from cfc_rl.experiment.tune import REFERENCE, _asha_without_trial_0, _trial_0_first

    class Recording:
        def __init__(self):
            self.completed = []

        def suggest(self, trial_id):
            return {"x": 0.5}

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.completed.append(trial_id)

        def on_trial_result(self, trial_id, result):
            self.completed.append(f"result of {trial_id}")

    inner = Recording()
    searcher = _trial_0_first({REFERENCE: True, "x": None}, inner)
    assert searcher.suggest("a") == {REFERENCE: True, "x": None}
    assert searcher.suggest("b") == {"x": 0.5}
    for trial_id in ("a", "b"):
        searcher.on_trial_result(trial_id, {"score": 1.0})
        searcher.on_trial_complete(trial_id, {"score": 1.0, "final": True})
    assert inner.completed == ["result of b", "b"]
    # stopped and resumed, it does not suggest trial 0 again
    again = _trial_0_first({REFERENCE: True, "x": None}, inner)
    again.set_state(searcher.get_state())
    assert again.suggest("c") == {"x": 0.5}

    asha = _asha_without_trial_0(time_attr="steps", max_t=100, grace_period=10, reduction_factor=3)
    asha.set_search_properties("score", "max")
    trial_0 = SimpleNamespace(config={REFERENCE: True, "x": None}, trial_id="a")
    sampled = [SimpleNamespace(config={"x": 0.1 * n}, trial_id=f"s{n}") for n in range(3)]
    asha.on_trial_add(None, trial_0)
    for trial in sampled:
        asha.on_trial_add(None, trial)
    # at its first rung, ASHA stops a sampled trial that is behind; trial 0 never, even at
    # max_t and far behind, and its results do not move the rungs
    for steps in (10, 100):
        assert asha.on_trial_result(None, trial_0, {"steps": steps, "score": -1e9}) == (
            TrialScheduler.CONTINUE
        )
    decisions = [
        asha.on_trial_result(None, trial, {"steps": 10, "score": score})
        for trial, score in zip(sampled, (3.0, 2.0, 1.0), strict=True)
    ]
    assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.STOP]
    asha.on_trial_complete(None, trial_0, {"steps": 100, "score": -1e9})
    asha.on_trial_remove(None, trial_0)


def test_asha_keeps_its_rungs_when_a_stopped_search_resumes(local_ray, tmp_path, monkeypatch):
    from ray import tune as ray_tune

    from cfc_rl.experiment.tune import METRIC, TIME_ATTR, _asha_without_trial_0, _saved_rungs

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")  # Ray saves its state at every step
    interrupted = tmp_path / "interrupted"

    def trainable(config):
        for step in (1, 3, 9):
            ray_tune.report({METRIC: config["x"], TIME_ATTR: step})

    class CtrlCAfterTwo(ray_tune.Callback):
        """Ctrl-C in the driver once two trials are complete (only the first time)."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            if not interrupted.exists() and sum(t.status == "TERMINATED" for t in trials) >= 2:
                interrupted.touch()
                raise KeyboardInterrupt

    # one trial at a time, in order: x = 1 and 2 pass the rungs (at 1 and 3 steps); after the
    # resume x = 0.5 is below them at the first rung, and stops there
    scheduler = _asha_without_trial_0(
        time_attr=TIME_ATTR, max_t=9, grace_period=1, reduction_factor=3
    )
    tuner = ray_tune.Tuner(
        trainable,
        param_space={"x": ray_tune.grid_search([1.0, 2.0, 0.5])},
        tune_config=ray_tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, max_concurrent_trials=1
        ),
        run_config=ray_tune.RunConfig(
            name="search",
            storage_path=str(tmp_path),
            callbacks=[CtrlCAfterTwo(), _saved_rungs(scheduler)],
            verbose=0,
        ),
    )
    with pytest.raises(KeyboardInterrupt):
        tuner.fit()
    restored = ray_tune.Tuner.restore(
        str(tmp_path / "search"), trainable=trainable, resume_unfinished=True
    )
    steps = {r.config["x"]: r.metrics[TIME_ATTR] for r in restored.fit()}
    assert steps == {1.0: 9, 2.0: 9, 0.5: 1}


def test_a_search_resumes_whatever_the_agent_file_says_of_other_tasks(tmp_path, caplog):
    from cfc_rl.experiment.tune import SEARCH_STATE, _start_or_resume

    mlp, _, task = _files(tmp_path / "files")
    space = tmp_path / "space.yaml"
    space.write_text("hyperparams.learning_rate: {loguniform: [1.0e-4, 3.0e-3]}\n")
    out = tmp_path / "tune"
    out.mkdir()

    def begun() -> bool:
        plan = make_plan(mlp, task, space, check_model=False)
        return _start_or_resume(plan, out, 4, 0, None, False)

    assert not begun() and (out / SEARCH_STATE).exists()
    # another task's search adopted its values into the agent file: this one still resumes
    other = "overrides:\n  pendulum_p:\n    hyperparams: {learning_rate: 0.002}\n"
    mlp.write_text(MLP + other)
    assert begun()
    # a change of what it trains on its own task starts it afresh, and says what differs
    mlp.write_text(MLP.replace("n_epochs: 1", "n_epochs: 2") + other)
    with caplog.at_level(logging.WARNING, logger="cfc_rl"):
        assert not begun()
    assert (
        f"{out} holds an unfinished search of other settings (what differs: agent)" in caplog.text
    )
    assert begun()
