"""The Gradio page of ``dynasyn ui``: five tabs wired to :class:`~dynasyn.ui.callbacks.Studio`.

Only Gradio components and events (a :class:`gr.Timer` polls the background jobs); no
hand-written JavaScript. Element ids (``elem_id``) name the controls the browser test drives.
"""

from __future__ import annotations

import functools
import html
import math
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402 - a Gradio dependency

from dynasyn.ui.callbacks import MAX_SUBJECTS, Studio  # noqa: E402

CATEGORIES = ("plain", "action", "interaction")
TITLE = "dynasyn: personalize a diffusion model to the subjects of one photo"


def escaped(fn: Callable[..., Any], index: int | None = 0) -> Callable[..., Any]:
    """``fn`` with its message (the whole result, or item ``index`` of it) made safe for a
    Markdown component: ``<asset0>`` would otherwise be dropped as an HTML tag."""
    def esc(text: Any) -> Any:
        return html.escape(text, quote=False) if isinstance(text, str) else text

    @functools.wraps(fn)
    def inner(*args: Any) -> Any:
        out = fn(*args)
        if index is None:
            return esc(out)
        return tuple(esc(v) if i == index else v for i, v in enumerate(out))
    return inner


def loss_frame(rows: list[tuple[int, str, float]]) -> pd.DataFrame:
    """The loss rows as the line plot's table: the total and each term, on a log10 scale (the
    terms differ by orders of magnitude; zero terms are left out)."""
    kept = [(step, term, math.log10(v)) for step, term, v in rows if v > 0]
    return pd.DataFrame({"step": pd.Series([r[0] for r in kept], dtype="int64"),
                         "term": pd.Series([r[1] for r in kept], dtype="str"),
                         "log10 loss": pd.Series([r[2] for r in kept], dtype="float64")})


