"""PatchFCN ensemble training: retrain from scratch or continually fine-tune on H u Q; `python -m ichal.train`.

Kuo et al. 2018, section 2 (patch training, hemorrhage-rich patches oversampled, N seeds); ACFT
(paper 001, Table 2 ACFT(HQ), Table 3: fine-tune from the previous model at 1/10 learning rate).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import monai
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, FocalLoss
from scipy import ndimage
from torch import nn
from tqdm import tqdm

import ichal
from ichal.config import DEFAULT_CONFIG, HUWindow, PipelineConfig
from ichal.ensemble import (
    EnsembleModel,
    load_ensemble,
    merge_ensembles,
    model_grid_yx,
    predict_member_slices,
    resample_slices,
    save_ensemble,
    window_channels,
    windows_to_meta,
)
from ichal.io import VolumeError, check_ct_hu, check_label, read_nifti
from ichal.metrics import dice, stack_score
from ichal.models import ModelPreset, build_network, resolve_preset

MODES = ("retrain", "continual")
LOSSES = ("dice_ce", "focal")
# Patch centres for negative samples are redrawn until they fall inside the head (HU above this).
BODY_MIN_HU = -300.0
BODY_SAMPLE_TRIES = 10
AIR_HU = -1000.0
# Look-alike negatives: unlabeled intracranial voxels of acute-blood density (3x3 mean, HU), away from the
# skull (bone above SKULL_MIN_HU, grown 1 px) and at least LABEL_MARGIN_PX from a label. Uniform draws over
# the head rarely hit dense sinuses, arteries or calcifications, which are where the models' false
# positives on empty stacks sit (docs/model.md, "Look-alike negatives").
LOOKALIKE_HU = (50.0, 100.0)
SKULL_MIN_HU = 300.0
LABEL_MARGIN_PX = 2
# Hard negatives: midway (`TrainSettings.hard_negative_start`) a member predicts some of its training stacks and
# keeps the voxels it calls bleed where there is none, so later negative patches revisit its own confident
# mistakes (issue 19: single false-positive voxels at probability 1.00 decide stack AP). One stack per 100
# iterations (at least 4): predicting a stack costs about 10 training steps, so mining adds about 10 %.
HARD_NEGATIVE_STACKS_PER_ITERATION = 0.01
HARD_NEGATIVE_MIN_STACKS = 4


class TrainingCancelled(RuntimeError):
    """`should_stop()` returned True; no model was produced and the previous one is untouched."""


@dataclass
class TrainItem:
    """One labeled stack: image (Z, Y, X) in HU, label (Z, Y, X) uint8 {0, 1}, spacing (z, y, x) mm."""

    id: str
    image_hu: np.ndarray
    label: np.ndarray
    spacing_mm: tuple[float, float, float]


@dataclass
class TrainSettings:
    """Training hyper-parameters. `spacing_mm` is the in-plane model spacing (None: median of the data).

    Continual mode fine-tunes each member for `continual_iterations` (None: `iterations`) at
    `lr * continual_lr_factor` on new stacks plus stacks it gets wrong: a stack is wrong when the
    member's stack-level call (`ichal.metrics.stack_score` >= detection threshold) is wrong or, for a bleed stack, its
    Dice is below `hard_dice_threshold`.

    Retrain mode trains members `first_member` .. `first_member + ensemble_size - 1` (member i's seed is
    `seed * 1000 + i`), so members trained in separate runs and merged (`ichal.ensemble.merge_ensembles`)
    equal one run's committee.

    A patch is centred on a bleed voxel with probability `positive_fraction`; a negative patch is centred
    on one of the member's own false-positive voxels (`false_positive_voxels`, mined after
    `hard_negative_start` of its iterations) with probability `hard_negative_fraction`, else on a
    blood-density look-alike voxel (`lookalike_voxels`) with probability `lookalike_fraction`, else
    anywhere in the head.
    """

    preset: str | ModelPreset = "cpu_small"
    ensemble_size: int = 4
    first_member: int = 0
    iterations: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    loss: str = "dice_ce"
    positive_fraction: float = 0.5
    lookalike_fraction: float = 0.5
    hard_negative_fraction: float = 0.5  # docs/model.md, "Hard negatives": stack AUC 0.77 / 0.83 -> 0.91 / 0.92
    hard_negative_start: float = 0.5
    seed: int = 0
    device: str = "cpu"
    spacing_mm: float | None = None
    max_rotation_deg: float = 10.0
    hu_shift_jitter: float = 4.0
    hu_scale_jitter: float = 0.03
    continual_iterations: int | None = None
    continual_lr_factor: float = 0.1
    hard_dice_threshold: float = 0.5
    config: PipelineConfig = field(default_factory=lambda: DEFAULT_CONFIG)

    def validate(self) -> None:
        """Raise `ValueError` naming the first setting out of range."""
        resolve_preset(self.preset)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("ensemble_size", "iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("positive_fraction", "lookalike_fraction", "hard_negative_fraction", "hard_negative_start"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.first_member < 0:
            raise ValueError(f"first_member must be at least 0, got {self.first_member}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")


@dataclass(frozen=True)
class DataParallel:
    """This process's part in training each member with several processes (torch DistributedDataParallel,
    set up by `ichal.cluster`): `wrap` turns a member into its DDP module, and `rank` gives this process its
    own patch draws, so each step averages the gradients of `world_size` different batches."""

    rank: int
    world_size: int
    wrap: Callable[[nn.Module], nn.Module]


@dataclass
class _Stack:
    """A training stack resampled to the model spacing: HU (Z, H, W) int16, label (Z, H, W) uint8."""

    id: str
    image_hu: np.ndarray
    label: np.ndarray
    spacing_mm: tuple[float, float, float]  # (z, y, x) on the model grid
    positives: np.ndarray  # flat indices of label voxels
    lookalikes: np.ndarray  # flat indices of look-alike voxels (`lookalike_voxels`)
    # flat indices of the training member's own false-positive voxels (`false_positive_voxels`), once mined
    hard_negatives: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def false_positive_voxels(probs: np.ndarray, label: np.ndarray, threshold: float) -> np.ndarray:
    """Flat indices of voxels a model calls bleed (`probs >= threshold`) in a (Z, Y, X) stack, away from the
    label (more than `LABEL_MARGIN_PX` in-plane: the label's rim is partial volume, not a mistake)."""
    near_label = ndimage.binary_dilation(label > 0, structure=np.ones((1, 3, 3), dtype=bool),
                                         iterations=LABEL_MARGIN_PX)
    return np.flatnonzero((probs >= threshold) & ~near_label)


def lookalike_voxels(image_hu: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Flat indices of unlabeled intracranial voxels of blood density in a (Z, Y, X) stack.

    Intracranial = the holes of each slice's skull (HU > `SKULL_MIN_HU`, grown 1 px), so slices with an open
    skull (skull base, vertex) contribute none. Blood density = the 3 x 3 in-plane mean in `LOOKALIKE_HU`,
    so single noisy voxels do not count. Voxels within `LABEL_MARGIN_PX` of a label (its partial-volume rim)
    are left to the positive patches.
    """
    in_plane = np.ones((1, 3, 3), dtype=bool)
    skull = ndimage.binary_dilation(image_hu > SKULL_MIN_HU, structure=in_plane)
    intracranial = np.stack([ndimage.binary_fill_holes(plane) for plane in skull]) & ~skull
    mean_hu = ndimage.uniform_filter(image_hu.astype(np.float32), size=(1, 3, 3))
    near_label = ndimage.binary_dilation(label > 0, structure=in_plane, iterations=LABEL_MARGIN_PX)
    low, high = LOOKALIKE_HU
    return np.flatnonzero(intracranial & (mean_hu >= low) & (mean_hu <= high) & ~near_label)


def software_versions() -> dict[str, str]:
    """Versions recorded in checkpoint metadata."""
    return {"ichal": ichal.__version__, "torch": str(torch.__version__), "monai": str(monai.__version__),
            "numpy": str(np.__version__), "python": platform.python_version()}


def _validate_items(items: Sequence[TrainItem]) -> None:
    if not items:
        raise ValueError("no labeled stacks to train on")
    ids = [item.id for item in items]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate stack ids in training items: {duplicates[:5]}")
    for item in items:
        check_ct_hu(item.image_hu, f"image {item.id!r}")
        check_label(item.label, item.image_hu.shape, f"label of {item.id!r}")
        spacing = tuple(float(s) for s in item.spacing_mm)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise VolumeError(f"stack {item.id!r} has invalid spacing {item.spacing_mm}; expected (z, y, x) mm > 0")


def _prepare(item: TrainItem, model_spacing_mm: float) -> _Stack:
    """Resample one item in-plane to the model spacing (image bilinear, label by 0.5 on bilinear)."""
    grid = model_grid_yx(item.image_hu.shape[1:], item.spacing_mm[1:], model_spacing_mm)
    image = resample_slices(torch.from_numpy(np.asarray(item.image_hu, dtype=np.float32)), grid)
    label = resample_slices(torch.from_numpy(np.asarray(item.label, dtype=np.float32)), grid) >= 0.5
    label_np = label.numpy().astype(np.uint8)
    image_np = image.round().clamp(-32768, 32767).numpy().astype(np.int16)
    return _Stack(id=item.id, image_hu=image_np, label=label_np,
                  spacing_mm=(float(item.spacing_mm[0]), model_spacing_mm, model_spacing_mm),
                  positives=np.flatnonzero(label_np),
                  lookalikes=lookalike_voxels(image_np, label_np))


def _crop(plane: np.ndarray, center_y: int, center_x: int, size: int, fill: float) -> np.ndarray:
    """`size` x `size` crop of a 2D array centred at (center_y, center_x), padded with `fill`."""
    out = np.full((size, size), fill, dtype=np.float32)
    y0, x0 = center_y - size // 2, center_x - size // 2
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(plane.shape[0], y0 + size), min(plane.shape[1], x0 + size)
    if ye > ys and xe > xs:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = plane[ys:ye, xs:xe]
    return out


_VOXEL_KINDS = {"positive": "positives", "hard": "hard_negatives", "lookalike": "lookalikes"}


def _sample_patch_center(stacks: Sequence[_Stack], positive_ids: Sequence[int], hard_ids: Sequence[int],
                         lookalike_ids: Sequence[int], kind: str, patch_px: int,
                         rng: np.random.Generator) -> tuple[_Stack, int, int, int]:
    """A (stack, z, y, x) patch centre of `kind`: "positive" on a random bleed voxel, "hard" on a random
    false-positive voxel of the member, "lookalike" on a random look-alike voxel (all shifted up to
    patch/4), "head" anywhere in the head."""
    if kind in _VOXEL_KINDS:
        attribute = _VOXEL_KINDS[kind]
        stack_ids = {"positive": positive_ids, "hard": hard_ids, "lookalike": lookalike_ids}[kind]
        stack = stacks[stack_ids[rng.integers(len(stack_ids))]]
        voxels = getattr(stack, attribute)
        z, y, x = np.unravel_index(voxels[rng.integers(voxels.size)], stack.label.shape)
        shift = patch_px // 4
        return stack, int(z), int(y + rng.integers(-shift, shift + 1)), int(x + rng.integers(-shift, shift + 1))
    stack = stacks[rng.integers(len(stacks))]
    depth, height, width = stack.image_hu.shape
    for _ in range(BODY_SAMPLE_TRIES):
        z, y, x = int(rng.integers(depth)), int(rng.integers(height)), int(rng.integers(width))
        if stack.image_hu[z, y, x] > BODY_MIN_HU:
            break
    return stack, z, y, x


def _patch_kind(positive_ids: Sequence[int], hard_ids: Sequence[int], lookalike_ids: Sequence[int],
                settings: TrainSettings, rng: np.random.Generator) -> str:
    """Draw what the next patch is centred on; kinds without any voxel in the training set are skipped."""
    if positive_ids and rng.random() < settings.positive_fraction:
        return "positive"
    if hard_ids and rng.random() < settings.hard_negative_fraction:
        return "hard"
    if lookalike_ids and rng.random() < settings.lookalike_fraction:
        return "lookalike"
    return "head"


def _sample_batch(stacks: Sequence[_Stack], positive_ids: Sequence[int], hard_ids: Sequence[int],
                  lookalike_ids: Sequence[int], settings: TrainSettings, patch_px: int, windows: Sequence[HUWindow],
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: (B, C, P, P) windowed patches and (B, 1, P, P) float labels, augmented.

    Augmentation: left-right flip, rotation up to `max_rotation_deg`, HU scale/shift jitter.
    """
    images, labels = [], []
    for _ in range(settings.batch_size):
        kind = _patch_kind(positive_ids, hard_ids, lookalike_ids, settings, rng)
        stack, z, y, x = _sample_patch_center(stacks, positive_ids, hard_ids, lookalike_ids, kind, patch_px, rng)
        images.append(_crop(stack.image_hu[z], y, x, patch_px, AIR_HU))
        labels.append(_crop(stack.label[z], y, x, patch_px, 0.0))
    batch = settings.batch_size
    image = torch.from_numpy(np.stack(images))[:, None]
    label = torch.from_numpy(np.stack(labels))[:, None]
    angle = np.deg2rad(rng.uniform(-settings.max_rotation_deg, settings.max_rotation_deg, batch))
    flip = np.where(rng.random(batch) < 0.5, -1.0, 1.0)
    theta = np.zeros((batch, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = np.cos(angle) * flip, -np.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = np.sin(angle) * flip, np.cos(angle)
    grid = F.affine_grid(torch.from_numpy(theta), list(image.shape), align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    label = F.grid_sample(label, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    scale = 1.0 + rng.uniform(-settings.hu_scale_jitter, settings.hu_scale_jitter, (batch, 1, 1, 1))
    shift = rng.uniform(-settings.hu_shift_jitter, settings.hu_shift_jitter, (batch, 1, 1, 1))
    image = image * torch.from_numpy(scale.astype(np.float32)) + torch.from_numpy(shift.astype(np.float32))
    return window_channels(image[:, 0], windows), label


def _loss_function(name: str) -> nn.Module:
    if name == "dice_ce":
        return DiceCELoss(sigmoid=True, batch=True)
    return FocalLoss(gamma=2.0, use_softmax=False)


def _train_member(member: nn.Module, stacks: Sequence[_Stack], settings: TrainSettings, *, iterations: int,
                  lr: float, seed: int, member_index: int, patch_px: int, windows: Sequence[HUWindow],
                  progress: Callable[[dict], None] | None, should_stop: Callable[[], bool] | None,
                  data_parallel: DataParallel | None = None) -> dict:
    """Optimise one member in place with AdamW and a cosine learning-rate schedule; returns its metrics."""
    rng = np.random.default_rng(seed if data_parallel is None else (seed, data_parallel.rank))
    torch.manual_seed(seed)
    positive_ids = [i for i, stack in enumerate(stacks) if stack.positives.size]
    lookalike_ids = [i for i, stack in enumerate(stacks) if stack.lookalikes.size]
    hard_ids: list[int] = []
    mining_iteration = (max(1, round(settings.hard_negative_start * iterations))
                        if settings.hard_negative_fraction > 0 else None)
    member.to(settings.device).train()
    if data_parallel is not None:
        # The DDP module shares the member's parameters: training it trains `member`.
        member = data_parallel.wrap(member)
    optimizer = torch.optim.AdamW(member.parameters(), lr=lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations)
    loss_function = _loss_function(settings.loss)
    losses = []
    for iteration in range(1, iterations + 1):
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"training cancelled at member {member_index}, iteration {iteration}")
        if iteration == mining_iteration:
            mining_stacks = max(HARD_NEGATIVE_MIN_STACKS, round(iterations * HARD_NEGATIVE_STACKS_PER_ITERATION))
            stacks = _with_hard_negatives(member, stacks, mining_stacks, settings, patch_px, windows,
                                          np.random.default_rng(seed + 1))
            hard_ids = [i for i, stack in enumerate(stacks) if stack.hard_negatives.size]
            member.train()
        image, label = _sample_batch(stacks, positive_ids, hard_ids, lookalike_ids, settings, patch_px, windows, rng)
        loss = loss_function(member(image.to(settings.device)), label.to(settings.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.item()))
        if progress is not None:
            progress({"member": member_index, "iteration": iteration, "iterations": iterations,
                      "loss": losses[-1], "lr": schedule.get_last_lr()[0]})
    member.eval()
    tail = losses[-max(1, iterations // 10):]
    return {"seed": seed, "iterations": iterations, "stacks": len(stacks), "final_loss": float(np.mean(tail)),
            "hard_negative_stacks": len(hard_ids),
            "hard_negative_voxels": int(sum(stacks[i].hard_negatives.size for i in hard_ids))}


def _with_hard_negatives(member: nn.Module, stacks: Sequence[_Stack], count: int, settings: TrainSettings,
                         patch_px: int, windows: Sequence[HUWindow], rng: np.random.Generator) -> list[_Stack]:
    """`stacks`, where `count` of them (drawn at random; all if fewer) carry the member's false-positive
    voxels; copies, so other members' stacks stay as they were."""
    mined = set(rng.choice(len(stacks), size=min(len(stacks), count), replace=False).tolist())
    out = []
    for index, stack in enumerate(stacks):
        if index in mined:
            probs = _member_probs(member, stack, settings, patch_px, windows)
            stack = replace(stack, hard_negatives=false_positive_voxels(probs, stack.label,
                                                                         settings.config.detection_threshold))
        out.append(stack)
    return out


def _member_probs(member: nn.Module, stack: _Stack, settings: TrainSettings, patch_px: int,
                  windows: Sequence[HUWindow]) -> np.ndarray:
    """One member's (Z, H, W) probabilities on a training stack (model grid)."""
    channels = window_channels(torch.from_numpy(stack.image_hu), windows)
    return predict_member_slices(member, channels, patch_px, device=settings.device).numpy()


def _member_gets_wrong(member: nn.Module, stack: _Stack, settings: TrainSettings, patch_px: int,
                       windows: Sequence[HUWindow]) -> bool:
    """ACFT's H: the member's stack-level call (`ichal.metrics.stack_score`) is wrong, or its Dice on a bleed
    stack is too low."""
    probs = _member_probs(member, stack, settings, patch_px, windows)
    threshold = settings.config.detection_threshold
    has_bleed = bool(stack.positives.size)
    if (stack_score(probs, stack.spacing_mm) >= threshold) != has_bleed:
        return True
    predicted = probs >= threshold
    return has_bleed and dice(predicted, stack.label) < settings.hard_dice_threshold


def _member_seed(settings: TrainSettings, member_index: int) -> int:
    return settings.seed * 1000 + member_index


def train_ensemble(
    items: Sequence[TrainItem],
    settings: TrainSettings,
    *,
    mode: str = "retrain",
    previous: EnsembleModel | None = None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    data_parallel: DataParallel | None = None,
) -> EnsembleModel:
    """Train a PatchFCN ensemble on labeled stacks.

    `retrain`: `settings.ensemble_size` members from scratch, differing only by seed.
    `continual`: each member of `previous` is copied and fine-tuned on the stacks not in
    `previous.meta['train_ids']` (Q) plus the already-seen stacks that member gets wrong (H); a
    member with an empty H u Q is kept as is. Model geometry (preset, channels, spacing, patch)
    comes from `previous`. `progress` gets {"member", "iteration", "iterations", "loss", "lr"} per
    step (and {"member", "hard", "new"} in continual mode before each member); `should_stop()`
    returning True raises `TrainingCancelled` and leaves `previous` untouched. `data_parallel`: this
    process is one of `world_size` training every member together (each draws `batch_size` patches a step).
    """
    settings.validate()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "continual" and previous is None:
        raise ValueError("continual mode needs the previous ensemble to fine-tune")
    _validate_items(items)
    if mode == "continual":
        preset = ModelPreset.from_dict(previous.meta["preset"])
        windows, spacing_mm, patch_px = previous.windows, previous.spacing_mm, previous.patch_px
    else:
        preset = resolve_preset(settings.preset)
        windows = settings.config.hu_windows
        spacing_mm = settings.spacing_mm or round(float(np.median([np.mean(i.spacing_mm[1:]) for i in items])), 3)
        patch_px = settings.config.patch_px(spacing_mm)
    stacks = [_prepare(item, spacing_mm) for item in items]
    member_metrics, members = [], []
    if mode == "retrain":
        for index in range(settings.first_member, settings.first_member + settings.ensemble_size):
            torch.manual_seed(_member_seed(settings, index))
            member = build_network(preset, len(windows))
            member_metrics.append(_train_member(
                member, stacks, settings, iterations=settings.iterations, lr=settings.lr,
                seed=_member_seed(settings, index), member_index=index, patch_px=patch_px, windows=windows,
                progress=progress, should_stop=should_stop, data_parallel=data_parallel))
            members.append(member)
        train_ids = sorted(stack.id for stack in stacks)
    else:
        seen = set(previous.meta["train_ids"])
        new = [stack for stack in stacks if stack.id not in seen]
        old = [stack for stack in stacks if stack.id in seen]
        for index, previous_member in enumerate(previous.members):
            member = copy.deepcopy(previous_member).to(settings.device)
            hard = [stack for stack in old if _member_gets_wrong(member, stack, settings, patch_px, windows)]
            if progress is not None:
                progress({"member": index, "new": len(new), "hard": len(hard)})
            subset = new + hard
            metrics = {"new": len(new), "hard": len(hard), "iterations": 0, "stacks": len(subset)}
            if subset:
                metrics |= _train_member(
                    member, subset, settings, iterations=settings.continual_iterations or settings.iterations,
                    lr=settings.lr * settings.continual_lr_factor, seed=_member_seed(settings, index),
                    member_index=index, patch_px=patch_px, windows=windows, progress=progress,
                    should_stop=should_stop, data_parallel=data_parallel)
            member_metrics.append(metrics)
            members.append(member.cpu().eval())
        train_ids = sorted(seen | {stack.id for stack in stacks})
    training = {k: v for k, v in asdict(settings).items() if k != "config"}
    if data_parallel is not None:
        training["data_parallel_processes"] = data_parallel.world_size
    meta = {
        "preset": preset.to_dict(),
        "channels": windows_to_meta(windows),
        "patch_px": int(patch_px),
        "spacing_mm": float(spacing_mm),
        "train_ids": train_ids,
        "metrics": {"mode": mode, "members": member_metrics, "settings": training},
        "versions": software_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return EnsembleModel(members=[m.cpu().eval() for m in members], meta=meta)


def load_pool_items(pool_dir: str | Path) -> list[TrainItem]:
    """Labeled stacks of a pool: labels `POOL/labels/final/<id>.nii.gz` with images `POOL/<id>.nii.gz`."""
    pool_dir = Path(pool_dir)
    label_paths = sorted((pool_dir / "labels" / "final").glob("*.nii.gz"))
    if not label_paths:
        raise ValueError(f"no labels in {pool_dir / 'labels' / 'final'}; label some stacks first")
    items = []
    for label_path in label_paths:
        stack_id = label_path.name.removesuffix(".nii.gz")
        image = read_nifti(pool_dir / f"{stack_id}.nii.gz")
        label = read_nifti(label_path)
        checked = check_label(label.array, image.array.shape, f"label {stack_id!r}")
        items.append(TrainItem(stack_id, image.array, checked, image.spacing_mm))
    return items


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ichal.train", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, help="pool folder (images + labels/final)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (atomically)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="CKPT",
                        help="instead of training: merge these ensembles (same stacks, other members) into --out")
    parser.add_argument("--preset", default="cpu_small")
    parser.add_argument("--members", type=int, default=DEFAULT_CONFIG.ensemble_size)
    parser.add_argument("--first-member", type=int, default=0,
                        help="index of the first member to train (train members in parallel runs, then --merge)")
    parser.add_argument("--iterations", type=int, default=TrainSettings.iterations)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--lookalike-fraction", type=float, default=TrainSettings.lookalike_fraction,
                        help="share of negative patches centred on blood-density look-alikes")
    parser.add_argument("--hard-negative-fraction", type=float, default=TrainSettings.hard_negative_fraction,
                        help="share of negative patches centred on the member's own false positives (mined mid-training)")
    parser.add_argument("--loss", choices=LOSSES, default="dice_ce")
    parser.add_argument("--mode", choices=MODES, default="retrain")
    parser.add_argument("--previous", type=Path, help="checkpoint to fine-tune (continual mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.merge:
        model = merge_ensembles([load_ensemble(path) for path in args.merge])
        save_ensemble(model, args.out)
        print(f"saved {len(model.members)} members merged from {len(args.merge)} ensembles to {args.out}, "
              f"version {model.meta['version']}")
        return 0
    if args.pool is None:
        parser.error("--pool is required (or --merge)")
    if args.mode == "continual" and args.previous is None:
        parser.error("--mode continual needs --previous")
    settings = TrainSettings(preset=args.preset, ensemble_size=args.members, first_member=args.first_member,
                             iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, loss=args.loss,
                             lookalike_fraction=args.lookalike_fraction,
                             hard_negative_fraction=args.hard_negative_fraction, seed=args.seed, device=args.device)
    previous = load_ensemble(args.previous) if args.previous else None
    items = load_pool_items(args.pool)
    members = len(previous.members) if previous else args.members
    with tqdm(total=members * args.iterations, desc="training", unit="it") as bar:
        def report(event: dict) -> None:
            if "loss" in event:
                bar.update(1)
                bar.set_postfix(member=event["member"], loss=f"{event['loss']:.3f}")
        model = train_ensemble(items, settings, mode=args.mode, previous=previous, progress=report)
    save_ensemble(model, args.out)
    print(f"saved {len(model.members)} members ({args.mode}, {len(model.meta['train_ids'])} stacks) "
          f"to {args.out}, version {model.meta['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
