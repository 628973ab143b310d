"""Learning check: RecurrentPPO with the CfC policy solves CartPole with velocities hidden.

The bar is sb3-contrib's own for its LSTM policy (same task, settings and budget): a mean
return of at least 450 over 20 evaluation episodes within 50k steps. A policy without memory
stays below ~50 here.
"""

from __future__ import annotations

import pytest
import torch
from sb3_contrib import RecurrentPPO
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

import cfc_rl.envs  # noqa: F401  (registers the task ids)
from cfc_rl.sb3 import RecurrentCellPolicy


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same numbers on every machine, and fair to the other test jobs
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_recurrent_ppo_with_cfc_solves_cartpole_without_velocities(one_thread) -> None:
    task, seed = "cfc_rl/CartPole-P-v1", 1
    env = VecNormalize(make_vec_env(task, n_envs=8, seed=seed))
    eval_env = VecNormalize(
        make_vec_env(task, n_envs=4, seed=seed + 100), training=False, norm_reward=False
    )
    evaluation = EvalCallback(
        eval_env,
        n_eval_episodes=20,
        eval_freq=5000 // 8,
        callback_on_new_best=StopTrainingOnRewardThreshold(reward_threshold=450),
    )
    model = RecurrentPPO(
        RecurrentCellPolicy,
        env,
        n_steps=128,
        learning_rate=7e-4,
        batch_size=256,
        n_epochs=10,
        max_grad_norm=1,
        gae_lambda=0.98,
        seed=seed,
        policy_kwargs={
            "cell": "cfc",
            "hidden_size": 64,
            "net_arch": {"vf": [64], "pi": []},
            "ortho_init": False,
        },
    )
    model.learn(total_timesteps=50_000, callback=evaluation)
    assert evaluation.best_mean_reward >= 450, (
        f"best mean return {evaluation.best_mean_reward:.1f} after {model.num_timesteps} steps"
    )
