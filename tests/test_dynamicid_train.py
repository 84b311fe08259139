"""DynamicID training: data pairs, held-out identities, short runs lower their loss, resume."""

from __future__ import annotations

import json

import pytest
import torch

from dynasyn.dynamicid import train as dt
from dynasyn.dynamicid.weights import read_weights
from dynasyn.micro.world import caption_for


def test_pairs_are_one_training_identity_in_two_actions():
    for seed in range(20):
        p = dt.sample_pair(seed, 64)
        assert p.a.spec.subjects == p.b.spec.subjects == (p.identity,)
        assert p.a.spec.action != p.b.spec.action
        assert p.a.spec.background in dt.PHOTO_BACKGROUNDS
        assert not dt.is_heldout_identity(p.identity)
        assert caption_for(p.b.spec, "class").startswith(("a ", "an "))
    held = dt.heldout_identities()
    assert len(held) == 32
    assert {h.shape for h in held} == set(dt.SHAPES) and {h.pattern for h in held} == set(
        dt.PATTERNS)


def _fixed_batch_run(trainer: dt.Trainer, steps: int, lr: float) -> tuple[float, float]:
    """Loss on one fixed batch (fixed noise) before and after ``steps`` AdamW steps on it."""
    batch = trainer.dataset()[0]
    opt = torch.optim.AdamW(trainer.param_groups(lr))

    def loss() -> torch.Tensor:
        return trainer.loss(batch, torch.Generator().manual_seed(0))[0]

    with torch.no_grad():
        before = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    return before, after


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from dynasyn.tiny import save_tiny_pipeline

    path = save_tiny_pipeline(tmp_path_factory.mktemp("dyn") / "sd")
    return path, dt.build_models(str(path), torch.device("cpu"), encoder="tiny")


def test_short_anchor_training_lowers_its_loss(tiny_models):
    _, m = tiny_models
    trainer = dt.Trainer("anchor", m, batch=2, device=torch.device("cpu"))
    before, after = _fixed_batch_run(trainer, steps=10, lr=2e-3)
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_short_reconfig_training_lowers_its_loss(tiny_models):
    _, m = tiny_models
    trainer = dt.Trainer("reconfig", m, batch=4, device=torch.device("cpu"))
    frozen = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    before, after = _fixed_batch_run(trainer, steps=12, lr=1e-3)
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, m.encoder.state_dict()[k]) for k, v in frozen.items())


def test_command_trains_both_stages_resumes_and_writes_small_weights(tiny_models, tmp_path):
    path, _ = tiny_models
    out, work = tmp_path / "w", tmp_path / "k"
    args = ["--model", str(path), "--encoder", "tiny", "--batch", "1", "--out", str(out),
            "--work", str(work), "--no-progress", "--eval-every", "0"]
    assert dt.main([*args, "--steps", "1"]) == 0
    w = read_weights(out)
    assert w.imr is not None and w.config["stages"] == ["anchor", "reconfig"]
    assert all(v.dtype == torch.float16 for v in w.saa.values())
    assert sum(f.stat().st_size for f in out.iterdir()) < 10e6
    with pytest.raises(SystemExit, match="--resume"):
        dt.main([*args, "--steps", "2", "--stage", "anchor"])
    assert dt.main([*args, "--steps", "2", "--stage", "anchor", "--resume"]) == 0
    lines = [json.loads(line) for line in (work / "anchor" / "log.jsonl").open()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2]  # continued from step 1, not restarted


def test_measurement_scenes_and_prompts_use_heldout_identities(tmp_path):
    from dynasyn.dynamicid import measure as dm
    from dynasyn.micro.world import parse_caption
    from dynasyn.scene import load_scene

    scenes = dm.make_scenes(tmp_path, 3)
    held = {h.phrase for h in dt.heldout_identities()}
    for i, sdir in enumerate(scenes):
        scene = load_scene(sdir)
        assert len(scene) == 2 and scene.classes[0] != scene.classes[1]
        assert {s.phrase for s in scene.subjects} <= held
        prompts = dm.scene_prompts(scene.classes, seed=i)
        assert [c for c, _ in prompts].count("interaction") == 3
        from dynasyn.dynamicid.pipeline import substitute_classes

        for category, prompt in prompts:
            parsed = parse_caption(substitute_classes(prompt, scene.classes))
            assert (parsed.action is not None) == (category == "action")
            assert (parsed.relation is not None) == (category == "interaction")
    assert dm._template("<asset1> is on top of <asset0>") == ("{0} is on top of {1}", [1, 0])
