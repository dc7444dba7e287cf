"""Dilated residual FCN (DRN family) for per-pixel hemorrhage logits on 2D axial CT patches.

Kuo et al. 2018, section 2 (PatchFCN on a 38-layer DRN); DRN-D layout from Yu et al. 2017. Built from
MONAI's `Convolution` and `ResidualUnit` blocks; only the DRN stage layout is ours.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

# Prior foreground probability used to initialise the output bias (bleeds are a small fraction of
# pixels); it keeps the first iterations from being dominated by false positives.
PRIOR_FOREGROUND_PROBABILITY = 0.01


@dataclass(frozen=True)
class Stage:
    """One DRN level: `blocks` residual units (or plain conv layers when `residual` is False).

    The first block applies `stride`; all blocks use `dilation`. Channels are `channels`.
    """

    channels: int
    blocks: int
    stride: int = 1
    dilation: int = 1
    residual: bool = True


@dataclass(frozen=True)
class ModelPreset:
    """Depth and width of a dilated residual FCN: a stem convolution followed by `stages`."""

    name: str
    stem_channels: int
    stem_kernel: int
    stages: tuple[Stage, ...]

    @property
    def output_stride(self) -> int:
        """Downsampling factor of the last feature map relative to the input."""
        return math.prod(stage.stride for stage in self.stages)

    def to_dict(self) -> dict:
        """Plain-data form (str/int/bool/list) for checkpoint metadata."""
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> ModelPreset:
        """Inverse of `to_dict`; raises `ValueError` on missing or malformed keys."""
        try:
            stages = tuple(Stage(**dict(stage)) for stage in data["stages"])
            return ModelPreset(
                name=str(data["name"]),
                stem_channels=int(data["stem_channels"]),
                stem_kernel=int(data["stem_kernel"]),
                stages=stages,
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed model preset {data!r}: {error}") from error


PRESETS: dict[str, ModelPreset] = {
    # About 0.22 M parameters, output stride 4: trains in minutes on 2 CPU cores.
    "cpu_small": ModelPreset(
        name="cpu_small",
        stem_channels=16,
        stem_kernel=5,
        stages=(
            Stage(16, 1, stride=1, residual=False),
            Stage(24, 1, stride=2),
            Stage(32, 2, stride=2),
            Stage(48, 2, dilation=2),
            Stage(48, 1, dilation=4),
            Stage(48, 1, dilation=2, residual=False),
            Stage(48, 1, dilation=1, residual=False),
        ),
    ),
    # DRN-D-38 (Yu et al. 2017, layers [1,1,3,4,6,3,1,1]), output stride 8, about 26 M parameters.
    "drn38": ModelPreset(
        name="drn38",
        stem_channels=16,
        stem_kernel=7,
        stages=(
            Stage(16, 1, stride=1, residual=False),
            Stage(32, 1, stride=2, residual=False),
            Stage(64, 3, stride=2),
            Stage(128, 4, stride=2),
            Stage(256, 6, dilation=2),
            Stage(512, 3, dilation=4),
            Stage(512, 1, dilation=2, residual=False),
            Stage(512, 1, dilation=1, residual=False),
        ),
    ),
}


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Module:
    """Conv -> BatchNorm -> ReLU with 'same' padding for odd kernels (MONAI `Convolution`)."""
    return Convolution(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=stride,
        kernel_size=kernel,
        dilation=dilation,
        act="RELU",
        norm="BATCH",
        bias=False,
    )


class DilatedResidualFCN(nn.Module):
    """(N, C, H, W) windowed CT -> (N, 1, H, W) hemorrhage logits at the input resolution.

    Stages downsample by `preset.output_stride`, later stages dilate instead of striding (DRN);
    a 1x1 classifier is upsampled bilinearly to the input size, so any H, W works.
    """

    def __init__(self, preset: ModelPreset, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(in_channels, preset.stem_channels, preset.stem_kernel)]
        channels = preset.stem_channels
        for stage in preset.stages:
            for block in range(stage.blocks):
                stride = stage.stride if block == 0 else 1
                if stage.residual:
                    layers.append(
                        ResidualUnit(
                            spatial_dims=2,
                            in_channels=channels,
                            out_channels=stage.channels,
                            strides=stride,
                            kernel_size=3,
                            subunits=2,
                            act="RELU",
                            norm="BATCH",
                            dilation=stage.dilation,
                            bias=False,
                        )
                    )
                else:
                    layers.append(_conv(channels, stage.channels, 3, stride, stage.dilation))
                channels = stage.channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, 1, kernel_size=1)
        prior = PRIOR_FOREGROUND_PROBABILITY
        nn.init.constant_(self.classifier.bias, math.log(prior / (1.0 - prior)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def resolve_preset(preset: str | ModelPreset) -> ModelPreset:
    """Return the `ModelPreset` named `preset` (or `preset` itself); unknown names raise `ValueError`."""
    if isinstance(preset, ModelPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def build_network(preset: str | ModelPreset, in_channels: int) -> nn.Module:
    """A fresh `DilatedResidualFCN` for `in_channels` HU-window channels: (N,C,H,W) -> (N,1,H,W) logits."""
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    return DilatedResidualFCN(resolve_preset(preset), in_channels)
