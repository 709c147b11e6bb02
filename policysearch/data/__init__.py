"""Datasets and loaders, chosen by a spec string naming a registered source (:data:`SOURCES`).

* ``fmnist-sample`` (default): the class-balanced Fashion-MNIST subset shipped in the package
  (calibration images from the training set, evaluation images from the test set);
* ``fmnist`` or ``fmnist:DIR``: the full Fashion-MNIST idx files (default directory
  ``/usr/share/datasets/fashion-mnist/``, or ``$POLICYSEARCH_FMNIST_DIR``);
* ``imagefolder:PATH``: one folder per class (or ``train``/``val`` folders of class folders),
  preprocessed with the model's timm data config (resize, crop, normalize).

Each source gives calibration and evaluation data and a lazily loaded training split
(:meth:`DataBundle.train_dataset`) that never holds an evaluation image. A source is one module
here, registered with ``@SOURCES.register("name")``. Every problem with a dataset raises one
:class:`DataError` that names the problem and the fix.
"""
from __future__ import annotations

from policysearch.data.base import (
    DEFAULT_CALIB_SIZE,
    DEFAULT_SOURCE,
    SOURCES,
    ArrayDataset,
    DataBundle,
    DataError,
    DataSpec,
    GrayPreprocess,
    ImageFileDataset,
    LoadRequest,
    Source,
    balanced_order,
    load_data,
    make_loader,
    valid_specs,
)
from policysearch.data.classes import ClassMapping, map_classes, normalize_class_name
from policysearch.data.fmnist import FMNIST_DIR, FMNIST_ENV, fmnist_dir, read_fmnist, read_idx
from policysearch.data.imagefolder import IMAGE_EXTENSIONS
from policysearch.data.sample import read_sample

__all__ = [
    "DEFAULT_CALIB_SIZE",
    "DEFAULT_SOURCE",
    "FMNIST_DIR",
    "FMNIST_ENV",
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "ArrayDataset",
    "ClassMapping",
    "DataBundle",
    "DataError",
    "DataSpec",
    "GrayPreprocess",
    "ImageFileDataset",
    "LoadRequest",
    "Source",
    "balanced_order",
    "fmnist_dir",
    "load_data",
    "make_loader",
    "map_classes",
    "normalize_class_name",
    "read_fmnist",
    "read_idx",
    "read_sample",
    "valid_specs",
]
