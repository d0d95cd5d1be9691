"""fwdkern: forward-gradient fine-tuning kernels.

Seeded perturbations (counter-based Philox, never materialized) and the ops built
on them. See docs/perturbations.md for the stream definition.
"""
from . import backends  # noqa: F401
from .backends import BackendUnavailable  # noqa: F401
from .ops import perturbation, seeded_axpy_, seeded_dot  # noqa: F401

from .ops.lora import lora_linear_dual, lora_linear_perturbed, seeded_matmul  # noqa: F401,E402
from . import nn  # noqa: F401,E402
from .nn import LoRALinear  # noqa: F401,E402

__version__ = "0.1.0"
__all__ = ["perturbation", "seeded_axpy_", "seeded_dot", "BackendUnavailable", "backends"]
__all__ += ["lora_linear_dual", "lora_linear_perturbed", "seeded_matmul", "LoRALinear", "nn"]

from . import dual  # noqa: F401,E402
from .engine import (batch_loss, default_targets, jvp, load_adapter, patch, perturbed_loss,  # noqa: F401,E402
                     save_adapter, trainable)

__all__ += ["patch", "trainable", "jvp", "perturbed_loss", "batch_loss", "save_adapter", "load_adapter", "default_targets", "dual"]
