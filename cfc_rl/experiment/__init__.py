"""Experiments from YAML files: train, evaluate and compare agents, and benchmark the cells.

- :mod:`~cfc_rl.experiment.config`: agent files (``agents/*.yaml``), validated on load
- :mod:`~cfc_rl.experiment.train`: one agent, one task, one seed -> a run folder
- :mod:`~cfc_rl.experiment.evaluate`: episodes with a run's final model
- :mod:`~cfc_rl.experiment.compare`: agents x tasks x seeds in parallel, with rliable statistics
- :mod:`~cfc_rl.experiment.runs`: the run folder's layout and atomic writes
- :mod:`~cfc_rl.experiment.cli`: the ``cfc-rl`` command; :mod:`~cfc_rl.experiment.bench`: cell speed

The submodules are imported on demand (``from cfc_rl.experiment.train import train``), so that
loading the package stays cheap.
"""
