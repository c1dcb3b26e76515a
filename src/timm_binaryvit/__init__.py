"""BinaryViT and fully-binary DeiT-S for timm.

Importing this package registers every model with timm's registry, so
``timm.create_model('binaryvit')`` works afterwards.
"""
__version__ = "0.1.0"
