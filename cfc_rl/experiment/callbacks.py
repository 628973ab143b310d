"""The callbacks and logs of a training session: checkpoints between rollouts, periodic
evaluations at fixed step counts, and SB3's CSV / TensorBoard logs across resumes."""

from __future__ import annotations

import copy
import csv
import io
import json
import pickle
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import CSVOutputFormat, Logger, TensorBoardOutputFormat
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv, sync_envs_normalization

from cfc_rl.experiment.runs import RunFolder, atomic_write, atomic_write_text

__all__ = ["Checkpoints", "PeriodicEvaluation", "ProgressBar", "make_logger", "merge_progress"]


class Checkpoints(BaseCallback):
    """Save a checkpoint between rollouts every ``every_steps`` steps.

    A checkpoint is ``step_<n>.zip`` (+ ``_vecnormalize.pkl``, + ``_replay_buffer.pkl`` for
    off-policy algorithms), then ``latest.json`` naming them, written last: a checkpoint is in
    effect only once complete. Older ones are then deleted.

    :param run: the run folder
    :param every_steps: environment steps between two checkpoints
    :param steps: the step count the session starts from
    :param elapsed_before: the run's wall clock before this session
    :param training_before: its training time before this session (None: those steps were not
        timed, a checkpoint written before training time was recorded; checkpoints then leave
        it out)
    :param evaluation: the session's periodic evaluations, whose time is not training time
    """

    def __init__(
        self,
        run: RunFolder,
        every_steps: int,
        *,
        steps: int = 0,
        elapsed_before: float = 0.0,
        training_before: float | None = 0.0,
        evaluation: PeriodicEvaluation | None = None,
    ) -> None:
        super().__init__()
        self.run = run
        self.every_steps = every_steps
        self.elapsed_before = elapsed_before
        self.training_before = training_before
        self.evaluation = evaluation
        self.started = time.perf_counter()
        # What a Ctrl-C before the first rollout saves: the state the session starts from.
        self.last_saved = self.rollout_start_steps = steps
        self.rollout_start_training_s = training_before or 0.0
        self.rollout_start_state: dict[str, Any] | None = None  # the model as it starts

    def _on_rollout_start(self) -> None:
        # Between rollouts (after the update on the previous one): a consistent state.
        self.rollout_start_steps = self.num_timesteps
        self.rollout_start_training_s = self.training_s()
        if self.num_timesteps - self.last_saved >= self.every_steps:
            self.save(self.model)
        if not isinstance(self.model, OffPolicyAlgorithm):
            self.rollout_start_state = _learned_state(self.model)

    def training_s(self) -> float:
        """Training time so far, over all sessions: periodic evaluations excluded."""
        evaluating = self.evaluation.seconds if self.evaluation is not None else 0.0
        before = self.training_before or 0.0
        return before + time.perf_counter() - self.started - evaluating

    def _on_step(self) -> bool:
        return True

    def save_at_rollout_start(self, model: BaseAlgorithm) -> None:
        """On Ctrl-C: the partial rollout is lost anyway, so rewind to the rollout's start and
        save there; the resumed run then ends where an uninterrupted one does. An on-policy
        model is rewound whole: the step count, the training time, and what the rollout or a
        half-done update on it changed (the policy and its optimizer, the normalisation
        statistics). An off-policy one keeps the transitions and gradient steps of its last
        ``train_freq`` steps."""
        model.num_timesteps = self.rollout_start_steps
        if self.rollout_start_state is not None:
            _restore_learned_state(model, self.rollout_start_state)
        self.save(model, training_s=self.rollout_start_training_s)

    def save(self, model: BaseAlgorithm, training_s: float | None = None) -> None:
        """Write a checkpoint of ``model`` at its current step count.

        :param training_s: the training time at that step count (default: until now)
        """
        folder, n = self.run.checkpoints, model.num_timesteps
        record: dict[str, Any] = {"steps": n, "model": f"step_{n}.zip"}
        atomic_write(folder / record["model"], model.save)
        normalization = model.get_vec_normalize_env()
        if normalization is not None:
            record["vecnormalize"] = f"step_{n}_vecnormalize.pkl"
            atomic_write(folder / record["vecnormalize"], lambda f: pickle.dump(normalization, f))
        if isinstance(model, OffPolicyAlgorithm):
            record["replay_buffer"] = f"step_{n}_replay_buffer.pkl"
            atomic_write(folder / record["replay_buffer"], model.save_replay_buffer)
        record["elapsed_s"] = self.elapsed_before + time.perf_counter() - self.started
        if self.training_before is not None:
            record["training_s"] = self.training_s() if training_s is None else training_s
        atomic_write_text(self.run.latest_checkpoint, json.dumps(record, indent=2) + "\n")
        keep = {record[k] for k in ("model", "vecnormalize", "replay_buffer") if k in record}
        for path in folder.glob("step_*"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        self.last_saved = n


def _learned_state(model: BaseAlgorithm) -> dict[str, Any]:
    """Copies of what training changes: the policy's parameters, its optimizer's state and
    the normalisation statistics."""
    state: dict[str, Any] = {
        "policy": copy.deepcopy(model.policy.state_dict()),
        "optimizer": copy.deepcopy(model.policy.optimizer.state_dict()),
    }
    normalization = model.get_vec_normalize_env()
    if normalization is not None:
        state["statistics"] = copy.deepcopy((normalization.obs_rms, normalization.ret_rms))
    return state


def _restore_learned_state(model: BaseAlgorithm, state: dict[str, Any]) -> None:
    model.policy.load_state_dict(state["policy"])
    model.policy.optimizer.load_state_dict(state["optimizer"])
    normalization = model.get_vec_normalize_env()
    if normalization is not None:
        normalization.obs_rms, normalization.ret_rms = state["statistics"]


class PeriodicEvaluation(BaseCallback):
    """Evaluate every ``every_steps`` environment steps on a separate environment (with the
    training env's normalisation statistics), into ``evaluations.npz`` and ``evaluations.csv``.

    Evaluations fall on the first step count at or after each multiple of ``every_steps``, so
    every seed and a resumed run evaluate at the same step counts (SB3's EvalCallback counts
    calls since the last ``learn``).

    :param eval_env: the evaluation environment
    :param run: the run folder (earlier evaluations are read back from it)
    :param every_steps: environment steps between evaluations
    :param episodes: episodes per evaluation
    :param deterministic: evaluate the mode of the policy
    :param on_evaluation: called with the step count and the mean return after each
        evaluation (a hyperparameter search reports them to its scheduler)
    """

    def __init__(
        self,
        eval_env: VecEnv,
        run: RunFolder,
        every_steps: int,
        episodes: int,
        deterministic: bool,
        on_evaluation: Callable[[int, float], None] | None = None,
    ) -> None:
        super().__init__()
        self.on_evaluation = on_evaluation
        self.eval_env, self.run = eval_env, run
        self.every_steps, self.episodes, self.deterministic = every_steps, episodes, deterministic
        self.seconds = 0.0  # spent evaluating, in this process
        self.timesteps: list[int] = []
        self.returns: list[list[float]] = []
        self.lengths: list[list[int]] = []
        self.best = -np.inf
        if run.best_record.exists():  # a resumed run: beat the best of the earlier sessions
            self.best = json.loads(run.best_record.read_text())["mean_return"]
        if run.evaluations.exists():
            with np.load(run.evaluations) as data:
                self.timesteps = data["timesteps"].tolist()
                self.returns = data["results"].tolist()
                self.lengths = data["ep_lengths"].tolist()

    def _on_training_start(self) -> None:
        # Forget evaluations past the checkpoint: a resumed run redoes them.
        keep = sum(t <= self.num_timesteps for t in self.timesteps)
        del self.timesteps[keep:], self.returns[keep:], self.lengths[keep:]
        self.next_eval = (self.num_timesteps // self.every_steps + 1) * self.every_steps

    def _on_step(self) -> bool:
        if self.num_timesteps < self.next_eval:
            return True
        self.next_eval = (self.num_timesteps // self.every_steps + 1) * self.every_steps
        start = time.perf_counter()
        sync_envs_normalization(self.training_env, self.eval_env)
        returns, lengths = evaluate_policy(
            self.model,
            self.eval_env,
            n_eval_episodes=self.episodes,
            deterministic=self.deterministic,
            return_episode_rewards=True,
        )
        self.seconds += time.perf_counter() - start
        self.timesteps.append(self.num_timesteps)
        self.returns.append([float(r) for r in returns])
        self.lengths.append([int(n) for n in lengths])
        # The step count too: SB3 writes it only with its own training rows, and a curve
        # plotted from progress.csv needs it on every row.
        self.logger.record("time/total_timesteps", self.num_timesteps)
        self.logger.record("eval/mean_reward", float(np.mean(returns)))
        self.logger.record("eval/mean_ep_length", float(np.mean(lengths)))
        self.logger.dump(self.num_timesteps)  # as SB3's EvalCallback: one row per evaluation
        self._write()
        mean = float(np.mean(returns))
        if mean > self.best:
            self._save_best(mean)
        if self.on_evaluation is not None:
            self.on_evaluation(self.num_timesteps, mean)
        return True

    def _save_best(self, mean: float) -> None:
        """The model of the best evaluation so far, as RL Zoo keeps it, with its statistics."""
        atomic_write(self.run.best_model, self.model.save)
        normalization = self.model.get_vec_normalize_env()
        if normalization is not None:
            atomic_write(self.run.best_vecnormalize, lambda f: pickle.dump(normalization, f))
        record = {"steps": self.num_timesteps, "mean_return": mean}
        atomic_write_text(self.run.best_record, json.dumps(record, indent=2) + "\n")
        self.best = mean

    def _write(self) -> None:
        def npz(f: Any) -> None:
            np.savez(
                f,
                timesteps=np.array(self.timesteps),
                results=np.array(self.returns),
                ep_lengths=np.array(self.lengths),
            )

        atomic_write(self.run.evaluations, npz)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["timesteps", "mean_return", "std_return", "mean_length", "episodes"])
        for t, r, n in zip(self.timesteps, self.returns, self.lengths, strict=True):
            writer.writerow([t, np.mean(r), np.std(r), np.mean(n), len(r)])
        atomic_write_text(self.run.root / "evaluations.csv", text.getvalue())


PROGRESS_CSV = "progress.csv"


def make_logger(run: RunFolder, resumed_at: int | None) -> Logger:
    """SB3's CSV and TensorBoard logs of a training session. A session resumed at step
    ``resumed_at`` writes its CSV rows to a file of its own named after that step, which
    :func:`merge_progress` appends to ``progress.csv``."""
    path = run.root / PROGRESS_CSV if resumed_at is None else run.resumed_progress_log(resumed_at)
    return Logger(
        str(run.root), [CSVOutputFormat(str(path)), TensorBoardOutputFormat(str(run.tensorboard))]
    )


def merge_progress(run: RunFolder, until: int | None = None) -> None:
    """Append a resumed session's rows (``progress.resumed_<n>.csv``: it resumed at step n) to
    ``progress.csv``, columns joined by name. The rows ``progress.csv`` holds past step n are
    dropped (that session trained those steps again), and, with ``until``, the session's own
    rows past it: a session that died, whose steps after its checkpoint at ``until`` the next
    session trains again."""
    for resumed_at, segment in run.resumed_progress():
        rows, columns = [], {}
        for path, keep_until in ((run.root / PROGRESS_CSV, resumed_at), (segment, until)):
            if not path.exists():
                continue
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                columns.update(dict.fromkeys(reader.fieldnames or []))
                for row in reader:
                    steps = row.get("time/total_timesteps") or ""
                    if keep_until is None or not steps or float(steps) <= keep_until:
                        rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(run.root / PROGRESS_CSV, text.getvalue())
        segment.unlink()


class ProgressBar(BaseCallback):
    """A progress bar of the run's own steps: from where it starts (a resumed run starts
    part-way) to where it ends (``final``: on-policy algorithms end on a whole rollout, past
    the budget), so that it never shows 20,224/20,000.

    :param final: the step count training ends at
    """

    def __init__(self, final: int) -> None:
        super().__init__()
        self.final = final
        self.bar: Any = None

    def _on_training_start(self) -> None:
        from tqdm import TqdmExperimentalWarning
        from tqdm.rich import tqdm

        with warnings.catch_warnings():  # the rich bar is "experimental"; SB3 uses it too
            warnings.simplefilter("ignore", TqdmExperimentalWarning)
            self.bar = tqdm(total=self.final, initial=self.num_timesteps, unit="steps")

    def _on_step(self) -> bool:
        self.bar.n = min(self.num_timesteps, self.final)
        self.bar.refresh()
        return True

    def _on_training_end(self) -> None:
        self.bar.close()
