"""cfc-rl: closed-form continuous-time (CfC) and liquid time-constant (LTC) networks for RL."""

__version__ = "0.1.0"
