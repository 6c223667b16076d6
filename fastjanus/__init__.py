"""fastjanus: an inference runtime for DeepSeek's Janus-1.3B, Janus-Pro-1B and Janus-Pro-7B."""
from .config import JanusConfig, preset
from .engine.pipeline import JanusPipeline, load
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError, FastJanusError, InputError

__version__ = "0.1.0"
__all__ = ["load", "JanusPipeline", "JanusConfig", "preset", "FastJanusError", "ConfigError", "CheckpointError",
           "CheckpointNotFoundError", "InputError", "__version__"]
