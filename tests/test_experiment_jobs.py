"""Jobs as plain data, the executors that run them, and the command line's structure."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import yaml

from cfc_rl.experiment import cli
from cfc_rl.experiment.algorithms import ALGORITHMS, algorithm
from cfc_rl.experiment.compare import plan_jobs, run_jobs
from cfc_rl.experiment.executors import LocalExecutor
from cfc_rl.experiment.jobs import Job, run_job, stale_runs
from cfc_rl.experiment.runs import RunError, RunFolder
from cfc_rl.nn import cpu_extensions

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _files(folder: Path) -> tuple[Path, Path]:
    """A tiny PPO-MLP agent beside a copy of the settings, and a 256-step CartPole task."""
    shutil.copytree(ROOT / "agents" / "settings", folder / "settings")
    agent = folder / "mlp.yaml"
    agent.write_text("algo: ppo\npolicy: MlpPolicy\nhyperparams: {n_steps: 64, n_epochs: 1}\n")
    task = folder / "cartpole_p.yaml"
    data = yaml.safe_load((ROOT / "envs" / "cartpole_p.yaml").read_text())
    data["train"] = {**data["train"], "total_timesteps": 256, "n_envs": 2}
    data["eval"] = {"episodes": 2, "every_steps": 128, "deterministic": True}
    task.write_text(yaml.safe_dump(data))
    return agent, task


def test_a_job_is_plain_data_and_runs_without_the_files_it_came_from(tmp_path: Path) -> None:
    agent, task = _files(tmp_path / "files")
    jobs = plan_jobs([agent], [task], seeds=2, out=tmp_path / "out")
    assert [job.name for job in jobs] == ["cartpole_p/mlp/seed_0", "cartpole_p/mlp/seed_1"]
    job = jobs[1]
    assert pickle.loads(pickle.dumps(job)) == job
    json.dumps([job.agent, job.task])  # nothing but plain data
    assert job.agent["hyperparams"]["n_steps"] == 64  # the agent's own value over the settings
    assert job.agent["hyperparams"]["gamma"] == 0.98  # CartPole's settings, resolved here
    shutil.rmtree(tmp_path / "files")  # a cluster worker does not have them

    record = run_job(job)
    run = RunFolder(Path(job.run_dir))
    assert record == run.read_result() and record["seed"] == 1
    assert record["num_timesteps"] >= 256 and job.is_complete()
    assert run.read_config()["agent"]["hyperparams"] == job.agent["hyperparams"]


def test_a_run_started_with_other_settings_is_neither_skipped_nor_continued(
    tmp_path: Path,
) -> None:
    agent, task = _files(tmp_path)
    job = plan_jobs([agent], [task], seeds=1, out=tmp_path / "out")[0]
    run_job(job)
    run = RunFolder(Path(job.run_dir))
    run.result.unlink()  # a partial run, as one stopped between two checkpoints
    files = {p: p.stat().st_mtime_ns for p in run.root.rglob("*")}
    agent.write_text(agent.read_text().replace("n_epochs: 1", "n_epochs: 2"))
    changed = plan_jobs([agent], [task], seeds=1, out=tmp_path / "out")[0]
    difference = "agent.hyperparams.n_epochs was 1, is now 2"
    assert stale_runs([changed]) == [f"{changed.run_dir}: {difference}"]
    with pytest.raises(
        RunError, match=rf"^1 run\(s\) were started with other settings.*{difference}"
    ):
        run_jobs([changed])
    with pytest.raises(
        RunError, match=rf"^1 run\(s\) were started with other settings.*{difference}"
    ):
        run_job(changed)
    assert {p: p.stat().st_mtime_ns for p in run.root.rglob("*")} == files

    # A new budget is the same run, continued to it.
    agent.write_text(agent.read_text().replace("n_epochs: 2", "n_epochs: 1"))
    longer = plan_jobs([agent], [task], seeds=1, steps=512, out=tmp_path / "out")[0]
    assert stale_runs([longer]) == []
    [result] = run_jobs([longer])
    assert result.status == "done" and result.record["num_timesteps"] >= 512


def test_the_local_executor_reports_a_failing_job_and_runs_the_others(tmp_path: Path) -> None:
    agent, task = _files(tmp_path)
    good = plan_jobs([agent], [task], seeds=1, out=tmp_path / "out")[0]
    broken_task = {**good.task, "id": "cfc_rl/CartPole-P-v1", "wrappers": {"flicker": 7.0}}
    bad = Job(good.agent, broken_task, 5, str(tmp_path / "bad"))
    results = {r.job.seed: r for r in LocalExecutor(1).run([bad, good])}
    assert results[5].status == "failed" and "flicker" in results[5].error
    assert results[0].status == "done" and results[0].record["num_timesteps"] >= 256


def test_the_algorithm_registry_resolves_policies_and_checks_actions() -> None:
    from gymnasium import spaces

    from cfc_rl.sb3 import RecurrentCellPolicy

    assert set(ALGORITHMS) == {"ppo", "recurrent_ppo", "sac", "recurrent_sac"}
    assert algorithm("recurrent_ppo").cls.__name__ == "RecurrentPPO"
    assert algorithm("sac").off_policy and not algorithm("ppo").off_policy
    assert algorithm("recurrent_sac").off_policy and algorithm("recurrent_sac").continuous_only
    # the policies that run a cell of cfc_rl.nn, by their constructor's `cell`
    assert algorithm("recurrent_sac").takes_cell("MlpPolicy")
    assert algorithm("recurrent_ppo").takes_cell("RecurrentCellPolicy")
    assert not algorithm("recurrent_ppo").takes_cell("MlpLstmPolicy")
    assert not algorithm("sac").takes_cell("MlpPolicy")
    box = spaces.Box(-1, 1, (2,))
    assert algorithm("recurrent_ppo").policy_for("RecurrentCellPolicy", box) is RecurrentCellPolicy
    assert algorithm("ppo").policy_for("MlpPolicy", spaces.Dict({"obs": box})) == (
        "MultiInputPolicy"
    )
    with pytest.raises(ValueError, match="needs continuous actions"):
        algorithm("sac").check_action_space(spaces.Discrete(2), "sac_mlp")
    with pytest.raises(ValueError, match="unknown algorithm 'dqn'; known: ppo"):
        algorithm("dqn")


def test_the_command_line_has_one_subcommand_per_step(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "compare", "bench", "build"):
        assert command in out
    with pytest.raises(SystemExit) as failed:
        cli.main(["trian"])
    assert failed.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.skipif(not cpu_extensions.enabled(), reason="the compiled loops are switched off")
def test_the_build_command_reports_each_extension_and_where_it_is(capsys) -> None:
    assert cli.main(["build"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == list(cpu_extensions.EXTENSIONS)
    for line in lines:
        assert str(cpu_extensions.cache_dir()) in line
    assert cli.main(["build", "cfc_cpu"]) == 0
    assert "cfc_cpu: already built" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["build", "nope"])
    assert "unknown extension(s) nope" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("agent", "built"),
    [("ppo_cfc", ["cfc_cpu"]), ("ppo_ltc", ["ltc_cpu"]), ("sac_cfc", ["cfc_cpu"]), ("ppo_mlp", [])],
)
def test_training_builds_the_loops_of_its_cells_before_its_clock(
    agent: str, built: list[str], monkeypatch
) -> None:
    from cfc_rl.experiment.train import compile_cells, resolve

    loaded = []
    monkeypatch.setattr(cpu_extensions, "load", loaded.append)
    task = "pendulum_p" if agent.startswith("sac") else "cartpole_p"
    compile_cells(resolve(ROOT / "agents" / f"{agent}.yaml", ROOT / "envs" / f"{task}.yaml")[0])
    assert loaded == built
