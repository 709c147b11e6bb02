"""The Fashion-MNIST sample shipped in the package: ``fmnist-sample`` (the default data).

512 class-balanced training images (calibration) and 2,000 test images, 200 per class
(evaluation), stored in round-robin class order so that every prefix is balanced. The training
split is the calibration part, all 512 images whatever ``calib_size`` picks: a small set for
smoke tests of training code, not for real fine-tuning (use ``fmnist`` for the 60,000 images).
It holds training-set images only, so never an evaluation image.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from policysearch.data.base import (
    DEFAULT_CALIB_SIZE,
    SOURCES,
    ArrayDataset,
    DataBundle,
    DataError,
    DataSpec,
    GrayPreprocess,
    LoadRequest,
    Source,
    take,
)
from policysearch.data.fmnist import Relabel, fmnist_bundle, gray_preprocess
from policysearch.models.zoo import sample_path

__all__ = ["SampleSource", "read_sample"]

_KEYS = ("calib_images", "calib_labels", "eval_images", "eval_labels")


def read_sample(path: Path | None = None) -> dict[str, np.ndarray]:
    """The sample's arrays: calib_images, calib_labels, eval_images, eval_labels."""
    path = path or sample_path()
    fix = ("reinstall policysearch, or regenerate it with "
           "`python reproduce/make_sample.py` (needs dataset-fashion-mnist)")
    if not path.is_file():
        raise DataError(f"the shipped Fashion-MNIST sample {path} is missing; {fix}")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in _KEYS}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"the shipped Fashion-MNIST sample {path} is unreadable ({e}); {fix}") from None
    return arrays


def _train_split(path: Path, pre: GrayPreprocess, relabel: Relabel) -> ArrayDataset:
    arrays = read_sample(path)
    return ArrayDataset(arrays["calib_images"], relabel(arrays["calib_labels"]), pre)


@SOURCES.register("fmnist-sample")
class SampleSource(Source):
    """``fmnist-sample``: the shipped sample; its calibration part doubles as a small training split."""

    path = "none"
    usage = "fmnist-sample (default, shipped)"

    def load(self, spec: DataSpec, request: LoadRequest) -> DataBundle:
        path = sample_path()
        arrays = read_sample(path)
        hint = "use `--data fmnist` (the full set) for more"
        n_calib = len(arrays["calib_labels"])
        nc = take(request.calib_size or min(DEFAULT_CALIB_SIZE, n_calib), n_calib, "calibration",
                  "the shipped sample", hint)
        ne = take(request.eval_size, len(arrays["eval_labels"]), "evaluation", "the shipped sample", hint)
        # the sample is stored in class-balanced round-robin order: every prefix is balanced
        return fmnist_bundle(
            spec, request, (arrays["calib_images"][:nc], arrays["calib_labels"][:nc]),
            (arrays["eval_images"][:ne], arrays["eval_labels"][:ne]), gray_preprocess(request.model_cfg),
            train=functools.partial(_train_split, path), source=str(path),
            train_split=f"the sample's {n_calib} calibration images (training-set images)")
