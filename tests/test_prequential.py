"""The hours a prequential point is placed at: measured labeling time of the stacks the committee was trained on."""

from __future__ import annotations

import pytest

from ichal.prequential import trained_hours


def test_trained_hours_sum_the_sessions_of_trained_stacks_and_count_the_unmeasured():
    records = [{"image": "a", "seconds": 1800.0}, {"image": "a", "seconds": 600.0},  # relabeled in a second session
               {"image": "b", "seconds": 1200.0}, {"image": "c", "seconds": 3600.0}]  # c: not trained on
    hours, unmeasured = trained_hours(records, ["a", "b", "seed"])
    assert hours == pytest.approx((1800 + 600 + 1200) / 3600)
    assert unmeasured == 1  # "seed": labeled without a measured session


def test_a_committee_trained_on_nothing_measured_sits_at_zero_hours():
    assert trained_hours([{"image": "a", "seconds": 60.0}], []) == (0.0, 0)
