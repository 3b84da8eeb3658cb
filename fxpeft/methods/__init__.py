"""The methods fxpeft ships, one file each. Importing this package registers them."""

from . import ia3, lora  # noqa: F401  (registers the methods)
from .ia3 import IA3Config
from .lora import LoraConfig

__all__ = ["LoraConfig", "IA3Config"]
