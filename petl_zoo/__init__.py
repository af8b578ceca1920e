"""petl_zoo: parameter-efficient transfer learning methods for timm ViT and Swin.

Usage::

    import timm, petl_zoo
    model = timm.create_model('vit_base_patch16_224', num_classes=47)
    model = petl_zoo.create('lora', model, rank=8, targets=('q', 'v'))
"""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .api import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_state_dict,
    classifier_parameters,
    create,
    is_mergeable,
    is_merged,
    load_adapter,
    load_adapter_weights,
    merge,
    method_of,
    read_adapter_config,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from .config import MethodConfig
from .hub import from_pretrained, push_to_hub
from .layers import AdaptedLinear, AdaptedModule, Delta, HookRegistry, LinearDelta, PetlModule
from .multi import MultiAdapterModel, load_adapters
from .registry import (
    Method,
    TrainContext,
    get_method,
    list_methods,
    method_names,
    register_method,
    unregister_method,
)
from .version import __version__ as __version__

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdaptedLinear",
    "AdaptedModule",
    "Delta",
    "HookRegistry",
    "LinearDelta",
    "Method",
    "MethodConfig",
    "MultiAdapterModel",
    "PetlModule",
    "TrainContext",
    "adapter_state_dict",
    "classifier_parameters",
    "create",
    "from_pretrained",
    "get_method",
    "is_merged",
    "is_mergeable",
    "list_methods",
    "load_adapter",
    "load_adapters",
    "load_adapter_weights",
    "merge",
    "method_names",
    "method_of",
    "read_adapter_config",
    "register_method",
    "push_to_hub",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
    "unregister_method",
]
