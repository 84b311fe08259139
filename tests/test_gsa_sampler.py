"""GSA's reverse process: deterministic DDIM (default) or the paper's stochastic SDE."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dynasyn.attention import install_attention_capture
from dynasyn.augment.gsa import guided_sde_augmentation
from dynasyn.augment.pipeline import AugmentConfig, item_key
from dynasyn.augment.prompts import PromptItem
from dynasyn.cli import build_parser, main
from dynasyn.errors import InputError
from dynasyn.models import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_model):
    p = load_pipeline(str(tiny_model))
    install_attention_capture(p.unet)
    p.set_progress_bar_config(disable=True)
    return p


def _gsa(pipe, sampler, seed=0, steps=10):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[1]))
    try:
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        out, maps = guided_sde_augmentation(pipe, img, "{0} is jumping", ["a panda"], ["panda"],
                                            seed, strength=0.7, steps=steps, sampler=sampler)
    finally:
        handle.remove()
    return np.asarray(out), maps, calls


def test_sde_runs_strength_times_steps_of_stochastic_ddpm_sampling(pipe):
    ddim, maps, calls = _gsa(pipe, "ddim")
    assert len(calls) == 7 and maps.shape[0] == 1  # int(10 × 0.7) steps
    sde, _, sde_calls = _gsa(pipe, "sde")
    assert len(sde_calls) == 7
    # SDE: the last 700 of 1000 timesteps on a 10-step schedule (SD's steps_offset 1)
    assert [int(t.flatten()[0]) for t in sde_calls] == [601, 501, 401, 301, 201, 101, 1]
    assert not np.array_equal(ddim, sde)
    # stochastic: the seed changes the image (fresh noise at every step), and fixes it
    again, _, _ = _gsa(pipe, "sde")
    other, _, _ = _gsa(pipe, "sde", seed=1)
    assert np.array_equal(sde, again) and not np.array_equal(sde, other)


@pytest.mark.slow
def test_sde_with_the_papers_700_steps(pipe):
    _, _, calls = _gsa(pipe, "sde", steps=1000)
    assert len(calls) == 700


def test_the_option_is_validated_keyed_and_on_the_command_line(capsys):
    with pytest.raises(InputError, match="--gsa-sampler must be one of ddim, sde"):
        AugmentConfig(gsa_sampler="ode").validate()
    with pytest.raises(InputError, match="--gsa-steps must be in 1..1000"):
        AugmentConfig(gsa_steps=1001).validate()
    item = PromptItem(template="{0} is jumping", subjects=[0], kind="action")
    keys = {s: item_key(AugmentConfig(gsa_sampler=s), "m", "d", item, ["a"], ["b"])
            for s in ("ddim", "sde")}
    assert keys["ddim"] != keys["sde"]  # another sampler renders other items
    for cmd in ("augment", "personalize"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        assert "--gsa-sampler {ddim,sde}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["augment", "nowhere", "--out", "x", "--gsa-sampler", "ode"])
    assert e.value.code == 2 and "invalid choice: 'ode'" in capsys.readouterr().err
