"""Stable-Baselines3 glue: cells as features extractors for any algorithm, as stateful
policies for ``sb3_contrib.RecurrentPPO``, and RecurrentSAC (recurrent actor and critics)."""

from cfc_rl.sb3.extractors import (
    ElapsedTimeExtractor,
    SequenceExtractor,
    WindowLayout,
    sequence_extractor_kwargs,
    stack_sizes_allowed_by_bounds,
)
from cfc_rl.sb3.recurrent import PolicyCell, RecurrentCellPolicy
from cfc_rl.sb3.recurrent_sac import (
    DictSequenceReplayBuffer,
    RecurrentSAC,
    RecurrentSACPolicy,
    SequenceReplayBuffer,
)

__all__ = [
    "DictSequenceReplayBuffer",
    "ElapsedTimeExtractor",
    "PolicyCell",
    "RecurrentCellPolicy",
    "RecurrentSAC",
    "RecurrentSACPolicy",
    "SequenceExtractor",
    "SequenceReplayBuffer",
    "WindowLayout",
    "sequence_extractor_kwargs",
    "stack_sizes_allowed_by_bounds",
]
