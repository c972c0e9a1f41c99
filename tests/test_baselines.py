"""Baselines along wavelength for spectra (a channel seen at one time over many wavelengths)."""

from __future__ import annotations

import numpy as np

from perceiver.baselines import along_axis, predict_baseline


def test_spectra_are_interpolated_along_wavelength_and_light_curves_along_time():
    # record 0: a spectrum (one time, wavelengths 1..5); record 1: a light curve (times 0..3, one band)
    offsets = np.array([0, 5, 9])
    time = np.array([5.0] * 5 + [0.0, 1.0, 2.0, 3.0])
    channel = np.array([0] * 5 + [1] * 4)
    coord = np.array([1.0, 2.0, 3.0, 4.0, 5.0] + [6000.0] * 4)
    value = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 0.0, 5.0, 7.0, 9.0])
    visible = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
    means = np.array([0.0, 0.0])
    np.testing.assert_array_equal(along_axis(offsets, time, channel, coord)[:5], coord[:5])
    np.testing.assert_array_equal(along_axis(offsets, time, channel, coord)[5:], time[5:])
    lin = predict_baseline("linear_interpolation", offsets, time, channel, value, visible, ~visible, means, coord)
    ffill = predict_baseline("forward_fill", offsets, time, channel, value, visible, ~visible, means, coord)
    np.testing.assert_allclose(lin, [30.0, 3.5])
    np.testing.assert_allclose(ffill, [20.0, 0.0])
