"""Fine-tuning: plain CE on the current step's labels; no protection of old classes."""

from incseg.methods.base import Method


class FineTuning(Method):
    """The lower bound of every table: the step's labels only (old classes are background)."""
