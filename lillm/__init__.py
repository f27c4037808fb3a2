"""lillm: a DeepSpeed-based trainer for small Llama-3-style language models."""

from lillm.config import ModelConfig
from lillm.model import LilLM

__all__ = ["LilLM", "ModelConfig"]
__version__ = "0.1.0"
