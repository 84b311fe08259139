"""Shared fixtures: tiny SD pipelines built from configs (real CLIP tokenizer) and scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynasyn.models import quiet_libraries
from dynasyn.scene import save_scene
from dynasyn.tiny import save_tiny_pipeline

SHARED_SCENES = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenes"

quiet_libraries()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction SD pipeline saved in diffusers format."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory) -> Path:
    """SD 2.1's layout: v-prediction, linear projections, per-block heads, pad token "!"."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tinyv") / "sd",
                              prediction_type="v_prediction", layout="sd21")


def make_scene(path: Path, n: int = 2, size: int = 64, classes=None) -> Path:
    """A synthetic scene: n coloured squares on grey, one mask each."""
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), 128, np.uint8)
    masks = []
    cols = int(np.ceil(np.sqrt(n)))
    cell = size // cols
    for i in range(n):
        r, c = divmod(i, cols)
        m = np.zeros((size, size), np.float32)
        m[r * cell + 2 : (r + 1) * cell - 2, c * cell + 2 : (c + 1) * cell - 2] = 1
        img[m > 0] = rng.integers(0, 255, 3)
        masks.append(m)
    classes = classes or ["panda", "bowl", "teddy bear", "ball", "cat", "dog"][:n]
    return save_scene(path, Image.fromarray(img), masks, classes)


@pytest.fixture
def scene2(tmp_path) -> Path:
    return make_scene(tmp_path / "scene2", n=2)


@pytest.fixture
def scene4(tmp_path) -> Path:
    return make_scene(tmp_path / "scene4", n=4)


@pytest.fixture
def bear() -> Path:
    p = SHARED_SCENES / "bear"
    if not p.is_dir():
        pytest.skip("../shared/data/scenes is not beside the checkout")
    return p
