"""Data-free knowledge distillation: a KD trainer over inverted images, judged on real held-out images.

* ``config``: ``DistillConfig``, every setting; ``DistillConfig.from_recipe(name)`` gives a named recipe's
  (``smi_plugin.recipes``).
* ``kd``: the step's pieces as functions (``kd_loss``, ``forward_sparse``, ``sample_batch``/``augment_batch``,
  ``build_optimizer``, ``learning_rate``).
* ``heads``: ``LeastSquaresHead`` (a linear probe's head solved exactly) and ``linear_probe_student``.
* ``sources``: where a step's inputs come from (``PoolSource``, ``AlternatingSource``, ``OnlineSource``).
* ``students``: the default student a recipe derives, ``load_student`` and ``save_student``.
* ``checkpoint``: resumable checkpoints in plain tensors and JSON.
* ``trainer``: ``KDTrainer``, a short loop over a source, on accelerate; ``KDTrainer.from_recipe`` is
  ``smi distill`` in one call.

The inverted-data streams live in ``smi_plugin.stream`` (re-exported here).
"""

from ..stream import distillation_stream, stream_from_inverted
from .checkpoint import CheckpointMismatchError
from .config import MODES, OPTIMIZERS, PROBE_HEADS, SOURCES, DistillConfig
from .heads import LeastSquaresHead, headless, linear_probe_student
from .kd import (
    FAILURE_FACTOR,
    augment_batch,
    build_optimizer,
    classifier_head,
    failed,
    forward_sparse,
    kd_loss,
    learning_rate,
    sample_batch,
)
from .sources import AlternatingSource, OnlineSource, PoolSource, Source, SourceBatch, as_pool, build_source
from .students import Student, check_student_fits, default_student, load_student, save_student, seeded
from .trainer import KDTrainer

__all__ = [
    "FAILURE_FACTOR", "MODES", "OPTIMIZERS", "PROBE_HEADS", "SOURCES", "AlternatingSource", "CheckpointMismatchError",
    "DistillConfig", "KDTrainer", "LeastSquaresHead", "OnlineSource", "PoolSource", "Source", "SourceBatch",
    "Student", "as_pool", "augment_batch", "build_optimizer", "build_source", "check_student_fits",
    "classifier_head", "default_student", "distillation_stream", "failed", "forward_sparse", "headless",
    "kd_loss", "learning_rate", "linear_probe_student", "load_student", "sample_batch", "save_student",
    "seeded", "stream_from_inverted",
]
