"""Dilated residual FCN: output geometry, presets and their validation."""

import pytest
import torch

from ichal.models import PRESETS, ModelPreset, Stage, build_network, resolve_preset


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("height, width", [(40, 40), (33, 47)])
def test_network_returns_one_logit_per_input_pixel(preset, height, width):
    network = build_network(preset, in_channels=3).eval()
    with torch.no_grad():
        logits = network(torch.randn(2, 3, height, width))
    assert logits.shape == (2, 1, height, width)
    assert torch.isfinite(logits).all()


def test_presets_follow_the_drn_layout():
    assert PRESETS["cpu_small"].output_stride == 4
    assert PRESETS["drn38"].output_stride == 8
    drn38_blocks = [stage.blocks for stage in PRESETS["drn38"].stages]
    assert drn38_blocks == [1, 1, 3, 4, 6, 3, 1, 1]
    small = sum(p.numel() for p in build_network("cpu_small", 3).parameters())
    large = sum(p.numel() for p in build_network("drn38", 3).parameters())
    assert small < 500_000 < 20_000_000 < large


def test_preset_round_trips_through_plain_data():
    preset = ModelPreset("tiny", 4, 3, (Stage(8, 1, stride=2), Stage(8, 1, dilation=2, residual=False)))
    assert ModelPreset.from_dict(preset.to_dict()) == preset
    assert resolve_preset(preset) is preset


def test_bad_presets_and_channels_are_rejected():
    with pytest.raises(ValueError, match="unknown model preset 'drn1000'"):
        build_network("drn1000", 3)
    with pytest.raises(ValueError, match="in_channels"):
        build_network("cpu_small", 0)
    with pytest.raises(ValueError, match="malformed model preset"):
        ModelPreset.from_dict({"name": "x", "stages": []})
