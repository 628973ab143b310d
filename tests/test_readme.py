"""The README as a user reads it: its first two commands, every Python snippet (run as written,
at reduced budgets where training would take minutes), every ``cfc-rl`` command line (parsed),
and the learning check, which runs the RecurrentPPO snippet itself."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from cfc_rl.experiment import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)
PYTHON = [code for language, code in BLOCKS if language == "python"]
RECURRENT_PPO = next(code for code in PYTHON if "RecurrentPPO(RecurrentCellPolicy" in code)
# Training budgets in the snippets -> what a test affords; the rest runs as written.
REDUCED = {
    "model.learn(50_000)": "model.learn(512)",
    ".learn(10_000)": ".learn(300)",
    "model.learn(1_000)": "model.learn(300)",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_readme_opens_with_the_two_commands() -> None:
    language, code = BLOCKS[0]
    lines = code.strip().splitlines()
    assert language == "bash" and len(lines) == 2
    assert "cfc-rl train" in lines[0] and "cfc-rl evaluate" in lines[0]
    assert lines[1].startswith("pip install") and "pytest" in lines[1]


@pytest.mark.parametrize("index", range(len(PYTHON)), ids=lambda i: f"snippet{i}")
def test_every_python_snippet_runs(index: int, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # the paths are the repo's
    code = PYTHON[index]
    for full, reduced in REDUCED.items():
        code = code.replace(full, reduced)
    exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})


def test_every_command_line_parses() -> None:
    commands = []
    for language, code in BLOCKS:
        if language != "bash":
            continue
        for line in code.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                if part.startswith("cfc-rl "):
                    commands.append(shlex.split(part)[1:])
    assert len(commands) >= 10
    parser = cli._parser()
    for argv in commands:
        args, extra = parser.parse_known_args(argv)
        assert not extra or args.command == "bench", argv


@pytest.mark.slow
def test_the_recurrent_ppo_snippet_learns() -> None:
    """The README's claim: a mean return of at least 450 over 20 evaluation episodes on
    CartPole-P within 50k steps (sb3-contrib's bar for its LSTM policy)."""
    eval_env = VecNormalize(
        make_vec_env("cfc_rl/CartPole-P-v1", n_envs=4, seed=101), training=False, norm_reward=False
    )
    evaluation = EvalCallback(
        eval_env,
        n_eval_episodes=20,
        eval_freq=5000 // 8,
        callback_on_new_best=StopTrainingOnRewardThreshold(reward_threshold=450),
    )
    code = RECURRENT_PPO.replace("model.learn(50_000)", "model.learn(50_000, callback=evaluation)")
    assert code != RECURRENT_PPO
    namespace = {"evaluation": evaluation}
    exec(compile(code, "README.md RecurrentPPO snippet", "exec"), namespace)
    assert evaluation.best_mean_reward >= 450, (
        f"best mean return {evaluation.best_mean_reward:.1f} after "
        f"{namespace['model'].num_timesteps} steps"
    )
