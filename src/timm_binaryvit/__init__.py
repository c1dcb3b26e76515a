"""BinaryViT and fully-binary DeiT-S for timm.

Importing this package registers every model with timm's registry, so
``timm.create_model('binaryvit')`` works afterwards.
"""
from .binary_deit import BinaryDeiT
from .binaryvit import BinaryViT
from .capability import CapabilityReport, CapabilityTerm, representational_capability
from .convert import checkpoint_filter_fn, convert_authors_state_dict
from .deploy import PackedFormatError, deploy, export_packed, load_packed
from .profile import profile

__version__ = "0.1.0"

__all__ = [
    'BinaryViT', 'BinaryDeiT', 'checkpoint_filter_fn', 'convert_authors_state_dict',
    'deploy', 'export_packed', 'load_packed', 'PackedFormatError',
    'profile', 'representational_capability', 'CapabilityReport', 'CapabilityTerm',
]
