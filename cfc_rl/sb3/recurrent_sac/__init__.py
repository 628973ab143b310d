"""RecurrentSAC: SB3's SAC with a cell of :mod:`cfc_rl.nn` in the actor and in each critic,
trained on sequences within episodes (with an R2D2 burn-in) from a sequence replay buffer."""

from cfc_rl.sb3.recurrent_sac.buffers import (
    DictSequenceReplayBuffer,
    SequenceReplayBuffer,
    SequenceReplayBufferSamples,
)
from cfc_rl.sb3.recurrent_sac.policies import RecurrentActor, RecurrentCritic, RecurrentSACPolicy
from cfc_rl.sb3.recurrent_sac.recurrent_sac import RecurrentSAC, SequenceLosses, masked_mean

__all__ = [
    "DictSequenceReplayBuffer",
    "RecurrentActor",
    "RecurrentCritic",
    "RecurrentSAC",
    "RecurrentSACPolicy",
    "SequenceLosses",
    "SequenceReplayBuffer",
    "SequenceReplayBufferSamples",
    "masked_mean",
]
