"""relex: extrapolate RLVR training runs from a short prefix of checkpoints.

The RELEX method (arXiv 2605.21468): RLVR weight trajectories are close to rank 1 and their
rank-1 coefficient grows linearly with the step, so a few early checkpoints predict late ones.

    >>> import relex
    >>> relex.extrapolate("runs/grpo", base="models/base", observe_until=75,
    ...                   targets=[500, 750], output="out")
"""

from relex.version import __version__  # noqa: E402

from relex.errors import RelexError  # noqa: E402
from relex.api import Analysis, Report, analyze, extrapolate, reconstruct  # noqa: E402
from relex.loop.accelerator import Accelerator, Jump  # noqa: E402
from relex.loop.restart import jump  # noqa: E402

from relex.evaluation.evaluate import evaluate, grade_responses  # noqa: E402
from relex.evaluation.sweep import sweep  # noqa: E402

__all__ = ["Accelerator", "Analysis", "Jump", "RelexError", "Report", "analyze", "evaluate", "extrapolate",
           "grade_responses", "jump", "reconstruct", "sweep", "__version__"]
