"""The one interface every recurrent module of :mod:`cfc_rl.nn` shares.

Every module maps a batch-first sequence ``x (B, T, input_size)`` and a flat state
``(B, state_size)`` to outputs ``(B, T, output_size)`` and the final state. One flat state tensor
(an LSTM packs ``[h | c]``) keeps Stable-Baselines3 buffers, checkpoints and resets uniform;
``resets`` lets a padded minibatch of many episodes run in one call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

Timespans = Tensor | float | None


class RecurrentModule(nn.Module, ABC):
    """Base class of every cell: validates inputs once, then runs :meth:`_sequence`.

    Subclasses set ``input_size``, ``output_size`` and ``state_size`` and implement
    :meth:`_sequence`, which receives checked tensors only.
    """

    input_size: int
    output_size: int
    state_size: int
    uses_timespans: bool = True
    """False for discrete cells (LSTM, GRU), which ignore ``timespans``: callers that want to
    give them the elapsed time feed it as an input feature instead."""

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The state at the start of an episode: zeros of shape ``(batch_size, state_size)``.

        :param batch_size: number of sequences
        :param device: defaults to the device of the module's parameters
        :param dtype: defaults to the dtype of the module's parameters
        """
        reference = next(self.parameters())
        return torch.zeros(
            batch_size,
            self.state_size,
            device=reference.device if device is None else device,
            dtype=reference.dtype if dtype is None else dtype,
        )

    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        *,
        timespans: Timespans = None,
        resets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the module over a batch of sequences.

        :param x: inputs of shape ``(B, T, input_size)``
        :param state: state before the first step, ``(B, state_size)``; zeros when None
        :param timespans: elapsed time of each step, a float for all steps or a ``(B, T)``
            tensor of per-sample values; 1.0 when None
        :param resets: ``(B, T)`` boolean tensor (or 0/1 numbers); True zeroes the state
            before step t
        :return: outputs ``(B, T, output_size)`` and the final state ``(B, state_size)``
        """
        name = type(self).__name__
        if x.dim() != 3 or x.shape[2] != self.input_size or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(
                f"{name} expected x of shape (batch >= 1, time >= 1, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        batch, steps = x.shape[0], x.shape[1]
        if state is None:
            state = self.initial_state(batch, device=x.device, dtype=x.dtype)
        elif state.shape != (batch, self.state_size):
            raise ValueError(
                f"{name} expected state of shape ({batch}, {self.state_size}), "
                f"got {tuple(state.shape)}"
            )
        elif state.dtype != x.dtype:
            raise ValueError(f"{name} got a state of dtype {state.dtype} for x of {x.dtype}")
        # Tensors (and arrays) keep their autograd history; a number means every step.
        timespans = torch.as_tensor(1.0 if timespans is None else timespans)
        timespans = timespans.to(device=x.device, dtype=x.dtype)
        if timespans.dim() == 0:
            timespans = timespans.expand(batch, steps)
        elif timespans.shape != (batch, steps):
            raise ValueError(
                f"{name} expected timespans of shape ({batch}, {steps}) or a float, "
                f"got {tuple(timespans.shape)}"
            )
        if resets is not None:
            resets = torch.as_tensor(resets, device=x.device)
            if resets.shape != (batch, steps):
                raise ValueError(
                    f"{name} expected resets of shape ({batch}, {steps}), got {tuple(resets.shape)}"
                )
            # Episode-start flags often come as 0./1. floats (SB3): above one half is a reset.
            resets = resets if resets.dtype == torch.bool else resets > 0.5
        return self._sequence(x, state, timespans, resets)

    @abstractmethod
    def _sequence(
        self, x: Tensor, state: Tensor, timespans: Tensor, resets: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Run over checked inputs: x (B,T,I), state (B,S), timespans (B,T), resets (B,T)|None."""


def keep_masks(resets: Tensor | None, steps: int, dtype: torch.dtype) -> list[Tensor | None]:
    """Per step, the ``(B, 1)`` factor that zeroes the state of the samples that reset before
    it (None for every step when there are no resets).

    Steps are unbound once: indexing ``[:, t]`` inside a time loop would make autograd build
    a full-size gradient for every step."""
    if resets is None:
        return [None] * steps
    return list((~resets).to(dtype).unsqueeze(-1).unbind(1))
