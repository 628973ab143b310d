"""Drive a task with a policy exported by ``cfc-rl export``: onnxruntime, numpy, gymnasium.

    python scripts/onnx_control_loop.py RUN/policy.onnx [--episodes N] [--seed S]

No torch and no Stable-Baselines3: the task comes from ``cfc_rl.envs`` (Gymnasium wrappers
only, it imports no torch), the rest from the JSON beside the file (``policy.onnx.json``).
Each step feeds the raw observation (and its Δt where the policy reads it), the state and the
episode-start flag, and carries ``new_state`` to the next step. The episodes and seeds are
``cfc-rl evaluate``'s (environment i of min(4, N) starts from seed + i and runs
(N + i) // min(4, N) episodes), so the mean return reproduces the run's deterministic
evaluation.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cfc_rl.envs import make_task

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("policy", help="an .onnx file written by cfc-rl export")
parser.add_argument("--episodes", type=int, help="default: the run's evaluation episodes")
parser.add_argument("--seed", type=int, help="default: the run's evaluation seed")
args = parser.parse_args()
meta = json.loads(Path(args.policy + ".json").read_text())
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(args.policy, options, providers=["CPUExecutionProvider"])
dtype = {i["name"]: np.dtype(i["dtype"]) for i in meta["inputs"]}
episodes = args.episodes or meta["evaluation"]["episodes"]
seed = meta["evaluation"]["seed"] if args.seed is None else args.seed
n_envs, returns = min(4, episodes), []
for i in range(n_envs):
    env = make_task(meta["env"])
    obs, _ = env.reset(seed=seed + i)
    for _ in range((episodes + i) // n_envs):
        state = np.zeros((1, meta["state"]["size"]), dtype["state"])
        start, total, done = 1.0, 0.0, False
        while not done:
            feeds = {"state": state, "episode_start": np.array([start], np.float32)}
            feeds["obs"] = np.asarray(obs["obs"] if isinstance(obs, dict) else obs)[None]
            if "dt" in dtype:
                feeds["dt"] = np.asarray(obs["dt"], np.float32).reshape(1, 1)
            action, state = session.run(None, {k: v.astype(dtype[k]) for k, v in feeds.items()})
            obs, reward, terminated, truncated, _ = env.step(action[0])
            total, start, done = total + float(reward), 0.0, terminated or truncated
        returns.append(total)
        obs, _ = env.reset()
print(f"mean return {np.mean(returns):.6f} over {len(returns)} episodes")
