"""adpo-kernels: fused Diffusion-DPO / Adaptive-DPO losses (arXiv 2503.16921).

Nothing here queries a device or loads an extension at import; backends load lazily
on first use (see :mod:`adpo_kernels.dispatch`).
"""
from . import ops  # noqa: F401  (defines the adpo:: op schemas)
from .config import AdaptiveDPOConfig
from .dispatch import available_backends
from .loss import AdaptiveDPOLoss, adaptive_dpo_loss, dpo_loss, pair_logits
from .output import AdaptiveDPOOutput

__version__ = "0.1.0"

__all__ = ["AdaptiveDPOConfig", "AdaptiveDPOLoss", "AdaptiveDPOOutput", "adaptive_dpo_loss",
           "available_backends", "dpo_loss", "pair_logits", "__version__"]
