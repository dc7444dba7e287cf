"""PatchFCN ensemble: the model object, its single-file checkpoint, and sliding-window inference.

Kuo et al. 2018, section 2 (PatchFCN applied by sliding window) and section 3.1 (committee of N
members, voxelwise Jensen-Shannon divergence).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from torch import nn

from ichal.config import HUWindow
from ichal.io import VolumeError, atomic_write_bytes, check_ct_hu
from ichal.models import ModelPreset, build_network
from ichal.uncertainty import js_divergence

CHECKPOINT_FORMAT = "ichal-patchfcn-ensemble"
CHECKPOINT_FORMAT_VERSION = 1
# Keys every checkpoint's metadata carries; `version` is computed by `save_ensemble`.
REQUIRED_META_KEYS = ("preset", "channels", "patch_px", "spacing_mm", "train_ids", "metrics", "versions", "created")
# What ensembles must share to be merged into one committee.
MERGE_KEYS = ("preset", "channels", "patch_px", "spacing_mm", "train_ids")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt, or does not match its own metadata."""


@dataclass
class EnsembleModel:
    """N PatchFCN members differing by seed, plus the metadata needed to apply them.

    `meta` holds: preset (dict), channels (list of {name, low_hu, high_hu}), patch_px (int, at the
    model spacing), spacing_mm (in-plane model spacing), train_ids, metrics, versions, created, and
    after a save `version` (digest of the weights: changes whenever the weights change).
    """

    members: list[nn.Module]
    meta: dict

    @property
    def windows(self) -> tuple[HUWindow, ...]:
        return windows_from_meta(self.meta["channels"])

    @property
    def patch_px(self) -> int:
        return int(self.meta["patch_px"])

    @property
    def spacing_mm(self) -> float:
        return float(self.meta["spacing_mm"])


@dataclass
class StackPrediction:
    """Ensemble output on the input grid: member_probs (N, Z, Y, X), mean_prob and js (Z, Y, X, nats)."""

    member_probs: np.ndarray
    mean_prob: np.ndarray
    js: np.ndarray


def windows_to_meta(windows: Sequence[HUWindow]) -> list[dict]:
    """HU windows as plain dicts for checkpoint metadata."""
    return [{"name": w.name, "low_hu": float(w.low_hu), "high_hu": float(w.high_hu)} for w in windows]


def windows_from_meta(channels: Sequence[dict]) -> tuple[HUWindow, ...]:
    """Inverse of `windows_to_meta`."""
    return tuple(HUWindow(str(c["name"]), float(c["low_hu"]), float(c["high_hu"])) for c in channels)


def window_channels(image_hu: torch.Tensor, windows: Sequence[HUWindow]) -> torch.Tensor:
    """(..., Y, X) HU -> (..., C, Y, X) float32 in [0, 1], one channel per HU window (C = len(windows))."""
    image = image_hu.float()
    channels = [((image - w.low_hu) / (w.high_hu - w.low_hu)).clamp_(0.0, 1.0) for w in windows]
    return torch.stack(channels, dim=-3)


def model_grid_yx(shape_yx: Sequence[int], spacing_yx_mm: Sequence[float], model_spacing_mm: float) -> tuple[int, int]:
    """Slice size in pixels after resampling an in-plane grid of `shape_yx` to `model_spacing_mm`."""
    return tuple(max(1, int(round(n * s / model_spacing_mm))) for n, s in zip(shape_yx, spacing_yx_mm))


def resample_slices(volume: torch.Tensor, size_yx: Sequence[int]) -> torch.Tensor:
    """Bilinearly resample each slice of a (Z, Y, X) tensor to (Z, *size_yx), keeping the field of view."""
    if tuple(volume.shape[-2:]) == tuple(size_yx):
        return volume
    resized = F.interpolate(volume[:, None].float(), size=tuple(size_yx), mode="bilinear", align_corners=False)
    return resized[:, 0]


