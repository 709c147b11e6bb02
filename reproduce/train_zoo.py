"""Train a zoo model on Fashion-MNIST: ``python reproduce/train_zoo.py fmnist_vit``.

Fixed seed, class-agnostic recipe from the zoo entry (AdamW, linear warm-up + cosine, label
smoothing, random crop with padding + horizontal flip, drop path), CUDA when present. Writes
``NAME.safetensors`` and the model card (``NAME.json`` + ``NAME.md``) into the package, or ``--out``.

The loop itself is the shared trainer (:func:`policysearch.train.train`); this module adds the
zoo's data (Fashion-MNIST on the device, augmented per batch), recipe and model cards.
``--checkpoint-dir DIR`` checkpoints every epoch and resumes from DIR, with the same final weights.

Other modes: ``--estimate-cpu N`` times N training steps on 2 CPU threads and logs the per-epoch
estimate; ``--verify`` re-evaluates shipped weights on this machine and records the result in the card.
Data loading and augmentation draw from a seeded CPU generator, so the batches are the same on
every device; with the same device, torch and seed, training is bit-reproducible.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from policysearch.data import fmnist_dir, read_fmnist
from policysearch.models.zoo import (
    ZOO_DIR,
    Recipe,
    ZooEntry,
    card_path,
    get,
    list_zoo,
    sample_path,
    weights_path,
)
from policysearch.train import CrossEntropy, Schedule, optimizer_step, param_groups
from policysearch.train import train as run_trainer

__all__ = ["Batches", "evaluate", "main", "param_groups", "train", "write_card"]

log = logging.getLogger("reproduce.train_zoo")

CARD_FORMAT = "policysearch.zoo-card/v1"
CPU_THREADS = 2


# ----------------------------------------------------------------------------------------- data


@dataclass(frozen=True, kw_only=True)
class Split:
    """uint8 images (N, 28, 28) and int64 labels on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray, device: torch.device) -> Split:
        return cls(images=torch.as_tensor(np.ascontiguousarray(images)).to(device),
                   labels=torch.as_tensor(labels.astype(np.int64)).to(device))


def normalize(images: torch.Tensor, entry: ZooEntry) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) with the entry's mean/std."""
    x = images.unsqueeze(1).float().div_(255.0)
    return (x - entry.mean[0]) / entry.std[0]


