"""Weight-only post-training quantization: RTN / GPTQ grids, the packed ``QuantLinear``, checkpoints.

Public API (contract: docs/INTERFACES.md):

* ``uniform``: ``find_params``, ``quantize``, ``dequantize``, ``rtn_quantize``
* ``pack``: int32 packing in the GPTQ ("gptq" v1) checkpoint layout
* ``QuantLinear`` (``qlinear``), ``quantized_nbytes``
* ``rtn_quantize_model``, ``gptq_quantize_model``, ``GPTQ`` (one layer)
* ``save_quantized``, ``load_quantized`` (``checkpoint``)
* ``find_linear_layers``, ``get_decoder_layers``, ``set_module`` (``layers``)
"""
from .checkpoint import load_quantized, save_quantized
from .gptq import GPTQ, GPTQResult, gptq_quantize_model
from .layers import find_linear_layers, get_decoder_layers, set_module
from .pack import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from .qlinear import QuantLinear, quantized_nbytes
from .rtn import rtn_quantize_model
from .uniform import dequantize, find_params, quantize, rtn_quantize

__all__ = [
    "QuantLinear", "quantized_nbytes",
    "find_params", "quantize", "dequantize", "rtn_quantize",
    "pack_qweight", "unpack_qweight", "pack_qzeros", "unpack_qzeros",
    "rtn_quantize_model", "gptq_quantize_model", "GPTQ", "GPTQResult",
    "save_quantized", "load_quantized",
    "find_linear_layers", "get_decoder_layers", "set_module",
]
