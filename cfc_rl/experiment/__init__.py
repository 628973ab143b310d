"""Experiments from YAML files: train, evaluate and compare agents, and benchmark the cells.

- :mod:`~cfc_rl.experiment.settings`: agent files (``agents/*.yaml``) and the per-task
  algorithm settings they share (``agents/settings/<algo>.yaml``)
- :mod:`~cfc_rl.experiment.tasks`: task files (``envs/*.yaml``): environment, budget, evaluation
- :mod:`~cfc_rl.experiment.algorithms`: the algorithms agent files name, one registry entry each
- :mod:`~cfc_rl.experiment.train`: one agent, one task, one seed -> a run folder (train, resume)
- :mod:`~cfc_rl.experiment.jobs`: a run as plain data and :func:`~.jobs.run_job`;
  :mod:`~cfc_rl.experiment.executors`: where jobs run
- :mod:`~cfc_rl.experiment.compare`: agents x tasks x seeds, with the bootstrap intervals of
  :mod:`~cfc_rl.experiment.statistics`; :mod:`~cfc_rl.experiment.benchmark`: the benchmark
  study, a grid of runs that accumulate in the repository, and its report;
  :mod:`~cfc_rl.experiment.ray_executor`: its jobs on a Ray cluster;
  :mod:`~cfc_rl.experiment.tune`: hyperparameter search with Ray Tune and Optuna
- :mod:`~cfc_rl.experiment.robustness`: evaluation as a condition moves away from training
- :mod:`~cfc_rl.experiment.evaluate`: episodes with a run's final model
- :mod:`~cfc_rl.experiment.environments`, :mod:`~cfc_rl.experiment.callbacks`,
  :mod:`~cfc_rl.experiment.runs`: the vector env, the training callbacks and logs, the run
  folder's layout and atomic writes
- :mod:`~cfc_rl.experiment.cli`: the ``cfc-rl`` command; :mod:`~cfc_rl.experiment.bench`,
  :mod:`~cfc_rl.experiment.throughput`: speed benchmarks

The submodules are imported on demand (``from cfc_rl.experiment.train import train``), so that
loading the package stays cheap.
"""
