"""The methods fxpeft ships, one file each. Importing this package registers them."""

from . import ia3, loha, lokr, lora  # noqa: F401  (registers the methods)
from .ia3 import IA3Config
from .loha import LoHaConfig
from .lokr import LoKrConfig
from .lora import LoraConfig

__all__ = ["LoraConfig", "IA3Config", "LoHaConfig", "LoKrConfig"]
