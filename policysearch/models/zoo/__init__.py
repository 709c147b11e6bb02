"""The embedded model zoo: small timm ViT and Swin models trained on Fashion-MNIST, shipped as safetensors.

Each entry records the timm class and constructor kwargs (so the model is rebuilt with
``pretrained=False`` semantics), the preprocessing the data loader applies, and the training recipe
that ``python reproduce/train_zoo.py NAME`` runs. Weights and model cards live next to this
file: ``NAME.safetensors``, ``NAME.json`` (machine-readable card), ``NAME.md`` (the same, for people).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from policysearch.errors import ConfigError
from policysearch.identity import file_sha256
from policysearch.registry import Registry

__all__ = [
    "FMNIST_CLASSES",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "SAMPLE_FILE",
    "ZOO",
    "ZOO_DIR",
    "Recipe",
    "ZooEntry",
    "weights_identity",
    "card_path",
    "get",
    "list_zoo",
    "read_card",
    "sample_path",
    "weights_path",
]

ZOO_DIR = Path(__file__).resolve().parent
SAMPLE_FILE = "fmnist_sample.npz"

# Fashion-MNIST training-set statistics of pixel / 255 (60,000 images).
FMNIST_MEAN: tuple[float, ...] = (0.2860,)
FMNIST_STD: tuple[float, ...] = (0.3530,)
FMNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a zoo model is trained (see ``train.py``); every field lands in the model card."""

    epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.1
    crop_padding: int = 2
    hflip: bool = True
    grad_clip: float = 1.0
    seed: int = 0
    # Measured with `train NAME --estimate-cpu` on this project's 2-core CPU machines (torch 2.14.1).
    cpu_minutes_per_epoch: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    """One zoo model: timm class + kwargs, preprocessing, recipe."""

    name: str
    family: str  # "vit" | "swin"
    model_class: str  # dotted path of a timm class
    kwargs: dict[str, Any]
    recipe: Recipe
    dataset: str = "fmnist"
    input_size: tuple[int, int, int] = (1, 28, 28)
    mean: tuple[float, ...] = FMNIST_MEAN
    std: tuple[float, ...] = FMNIST_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    class_names: tuple[str, ...] = FMNIST_CLASSES
    description: str = ""
    #: False for the tiny test models: seeded random weights, nothing shipped
    shipped_weights: bool = True

    @property
    def num_classes(self) -> int:
        return int(self.kwargs["num_classes"])

    def build(self, **overrides: Any) -> nn.Module:
        """A randomly initialised model (``pretrained=False``); ``overrides`` replace kwargs."""
        module, _, cls_name = self.model_class.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        model = cls(**{**self.kwargs, **overrides})
        model.pretrained_cfg = self.data_config()
        return model

    def data_config(self) -> dict[str, Any]:
        """timm-style pretrained_cfg: what ``timm.data.resolve_data_config`` reads, plus provenance."""
        return {
            "architecture": self.name,
            "input_size": tuple(self.input_size),
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "num_classes": self.num_classes,
            "classifier": "head",
            "dataset": self.dataset,
            "class_names": list(self.class_names),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipe"] = asdict(self.recipe)
        return d


ZOO: Registry[ZooEntry] = Registry("zoo model")


def _register(entry: ZooEntry) -> ZooEntry:
    return ZOO.register(entry.name, entry)  # type: ignore[return-value]


_register(ZooEntry(
    name="fmnist_vit",
    family="vit",
    model_class="timm.models.vision_transformer.VisionTransformer",
    kwargs=dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10,
        embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0, class_token=False, global_pool="avg",
    ),
    recipe=Recipe(epochs=20, lr=2e-3, drop_path_rate=0.1, cpu_minutes_per_epoch=2.34),
    description="ViT (timm VisionTransformer, global average pooling instead of a class token), "
                "patch 4 on native 28x28 (7x7 tokens), width 96, depth 6, 3 heads.",
))

_register(ZooEntry(
    name="fmnist_swin",
    family="swin",
    model_class="timm.models.swin_transformer.SwinTransformer",
    kwargs=dict(
        img_size=28, patch_size=2, in_chans=1, num_classes=10,
        embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7, mlp_ratio=4.0,
    ),
    recipe=Recipe(epochs=22, lr=2e-3, drop_path_rate=0.0, cpu_minutes_per_epoch=2.0),
    description="Swin (timm SwinTransformer), patch 2 on native 28x28: stage 1 at 14x14 tokens (width 32), "
                "patch merging, stage 2 at 7x7 (width 64); window 7 divides both grids.",
))


def list_zoo() -> list[str]:
    """The zoo model names."""
    return ZOO.names()


def get(name: str) -> ZooEntry:
    """The zoo entry ``name`` (``UnknownNameError`` lists the valid names)."""
    return ZOO.get(name)


def weights_path(name: str, root: Path | None = None) -> Path:
    return (root or ZOO_DIR) / f"{name}.safetensors"


def card_path(name: str, root: Path | None = None) -> Path:
    return (root or ZOO_DIR) / f"{name}.json"


def sample_path() -> Path:
    """The shipped Fashion-MNIST sample (calibration + evaluation images)."""
    return ZOO_DIR / SAMPLE_FILE


def read_card(name: str, root: Path | None = None) -> dict[str, Any]:
    """The model card of zoo model ``name`` as a dict."""
    get(name)
    path = card_path(name, root)
    if not path.is_file():
        raise FileNotFoundError(
            f"model card {path} is missing; run `python reproduce/train_zoo.py {name}`"
        )
    return json.loads(path.read_text())

# Tiny models with seeded random weights (no file): fast end-to-end tests on the shipped sample.
_register(ZooEntry(
    name="test_fmnist_vit",
    family="vit",
    model_class="timm.models.vision_transformer.VisionTransformer",
    kwargs=dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                num_heads=2, mlp_ratio=2.0),
    recipe=Recipe(epochs=0),
    description="test model: 2-block ViT, random weights (seed 0); for tests, not accuracy",
    shipped_weights=False,
))
_register(ZooEntry(
    name="test_fmnist_swin",
    family="swin",
    model_class="timm.models.swin_transformer.SwinTransformer",
    kwargs=dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depths=(1, 1),
                num_heads=(1, 2), window_size=7, mlp_ratio=2.0),
    recipe=Recipe(epochs=0),
    description="test model: 2-stage Swin, random weights (seed 0); for tests, not accuracy",
    shipped_weights=False,
))


def weights_identity(model: str, checkpoint: str | None) -> str:
    """The content hash of the weights a run uses (checkpoint file, shipped zoo weights, or seed)."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ConfigError(f"checkpoint {checkpoint!r} does not exist; pass the path of a weights file")
        return "sha256:" + file_sha256(path)
    if model in ZOO:
        entry = get(model)
        if entry.shipped_weights:
            return "sha256:" + file_sha256(weights_path(model))
        return f"seeded:{entry.recipe.seed}"
    return "random:timm-init"  # timm, pretrained=False, no checkpoint: seeded by the run's seed