def theme() -> gr.themes.Base:
    """Gradio's default theme with local fonts (no font download from the browser)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_app(studio: Studio) -> gr.Blocks:
    """The page (call ``.launch`` on it, see :func:`dynasyn.ui.cli.launch`)."""
    from dynasyn.micro.examples import EXAMPLES
    from dynasyn.presets import PRESETS

    with gr.Blocks(title="dynasyn") as app:
        gr.Markdown(f"## {TITLE}\nModel: `{studio.model}` · runs in `{studio.runs_label}`")
        with gr.Row():
            run = gr.Dropdown(label="Run (a new name, or an existing run to open)",
                              choices=studio.run_names(), value=None, allow_custom_value=True,
                              elem_id="run", scale=4)
            refresh = gr.Button("Refresh runs", scale=1)
        with gr.Tabs():
            # ---------------------------------------------------------------- 1. scene
            with gr.Tab("1. Scene", id="scene"):
                with gr.Row():
                    example = gr.Dropdown(label="Example scene (micro world)", choices=list(EXAMPLES),
                                          value="star_ball", elem_id="example")
                    use_example = gr.Button("Use example", elem_id="use-example")
                with gr.Row():
                    photo = gr.File(label="Photo (PNG, JPEG, WebP)", file_types=["image"],
                                    type="filepath", elem_id="photo")
                    masks = gr.File(label="Masks: one per subject, white on black, the photo's "
                                    "size (file-name order)", file_count="multiple",
                                    file_types=["image"], type="filepath", elem_id="masks")
                classes = gr.Textbox(label="Class nouns, one per subject in mask order",
                                     placeholder="star ball", elem_id="classes")
                phrases = gr.Textbox(label="Noun phrases (optional, comma-separated)",
                                     placeholder="red striped star, blue dotted ball",
                                     elem_id="phrases")
                with gr.Row():
                    save = gr.Button("Save scene", variant="primary", elem_id="save-scene")
                    from_classes = gr.Button("Masks from class names", elem_id="masks-from-classes")
                with gr.Accordion("Paint the masks (one layer per subject)", open=False):
                    editor = gr.ImageEditor(label="Brush: add a layer per subject, in class order",
                                            type="numpy", image_mode="RGBA", layers=True,
                                            sources=(), elem_id="editor")
                    from_brush = gr.Button("Save scene from the layers", elem_id="save-brush")
                scene_msg = gr.Markdown(elem_id="scene-msg")
                preview = gr.Image(label="Masks on the photo", type="filepath", interactive=False,
                                   elem_id="overlay", height=256)
            # ---------------------------------------------------------------- 2. augment
            with gr.Tab("2. Augment", id="augment"):
                gr.Markdown("Steps 1-4 of the paper: action and interaction prompts, drafts, the "
                            "real subjects pasted in, Guided SDE Augmentation. Optional (L_AUG).")
                with gr.Row():
                    num_prompts = gr.Number(label="Items", value=8, precision=0, minimum=1,
                                            elem_id="augment-items")
                    provider = gr.Dropdown(label="Prompts", choices=["template", "micro"],
                                           value="template")
                    aug_seed = gr.Number(label="Seed", value=0, precision=0)
                with gr.Row():
                    augment = gr.Button("Augment", variant="primary", elem_id="augment")
                    reroll_index = gr.Number(label="Item to re-roll", value=0, precision=0,
                                             minimum=0)
                    reroll = gr.Button("Re-roll item", elem_id="reroll")
                aug_msg = gr.Markdown(elem_id="augment-msg")
                sheets = gr.Gallery(label="Contact sheets: draft → composed → final", columns=2,
                                    elem_id="sheets", height=360, object_fit="contain")
            # ---------------------------------------------------------------- 3. train
            with gr.Tab("3. Train", id="train"):
                with gr.Row():
                    preset = gr.Dropdown(label="Preset", choices=list(PRESETS), value="dynasyn")
                    phase1 = gr.Number(label="Phase 1 steps", value=100, precision=0, minimum=0,
                                       elem_id="phase1")
                    phase2 = gr.Number(label="Phase 2 steps", value=100, precision=0, minimum=0,
                                       elem_id="phase2")
                    lora = gr.Number(label="LoRA rank (0: full)", value=0, precision=0, minimum=0)
                    every = gr.Number(label="Sample + checkpoint every K steps", value=25,
                                      precision=0, minimum=1, elem_id="every")
                    seed = gr.Number(label="Seed", value=0, precision=0)
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="train")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    resume = gr.Button("Resume", elem_id="resume")
                train_msg = gr.Markdown(elem_id="train-msg")
                with gr.Row():
                    losses = gr.LinePlot(x="step", y="log10 loss", color="term",
                                         label="Losses (log10 of each logged term)", height=300,
                                         elem_id="losses", scale=3)
                    sample = gr.Image(label="Latest sample", type="filepath", interactive=False,
                                      elem_id="sample", height=260, scale=2)
            # ---------------------------------------------------------------- 4. generate
            with gr.Tab("4. Generate", id="generate"):
                with gr.Row():
                    inserts = [gr.Button(f"<asset{i}>", size="sm", visible=i < 2,
                                         elem_id=f"insert{i}") for i in range(MAX_SUBJECTS)]
                with gr.Row():
                    category = gr.Radio(list(CATEGORIES), value="interaction", label="Template")
                    template = gr.Dropdown(label="Prompt template", choices=[],
                                           allow_custom_value=False, scale=3)
                prompt = gr.Textbox(label="Prompts (one per line)", lines=2,
                                    value="<asset0> is next to <asset1>", elem_id="prompt")
                with gr.Row():
                    n_images = gr.Slider(1, 8, value=2, step=1, label="Images per prompt",
                                         elem_id="n-images")
                    gen_seed = gr.Number(label="Seed", value=0, precision=0)
                    gen_steps = gr.Slider(1, 100, value=25, step=1, label="Steps",
                                          elem_id="gen-steps")
                    guidance = gr.Slider(1, 15, value=5.0, step=0.5, label="Guidance")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                gen_msg = gr.Markdown(elem_id="generate-msg")
                gallery = gr.Gallery(label="Images (click one, then download)", columns=4,
                                     elem_id="gallery", height="auto", object_fit="contain")
            # ---------------------------------------------------------------- 5. evaluate
            with gr.Tab("5. Evaluate", id="evaluate"):
                with gr.Row():
                    ev_n = gr.Number(label="Images per prompt", value=2, precision=0, minimum=1)
                    ev_steps = gr.Number(label="Steps", value=25, precision=0, minimum=1)
                    ev_limit = gr.Number(label="Prompts per category", value=3, precision=0,
                                         minimum=1)
                evaluate = gr.Button("Evaluate", variant="primary", elem_id="evaluate")
                ev_msg = gr.Markdown(elem_id="evaluate-msg")
                table = gr.Dataframe(label="Metrics (mean ± std)", interactive=False,
                                     elem_id="metrics")
                report = gr.File(label="report.html", interactive=False, elem_id="report")

        # -------------------------------------------------------------------- events
        def runs_update(value: str | None = None) -> Any:
            return gr.Dropdown(choices=studio.run_names(), value=value)

        refresh.click(runs_update, run, run)
        use_example.click(studio.example, example, [photo, masks, classes, phrases, run])
        photo.change(lambda p: p, photo, editor)
        for button, fn, inputs in (
            (save, studio.save_uploaded, [run, photo, masks, classes, phrases]),
            (from_classes, studio.masks_from_classes, [run, photo, classes]),
            (from_brush, studio.save_brushed, [run, photo, editor, classes]),
        ):
            button.click(escaped(fn), inputs, [scene_msg, preview]).then(runs_update, run, run)
        aug_inputs = [num_prompts, provider, aug_seed]
        augment.click(escaped(studio.augment, None), [run, *aug_inputs], aug_msg)
        reroll.click(escaped(studio.reroll, None), [run, reroll_index, *aug_inputs], aug_msg)
        train.click(escaped(studio.train, None), [run, preset, phase1, phase2, lora, every, seed],
                    train_msg)
        cancel.click(escaped(studio.cancel, None), run, train_msg)
        resume.click(escaped(studio.resume, None), run, train_msg)

        def run_changed(name: str | None):
            try:
                places, _ = studio.run_placeholders(name) if name else ([], [])
            except Exception:  # noqa: BLE001 - not trained yet: default buttons
                places = []
            count = len(places) or 2
            return [gr.Button(visible=i < count) for i in range(MAX_SUBJECTS)]

        run.change(run_changed, run, inserts)
        for i, b in enumerate(inserts):
            b.click(lambda p, i=i: f"{(p or '').rstrip()} <asset{i}>".lstrip(), prompt, prompt)
        category.change(lambda r, c: gr.Dropdown(choices=studio.templates(r, c), value=None),
                        [run, category], template)
        run.change(lambda r, c: gr.Dropdown(choices=studio.templates(r, c), value=None),
                   [run, category], template)
        template.change(lambda t, p: t or p, [template, prompt], prompt)
        generate.click(escaped(studio.generate, 1), [run, prompt, n_images, gen_seed, gen_steps, guidance],
                       [gallery, gen_msg])
        evaluate.click(escaped(studio.evaluate, None), [run, ev_n, ev_steps, ev_limit], ev_msg)

        # live progress: one poll a second of the files the jobs write
        timer = gr.Timer(1.0)
        last_sheets = gr.State(None)

        def poll(name: str | None, seen: Any):
            if not name:
                blank = "choose or type a run name above"
                return (blank, gr.skip(), seen, blank, gr.skip(), gr.skip(), blank, gr.skip(),
                        gr.skip())
            a_msg, a_sheets = escaped(studio.augment_status)(name)
            t_msg, t_losses, t_sample = escaped(studio.train_status)(name)
            e_msg, e_table, e_report = escaped(studio.evaluate_status)(name)
            # send the gallery and the plot only when they change (no redraw every second);
            # an empty plot is sent as None: Vega keeps the axes of an empty first table
            seen = dict(seen or {})
            sheets_key = (name, tuple(a_sheets), *(os.path.getmtime(p) for p, _ in a_sheets
                                                  if os.path.exists(p)))
            sheets_out = gr.skip() if seen.get("sheets") == sheets_key else a_sheets
            loss_key = (name, len(t_losses), t_losses[-1] if t_losses else None)
            losses_out = (gr.skip() if seen.get("losses") == loss_key
                          else loss_frame(t_losses) if t_losses else None)
            seen.update(sheets=sheets_key, losses=loss_key)
            headers, rows = e_table
            return (a_msg, sheets_out, seen, t_msg, losses_out, t_sample, e_msg,
                    pd.DataFrame(rows, columns=headers), e_report)

        timer.tick(poll, [run, last_sheets], [aug_msg, sheets, last_sheets, train_msg, losses,
                                              sample, ev_msg, table, report],
                   show_progress="hidden", concurrency_limit=None)
    return app
