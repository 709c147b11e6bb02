"""Low-level identity and IO helpers every stage shares: content hashes, fingerprint digests,
data identities, where a cost profile lives, the machine a timing ran on, and the ranking of
results by their objectives.

This module sits at the bottom of the package: it imports only :mod:`policysearch.errors` and the standard library (not torch,
so the light modules stay torch-free), and any stage may use it without importing another stage.
The device name, which needs torch, is :func:`policysearch.device.resolve_device`; the weights'
identity, which needs the zoo, is :func:`policysearch.models.zoo.weights_identity`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policysearch.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from policysearch.result import EvalResult

__all__ = [
    "IN_MEMORY",
    "RUN_SETTINGS",
    "data_digest",
    "data_identity",
    "diff_fingerprints",
    "file_sha256",
    "fingerprint_digest",
    "machine_info",
    "profile_path",
    "rank_key",
    "refusal",
    "setting_changes",
    "settings_refusal",
]

#: what a run's ``config.data`` says for images given in memory (``policysearch.search_policy``):
#: a label, nothing is loaded by that name
IN_MEMORY = "in-memory"

# -- content hashes -----------------------------------------------------------------------------

def file_sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_digest(*tensors: torch.Tensor | None) -> str:
    """A content hash of the exact images and labels a run calibrates and evaluates on."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def data_identity(data: str) -> str:
    """A data spec as the fingerprint records it (an image folder by its resolved path)."""
    source, sep, rest = data.partition(":")
    if sep and source == "imagefolder" and rest:
        return f"imagefolder:{Path(rest).expanduser().resolve()}"
    return data


# -- fingerprints -------------------------------------------------------------------------------

def fingerprint_digest(fields: Mapping[str, Any]) -> str:
    text = json.dumps(dict(fields), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def diff_fingerprints(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Names of the fields that differ (a field present on one side only differs too)."""
    return [k for k in sorted(set(old) | set(new)) if _canon(old.get(k)) != _canon(new.get(k))]


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _short(v: Any, n: int = 40) -> str:
    s = _canon(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def refusal(run_name: str, old: Mapping[str, Any], new: Mapping[str, Any], fields: list[str]) -> ConfigError:
    shown = "; ".join(f"{f}: {_short(old.get(f))} -> {_short(new.get(f))}" for f in fields[:6])
    more = f" and {len(fields) - 6} more" if len(fields) > 6 else ""
    return ConfigError(
        f"run {run_name!r} was made with other work ({shown}{more}); its results cannot be reused. "
        f"Choose a new --run-name, or repeat the run's original options to resume it"
    )


#: what a run searches with besides its work: a resume must repeat them (the fingerprint decides
#: which evaluations are reusable; these decide whether it is the same run)
RUN_SETTINGS = ("strategy", "space", "objective")


def setting_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The :data:`RUN_SETTINGS` recorded on both sides that differ."""
    return [k for k in RUN_SETTINGS if k in old and k in new and _canon(old[k]) != _canon(new[k])]


def _setting(value: Any) -> str:
    if isinstance(value, Mapping):  # an objective: its name
        return repr(str(value.get("name", "?"))[:40])
    return repr(_short(value).strip('"'))


def settings_refusal(run_name: str, old: Mapping[str, Any], new: Mapping[str, Any],
                     changed: list[str]) -> ConfigError:
    """One line for a run name resumed with another strategy, space or objective."""
    def shown(k: str) -> str:
        a, b = _setting(old[k]), _setting(new[k])
        text = f"--{k} {a} -> {b}" if a != b else f"--{k} {a} (its definition changed)"
        if k == "objective" and isinstance(old[k], Mapping) and isinstance(new[k], Mapping):
            da, db = old[k].get("directions"), new[k].get("directions")
            if da != db:
                text += f", other directions ({', '.join(map(str, da or ()))} -> {', '.join(map(str, db or ()))})"
        return text

    original = " ".join(f"--{k} {_setting(old[k])}" for k in changed)
    return ConfigError(
        f"run {run_name!r} was searched with other settings ({'; '.join(shown(k) for k in changed)}); "
        f"choose a new --run-name (it reuses this run's evaluations of the same work, nothing is "
        f"evaluated twice), or repeat {original} to resume this run"
    )


# -- machine ------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """CPU, core count and load averages (report them beside any latency)."""
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["load"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def profile_path(model: str, device: str, batch: int, results_dir: str | Path = "results") -> Path:
    """``<results_dir>/profiles/<model>-<device>-b<batch>.json`` (the model name made file-safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.") or "model"
    dev = re.sub(r"[^A-Za-z0-9]+", "", device)
    return Path(results_dir) / "profiles" / f"{safe}-{dev}-b{int(batch)}.json"


# -- ranking ------------------------------------------------------------------------------------

def rank_key(result: EvalResult, directions: Sequence[str]) -> tuple[float, ...]:
    """A tuple to *minimise*, objective by objective; failed results are all ``+inf``."""
    if not result.ok or len(result.values) != len(directions):
        return (math.inf,) * len(directions)
    return tuple(-v if d == "maximize" else v for v, d in zip(result.values, directions))
