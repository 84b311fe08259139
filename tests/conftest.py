"""Shared fixtures: tiny SD pipelines built from configs (real CLIP tokenizer) and scenes."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynasyn.models import quiet_libraries
from dynasyn.tiny import save_tiny_pipeline, synthetic_scene

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
    return synthetic_scene(path, n, size, classes)


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
