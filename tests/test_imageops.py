"""The shared mask operations (scipy.ndimage / scikit-image underneath) and their conventions."""

from __future__ import annotations

import numpy as np
import pytest

from dynasyn.imageops import (
    dilate,
    erode,
    fill_holes,
    label_components,
    largest_component,
    otsu_threshold,
)


def test_dilate_and_erode_use_a_3x3_square() -> None:
    m = np.zeros((7, 7), dtype=bool)
    m[3, 3] = True
    assert dilate(m).sum() == 9 and dilate(m, 2).sum() == 25
    assert np.array_equal(erode(dilate(m)), m)
    assert np.array_equal(dilate(m, 0), m) and dilate(m, 0) is not m
    # the image border does not erode: a full mask stays full, a border strip survives
    assert erode(np.ones((5, 5), bool), 3).all()
    strip = np.zeros((6, 6), dtype=bool)
    strip[:, :3] = True
    assert np.array_equal(erode(strip), np.pad(np.ones((6, 2), bool), ((0, 0), (0, 4))))


def test_label_components_is_8_connected_in_raster_order() -> None:
    m = np.zeros((8, 8), dtype=bool)
    m[5:7, 0:3] = True  # lower left
    m[1:3, 4:6] = True  # upper right: first in raster order
    m[3, 6] = True  # touches the upper blob diagonally
    labels, n = label_components(m)
    assert n == 2 and labels.dtype == np.int32
    assert labels[1, 4] == 1 and labels[3, 6] == 1 and labels[5, 0] == 2
    assert (labels > 0).sum() == m.sum()
    assert label_components(np.zeros((3, 3), bool))[1] == 0


def test_largest_component_keeps_the_biggest() -> None:
    m = np.zeros((9, 9), dtype=bool)
    m[0:2, 0:2] = True
    m[4:8, 4:8] = True
    big = largest_component(m)
    assert big.sum() == 16 and big[5, 5] and not big[0, 0]
    assert not largest_component(np.zeros((4, 4), bool)).any()


def test_fill_holes_connectivity() -> None:
    ring = np.zeros((7, 7), dtype=bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    assert fill_holes(ring).sum() == 25
    # a hole that reaches the outside only through a diagonal gap of the outline
    diag = np.zeros((5, 5), dtype=bool)
    diag[0, 1:4] = diag[1:4, 0] = True
    diag[4, 1:4] = diag[1:4, 4] = True
    diag[1, 1] = False  # open at the corner only diagonally: (0, 0) outside, (1, 1) inside
    diag[0, 0] = False
    assert fill_holes(diag, 4)[2, 2]
    assert not fill_holes(diag, 8)[2, 2]
    with pytest.raises(ValueError):
        fill_holes(ring, 6)


def test_otsu_threshold_splits_two_modes_at_a_bin_edge() -> None:
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.2, 0.03, 500), rng.normal(0.7, 0.03, 300)]).clip(0, 1)
    t = otsu_threshold(v)
    assert 0.25 < t < 0.65  # anywhere in the gap between the modes
    assert (v > t).sum() == 300
    assert t * 256 == pytest.approx(round(t * 256))  # the upper edge of a [0, 1] bin
    assert otsu_threshold(np.full(10, 0.3)) == 0.5  # no between-class variance
