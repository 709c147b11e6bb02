"""Static QDQ int8 quantization of a float ONNX model with ONNX Runtime's tools.

:func:`quantize_int8` calibrates activation ranges (min/max) on real images through a
:class:`ImageReader` (ONNX Runtime's ``CalibrationDataReader``) and writes a QDQ model. The default
is **U8S8**: uint8 activations, int8 weights. On this project's AVX2 CPUs (no VNNI) S8S8, ONNX
Runtime's default, is often slower than float, while U8S8 is faster (see
``benchmarks/bench_int8_relu.py``, which measures both with ``--compare-formats``).

Static QDQ quantizes the inputs and outputs of every quantizable operator; ONNX Runtime's fused GELU
is then split into Erf / Mul / Add / Div wrapped in Q/DQ, while a ReLU is absorbed into the
preceding quantized MatMul's output range. That is the int8 latency a GELU-less MLP saves.

Swin fails ONNX Runtime's symbolic shape inference, so the optional pre-processing
(``quant_pre_process``) runs with ``skip_symbolic_shape=True``; its output goes to a temporary folder
(onnxruntime 1.31.1 leaves nothing in the working directory, checked on swin_tiny).
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policysearch.deploy import require_onnx
from policysearch.errors import ConfigError

__all__ = ["FORMATS", "ImageReader", "quantize_int8"]

log = logging.getLogger(__name__)

#: activation / weight types by name: "u8s8" (default here) and "s8s8" (ONNX Runtime's default)
FORMATS = {"u8s8": ("QUInt8", "QInt8"), "s8s8": ("QInt8", "QInt8")}


def _reader_base() -> type:
    require_onnx()
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class ImageReader:
    """Feeds calibration images to ONNX Runtime's calibrator, ``batch_size`` at a time.

    Built by :func:`image_reader` (it subclasses ``CalibrationDataReader``, which is only
    importable with the ``onnx`` extra).
    """

    def __init__(self, images: torch.Tensor | np.ndarray, *, input_name: str = "x", batch_size: int = 8) -> None:
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.ndim != 4 or len(arr) == 0:
            raise ValueError(f"calibration images must be a non-empty (N, C, H, W) batch, got shape {arr.shape}")
        self.images = np.ascontiguousarray(arr, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = int(batch_size)
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.images):
            return None
        batch = self.images[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


def image_reader(images: torch.Tensor | np.ndarray, *, input_name: str = "x", batch_size: int = 8) -> Any:
    """An :class:`ImageReader` that is also an ONNX Runtime ``CalibrationDataReader``."""
    base = _reader_base()
    cls = type("OrtImageReader", (ImageReader, base), {})
    return cls(images, input_name=input_name, batch_size=batch_size)


def quantize_int8(float_path: str | Path, out_path: str | Path, calib_images: torch.Tensor | np.ndarray, *,
                  fmt: str = "u8s8", per_channel: bool = False, batch_size: int = 8,
                  op_types: Sequence[str] | None = None, preprocess: bool = True) -> Path:
    """Static QDQ int8 ``float_path`` -> ``out_path``, calibrated (min/max) on ``calib_images``.

    ``fmt``: ``"u8s8"`` (uint8 activations, int8 weights; default) or ``"s8s8"``. ``op_types``:
    restrict quantization to these operator types (default: every type ONNX Runtime quantizes).
    ``preprocess``: run ``quant_pre_process`` first (shape inference and graph optimization;
    symbolic shape inference skipped, Swin fails it).
    """

    onnx, _ = require_onnx()
    from onnxruntime.quantization import QuantType

    if fmt not in FORMATS:
        raise ConfigError(f"unknown int8 format {fmt!r}; valid: {', '.join(FORMATS)}")
    act, weight = (getattr(QuantType, t) for t in FORMATS[fmt])
    float_path, out_path = Path(float_path).resolve(), Path(out_path).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    input_name = onnx.load(str(float_path), load_external_data=False).graph.input[0].name
    root = logging.getLogger()  # onnxruntime.quantization logs every bias copy at INFO on the root logger
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        _quantize(float_path, out_path, calib_images, input_name=input_name, act=act, weight=weight,
                  per_channel=per_channel, batch_size=batch_size, op_types=op_types, preprocess=preprocess)
    finally:
        root.setLevel(level)
    return out_path


def _quantize(float_path: Path, out_path: Path, calib_images: Any, *, input_name: str, act: Any, weight: Any,
              per_channel: bool, batch_size: int, op_types: Sequence[str] | None, preprocess: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    with tempfile.TemporaryDirectory(prefix="policysearch-int8-") as tmp:
        source = float_path
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            source = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(float_path), str(source), skip_symbolic_shape=True)
        quantize_static(
            str(source), str(out_path), image_reader(calib_images, input_name=input_name, batch_size=batch_size),
            quant_format=QuantFormat.QDQ, activation_type=act, weight_type=weight, per_channel=per_channel,
            op_types_to_quantize=list(op_types) if op_types else None, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