def predict_member_slices(
    member: nn.Module,
    channels: torch.Tensor,
    patch_px: int,
    *,
    device: str | torch.device = "cpu",
    overlap: float = 0.25,
    batch_slices: int = 8,
) -> torch.Tensor:
    """One member by sliding window over each slice: (Z, C, H, W) in [0, 1] -> (Z, H, W) probabilities.

    Windows are `patch_px` square (the training patch), blended with Gaussian weights; `batch_slices`
    slices go through MONAI's inferer at a time, which runs up to `batch_slices` windows per forward.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_slices < 1:
        raise ValueError(f"batch_slices must be at least 1, got {batch_slices}")
    inferer = SlidingWindowInferer(
        roi_size=(patch_px, patch_px), sw_batch_size=batch_slices, overlap=overlap, mode="gaussian"
    )
    was_training = member.training
    member.eval()
    outputs = []
    with torch.inference_mode(), warnings.catch_warnings():
        # MONAI 1.5's inferer indexes with a list of slices, which torch >= 2.9 warns about but still
        # reads as a tuple; tests/test_ensemble.py checks the output geometry stays right.
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
        for start in range(0, channels.shape[0], batch_slices):
            batch = channels[start : start + batch_slices].to(device)
            outputs.append(torch.sigmoid(inferer(batch, member))[:, 0].float().cpu())
    member.train(was_training)
    return torch.cat(outputs)


def _check_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing_mm)
    if len(values) != 3 or not all(np.isfinite(values)) or min(values) <= 0:
        raise VolumeError(f"spacing_mm must be three positive (z, y, x) values in mm, got {tuple(spacing_mm)}")
    return values


def predict_stack(
    model: EnsembleModel,
    image_hu: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    device: str | torch.device = "cpu",
    overlap: float = 0.25,
    batch_slices: int = 8,
    progress: Callable[[dict], None] | None = None,
) -> StackPrediction:
    """Run every member on a CT stack (Z, Y, X) in HU with (z, y, x) `spacing_mm`.

    Slices are resampled to the model's in-plane spacing, windowed into the model's HU channels,
    predicted by sliding window, and resampled back, so all outputs are on the input grid.
    `progress` receives {"member": i, "members": N} after each member. Raises `VolumeError` for
    non-CT input, bad shapes or bad spacing.
    """
    check_ct_hu(image_hu, "image")
    _, spacing_y, spacing_x = _check_spacing(spacing_mm)
    shape_yx = tuple(image_hu.shape[1:])
    grid_yx = model_grid_yx(shape_yx, (spacing_y, spacing_x), model.spacing_mm)
    image = resample_slices(torch.from_numpy(np.asarray(image_hu, dtype=np.float32)), grid_yx)
    channels = window_channels(image, model.windows)
    member_probs = np.empty((len(model.members), *image_hu.shape), dtype=np.float32)
    for index, member in enumerate(model.members):
        probs = predict_member_slices(
            member, channels, model.patch_px, device=device, overlap=overlap, batch_slices=batch_slices
        )
        member_probs[index] = resample_slices(probs, shape_yx).clamp_(0.0, 1.0).numpy()
        if progress is not None:
            progress({"member": index, "members": len(model.members)})
    js = np.stack([js_divergence(member_probs[:, z]) for z in range(image_hu.shape[0])])
    return StackPrediction(member_probs=member_probs, mean_prob=member_probs.mean(axis=0), js=js)


def _state_dicts(model: EnsembleModel) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in model.members]


def weights_digest(states: Sequence[dict[str, torch.Tensor]]) -> str:
    """SHA-256 (first 16 hex digits) over every member's tensors: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for state in states:
        for name in sorted(state):
            tensor = state[name].detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_ensemble(model: EnsembleModel, path: str | Path) -> None:
    """Write `model` (weights + metadata) as one file, atomically; sets `model.meta['version']`."""
    missing = [key for key in REQUIRED_META_KEYS if key not in model.meta]
    if missing:
        raise CheckpointError(f"cannot save ensemble: metadata lacks {missing}")
    if not model.members:
        raise CheckpointError("cannot save an ensemble with no members")
    states = _state_dicts(model)
    model.meta["version"] = weights_digest(states)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "meta": dict(model.meta),
        "members": states,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def merge_ensembles(models: Sequence[EnsembleModel]) -> EnsembleModel:
    """One committee from ensembles trained separately on the same stacks (e.g. members trained in parallel
    with `TrainSettings.first_member`, on several machines); members keep their order.

    Raises `CheckpointError` when the ensembles differ in preset, channels, patch, spacing or training
    stacks, or when two members share a training seed (the same member twice would bias the committee).
    """
    if len(models) < 2:
        raise ValueError(f"merging needs at least two ensembles, got {len(models)}")
    first = models[0].meta
    for index, model in enumerate(models[1:], start=1):
        differing = [key for key in MERGE_KEYS if model.meta.get(key) != first.get(key)]
        if differing:
            raise CheckpointError(f"cannot merge: ensemble {index} differs from ensemble 0 in {differing}")
    member_metrics = [metrics for model in models for metrics in model.meta["metrics"].get("members", [])]
    seeds = [metrics.get("seed") for metrics in member_metrics]
    repeated = sorted({seed for seed in seeds if seed is not None and seeds.count(seed) > 1})
    if repeated:
        raise CheckpointError(f"cannot merge: members trained with the same seed {repeated} would be duplicates")
    meta = {key: value for key, value in first.items() if key != "version"}
    meta["metrics"] = {"mode": "merged", "members": member_metrics,
                       "merged_from": [model.meta.get("version") for model in models],
                       "settings": first["metrics"].get("settings")}
    return EnsembleModel(members=[member for model in models for member in model.members], meta=meta)


def load_ensemble(path: str | Path, device: str | torch.device = "cpu") -> EnsembleModel:
    """Read a checkpoint written by `save_ensemble`; members are in eval mode on `device`.

    Raises `CheckpointError` if the file is missing, unreadable or corrupt, if its weights do not
    match their recorded digest, or if they do not fit the recorded preset and channels.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no ensemble checkpoint at {path}")
    try:
        payload = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"cannot read ensemble checkpoint {path}: corrupt or not a torch file ({error})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an ichal ensemble checkpoint")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload.get('format_version')}, expected {CHECKPOINT_FORMAT_VERSION}"
        )
    meta, states = payload.get("meta"), payload.get("members")
    if not isinstance(meta, dict) or not isinstance(states, list) or not states:
        raise CheckpointError(f"{path} lacks metadata or member weights")
    missing = [key for key in (*REQUIRED_META_KEYS, "version") if key not in meta]
    if missing:
        raise CheckpointError(f"{path} metadata lacks {missing}")
    if weights_digest(states) != meta["version"]:
        raise CheckpointError(f"{path} weights do not match their recorded version {meta['version']}: file is corrupt")
    try:
        preset = ModelPreset.from_dict(meta["preset"])
        windows = windows_from_meta(meta["channels"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} has malformed preset or channels: {error}") from error
    members = []
    for index, state in enumerate(states):
        member = build_network(preset, len(windows))
        try:
            member.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise CheckpointError(
                f"{path} member {index} weights do not fit preset {preset.name!r} with {len(windows)} channels: {error}"
            ) from error
        members.append(member.to(device).eval())
    return EnsembleModel(members=members, meta=meta)
