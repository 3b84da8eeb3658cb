"""fxpeft: parameter-efficient fine-tuning as compiler surgery on a torch.fx graph.

Example:
    >>> import torch, fxpeft
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> x = torch.randn(2, 8)
    >>> gm = fxpeft.trace(mlp, (x,))
    >>> gm = fxpeft.rewrite(gm, fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    >>> bool((gm(x) == mlp(x)).all())       # zero-initialised B: the same outputs, bit for bit
    True
    >>> merged = fxpeft.merge(gm)          # a plain graph again
"""

from . import methods  # noqa: F401  (registers LoRA, IA3, LoHa and LoKr)
from . import passes  # noqa: F401
from .api import (
    adapters,
    export,
    get_nb_trainable_parameters,
    print_trainable_parameters,
    rewrite,
    trace,
)
from .combine import add_weighted_adapter
from .errors import (
    AdapterExistsError,
    AdapterFileError,
    ConfigError,
    DrawError,
    FxPeftError,
    GraphvizNotFoundError,
    InputShapeError,
    MergeError,
    SerializationError,
    TargetError,
    TraceError,
    UnsupportedSiteError,
    WeightsError,
)
from .graph import to_networkx
from .lifecycle import (
    active_adapters,
    adapter_names,
    delete_adapter,
    disable_adapters,
    merge,
    merge_adapter,
    set_adapter,
    unload,
    unmerge_adapter,
)
from .mixed import adapter_index, export_mixed_batch, mixed_batch
from .io import config_from_peft, hotswap_adapter, load_adapter, prepare_for_hotswap, save_adapter, save_merged
from .distributed import (adapter_state_dict, consolidate_adapter, load_adapter_dcp, save_adapter_dcp,
                          set_adapter_state_dict)
from .methods.adalora import AdaLoraConfig, adalora_orth_loss, update_and_allocate
from .methods import BOFTConfig, FourierFTConfig, ShiraConfig, HRAConfig, IA3Config, LNTuningConfig, LoHaConfig, LoKrConfig, LoraConfig, MissConfig, OFTConfig, VeraConfig
from .methods.adaption_prompt import AdaptionPromptConfig
from .methods.poly import PolyConfig
from .methods.p_tuning import PromptEncoderConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.trainable_tokens import TrainableTokensConfig
from .registry import AdapterModule, Emit, Method, PeftConfigBase, PeftRegistry
from .tags import AdapterTag, GraphInfo, Role
from .sites import Site, find_sites, list_sites, unreached_weights
from .viz import draw
from .weights import empty_weights, load_weights, meta_tensors
from .fsdp import shard
from .trainer import FxPeftTrainerMixin, restore_adapters, save_adapters

__version__ = "0.1.0"

__all__ = [
    "trace",
    "rewrite",
    "merge",
    "adapter_names",
    "active_adapters",
    "set_adapter",
    "disable_adapters",
    "delete_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "unload",
    "mixed_batch",
    "adapter_index",
    "export_mixed_batch",
    "add_weighted_adapter",
    "export",
    "save_adapter",
    "config_from_peft",
    "load_adapter",
    "hotswap_adapter",
    "prepare_for_hotswap",
    "save_merged",
    "adapter_state_dict",
    "set_adapter_state_dict",
    "save_adapter_dcp",
    "load_adapter_dcp",
    "consolidate_adapter",
    "adapters",
    "shard",
    "list_sites",
    "find_sites",
    "unreached_weights",
    "draw",
    "empty_weights",
    "load_weights",
    "meta_tensors",
    "save_adapters",
    "restore_adapters",
    "FxPeftTrainerMixin",
    "to_networkx",
    "Site",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "LoraConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LNTuningConfig",
    "AdaLoraConfig",
    "update_and_allocate",
    "adalora_orth_loss",
    "BOFTConfig",
    "HRAConfig",
    "MissConfig",
    "OFTConfig",
    "VeraConfig",
    "FourierFTConfig",
    "ShiraConfig",
    "PolyConfig",
    "AdaptionPromptConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "PrefixTuningConfig",
    "TrainableTokensConfig",
    "PeftRegistry",
    "Method",
    "AdapterModule",
    "PeftConfigBase",
    "Emit",
    "Role",
    "AdapterTag",
    "GraphInfo",
    "FxPeftError",
    "TraceError",
    "InputShapeError",
    "SerializationError",
    "ConfigError",
    "TargetError",
    "UnsupportedSiteError",
    "WeightsError",
    "AdapterExistsError",
    "MergeError",
    "AdapterFileError",
    "DrawError",
    "GraphvizNotFoundError",
]


def __getattr__(name: str):
    # fxpeft.FxPeftTrainer subclasses transformers.Trainer: imported on first use, so `import fxpeft` needs no
    # transformers
    if name == "FxPeftTrainer":
        from .trainer import FxPeftTrainer

        return FxPeftTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
