"""Stable-Baselines3 glue: cells as features extractors for any algorithm, and as stateful
policies for ``sb3_contrib.RecurrentPPO``."""

from cfc_rl.sb3.extractors import (
    ElapsedTimeExtractor,
    SequenceExtractor,
    WindowLayout,
    sequence_extractor_kwargs,
    stack_sizes_allowed_by_bounds,
)
from cfc_rl.sb3.recurrent import PolicyCell, RecurrentCellPolicy

__all__ = [
    "ElapsedTimeExtractor",
    "PolicyCell",
    "RecurrentCellPolicy",
    "SequenceExtractor",
    "WindowLayout",
    "sequence_extractor_kwargs",
    "stack_sizes_allowed_by_bounds",
]
