"""Inference-only deployment and the packed 1-bit format of BinaryViT and the fully-binary DeiT-S.

:func:`deploy` turns a trained model into an inference-only twin whose eval logits equal the
training model's (bit-for-bit agreement of every sign is what the tests check in float64):

* :mod:`.folding` folds every BatchNorm, shift, scale and pooling branch into a few constants per
  layer (:mod:`.block` is the folded transformer layer, :mod:`.models` the folded models);
* :mod:`.runtime` runs the binary products with the kernel :mod:`timm_binaryvit.kernels` chooses
  for the machine at hand (float32 GEMM, exact int8 ``torch._int_mm``, exact bfloat16 attention,
  or the packed XNOR-popcount kernels of :mod:`timm_binaryvit.packed_ops`);
* :mod:`.packed` is the packed 1-bit safetensors file: :func:`export_packed` writes it,
  :func:`load_packed` rebuilds the training model or (``deployed=True``) the deployed one
  straight from the file's bits.
"""
from .models import DeployedBinaryDeiT, DeployedBinaryViT, deploy, is_deployed
from .packed import (
    PACKED_ENCODING, PACKED_FORMAT, PACKED_FORMAT_VERSION, PackedFormatError, check_rebuilds, export_packed,
    format_size_report, load_packed, read_packed_metadata)

__all__ = [
    'deploy', 'DeployedBinaryViT', 'DeployedBinaryDeiT', 'is_deployed',
    'export_packed', 'load_packed', 'read_packed_metadata', 'PackedFormatError', 'PACKED_FORMAT',
    'PACKED_FORMAT_VERSION', 'PACKED_ENCODING', 'format_size_report', 'check_rebuilds',
]
