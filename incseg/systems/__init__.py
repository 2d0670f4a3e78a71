"""LightningModules: the *systems* that wire a BiSeNet, its losses and its optimiser.

TeacherModule: step 0 and Joint. StudentModule: steps t >= 1 against the frozen model t-1.
"""

from incseg.systems.base import SegmentationSystem, TrainingError
from incseg.systems.student import StudentModule
from incseg.systems.teacher import TeacherModule

__all__ = ["SegmentationSystem", "StudentModule", "TeacherModule", "TrainingError"]
