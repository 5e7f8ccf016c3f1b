"""vitfast: custom-kernel Vision Transformer inference for NVIDIA GPUs."""

from vitfast import ops, reference
from vitfast.configs import CONFIGS
from vitfast.convert import optimize
from vitfast.engine import InferenceEngine as InferenceEngine
from vitfast.model import VisionTransformer, VisionTransformerDistilled, create_model, list_models

__version__ = "0.1.0"

__all__ = ["ops", "reference", "VisionTransformer", "VisionTransformerDistilled", "create_model", "list_models",
           "optimize", "CONFIGS", "__version__"]
