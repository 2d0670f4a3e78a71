"""The protocol: the step loop (``loop``), resume state (``state``), the teachers and their
cache (``teachers``), Trainer / logger / DataModule construction (``trainer``) and each step's
replay (``replay_sets``)."""

from incseg.protocol.loop import StepOutcome, Student, build_student, run_protocol, run_step
from incseg.protocol.state import (
    RunState,
    barrier,
    derive_seed,
    fingerprint,
    is_distributed,
    is_rank_zero,
)
from incseg.protocol.trainer import make_datamodule, make_trainer, recipe

__all__ = [
    "RunState", "StepOutcome", "Student", "barrier", "build_student", "derive_seed",
    "fingerprint", "is_distributed", "is_rank_zero", "make_datamodule", "make_trainer",
    "recipe", "run_protocol", "run_step",
]
