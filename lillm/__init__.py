"""lillm: a DeepSpeed-based trainer for small Llama-3-style language models."""

from typing import TYPE_CHECKING

from lillm.config import ModelConfig

if TYPE_CHECKING:
    from lillm.model import LilLM

__all__ = ["LilLM", "ModelConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The model (and so torch) loads on first use: data-only commands and their worker processes skip it.
    if name == "LilLM":
        from lillm.model import LilLM

        return LilLM
    raise AttributeError(f"module 'lillm' has no attribute {name!r}")
