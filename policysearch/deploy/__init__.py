"""Deployment: ONNX export, ONNX Runtime int8, latency measurement and the per-kernel cost profile.

* :mod:`policysearch.deploy.onnx_export`: export a float model (with GELU, or with GELU replaced
  by ReLU at chosen MLPs) and the simulated-integer model under a policy to ONNX (legacy
  TorchScript exporter, opset 17), and check ONNX Runtime's outputs against PyTorch's.
* :mod:`policysearch.deploy.ort_int8`: static QDQ int8 quantization with ONNX Runtime's tools,
  calibrated on real images through a ``CalibrationDataReader``.
* :mod:`policysearch.deploy.latency`: interleaved latency measurement of ONNX models and the
  ``policysearch latency RUN`` stage (``results/<run>/latency.json``).
* :mod:`policysearch.deploy.profile`: the cost profile of every (site shape, method) kernel and
  of the linear layers (``results/profiles/<model>-<device>-b<batch>.json``).

``onnx`` and ``onnxruntime`` are the optional extra ``policysearch[onnx]``; they are imported only
when a function needs them (:func:`require_onnx`). The profile needs neither.
"""
from __future__ import annotations

from typing import Any

from policysearch.errors import MissingExtraError

__all__ = ["require_onnx"]

_INSTALL = 'pip install "policysearch[onnx]"'


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or one :class:`MissingExtraError` naming the install command."""
    missing = []
    try:
        import onnx
    except ImportError:
        onnx, missing = None, missing + ["onnx"]
    try:
        import onnxruntime
    except ImportError:
        onnxruntime, missing = None, missing + ["onnxruntime"]
    if missing:
        raise MissingExtraError(
            f"ONNX export and int8 latency need {' and '.join(missing)}, which is not installed; "
            f"install the extra with `{_INSTALL}` (known to work: onnx 1.23.2, onnxruntime 1.31.1)"
        )
    return onnx, onnxruntime
