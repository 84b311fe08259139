"""Shared fixtures: tiny SD pipelines built from configs (real CLIP tokenizer) and scenes."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynasyn.models import quiet_libraries
from dynasyn.tiny import save_tiny_pipeline, synthetic_scene

SHARED_SCENES = Path(__file__).resolve().parents[2] / "shared" / "data" / "scenes"

quiet_libraries()


@pytest.fixture(scope="session", autouse=True)
def _class_image_cache(tmp_path_factory):
    """Class images of prior preservation go to a session folder, not ~/.cache/dynasyn."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DYNASYN_CACHE", str(tmp_path_factory.mktemp("dynasyn-cache")))
    yield
    mp.undo()


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


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random transformers CLIPModel with the real CLIP tokenizer, saved to disk."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel

    from dynasyn.bpe import clip_tokenizer
    from dynasyn.evaluate.metrics import CLIP_MEAN, CLIP_STD

    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                  num_attention_heads=4, num_hidden_layers=2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    path = tmp_path_factory.mktemp("clip") / "clip"
    model.save_pretrained(path, safe_serialization=True)
    clip_tokenizer(model_max_length=77).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32},
         "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core alone)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
