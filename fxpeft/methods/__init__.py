"""The methods fxpeft ships, one file each. Importing this package registers them."""

from . import adalora, adaption_prompt, boft, fourierft, hra, ia3, ln_tuning, loha, lokr, lora, miss, oft, p_tuning, poly, prefix_tuning, prompt_tuning, shira, trainable_tokens, vera  # noqa: F401  (registers the methods)
from .adalora import AdaLoraConfig
from .adaption_prompt import AdaptionPromptConfig
from .boft import BOFTConfig
from .fourierft import FourierFTConfig
from .hra import HRAConfig
from .ia3 import IA3Config
from .loha import LoHaConfig
from .ln_tuning import LNTuningConfig
from .lokr import LoKrConfig
from .lora import LoraConfig
from .miss import MissConfig
from .oft import OFTConfig
from .p_tuning import PromptEncoderConfig
from .poly import PolyConfig
from .shira import ShiraConfig
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig
from .trainable_tokens import TrainableTokensConfig
from .vera import VeraConfig

__all__ = ["AdaptionPromptConfig", "LoraConfig", "FourierFTConfig", "ShiraConfig", "AdaLoraConfig", "BOFTConfig", "HRAConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "LNTuningConfig", "MissConfig", "OFTConfig", "PolyConfig", "PromptEncoderConfig", "PrefixTuningConfig", "PromptTuningConfig", "TrainableTokensConfig", "VeraConfig"]
