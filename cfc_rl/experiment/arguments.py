"""Argument types shared by the command-line tools: their messages name the problem, and
argparse prefixes the option."""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "seed_int"]


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (the message names the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """An argparse type: a seed, 0 <= seed < 2**31."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**31 - 1, got {value}")
    return value
