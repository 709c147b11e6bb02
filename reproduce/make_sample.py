"""Generate the shipped Fashion-MNIST sample: ``python reproduce/make_sample.py``.

Calibration images come from the training set, evaluation images from the test set; both are
seeded, class-balanced, and stored in round-robin class order so that every prefix is balanced.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from policysearch.data import balanced_order, fmnist_dir, read_fmnist
from policysearch.models.zoo import FMNIST_CLASSES, sample_path

__all__ = ["make_sample", "main"]

log = logging.getLogger(__name__)

CALIB_SIZE = 512
EVAL_SIZE = 2000
SEED = 0


def make_sample(*, out: Path, data_dir: Path | None = None, calib_size: int = CALIB_SIZE,
                eval_size: int = EVAL_SIZE, seed: int = SEED) -> Path:
    """Write the sample ``.npz`` (uint8 images, uint8 labels, source indices) and return its path."""
    root = fmnist_dir(data_dir)
    train_x, train_y = read_fmnist(root, "train")
    test_x, test_y = read_fmnist(root, "test")
    calib_idx = balanced_order(train_y, seed)[:calib_size]
    eval_idx = balanced_order(test_y, seed + 1)[:eval_size]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        calib_images=train_x[calib_idx], calib_labels=train_y[calib_idx].astype(np.uint8),
        calib_index=calib_idx.astype(np.int32),
        eval_images=test_x[eval_idx], eval_labels=test_y[eval_idx].astype(np.uint8),
        eval_index=eval_idx.astype(np.int32),
        class_names=np.array(FMNIST_CLASSES), seed=np.int64(seed),
    )
    log.info("wrote %s (%d calibration from train, %d evaluation from test, %.2f MB)",
             out, len(calib_idx), len(eval_idx), out.stat().st_size / 2**20)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST idx folder")
    p.add_argument("--out", type=Path, default=sample_path())
    p.add_argument("--calib-size", type=int, default=CALIB_SIZE)
    p.add_argument("--eval-size", type=int, default=EVAL_SIZE)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_sample(out=args.out, data_dir=args.data_dir, calib_size=args.calib_size,
                eval_size=args.eval_size, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
