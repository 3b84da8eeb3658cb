"""The methods fxpeft ships, one file each. Importing this package registers them."""

from . import adalora, boft, ia3, ln_tuning, loha, lokr, lora, oft, poly, trainable_tokens, vera  # noqa: F401  (registers the methods)
from .adalora import AdaLoraConfig
from .boft import BOFTConfig
from .ia3 import IA3Config
from .loha import LoHaConfig
from .ln_tuning import LNTuningConfig
from .lokr import LoKrConfig
from .lora import LoraConfig
from .oft import OFTConfig
from .poly import PolyConfig
from .trainable_tokens import TrainableTokensConfig
from .vera import VeraConfig

__all__ = ["LoraConfig", "AdaLoraConfig", "BOFTConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "LNTuningConfig", "OFTConfig", "PolyConfig", "TrainableTokensConfig", "VeraConfig"]
