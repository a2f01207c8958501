"""Weight-only post-training quantization: RTN / GPTQ grids, the packed ``QuantLinear``, checkpoints.

Public API (contract: docs/INTERFACES.md):

* ``grid``: the grid's rules (supported bits, groups, signed ranges), torch-free
* ``uniform``: ``find_params``, ``quantize``, ``dequantize``, ``rtn_quantize``
* ``pack``: int32 packing in the GPTQ ("gptq" v1) checkpoint layout
* ``QuantLinear`` (``qlinear``), ``quantized_nbytes``, ``dequantize_model``
* ``rtn_quantize_model``, ``gptq_quantize_model``, ``GPTQ`` (one layer)
* ``save_quantized``, ``load_quantized`` (``checkpoint``)
* ``find_linear_layers``, ``get_decoder_layers``, ``set_module`` (``layers``)
"""
import importlib

# name -> submodule; imported on first use, so the torch-free ``grid`` (read by the study file's
# validation) can be imported without torch
_EXPORTS = {
    "load_quantized": "checkpoint", "save_quantized": "checkpoint",
    "GPTQ": "gptq", "GPTQResult": "gptq", "gptq_quantize_model": "gptq_model",
    "find_linear_layers": "layers", "get_decoder_layers": "layers", "set_module": "layers",
    "pack_qweight": "pack", "pack_qzeros": "pack", "unpack_qweight": "pack", "unpack_qzeros": "pack",
    "QuantLinear": "qlinear", "quantized_nbytes": "qlinear", "dequantize_model": "qlinear",
    "rtn_quantize_model": "rtn",
    "dequantize": "uniform", "find_params": "uniform", "quantize": "uniform", "rtn_quantize": "uniform",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "QuantLinear", "quantized_nbytes", "dequantize_model",
    "find_params", "quantize", "dequantize", "rtn_quantize",
    "pack_qweight", "unpack_qweight", "pack_qzeros", "unpack_qzeros",
    "rtn_quantize_model", "gptq_quantize_model", "GPTQ", "GPTQResult",
    "save_quantized", "load_quantized",
    "find_linear_layers", "get_decoder_layers", "set_module",
]
