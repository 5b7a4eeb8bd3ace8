"""smi-plugin: Sparse Model Inversion for data-free quantization and distillation of ViTs.

Example:
    >>> from smi_plugin import SparseInverter, InversionConfig, load_teacher
    >>> teacher = load_teacher("fashion-mnist-vit")
    >>> batch = SparseInverter(teacher, InversionConfig(iterations=300)).invert(range(10))
"""

from .batch import InvertedBatch
from .calibration import SparseInvertedCalibrationDataset
from .config import PRESETS, InversionConfig
from .data import load_eval_data
from .distill import DistillConfig, KDTrainer, distillation_stream, kd_loss, save_student
from .distributed import invert_to_directory
from .export import load_inverted, to_hf_dataset
from .inverter import SparseInverter, derive_seed
from .losses import BASE_METHODS, register_base_method
from .schedule import StoppingSchedule
from .selection import SELECTION_POLICIES, register_selection_policy
from .tokens import UnsupportedModelError, check_vit, forward_kept_tokens
from .visualize import save_grid, save_stage_strip
from .zoo import load_teacher

__version__ = "0.1.0"


def load_quantized(directory, compile: bool = True, trust_compiled: bool = False):
    """Load a model saved by ``smi quantize --out DIR``: normalized images -> logits, int8 kernels.

    A ``compiled.pt2`` (native code) runs only where this user built it or with ``trust_compiled=True``.
    See ``smi_plugin.integrations.package.load_quantized`` (torchao is imported only when called).
    """
    from .integrations.deploy import load_quantized as _load_quantized

    return _load_quantized(directory, compile=compile, trust_compiled=trust_compiled)


__all__ = [
    "BASE_METHODS", "DistillConfig", "InversionConfig", "InvertedBatch", "KDTrainer", "PRESETS", "SELECTION_POLICIES",
    "SparseInverter", "SparseInvertedCalibrationDataset", "StoppingSchedule", "UnsupportedModelError", "check_vit",
    "derive_seed", "distillation_stream", "forward_kept_tokens", "invert_to_directory", "kd_loss", "load_eval_data",
    "load_inverted", "load_quantized", "load_teacher", "register_base_method", "register_selection_policy",
    "save_grid", "save_student", "save_stage_strip", "to_hf_dataset",
]
