"""pyselfextend: run quantized GGUF llama-family models on a CPU, far past their trained context.

The main entry point is :class:`LocalModel`; the ``pyselfextend`` command wraps it for the shell.
"""
from ._engine import EvalAborted, NotEnoughMemory
from .model import LocalModel, devices
from .models import default_model_name, models_dir, pull
from .sampling import SamplingParams
from .state import CorruptState, StateMismatch

__all__ = ["LocalModel", "devices", "SamplingParams", "EvalAborted", "NotEnoughMemory", "StateMismatch", "CorruptState", "pull",
           "models_dir", "default_model_name"]
__version__ = "0.1.0"
