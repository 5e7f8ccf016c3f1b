"""vitfast: custom-kernel Vision Transformer inference for NVIDIA GPUs."""

from vitfast import ops, reference
from vitfast.configs import CONFIGS

__version__ = "0.1.0"


def list_models() -> list[str]:
    """The timm model names vitfast has configurations for."""
    return sorted(CONFIGS)


__all__ = ["ops", "reference", "list_models", "CONFIGS", "__version__"]