class Batches:
    """Seeded shuffled batches with random crop (zero padding) and horizontal flip.

    All randomness comes from one CPU generator (``generator``, which the trainer checkpoints), so
    batches do not depend on the device. Iterating gives one epoch of uint8 batches."""

    def __init__(self, split: Split, recipe: Recipe, seed: int) -> None:
        self.split = split
        self.recipe = recipe
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.split.labels) / self.recipe.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch()

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs = len(self.split.labels), self.recipe.batch_size
        perm = torch.randperm(n, generator=self.generator)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            offsets = torch.randint(0, 2 * self.recipe.crop_padding + 1, (len(idx), 2), generator=self.generator)
            flips = torch.rand(len(idx), generator=self.generator) < (0.5 if self.recipe.hflip else 0.0)
            dev = self.split.images.device
            x = self.split.images[idx.to(dev)]
            yield self._augment(x, offsets.to(dev), flips.to(dev)), self.split.labels[idx.to(dev)]

    def _augment(self, x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        pad = self.recipe.crop_padding
        b, h, w = x.shape
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = offsets[:, :1] + torch.arange(h, device=x.device)
        cols = offsets[:, 1:] + torch.arange(w, device=x.device)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        batch = torch.arange(b, device=x.device)[:, None, None]
        return xp[batch, rows[:, :, None], cols[:, None, :]]


# ---------------------------------------------------------------------------------------- model


class Normalize:
    """Trainer ``transform``: a batch of uint8 images -> normalized float input (on the device)."""

    def __init__(self, entry: ZooEntry) -> None:
        self.entry = entry

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(batch[0], self.entry), batch[1]


def lr_at(step: int, total: int, warmup: int, recipe: Recipe) -> float:
    """Linear warm-up to ``recipe.lr``, then cosine to ``recipe.min_lr``."""
    return Schedule(lr=recipe.lr, min_lr=recipe.min_lr, total=total, warmup=warmup).lr_at(step)


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, entry: ZooEntry, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (eval mode, float32)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(split.labels), batch_size):
        logits = model(normalize(split.images[i:i + batch_size], entry))
        correct += int((logits.argmax(-1) == split.labels[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / len(split.labels)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               entry: ZooEntry) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the summed loss and the number of hits (device tensors, no sync)."""
    loss, logits = optimizer_step(model, opt, (normalize(x, entry), y), CrossEntropy(entry.recipe.label_smoothing),
                                  entry.recipe.grad_clip)
    return loss * len(y), (logits.argmax(-1) == y).sum()


def _setup(entry: ZooEntry, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(entry.recipe.seed)
    model = entry.build(drop_path_rate=entry.recipe.drop_path_rate).to(device)
    opt = torch.optim.AdamW(param_groups(model, entry.recipe.weight_decay), lr=entry.recipe.lr)
    return model.train(), opt


def train(entry: ZooEntry, *, device: torch.device, data_dir: Path | None = None,
          max_steps: int | None = None, eval_every: int = 0, checkpoint_dir: Path | None = None,
          resume: bool = True, progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``entry`` with its recipe; returns the model (eval mode) and the training record.

    ``checkpoint_dir``: a checkpoint every epoch, resumed from when ``resume`` (same final weights)."""
    recipe = entry.recipe
    train_split = Split.from_numpy(*read_fmnist(fmnist_dir(data_dir), "train"), device)
    test_split = Split.from_numpy(*read_fmnist(fmnist_dir(data_dir), "test"), device) if eval_every else None
    batches = Batches(train_split, recipe, recipe.seed)
    model, opt = _setup(entry, device)  # seeds torch with recipe.seed, then builds: the trainer does not reseed

    def on_epoch_end(record: dict[str, Any], model: nn.Module) -> None:
        if test_split is not None and (record["epoch"] % eval_every == 0 or record["epoch"] == recipe.epochs):
            record["test_top1"] = evaluate(model, test_split, entry)

    result = run_trainer(
        model, batches, epochs=recipe.epochs, lr=recipe.lr, min_lr=recipe.min_lr,
        warmup_steps=int(recipe.warmup_epochs * len(batches)), schedule="cosine", grad_clip=recipe.grad_clip,
        label_smoothing=recipe.label_smoothing, seed=None, device=device, transform=Normalize(entry),
        optimizer=opt, progress=progress, desc=entry.name, checkpoint_dir=checkpoint_dir, resume=resume,
        stop_at_step=max_steps, on_epoch_end=on_epoch_end)
    return result.model, result.info()


# ------------------------------------------------------------------------------------- metrics


def measure(model: nn.Module, entry: ZooEntry, device: torch.device, data_dir: Path | None) -> dict[str, Any]:
    """Float top-1 on the full test set and on the shipped evaluation sample."""
    test = Split.from_numpy(*read_fmnist(fmnist_dir(data_dir), "test"), device)
    with np.load(sample_path()) as z:
        sample = Split.from_numpy(z["eval_images"], z["eval_labels"], device)
    return {"float_top1_test": evaluate(model, test, entry), "test_images": len(test.labels),
            "float_top1_sample": evaluate(model, sample, entry), "sample_images": len(sample.labels),
            "sample_file": sample_path().name, "sample_sha256": sha256(sample_path()),
            "device": device_name(device), "torch": torch.__version__, "timm": _timm_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _timm_version() -> str:
    import timm

    return timm.__version__


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def estimate_cpu(entry: ZooEntry, *, steps: int, data_dir: Path | None) -> dict[str, Any]:
    """Median seconds per training step on ``CPU_THREADS`` threads -> minutes per epoch and in total."""
    torch.set_num_threads(CPU_THREADS)
    device = torch.device("cpu")
    split = Split.from_numpy(*read_fmnist(fmnist_dir(data_dir), "train"), device)
    batches = Batches(split, entry.recipe, entry.recipe.seed)
    model, opt = _setup(entry, device)
    times = []
    for i, (x, y) in enumerate(tqdm(batches.epoch(), total=steps + 3, desc="cpu estimate")):
        t0 = time.perf_counter()
        train_step(model, opt, x, y, entry)
        times.append(time.perf_counter() - t0)
        if i + 1 >= steps + 3:
            break
    per_step = float(np.median(times[3:]))
    per_epoch = per_step * len(batches) / 60
    return {"seconds_per_step": round(per_step, 4), "steps_per_epoch": len(batches),
            "minutes_per_epoch": round(per_epoch, 2), "epochs": entry.recipe.epochs,
            "total_minutes": round(per_epoch * entry.recipe.epochs, 1), "threads": CPU_THREADS}


# ---------------------------------------------------------------------------------------- cards


def cpu_estimate_of(entry: ZooEntry) -> dict[str, Any]:
    per_epoch = entry.recipe.cpu_minutes_per_epoch
    return {"minutes_per_epoch": per_epoch, "epochs": entry.recipe.epochs,
            "total_minutes": round(per_epoch * entry.recipe.epochs, 1),
            "measured_on": f"{CPU_THREADS} CPU cores (AMD EPYC, shared), torch 2.14.1, batch "
                           f"{entry.recipe.batch_size}, median of a short burst of training steps "
                           f"(`--estimate-cpu`), evaluation not included"}


def make_card(entry: ZooEntry, model: nn.Module, *, info: dict[str, Any], metrics: dict[str, Any],
              weights: Path) -> dict[str, Any]:
    return {
        "format": CARD_FORMAT,
        "name": entry.name,
        "description": entry.description,
        "architecture": {"class": entry.model_class, "family": entry.family, "kwargs": entry.kwargs,
                         "params": sum(p.numel() for p in model.parameters())},
        "preprocessing": {k: v for k, v in entry.data_config().items() if k not in ("architecture",)},
        "data": {"dataset": "Fashion-MNIST (Zalando Research, MIT licence)",
                 "source": "Debian package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist/",
                 "train_images": 60000, "test_images": 10000,
                 "sample": {"file": sample_path().name, "calib": "512 training images",
                            "eval": "2,000 test images, 200 per class"}},
        "seed": entry.recipe.seed,
        "epochs": entry.recipe.epochs,
        "recipe": {**dataclasses.asdict(entry.recipe), "optimizer": "AdamW (no decay on 1-d params, "
                   "position embeddings, tokens, relative-position tables)",
                   "schedule": "per-step linear warm-up, then cosine to min_lr",
                   "augmentation": "random crop with zero padding, horizontal flip (p=0.5)",
                   "loss": "cross-entropy with label smoothing", "precision": "float32 (no TF32)"},
        "training": {"device": metrics["device"], "torch": torch.__version__, "timm": _timm_version(),
                     "python": platform.python_version(), **info},
        "cpu_estimate": cpu_estimate_of(entry),
        "metrics": metrics,
        "verified": [],
        "notes": [],
        "weights": {"file": weights.name, "sha256": sha256(weights), "bytes": weights.stat().st_size,
                    "dtype": "float32", "format": "safetensors"},
    }


def write_card(card: dict[str, Any], out: Path) -> None:
    """Write ``NAME.json`` and ``NAME.md`` into ``out``."""
    name = card["name"]
    card_path(name, out).write_text(json.dumps(card, indent=2, default=_json_default) + "\n")
    (out / f"{name}.md").write_text(render_markdown(card))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj)}")


def render_markdown(card: dict[str, Any]) -> str:
    m, t, w = card["metrics"], card["training"], card["weights"]
    lines = [
        f"# {card['name']}", "", card["description"], "",
        f"- **Architecture**: `{card['architecture']['class']}` with "
        f"`{json.dumps(card['architecture']['kwargs'], default=_json_default)}` "
        f"({card['architecture']['params']:,} parameters)",
        f"- **Input**: {card['preprocessing']['input_size']}, mean {card['preprocessing']['mean']}, "
        f"std {card['preprocessing']['std']} (pixels / 255)",
        f"- **Data**: {card['data']['dataset']}, trained on the {card['data']['train_images']:,} training images",
        f"- **Recipe**: seed {card['seed']}, {card['epochs']} epochs, batch {card['recipe']['batch_size']}, "
        f"AdamW lr {card['recipe']['lr']} wd {card['recipe']['weight_decay']}, warm-up "
        f"{card['recipe']['warmup_epochs']} epoch + cosine, label smoothing {card['recipe']['label_smoothing']}, "
        f"drop path {card['recipe']['drop_path_rate']}, crop padding {card['recipe']['crop_padding']}, hflip",
        f"- **Trained on**: {t['device']} (torch {t['torch']}, timm {t['timm']}), {t['wall_seconds']} s",
        f"- **CPU estimate**: {card['cpu_estimate']['minutes_per_epoch']} min/epoch on 2 cores, "
        f"about {card['cpu_estimate']['total_minutes']} min in total",
        f"- **Float top-1**: {m['float_top1_test']:.4f} on the {m['test_images']:,} test images, "
        f"{m['float_top1_sample']:.4f} on the shipped {m['sample_images']:,}-image sample ({m['device']})",
        f"- **Weights**: `{w['file']}`, {w['bytes']:,} bytes, sha256 `{w['sha256']}`",
    ]
    lines += [f"- **Verified**: {v['device']}: test {v['float_top1_test']:.4f}, sample "
              f"{v['float_top1_sample']:.4f} (torch {v['torch']}, timm {v['timm']})" for v in card["verified"]]
    lines += [f"- **Note**: {note}" for note in card.get("notes", [])]
    return "\n".join(lines) + "\n\nRegenerate: `python reproduce/train_zoo.py " + card["name"] + "`\n"


# ----------------------------------------------------------------------------------------- main


def save_weights(model: nn.Module, path: Path, entry: ZooEntry) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    # one metadata key only: safetensors writes several in random order, which would change the sha256
    save_file(state, str(path), metadata={"policysearch_zoo": entry.name})
    path.chmod(0o644)


def with_overrides(entry: ZooEntry, sets: list[str], epochs: int | None, seed: int | None,
                   batch_size: int | None) -> ZooEntry:
    """Apply ``--set arch.KEY=VALUE`` / ``--set recipe.KEY=VALUE`` and the shortcut options."""
    kwargs, recipe = dict(entry.kwargs), {}
    for item in sets:
        key, _, raw = item.partition("=")
        scope, _, field = key.partition(".")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if scope == "arch":
            kwargs[field] = value
        elif scope == "recipe" and field in {f.name for f in dataclasses.fields(Recipe)}:
            recipe[field] = value
        else:
            raise SystemExit(f"--set {item}: use arch.KWARG=VALUE or recipe.FIELD=VALUE")
    recipe.update({k: v for k, v in (("epochs", epochs), ("seed", seed), ("batch_size", batch_size))
                   if v is not None})
    return dataclasses.replace(entry, kwargs=kwargs, recipe=dataclasses.replace(entry.recipe, **recipe))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _deterministic(device: torch.device) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(min(torch.get_num_threads(), CPU_THREADS))


def run_training(entry: ZooEntry, args: argparse.Namespace) -> None:
    device = _device(args.device)
    _deterministic(device)
    log.info("training %s on %s (%s)", entry.name, device, device_name(device))
    model, info = train(entry, device=device, data_dir=args.data_dir, max_steps=args.max_steps,
                        eval_every=args.eval_every, checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume)
    args.out.mkdir(parents=True, exist_ok=True)
    path = weights_path(entry.name, args.out)
    save_weights(model, path, entry)
    metrics = measure(model, entry, device, args.data_dir)
    card = make_card(entry, model, info=info, metrics=metrics, weights=path)
    write_card(card, args.out)
    log.info("%s: test top-1 %.4f, sample top-1 %.4f, %s (%d bytes)", entry.name, metrics["float_top1_test"],
             metrics["float_top1_sample"], path, path.stat().st_size)


def run_verify(entry: ZooEntry, args: argparse.Namespace) -> None:
    """Evaluate the weights in ``--out`` on this machine and record the result in the card."""
    from policysearch.models.loading import load_model

    device = _device(args.device)
    _deterministic(device)
    card = json.loads(card_path(entry.name, args.out).read_text())
    path = weights_path(entry.name, args.out)
    if sha256(path) != card["weights"]["sha256"]:
        raise SystemExit(f"{path} does not match the sha256 in its card")
    model = load_model(entry.name, checkpoint=path).to(device)
    metrics = measure(model, entry, device, args.data_dir)
    card["verified"] = [v for v in card["verified"] if v["device"] != metrics["device"]] + [metrics]
    write_card(card, args.out)
    log.info("%s verified on %s: test %.4f, sample %.4f", entry.name, metrics["device"],
             metrics["float_top1_test"], metrics["float_top1_sample"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python reproduce/train_zoo.py",
                                description="Train a zoo model on Fashion-MNIST.")
    p.add_argument("name", choices=list_zoo())
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="Fashion-MNIST idx folder (default $POLICYSEARCH_FMNIST_DIR or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", type=Path, default=ZOO_DIR, help="output folder (default: the package)")
    p.add_argument("--set", action="append", default=[], metavar="SCOPE.KEY=VALUE",
                   help="override arch.KWARG or recipe.FIELD (repeatable)")
    p.add_argument("--eval-every", type=int, default=0, help="test accuracy every N epochs (0: at the end only)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (smoke test)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="write a training checkpoint every epoch into DIR and resume from it")
    p.add_argument("--no-resume", action="store_true", help="with --checkpoint-dir: start over")
    p.add_argument("--estimate-cpu", type=int, default=None, metavar="STEPS",
                   help="time STEPS training steps on 2 CPU threads, print the estimate, write nothing")
    p.add_argument("--verify", action="store_true", help="evaluate the weights in --out and record it in the card")
    p.add_argument("--log-file", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.log_file:
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers)
    entry = with_overrides(get(args.name), args.set, args.epochs, args.seed, args.batch_size)
    if args.estimate_cpu:
        est = estimate_cpu(entry, steps=args.estimate_cpu, data_dir=args.data_dir)
        log.info("%s CPU estimate: %s", entry.name, est)
        return 0
    if args.verify:
        run_verify(entry, args)
    else:
        run_training(entry, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
