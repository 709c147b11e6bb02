"""Linear/matmul quantization: observers, activation quantizers, dyadic requantization, STE, and
the integer GEMM engine (``intmm``)."""
from policysearch.quant.act import IntAct, PTFQuant, QuantAct, onto_grid, symmetric_scale
from policysearch.quant.dyadic import dyadic_params, requantize
from policysearch.quant.intmm import exact_matmul, get_engine, int_matmul, set_engine, use_engine
from policysearch.quant.linear import IntConv2d, IntLinear, QuantConv2d, QuantLinear, quantize_weight
from policysearch.quant.observers import OBSERVERS, Observer, create_observer
from policysearch.quant.ste import floor_ste, round_ste, ste

__all__ = [
    "OBSERVERS",
    "IntAct",
    "IntConv2d",
    "IntLinear",
    "Observer",
    "PTFQuant",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "create_observer",
    "dyadic_params",
    "exact_matmul",
    "floor_ste",
    "get_engine",
    "int_matmul",
    "onto_grid",
    "quantize_weight",
    "requantize",
    "round_ste",
    "set_engine",
    "ste",
    "symmetric_scale",
    "use_engine",
]
