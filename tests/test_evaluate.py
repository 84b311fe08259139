"""`dynasyn evaluate`: metrics, prompt sets, the evaluation run and its report (issue 5)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dynasyn.errors import InputError
from dynasyn.evaluate import metrics as M
from dynasyn.evaluate.metrics import (
    GREY,
    ClipScorer,
    attention_region,
    attention_regions,
    blank_crop,
    embedding,
    image_reward_available,
    mask_box,
    mean_std,
    region_crop,
    subject_reference,
)
from dynasyn.evaluate.prompts import (
    PAPER_PROMPTS,
    EvalPrompt,
    parse_prompt,
    prompt_sets,
    read_prompt_file,
)
from dynasyn.evaluate.report import loss_curves, report_links
from dynasyn.micro.models import micro_clip_path

PAPER_JSON = Path(__file__).resolve().parents[2] / "shared" / "data" / "paper.json"


# ------------------------------------------------------------------------------ fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scorer(tiny_clip) -> ClipScorer:
    return ClipScorer.from_name(tiny_clip)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model) -> Path:
    """A dynasyn run (both phases, one step each) on a two-subject synthetic scene."""
    from dynasyn.config import build_config
    from dynasyn.tiny import synthetic_scene
    from dynasyn.train import train

    root = tmp_path_factory.mktemp("evalrun")
    scene = synthetic_scene(root / "scene", 2)
    cfg = build_config("dynasyn", overrides=dict(model=str(tiny_model), scene=str(scene),
                                                 phase1_steps=1, phase2_steps=1, log_every=1))
    train(cfg, root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, tiny_model) -> Path:
    """A dynasyn run (one step per phase, tiny model) on a copy of the micro example
    ``star_ball`` (a red striped star and a blue dotted ball)."""
    import shutil

    from dynasyn.config import build_config
    from dynasyn.train import train

    root = tmp_path_factory.mktemp("microrun")
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "star_ball",
                    root / "scene")
    cfg = build_config("dynasyn", overrides=dict(model=str(tiny_model), scene=str(root / "scene"),
                                                 phase1_steps=1, phase2_steps=1, log_every=1))
    train(cfg, root / "run", progress=False)
    return root / "run"


def _square_scene(bg, pos, size=64, side=16, colour=(220, 40, 40)):
    img = np.zeros((size, size, 3), np.uint8)
    img[...] = bg
    y, x = pos
    img[y : y + side, x : x + side] = colour
    img[y + 4 : y + 8, x + 4 : x + 12] = (20, 20, 200)  # a pattern, so crops are not uniform
    mask = np.zeros((size, size), np.float32)
    mask[y : y + side, x : x + side] = 1
    return Image.fromarray(img), mask


# ------------------------------------------------------------------------------ metrics


def test_clip_i_of_an_image_with_itself_is_one(scorer):
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    assert scorer.clip_i(a, a) == pytest.approx(1.0, abs=1e-5)
    assert scorer.clip_i(a, b) < 0.99999
    t = scorer.text_embeds(["panda is throwing the bowl.", "a bowl"])
    i = scorer.image_embeds([a, b, np.asarray(a)])
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(i.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(i[0], i[2], atol=1e-6)  # PIL and uint8 arrays agree
    assert -1.0 <= scorer.clip_t(a, "panda in a comic.") <= 1.0
    assert scorer.image_size == 32 and scorer.mean == pytest.approx(M.CLIP_MEAN)


def test_embedding_accepts_tensors_and_output_objects():
    x = torch.ones(2, 3)
    assert embedding(x) is x
    assert embedding(SimpleNamespace(pooler_output=x)) is x
    assert embedding(SimpleNamespace(image_embeds=x, pooler_output=None), "image") is x
    with pytest.raises(TypeError):
        embedding(SimpleNamespace(last_hidden_state=x))


def test_missing_micro_clip_is_refused_with_the_fix(monkeypatch, tmp_path):
    import dynasyn.micro.models as mm

    monkeypatch.setattr(mm, "micro_clip_path", lambda: tmp_path / "nope")
    with pytest.raises(InputError, match="python -m dynasyn.micro.train or pass --clip-model"):
        ClipScorer.from_name("micro")
    with pytest.raises(InputError, match="config.json"):
        ClipScorer.from_name(tmp_path)
    with pytest.raises(InputError, match="not a model directory"):
        ClipScorer.from_name(str(tmp_path / "missing-dir"))


def test_subject_crops_follow_masks():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[5:45, 10:30] = 1.0  # a 20 x 40 box…
    mask[5:10, 10:15] = 0.2  # …whose corner is background (soft value below 0.5)
    assert mask_box(mask) == (10, 5, 30, 45)
    crop = np.asarray(subject_reference(Image.fromarray(arr), mask))
    assert crop.shape == (40, 40, 3)  # square canvas of the box's longer side
    inner = crop[:, 10:30]  # the box, centred horizontally
    keep = mask[5:45, 10:30] >= 0.5
    assert np.array_equal(inner[keep], arr[5:45, 10:30][keep])
    assert (inner[~keep] == GREY).all() and (crop[:, :10] == GREY).all()
    assert (crop[:, 30:] == GREY).all()
    with pytest.raises(InputError):
        subject_reference(Image.fromarray(arr), np.zeros((64, 64)))
    # a region of another size is resized to the image
    small = np.zeros((8, 8))
    small[4:, 4:] = 1
    assert np.asarray(blank_crop(Image.fromarray(arr), small)).shape == (32, 32, 3)


def test_attention_region_upsamples_and_thresholds():
    m = np.zeros((4, 4), np.float32)
    m[3, 3] = 2.0
    m[0, 0] = 0.5  # below half the maximum
    region = attention_region(m, (64, 64))
    ys, xs = np.nonzero(region)
    assert ys.min() >= 44 and xs.min() >= 44 and region[56, 56] and not region[8, 8]
    assert attention_region(np.zeros((4, 4)), (64, 64)) is None
    assert attention_region(np.full((4, 4), np.nan), (64, 64)) is None


def test_identity_in_region_uses_the_attention_region(scorer):
    ref, ref_mask = _square_scene((90, 160, 230), (8, 8))
    gen, gen_mask = _square_scene((60, 150, 60), (40, 36))  # same subject, moved, new background
    ref_crop = subject_reference(ref, ref_mask)
    score, used = scorer.identity_in_region(gen, gen_mask, ref_crop)  # a map right on it
    assert used and score == pytest.approx(1.0, abs=1e-5)
    assert scorer.clip_i(gen, ref) < 0.9999  # whole-image CLIP-I sees the layout change
    wrong = np.zeros((64, 64), np.float32)
    wrong[0:16, 0:16] = 1
    wrong_score, used = scorer.identity_in_region(gen, wrong, ref_crop)
    assert used and wrong_score < score - 1e-4
    crop, used = region_crop(gen, None)
    assert not used and crop.size == gen.size  # no map: the whole image
    # a coarse 4x4 map picks the subject's cell
    coarse = np.zeros((4, 4), np.float32)
    coarse[2:, 2:] = 1
    crop, used = region_crop(gen, coarse)
    assert used and crop.size[0] < 64


def test_attention_regions_segment_each_subject():
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 1:3, 1:3] = 1.0  # subject 0 top-left
    maps[1, 5:8, 4:8] = 0.3  # subject 1 bottom-right (weaker: min-max normalized per map)
    r0, r1 = attention_regions(maps, 64)
    assert r0[12, 12] and not r0[50, 50] and r1[52, 50] and not r1[12, 12]
    assert not (r0 & r1).any()
    assert attention_regions(np.ones((2, 4, 4)), 64) == [None, None]
    flat = maps.copy()
    flat[1] = 0.7
    assert attention_regions(flat, 64)[1] is None


def test_image_reward_reports_why_it_is_unavailable(monkeypatch):
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    ok, why = image_reward_available()
    assert not ok and "ImageReward" in why


def test_dino_similarity_of_an_image_with_itself_is_one(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from dynasyn.evaluate.metrics import DinoScorer

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=37)).save_pretrained(
        tmp_path / "dino")
    dino = DinoScorer.from_name(tmp_path / "dino")
    rng = np.random.default_rng(2)
    a, b = (Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in "ab")
    assert dino.similarity(a, a) == pytest.approx(1.0, abs=1e-5)
    assert dino.similarity(a, b) < 0.99999


def test_mean_std():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 2}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}


# ------------------------------------------------------------------------------ prompts


def test_prompt_sets_reproduce_the_papers_strings():
    one = prompt_sets(1)
    assert one["interaction"] == []
    two = prompt_sets(2, limit=None)
    rendered = {c: {p.placeholder_prompt() for p in v} for c, v in two.items()}
    classes = ["panda", "bowl"]
    if PAPER_JSON.is_file():  # the module embeds paper.json's lists; check them when present
        paper = json.loads(PAPER_JSON.read_text())["eval_prompts"]
        assert [p.placeholder_prompt() for p in one["plain"]] == paper["plain"]
        assert [p.placeholder_prompt() for p in one["action"]] == paper["action"]
        for cat in ("plain", "action", "interaction"):
            assert set(paper[cat]) <= rendered[cat]
    first = two["interaction"][0]
    assert first == EvalPrompt("{0} is throwing the {1}.", (0, 1))
    assert first.placeholder_prompt() == "<asset0> is throwing the <asset1>."
    assert first.class_prompt(classes) == "panda is throwing the bowl."
    assert EvalPrompt("{0} is throwing the {1}.", (1, 0)).class_prompt(classes) == \
        "bowl is throwing the panda."
    # default cap: 10 per category, every paper template once, subjects alternating
    capped = prompt_sets(2)
    for cat, prompts in capped.items():
        assert len(prompts) == 10
        assert {p.template for p in prompts} == set(PAPER_PROMPTS[cat])
    assert [p.subjects for p in capped["plain"][:4]] == [(0,), (1,), (0,), (1,)]


def test_prompt_sets_generalize_to_more_subjects():
    sets = prompt_sets(3, ("interaction", "plain"), limit=10)
    assert list(sets) == ["interaction", "plain"]
    pairs = [p.subjects for p in sets["interaction"]]
    assert len(pairs) == 10 and set(pairs) == {(i, j) for i in range(3) for j in range(3) if i != j}
    assert len({(p.template, p.subjects) for p in sets["interaction"]}) == 10  # no repeats
    full = prompt_sets(3, limit=None)
    assert {c: len(v) for c, v in full.items()} == {"plain": 30, "action": 30, "interaction": 60}
    with pytest.raises(InputError, match="unknown prompt category"):
        prompt_sets(2, ["dancing"])


def test_micro_scenes_use_the_worlds_grammar():
    from dynasyn.micro.world import parse_caption

    classes = ["star", "ball"]
    sets = prompt_sets(2, classes=classes)
    for cat, prompts in sets.items():
        assert prompts, cat
        for p in prompts:
            parsed = parse_caption(p.class_prompt(classes))  # raises outside the grammar
            assert [m.shape for m in parsed.subjects] == [classes[s] for s in p.subjects]
            assert p.placeholder_prompt().startswith("a <asset")
    assert sets["plain"][0].class_prompt(classes) == "a star at night"
    assert all(parse_caption(p.class_prompt(classes)).action for p in sets["action"])
    assert all(parse_caption(p.class_prompt(classes)).relation for p in sets["interaction"])
    assert prompt_sets(2, classes=classes, grammar="paper")["plain"][0].template == \
        PAPER_PROMPTS["plain"][0]


def test_prompt_files(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\n<asset1> hugs the <asset0>\n\naction\t<asset0> is sleeping\n")
    sets = read_prompt_file(f, 2)
    assert sets["custom"] == [EvalPrompt("{0} hugs the {1}", (1, 0))]
    assert sets["action"][0].placeholder_prompt() == "<asset0> is sleeping"
    f.write_text("a photo of <asset0>\n<asset2> jumps\n")
    with pytest.raises(InputError, match=r"prompts.txt:2: .*<asset2>"):
        read_prompt_file(f, 2)
    with pytest.raises(InputError, match="no <assetN>"):
        parse_prompt("a photo of a dog", 2)


# ------------------------------------------------------------------------------ report pieces


def test_loss_curves_are_drawn_from_the_log():
    recs = [{"step": s, "phase": 1 if s <= 5 else 2, "loss": 1 / s, "md": 0.5 / s,
             "m2a": 0.1, "ica": 0.2 + s} for s in range(1, 11)]
    img = loss_curves(recs)
    assert img is not None and img.size == (900, 300)  # 4 panels, 3 per row
    assert np.asarray(img).std() > 0
    assert loss_curves([{"step": 1}]) is None


# ------------------------------------------------------------------------------ evaluate


def test_evaluate_writes_metrics_and_a_report_with_working_links(trained_run, tiny_clip,
                                                                 tmp_path):
    from dynasyn.evaluate import evaluate

    out = tmp_path / "eval"
    res = evaluate(trained_run, n=2, steps=2, limit=2, clip_model=str(tiny_clip), out=out,
                   device="cpu", progress=False)
    data = json.loads((out / "metrics.json").read_text())
    assert res["out"] == str(out) and data["overall"] == res["overall"]
    metrics = {"clip_t", "clip_i", "clip_i_subject", "identity_region"}
    assert metrics <= set(data["metrics"])
    assert data["settings"]["prompt_set"] == "paper"
    assert list(data["categories"]) == ["plain", "action", "interaction"]
    assert len(data["prompts"]) == 6
    for m in metrics:
        assert data["overall"][m]["n"] == 12
        for cat in data["categories"].values():
            assert cat[m]["n"] == 4 and -1 <= cat[m]["mean"] <= 1 and cat[m]["std"] >= 0
    assert any(n.startswith("ImageReward skipped") for n in data["notes"])
    inter = next(p for p in data["prompts"] if p["category"] == "interaction")
    assert inter["prompt"] == "<asset0> is throwing the <asset1>."
    assert inter["class_prompt"] == "panda is throwing the bowl."
    assert len(inter["attention"]) == 2 and inter["summary"]["clip_t"]["n"] == 2
    for p in data["prompts"]:
        for f in [*p["images"], p["grid"], *(a["image"] for a in p["attention"])]:
            assert (out / f).is_file(), f
        assert len(p["scores"]["identity_region"]) == 2
    # identity-in-region crops the attention region (not the whole image) where a map exists
    assert sum(p["region_fallbacks"] for p in data["prompts"]) < sum(
        2 * len(p["subjects"]) for p in data["prompts"])
    assert any(a != b for p in data["prompts"] for a, b in
               zip(p["scores"]["identity_region"], p["scores"]["clip_i_subject"], strict=True))
    links = report_links(out / "report.html")
    assert any(x.endswith("scene.png") for x in links)
    assert any(x.endswith("losses.png") for x in links)
    assert any("attention/" in x for x in links) and "metrics.json" in links
    for link in links:
        assert not link.startswith(("/", "http:", "https:", "file:")), link
        assert (out / link).is_file(), link
    assert not list(tmp_path.glob(".eval.*"))  # no temporary directory left behind
    # a second evaluation replaces the first one; a foreign directory is refused
    evaluate(trained_run, categories="action", n=1, steps=1, limit=1,
             clip_model=str(tiny_clip), out=out, device="cpu", progress=False)
    assert not (out / "images" / "plain").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not an evaluation"):
        evaluate(trained_run, clip_model=str(tiny_clip), out=foreign, progress=False)
    with pytest.raises(InputError, match="unknown prompt category"):
        evaluate(trained_run, categories="dancing", clip_model=str(tiny_clip),
                 out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_evaluate_scores_micro_runs_exactly_with_the_text_ceiling(micro_run, tiny_clip,
                                                                   tmp_path, capsys):
    import copy

    from dynasyn.cli import main
    from dynasyn.evaluate import evaluate
    from dynasyn.evaluate.exact import EXACT_METRICS, EXACT_VERSION, Reference, rescore

    out, cache = tmp_path / "eval", tmp_path / "cache"
    res = evaluate(micro_run, n=2, steps=1, limit=1, clip_model=str(tiny_clip), out=out,
                   device="cpu", progress=False, ceiling_cache=cache)
    data = json.loads((out / "metrics.json").read_text())
    ex = data["exact"]
    assert ex == res["exact"] and ex["version"] == EXACT_VERSION
    assert set(EXACT_METRICS) == set(ex["definitions"])
    assert [(r["class"], r["colour"], r["pattern"]) for r in ex["references"]] == [
        ("star", "red", "striped"), ("ball", "blue", "dotted")]
    assert list(ex["categories"]) == ["plain", "action", "interaction"]
    for cat, subject_images in (("plain", 2), ("action", 2), ("interaction", 4)):
        st = ex["categories"][cat]
        assert st["images"] == 2 and st["identity_kept"]["n"] == subject_images
        for m in ("identity_kept", "identity_mixing"):
            lo, hi = st[m]["ci95"]
            assert 0 <= lo <= st[m]["rate"] <= hi <= 1
        assert st["action_followed"]["n"] == (0 if cat == "plain" else 2)
    assert ex["overall"]["identity_kept"]["n"] == 8 and ex["overall"]["images"] == 6
    # the numbers are those of the saved images, read again
    refs = [Reference(r["class"], r["colour"], r["pattern"]) for r in ex["references"]]
    again = rescore(copy.deepcopy(data), out, refs)
    assert again["exact"]["categories"] == ex["categories"]
    assert again["exact_ceiling"]["overall"] == data["exact_ceiling"]["overall"]
    # the text ceiling: the base model with identity phrases, same prompts and seeds
    ceil = data["exact_ceiling"]
    assert ceil["sampled"] == 6 and ceil["reused"] == 0 and len(list(cache.glob("*.png"))) == 6
    by_cat = {p["category"]: p for p in ceil["prompts"]}
    act = by_cat["action"]
    run_act = next(p for p in data["prompts"] if p["category"] == "action")
    assert act["template"] == run_act["template"] and act["seeds"] == run_act["seeds"]
    assert act["prompt"] == act["template"].format("red striped star") and "<asset" not in \
        act["prompt"]
    assert "red striped star" in by_cat["interaction"]["prompt"] and \
        "blue dotted ball" in by_cat["interaction"]["prompt"]
    for p in ceil["prompts"]:
        assert all((out / f).is_file() for f in p["images"])
    html = (out / "report.html").read_text()
    assert "Exact metrics" in html and "Text ceiling" in html
    for link in report_links(out / "report.html"):
        assert (out / link).is_file(), link
    # again: the ceiling comes from the cache (or the previous evaluation), nothing sampled
    res2 = evaluate(micro_run, n=2, steps=1, limit=1, clip_model=str(tiny_clip), out=out,
                    device="cpu", progress=False)
    assert res2["exact_ceiling"]["sampled"] == 0 and res2["exact_ceiling"]["reused"] == 6
    assert res2["exact_ceiling"]["overall"] == ceil["overall"]
    # the command line prints the exact table; --no-ceiling skips the ceiling
    assert main(["evaluate", str(micro_run), "--prompts", "action", "-n", "1", "--steps", "1",
                 "--limit", "1", "--clip-model", str(tiny_clip), "--out", str(tmp_path / "e2"),
                 "--no-progress", "--no-ceiling"]) == 0
    printed = capsys.readouterr().out
    assert "identity kept" in printed and "text ceiling skipped" in printed
    data = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert "exact_ceiling" not in data and data["exact"]["overall"]["images"] == 1


def test_evaluate_of_a_scene_outside_the_micro_world_has_no_exact_metrics(trained_run, tiny_clip,
                                                                          tmp_path):
    from dynasyn.evaluate import evaluate

    res = evaluate(trained_run, categories="plain", n=1, steps=1, limit=1,
                   clip_model=str(tiny_clip), out=tmp_path / "ev", device="cpu", progress=False)
    assert "exact" not in res and "exact_ceiling" not in res
    assert any(n.startswith("exact metrics skipped") for n in res["notes"])


# ------------------------------------------------------------------------------ micro CLIP

_BUNDLED = (micro_clip_path() / "config.json").is_file()


@pytest.mark.skipif(not _BUNDLED, reason="micro CLIP not built (python -m dynasyn.micro.train)")
def test_clip_t_with_micro_clip_ranks_the_matching_prompt_above_a_distractor():
    from dynasyn.micro.world import caption_for, distractor, sample_render

    scorer = ClipScorer.from_name("micro")
    rng = np.random.default_rng(5)
    wins = total = 0
    for seed in range(2_000_000_000, 2_000_000_200):
        r = sample_render(seed)
        if r.spec.background in ("grayscale", "sketch"):
            continue
        attr = "action" if r.spec.action else "relation" if r.spec.relation else "shape"
        d = distractor(r.spec, attr, rng)
        if d is None:
            continue
        img = Image.fromarray(r.image)
        wins += scorer.clip_t(img, caption_for(r.spec, "class")) > \
            scorer.clip_t(img, caption_for(d, "class"))
        total += 1
        if total == 60:
            break
    assert total >= 30 and wins / total >= 0.8


def test_evaluate_cli(trained_run, tiny_clip, tmp_path, capsys):
    from dynasyn.cli import main

    out = tmp_path / "ev"
    assert main(["evaluate", str(trained_run), "--prompts", "interaction", "-n", "1",
                 "--steps", "1", "--limit", "1", "--clip-model", str(tiny_clip),
                 "--out", str(out), "--no-progress"]) == 0
    assert "interaction" in capsys.readouterr().out and (out / "report.html").is_file()
    assert main(["evaluate", str(trained_run), "--prompts", "dance",
                 "--clip-model", str(tiny_clip), "--out", str(tmp_path / "x")]) == 2
    assert main(["evaluate", str(tmp_path), "--out", str(tmp_path / "y")]) == 2


def test_evaluate_mean_shift_renders_from_the_shifted_noise(trained_run, tiny_clip, tmp_path):
    """--mean-shift: the run's images start from MuDI's mean-shifted noise (different images,
    the same as generate --mean-shift gives), recorded in the settings."""
    import numpy as np
    from PIL import Image

    from dynasyn.cli import main
    from dynasyn.generate import generate_images, load_run, run_scene

    outs = {}
    for gamma in ("0", "2"):
        outs[gamma] = tmp_path / f"ev{gamma}"
        assert main(["evaluate", str(trained_run), "--prompts", "interaction", "-n", "1",
                     "--steps", "2", "--limit", "1", "--clip-model", str(tiny_clip),
                     "--out", str(outs[gamma]), "--no-progress", "--mean-shift", gamma]) == 0
    settings = json.loads((outs["2"] / "metrics.json").read_text())["settings"]
    assert settings["mean_shift"] == 2.0
    name = next(p.name for p in (outs["2"] / "images" / "interaction").glob("*_0.png"))
    plain, shifted = (np.asarray(Image.open(outs[g] / "images" / "interaction" / name)) for g in ("0", "2"))
    assert not np.array_equal(plain, shifted)
    prompt = json.loads((outs["2"] / "metrics.json").read_text())["prompts"][0]["prompt"]
    ref = generate_images(load_run(trained_run, device="cpu"), [prompt], tmp_path / "gen", n=1,
                          steps=2, progress=False, mean_shift=2.0, scene=run_scene(trained_run))
    assert np.array_equal(np.asarray(Image.open(ref[0]).convert("RGB")),
                          np.asarray(Image.open(outs["2"] / "images" / "interaction" / name).convert("RGB")))
