"""TeacherModule: step-0 training, and Joint (offline) training on all classes at once."""

from __future__ import annotations

from incseg.systems.base import SegmentationSystem


class TeacherModule(SegmentationSystem):
    """Plain BiSeNet training with CE on the main and both auxiliary heads (paper Eq. 3).

    At step 0 of an incremental task the model sees the step-0 classes only (future classes are
    background in its labels, the MiB protocol). For Joint, ``task`` is the one-step offline
    counterpart of the task being compared with and ``score_task`` that task itself.
    """
