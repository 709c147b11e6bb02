"""Linear/matmul quantization: observers, activation quantizers, dyadic requantization, STE."""
from policysearch.quant.act import PTFQuant, QuantAct, symmetric_scale
from policysearch.quant.dyadic import dyadic_params, requantize
from policysearch.quant.linear import QuantConv2d, QuantLinear, quantize_weight
from policysearch.quant.observers import OBSERVERS, Observer, create_observer
from policysearch.quant.ste import floor_ste, round_ste, ste

__all__ = [
    "OBSERVERS",
    "Observer",
    "PTFQuant",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "create_observer",
    "dyadic_params",
    "floor_ste",
    "quantize_weight",
    "requantize",
    "round_ste",
    "ste",
    "symmetric_scale",
]
