"""Exact micro-world metrics on constructed images (world renders, no diffusion): issue 20."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynasyn.evaluate.exact import (
    EXACT_METRICS,
    PromptMeaning,
    Reference,
    counts,
    holds_relation,
    phrase_prompt,
    prompt_meaning,
    rate,
    reference_from_phrase,
    rescore,
    scene_references,
    score_image,
    summarize,
)
from dynasyn.evaluate.metrics import bootstrap_interval, wilson_interval
from dynasyn.micro.world import (
    RELATIONS,
    Identity,
    SceneSpec,
    render,
    valid_actions,
    valid_relations,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

STAR = Identity("star", "red", "striped")
BALL = Identity("ball", "blue", "dotted")
REFS = [Reference("star", "red", "striped"), Reference("ball", "blue", "dotted")]


def _ref(i: Identity) -> Reference:
    return Reference(i.shape, i.colour, i.pattern)


def _score(spec: SceneSpec, subjects, refs, meaning: PromptMeaning, seed: int = 0):
    return score_image(render(spec, 64, seed).image, subjects, refs, meaning)


# ------------------------------------------------------------------------------ the true caption


def test_a_render_of_the_true_caption_keeps_identity_and_follows_the_action():
    subjects = [STAR, BALL, Identity("cat", "orange", "checkered"),
                Identity("heart", "green", "plain"), Identity("fish", "yellow", "striped")]
    # the parser's known misses on renders: a star's five-fold symmetry (turned by 36 degrees
    # it is a star upside down) and a small ball read as a cube
    known_misses = {("star", "upside down"), ("star", "tilted"), ("ball", "small")}
    n = 0
    for ident in subjects:
        other = Reference("pyramid", "purple", "dotted")  # a second scene subject, not drawn
        for action in valid_actions(ident.shape):
            if (ident.shape, action) in known_misses:
                continue
            for seed in range(2):
                got = _score(SceneSpec((ident,), action), [0], [_ref(ident), other],
                             PromptMeaning(action=action), seed)
                sub = got["subjects"][0]
                assert sub["identity_kept"], (ident, action, seed, got["parsed"])
                assert got["action_followed"], (ident, action, seed, got["parsed"])
                assert got["identity_and_action"]
                assert not sub["identity_mixing"], (ident, action, sub["mixing"])
                n += 1
    assert n >= 70
    # every relation of the grammar, between the two subjects of star_ball
    for relation in valid_relations("star", "ball"):
        for seed in range(2):
            got = _score(SceneSpec((STAR, BALL), relation=relation), [0, 1], REFS,
                         PromptMeaning(relation=relation), seed)
            assert got["action_followed"], (relation, seed, got["parsed"])
            if relation not in ("behind", "in front of", "inside"):  # an occluded one may misread
                assert all(s["identity_kept"] and not s["identity_mixing"]
                           for s in got["subjects"]), (relation, got)
    assert set(valid_relations("star", "ball")) == set(RELATIONS)


def test_styles_limit_the_attributes_that_count():
    for bg, attrs in (("grayscale", ("shape",)), ("sketch", ("shape", "colour"))):
        meaning = PromptMeaning(background=bg)
        assert meaning.attributes == attrs
        got = _score(SceneSpec((STAR,), background=bg), [0], REFS, meaning, seed=1)
        assert got["subjects"][0]["identity_kept"], (bg, got["parsed"])
    # the same grayscale picture does not keep the identity when colour counts
    got = _score(SceneSpec((STAR,), background="grayscale"), [0], REFS, PromptMeaning(), 1)
    assert not got["subjects"][0]["identity_kept"]


# ------------------------------------------------------------------------------ identity mixing


def test_two_subjects_with_swapped_colours_count_as_mixing():
    swapped = SceneSpec((Identity("star", "blue", "striped"), Identity("ball", "red", "dotted")),
                        relation="next to")
    got = _score(swapped, [0, 1], REFS, PromptMeaning(relation="next to"))
    for sub in got["subjects"]:
        assert not sub["identity_kept"]
        assert sub["identity_mixing"] and any(w.startswith("chimera") for w in sub["mixing"])
    assert got["action_followed"]  # the subjects still stand next to each other (by class)
    assert got["identity_and_action"] is False
    # the correct colours: no mixing
    ok = _score(SceneSpec((STAR, BALL), relation="next to"), [0, 1], REFS,
                PromptMeaning(relation="next to"))
    assert not any(s["identity_mixing"] for s in ok["subjects"])


def test_a_one_subject_prompt_showing_the_other_subject_is_a_leak():
    got = _score(SceneSpec((STAR, BALL)), [0], REFS, PromptMeaning())
    sub = got["subjects"][0]
    assert sub["identity_kept"] and sub["identity_mixing"]
    assert sub["mixing"] == ["leak: blue (subject 1)"]
    # drawn alone in the other subject's colour: a chimera, identity lost
    blue_star = _score(SceneSpec((Identity("star", "blue", "striped"),)), [0], REFS,
                       PromptMeaning())["subjects"][0]
    assert not blue_star["identity_kept"] and blue_star["identity_mixing"]
    # the other subject's pattern on it
    dotted = _score(SceneSpec((Identity("star", "red", "dotted"),)), [0], REFS,
                    PromptMeaning())["subjects"][0]
    assert dotted["mixing"] == ["chimera: red dotted (subject 1)"]
    # a pattern no scene subject has is an identity loss, not mixing
    checkered = _score(SceneSpec((Identity("star", "red", "checkered"),)), [0], REFS,
                       PromptMeaning())["subjects"][0]
    assert not checkered["identity_kept"] and not checkered["identity_mixing"]


def test_both_subjects_in_one_colour_merge():
    both_red = SceneSpec((Identity("star", "red", "striped"), Identity("ball", "red", "dotted")))
    got = _score(both_red, [0, 1], REFS, PromptMeaning())
    assert all(any(w.startswith("merge") for w in s["mixing"]) for s in got["subjects"])
    # one subject alone in its own colour is not a merge
    alone = _score(SceneSpec((STAR,)), [0, 1], REFS, PromptMeaning())
    assert not any(s["identity_mixing"] for s in alone["subjects"])


# ------------------------------------------------------------------------------ actions


def test_an_upright_subject_does_not_follow_upside_down():
    cat = Identity("cat", "orange", "checkered")
    refs = [_ref(cat), REFS[1]]
    for seed in range(3):
        standing = _score(SceneSpec((cat,), "standing"), [0], refs,
                          PromptMeaning(action="upside down"), seed)
        assert standing["subjects"][0]["identity_kept"]
        assert standing["action_followed"] is False and standing["identity_and_action"] is False
        flipped = _score(SceneSpec((cat,), "upside down"), [0], refs,
                         PromptMeaning(action="upside down"), seed)
        assert flipped["action_followed"] is True and flipped["identity_and_action"] is True


def test_actions_are_told_apart():
    heart = Identity("heart", "green", "plain")
    refs = [_ref(heart)]
    for drawn, asked in (("standing", "jumping"), ("standing", "sleeping"),
                         ("standing", "tilted"), ("on the left", "on the right"),
                         ("small", "big"), ("big", "small"), ("sleeping", "upside down")):
        got = _score(SceneSpec((heart,), drawn), [0], refs, PromptMeaning(action=asked))
        assert got["action_followed"] is False, (drawn, asked)
    # raised without its shadow is not jumping
    img = render(SceneSpec((heart,), "jumping"), 64, 0).image.copy()
    rows = slice(48, 60)
    img[rows] = img[rows, :2].mean(axis=1, keepdims=True).astype(np.uint8)  # erase the shadow
    got = score_image(img, [0], refs, PromptMeaning(action="jumping"))
    assert got["subjects"][0]["identity_kept"] and got["action_followed"] is False


def test_actions_a_class_cannot_show_and_plain_prompts_are_not_scored():
    got = _score(SceneSpec((BALL,)), [1], REFS, PromptMeaning(action="upside down"))
    assert got["action_followed"] is None and got["identity_and_action"] is None
    assert _score(SceneSpec((STAR,)), [0], REFS, PromptMeaning())["action_followed"] is None


# ------------------------------------------------------------------------------ relations


def test_a_relation_with_the_wrong_geometry_fails():
    wrong = [("next to", "on top of"), ("above", "on top of"), ("on top of", "above"),
             ("above", "below"), ("behind", "in front of"), ("in front of", "behind"),
             ("next to", "behind"), ("on top of", "next to"), ("next to", "inside")]
    for drawn, asked in wrong:
        got = _score(SceneSpec((STAR, BALL), relation=drawn), [0, 1], REFS,
                     PromptMeaning(relation=asked))
        assert got["action_followed"] is False, (drawn, asked)
    # a missing subject fails the relation too
    got = _score(SceneSpec((STAR,)), [0, 1], REFS, PromptMeaning(relation="next to"))
    assert got["action_followed"] is False


def test_holds_relation_on_boxes():
    def subject(box, area=100):
        mask = np.zeros((64, 64), bool)
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = True
        return {"bbox": box, "mask": mask, "area": area or int(mask.sum())}

    top, bottom = subject((20, 10, 40, 30)), subject((20, 31, 40, 54))
    assert holds_relation(top, bottom, "on top of", (64, 64))
    assert not holds_relation(top, bottom, "above", (64, 64))
    assert holds_relation(bottom, top, "below", (64, 64)) is False  # touching: not "below"
    high = subject((20, 5, 40, 20))
    assert holds_relation(high, bottom, "above", (64, 64))
    assert holds_relation(bottom, high, "below", (64, 64))
    with pytest.raises(ValueError, match="unknown relation"):
        holds_relation(top, bottom, "hugging", (64, 64))


# ------------------------------------------------------------------------------ prompts, refs


def test_phrase_prompts_and_references(tmp_path):
    refs = [Reference("cat", "orange", "checkered"), Reference("fish", "cyan", "striped")]
    assert phrase_prompt("a {0} is on top of a {1}", (0, 1), refs) == \
        "an orange checkered cat is on top of a cyan striped fish"
    assert phrase_prompt("A {0} at night", (1,), refs) == "A cyan striped fish at night"
    assert phrase_prompt("{0} hugs the {1}", (1, 0), refs) == \
        "cyan striped fish hugs the orange checkered cat"
    assert reference_from_phrase("red striped star", "star") == Reference(
        "star", "red", "striped", "phrase")
    assert reference_from_phrase("a red star", "star").pattern is None
    assert reference_from_phrase("red striped star", "ball") is None
    assert reference_from_phrase("fluffy toy", "star") is None
    assert prompt_meaning("a star is on top of a ball at night") == PromptMeaning(
        None, "on top of", "night")
    assert prompt_meaning("star hugs the ball").grammar is False

    from dynasyn.scene import load_scene

    sc = load_scene(EXAMPLES / "cat_fish")
    assert [(r.shape, r.colour, r.pattern, r.source) for r in scene_references(sc)] == [
        ("cat", "orange", "checkered", "phrase"), ("fish", "cyan", "striped", "phrase")]
    # without phrases the identity is read from the image inside each mask
    bare = tmp_path / "bare"
    shutil.copytree(EXAMPLES / "star_ball", bare)
    meta = json.loads((bare / "scene.json").read_text())
    for s in meta["subjects"]:
        del s["phrase"]
    (bare / "scene.json").write_text(json.dumps(meta))
    read = scene_references(load_scene(bare))
    assert [(r.shape, r.colour, r.pattern, r.source) for r in read] == [
        ("star", "red", "striped", "scene image"), ("ball", "blue", "dotted", "scene image")]


# ------------------------------------------------------------------------------ rates


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    # p = 81/263 = 0.30798: centre (p + z²/2n) / (1 + z²/n) = 0.31074,
    # half-width z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n) = 0.05546
    assert wilson_interval(81, 263) == pytest.approx((0.25529, 0.36621), abs=2e-5)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    assert rate(0, 0) == {"rate": None, "k": 0, "n": 0, "ci95": None}
    r = rate(1, 4)
    assert r["rate"] == 0.25 and r["ci95"][0] < 0.25 < r["ci95"][1]


def test_bootstrap_interval_reflects_the_spread_between_groups():
    same = bootstrap_interval([(5, 10)] * 6)
    assert same == pytest.approx((0.5, 0.5))
    lo, hi = bootstrap_interval([(0, 10), (10, 10)] * 3)
    assert lo < 0.3 and hi > 0.7  # wider than the pooled Wilson interval of 30/60
    w = wilson_interval(30, 60)
    assert hi - lo > w[1] - w[0]
    assert bootstrap_interval([(3, 10)]) is None


def test_counts_and_summaries():
    one = _score(SceneSpec((STAR,), "jumping"), [0], REFS, PromptMeaning(action="jumping"))
    pair = _score(SceneSpec((STAR, BALL), relation="next to"), [0, 1], REFS,
                  PromptMeaning(relation="above"))
    c = counts([one, pair])
    assert c["identity_kept"] == [3, 3] and c["identity_mixing"] == [0, 3]
    assert c["action_followed"] == [1, 2] and c["identity_and_action"] == [1, 2]
    assert set(EXACT_METRICS) <= set(c)
    s = summarize([{"category": "action", "exact": {"images": [one]}},
                   {"category": "interaction", "exact": {"images": [pair]}}])
    assert s["categories"]["action"]["images"] == 1
    assert s["overall"]["action_followed"]["rate"] == 0.5
    assert s["overall"]["images"] == 2


def test_rescore_recomputes_from_stored_images(tmp_path):
    cat = Identity("cat", "orange", "checkered")
    img = render(SceneSpec((cat,), "upside down"), 64, 0).image
    Image.fromarray(img).save(tmp_path / "a.png")
    metrics = {"prompts": [{"category": "action", "subjects": [0], "images": ["a.png"],
                            "class_prompt": "a cat is upside down"}]}
    out = rescore(metrics, tmp_path, [_ref(cat), REFS[1]])
    assert out["exact"]["overall"]["action_followed"]["rate"] == 1.0
    assert out["prompts"][0]["exact"]["summary"]["identity_kept"]["k"] == 1
    assert out["exact"]["references"][0]["colour"] == "orange"
