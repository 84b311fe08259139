"""``dynasyn ui`` without a browser: run names, upload checks, the job queue and the callbacks
(train → cancel → resume on the bundled micro model, generate, refusals). The page itself is
driven in tests/test_ui_browser.py."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynasyn.cli import build_parser, main
from dynasyn.errors import InputError
from dynasyn.scene import load_scene
from dynasyn.ui import uploads
from dynasyn.ui.callbacks import BAD, OK, Studio, loss_rows, metrics_rows, sample_prompt
from dynasyn.ui.jobs import JobManager
from dynasyn.ui.paths import RunsDir
from dynasyn.ui.uploads import layer_masks, parse_classes, parse_phrases, scene_from_uploads

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "star_ball"


def _png(path: Path, size=(64, 64), value=255, mode="L") -> Path:
    Image.new(mode, size, value).save(path)
    return path


# ---------------------------------------------------------------------------- run names


def test_run_names_stay_inside_the_runs_dir(tmp_path):
    runs = RunsDir(tmp_path / "runs")
    assert runs.path("star-ball_1.v2") == (tmp_path / "runs" / "star-ball_1.v2").resolve()
    for bad in ("../escape", "a/b", "/etc", ".hidden", "..", "", "  ", "x" * 65, "a\\b"):
        with pytest.raises(InputError):
            runs.path(bad)
    (tmp_path / "runs").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(InputError, match="outside the runs directory"):
        runs.path("link")
    (tmp_path / "runs" / "real").mkdir()
    assert runs.names() == ["real"]  # the escaping link is not listed


# ---------------------------------------------------------------------------- uploads


def test_uploaded_scene_is_checked_with_the_cli_messages(tmp_path):
    small = _png(tmp_path / "small_mask.png", (32, 32))
    dest = tmp_path / "run" / "masks"
    with pytest.raises(InputError) as e:
        scene_from_uploads(EXAMPLE / "img.png", [EXAMPLE / "mask0.png", small], ["star", "ball"],
                           dest)
    assert str(e.value) == ("small_mask.png is 32x32 but img.png is 64x64; resize the mask to "
                            "the image size")
    assert not dest.exists() and list((tmp_path / "run").iterdir()) == []  # nothing left behind
    with pytest.raises(InputError, match=r"1 class given \(star\) but the scene has 2 masks"):
        scene_from_uploads(EXAMPLE / "img.png", [EXAMPLE / "mask0.png", EXAMPLE / "mask1.png"],
                           ["star"], dest)
    empty = _png(tmp_path / "empty.png", value=0)
    with pytest.raises(InputError, match="empty.png is empty"):
        scene_from_uploads(EXAMPLE / "img.png", [empty], ["star"], dest)


def test_upload_format_and_size_checks(tmp_path, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="photo notes.png is not an image"):
        uploads.check_image(text, "photo")
    gif = tmp_path / "anim.gif"
    Image.new("P", (8, 8)).save(gif)
    with pytest.raises(InputError, match="mask anim.gif is GIF, not a supported format"):
        uploads.check_image(gif, "mask")
    big = _png(tmp_path / "big.png", (uploads.MAX_SIDE + 1, 4))
    with pytest.raises(InputError, match="largest side allowed is 4096"):
        uploads.check_image(big, "photo")
    monkeypatch.setattr(uploads, "MAX_UPLOAD_MB", 0)
    with pytest.raises(InputError, match="the limit is 0 MB"):
        uploads.check_image(EXAMPLE / "img.png", "photo")


def test_uploaded_scene_keeps_the_files_in_name_order(tmp_path):
    m0, m1 = (tmp_path / "b-2.png", tmp_path / "b-10.png")
    for src, dst in ((EXAMPLE / "mask0.png", m0), (EXAMPLE / "mask1.png", m1)):
        dst.write_bytes(src.read_bytes())
    dest = tmp_path / "run" / "masks"
    scene = scene_from_uploads(EXAMPLE / "img.png", [m1, m0], ["star", "ball"], dest,
                               phrases=["red striped star", "blue dotted ball"])
    assert [s.mask_path.name for s in scene.subjects] == ["b-2.png", "b-10.png"]  # 2 before 10
    assert (dest / "b-2.png").read_bytes() == (EXAMPLE / "mask0.png").read_bytes()
    again = load_scene(dest)  # scene.json alone describes it
    assert again.classes == ["star", "ball"]
    assert [s.phrase for s in again.subjects] == ["red striped star", "blue dotted ball"]
    assert parse_classes("teddy bear, bowl") == ["teddy bear", "bowl"]
    assert parse_classes(" star  ball ") == ["star", "ball"]
    assert parse_phrases("") is None and parse_phrases("a b, c") == ["a b", "c"]


def test_brush_layers_become_masks():
    bg = np.zeros((8, 10, 4), np.uint8)
    layer0, layer1, blank = (np.zeros((8, 10, 4), np.uint8) for _ in range(3))
    layer0[1:3, 2:4, 3] = 255
    layer1[5:7, 6:9, 3] = 40  # any painted alpha counts
    masks = layer_masks({"background": bg, "layers": [layer0, blank, layer1], "composite": bg})
    assert len(masks) == 2 and masks[0].shape == (8, 10)
    assert masks[0].sum() == 4 and masks[1].sum() == 6 and masks[1][5, 6]
    with pytest.raises(InputError, match="no brush strokes"):
        layer_masks({"background": bg, "layers": [blank]})
    with pytest.raises(InputError, match="brush layer 1 is 5x5 but the photo is 10x8"):
        layer_masks({"background": bg, "layers": [np.ones((5, 5, 4), np.uint8)]})
    with pytest.raises(InputError, match="has no photo"):
        layer_masks(None)


# ---------------------------------------------------------------------------- the command


def test_ui_command_defaults_are_local_and_private():
    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.share, args.model, args.runs_dir) == (
        "127.0.0.1", 7860, False, "micro", "runs")


def test_ui_without_gradio_says_how_to_install(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["ui", "--runs-dir", str(tmp_path)]) == 2
    assert 'pip install -e ".[ui]"' in capsys.readouterr().err


# ---------------------------------------------------------------------------- callbacks


@pytest.fixture
def studio(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    s = Studio(tmp_path / "runs")
    yield s
    s.close()


def _wait(studio: Studio, run: str, status, until=lambda m: not m.startswith("◷"),
          timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        out = status(run)
        if until(out[0] if isinstance(out, tuple) else out):
            return out
        time.sleep(0.3)
    raise AssertionError(f"timed out; last status {out!r}")


def test_refusals_are_messages(studio, tmp_path):
    assert studio.train("../x").startswith(f"{BAD} run name '../x' is not allowed")
    assert "has no scene yet: save one on the Scene tab first" in studio.train("fresh")
    msg, preview = studio.save_uploaded("r1", None, [], "star")
    assert msg == f"{BAD} no photo: upload one (PNG, JPEG or WebP) or pick an example"
    assert preview is None
    assert "not a finished dynasyn run" in studio.generate("r1", "<asset0>")[1]
    assert studio.cancel("r1") == f"{BAD} run r1 has no job to cancel"
    assert studio.train_status("r1")[0] == "not trained yet: set the steps and press Train"


def test_masks_from_class_names(studio):
    photo = str(EXAMPLE / "img.png")
    msg, preview = studio.masks_from_classes("m", photo, "star ball")
    assert msg.startswith(f"{OK} scene saved (from the class names): 2 subjects"), msg
    scene = load_scene(studio.runs.path("m") / "masks")
    truth = [np.asarray(Image.open(EXAMPLE / f"mask{i}.png").convert("L")) >= 128 for i in (0, 1)]
    for mask, want in zip(scene.masks, truth, strict=True):  # each mask finds its subject
        got = mask >= 0.5
        assert (got & want).sum() / (got | want).sum() > 0.5
    msg, preview = studio.masks_from_classes("m2", photo, "star star")
    assert msg == (f"{BAD} classes star star name a class twice; masks from class names need "
                   "distinct nouns (e.g. 'red ball' and 'blue ball' are not supported)")
    assert preview is None and not studio.runs.path("m2").exists()


def test_train_cancel_resume_generate(studio):
    """The UI's training goes through dynasyn.train (a sample per checkpoint); a cancelled job
    resumes from its checkpoint and finishes with the log of every step once."""
    photo, masks, classes, phrases, _ = studio.example("star_ball")
    msg, preview = studio.save_uploaded("sb", photo, masks, classes, phrases)
    assert msg.startswith(f"{OK} scene saved (uploaded masks): 2 subjects, <asset0> = star")
    assert Image.open(preview).size == (256, 256)  # the 64 px overlay, enlarged for the page
    assert studio.train("sb", "no-such-preset").startswith(f"{BAD} unknown preset")
    assert studio.train("sb", "dynasyn", 3, 3, 0, 2).startswith("◷ train job #1 queued")
    assert "already has a train job" in studio.train("sb", "dynasyn", 3, 3, 0, 2)
    run = studio.runs.path("sb")
    _wait(studio, "sb", lambda r: str(len(list((run / "checkpoints").glob("*")))),
          until=lambda m: m != "0")
    cancelled = studio.cancel("sb")
    assert cancelled.startswith(f"{OK} train job #1 cancelled")
    if not (run / "run.json").is_file():  # (it may finish before the kill lands)
        assert "Resume continues from there" in cancelled
        assert "press Resume" in studio.train("sb", "dynasyn", 3, 3, 0, 2)
        assert studio.resume("sb").startswith("◷ train job #2 queued")
    msg, rows, sample = _wait(studio, "sb", studio.train_status)
    assert msg.startswith(f"{OK} trained: step 6 / 6 (phase 2)"), msg
    steps = [r["step"] for r in map(json.loads, (run / "logs" / "losses.jsonl").open())]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert {t for _, t, _ in rows} >= {"loss", "md", "m2a", "ica"}
    assert sample.endswith("step00006.png") and Image.open(sample).size == (256, 256)
    assert Image.open(run / "ui" / "samples" / "step00006.png").size == (64, 64)
    assert studio.train("sb").startswith(f"{BAD} run sb is already trained")
    assert studio.resume("sb") == f"{BAD} run sb is finished; nothing to resume"
    assert "already trained or training" in studio.save_uploaded("sb", photo, masks, classes)[0]

    images, msg = studio.generate("sb", "<asset0> is next to <asset1>\n<asset1> at night", 2,
                                  0, 5)
    assert msg == f"{OK} 4 images in sb/generated" and len(images) == 4
    assert all(Image.open(p).size == (64, 64) for p in images)
    assert studio.generate("sb", "<asset2> at night")[1].startswith(f"{BAD} prompt")
    assert "at most 16 per click" in studio.generate("sb", "<asset0>", 17)[1]
    assert studio.templates("sb", "interaction")[0].count("<asset") == 2
    assert studio.run_choices() == ["sb"]


def test_a_failing_job_reports_one_line_and_the_queue_goes_on(tmp_path):
    jobs = JobManager()
    try:
        (tmp_path / "r").mkdir()
        bad = jobs.submit("evaluate", tmp_path / "r", {"n": 1})
        assert jobs.wait(bad, timeout=120)
        assert bad.state == "failed"
        assert "is not a finished dynasyn run (no run.json)" in bad.error
        assert "Traceback" in bad.log.read_text()  # the details stay in the job's log
        again = jobs.submit("evaluate", tmp_path / "r", {"n": 1})  # the server still serves
        queued = jobs.submit("evaluate", tmp_path / "s", {"n": 1})
        assert jobs.position(queued) in (1, 2)
        assert jobs.cancel(queued) and queued.state == "cancelled"
        assert jobs.wait(again, timeout=120) and again.state == "failed"
    finally:
        jobs.shutdown()


def test_a_job_process_ends_with_its_server():
    """A killed server leaves no orphan job writing into a run that a new server may resume."""
    import os
    import signal
    import subprocess
    import sys

    job = ("from dynasyn.ui.worker import exit_with_parent; import time; "
           "exit_with_parent(0.1); time.sleep(60)")
    server = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; p = subprocess.Popen([sys.executable, "
         f"'-c', {job!r}], start_new_session=True); print(p.pid, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    pid = int(server.stdout.readline())
    time.sleep(1.0)
    os.kill(pid, 0)  # the job runs
    server.send_signal(signal.SIGKILL)
    server.wait()
    end = time.time() + 10
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        stat = Path(f"/proc/{pid}/stat")
        if stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            return  # ended, not yet reaped by its new parent
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the job process outlived its server")


def test_tables_for_the_page():
    recs = [{"step": 1, "phase": 1, "loss": 0.5, "md": 0.4, "m2a": float("nan"), "aug": 0.0}]
    assert loss_rows(recs) == [(1, "loss", 0.5), (1, "md", 0.4), (1, "aug", 0.0)]
    result = {"metrics": {"clip_t": "…"}, "categories": {"plain": {"clip_t": {
        "mean": 0.25, "std": 0.125, "n": 4}}}, "overall": {"clip_t": {"mean": 0.25, "std": 0.1,
                                                                    "n": 4}}}
    headers, rows = metrics_rows(result)
    assert headers == ["category", "images", "CLIP-T"]
    assert rows == [["plain", 4, "0.250 ± 0.125"], ["overall", 4, "0.250 ± 0.100"]]
    assert metrics_rows({}) == (["category", "images"], [])
    assert sample_prompt(["<asset0>", "<asset1>"]) == "<asset0> and <asset1>"
    assert sample_prompt(["<asset0>"]) == "a photo of <asset0>"


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio not installed")
def test_the_page_builds(studio):
    from dynasyn.ui.app import build_app, escaped, loss_frame

    app = build_app(studio)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"run", "photo", "masks", "classes", "save-scene", "train", "cancel", "resume",
            "generate", "gallery", "evaluate", "losses", "sample"} <= ids
    frame = loss_frame([(1, "loss", 0.01), (1, "aug", 0.0)])
    assert list(frame["log10 loss"]) == [-2.0] and str(frame["step"].dtype) == "int64"
    assert escaped(lambda: ("<asset0> = star", 1))() == ("&lt;asset0&gt; = star", 1)
