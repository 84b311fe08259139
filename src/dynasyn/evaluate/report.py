"""``report.html`` of an evaluation: pictures and numbers on one self-contained page.

The page shows the scene with its mask outlines, the augmented data's contact sheets (if the
run was trained with augmentation), a grid per prompt category, the placeholder
cross-attention maps over generated images (heat-map overlays), the training loss curves and the
metrics table. Every picture is a PNG written or copied into the evaluation directory and linked
relatively, so the directory can be moved or zipped as a whole. Drawing uses PIL only (no
matplotlib).
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "METRIC_LABELS",
    "ASSETS",
    "EXACT_LABELS",
    "exact_table",
    "format_rate",
    "heat_overlay",
    "labelled_grid",
    "loss_curves",
    "outline_masks",
    "read_losses",
    "report_links",
    "summary_table",
    "write_report",
]

ASSETS = "report_files"
"""Sub-directory of the evaluation directory with the report's own pictures."""

METRIC_LABELS: dict[str, str] = {
    "clip_t": "CLIP-T",
    "clip_i": "CLIP-I",
    "clip_i_subject": "CLIP-I subject",
    "identity_region": "identity in region",
    "image_reward": "ImageReward",
    "dino_i": "DINO",
    "dino_i_subject": "DINO subject",
}
"""Column titles of the metrics table."""

EXACT_LABELS: dict[str, str] = {
    "identity_kept": "identity kept",
    "action_followed": "action followed",
    "identity_and_action": "identity & action",
    "identity_mixing": "identity mixing",
}
"""Column titles of the exact-metrics table (micro-world runs)."""

_LOSS_KEYS = ("loss", "md", "m2a", "ica", "aug")
_LOSS_COLOURS = {"loss": (30, 30, 30), "md": (31, 119, 180), "m2a": (255, 127, 14),
                 "ica": (44, 160, 44), "aug": (214, 39, 40)}


def _palette() -> tuple[tuple[int, int, int], ...]:
    from dynasyn.augment.compose import OUTLINE_COLOURS

    return OUTLINE_COLOURS


def _scale_for(size: int, target: int = 192) -> int:
    return max(1, target // max(size, 1))


# --------------------------------------------------------------------------------------------
# pictures


def outline_masks(image: Image.Image, masks: Sequence[np.ndarray], scale: int | None = None,
                  width: int = 2) -> Image.Image:
    """The image (upscaled ``scale``× nearest) with subject i's mask outlined in colour i."""
    image = image.convert("RGB")
    scale = scale or _scale_for(max(image.size))
    w, h = image.width * scale, image.height * scale
    big = np.array(image.resize((w, h), Image.NEAREST))
    colours = _palette()
    for i, mask in enumerate(masks):
        m = Image.fromarray((np.asarray(mask) >= 0.5).astype(np.uint8) * 255, "L")
        m = np.asarray(m.resize((w, h), Image.NEAREST)) > 0
        inner = m.copy()
        for _ in range(width):
            p = np.pad(inner, 1, constant_values=False)
            inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        big[m & ~inner] = colours[i % len(colours)]
    return Image.fromarray(big)


def _jet(x: np.ndarray) -> np.ndarray:
    """A jet-like colour map of values in [0, 1] -> uint8 RGB."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def heat_overlay(image: Image.Image, attn_map: np.ndarray, alpha: float = 0.55,
                 max_side: int = 256) -> Image.Image:
    """The attention map (upsampled bilinearly, scaled to its min..max) over the image.

    Small images are upscaled (nearest) to about 192 px, large ones reduced to ``max_side``.
    """
    image = image.convert("RGB")
    side = max(image.size)
    if side < 192:
        image = image.resize((image.width * _scale_for(side), image.height * _scale_for(side)),
                             Image.NEAREST)
    elif side > max_side:
        f = max_side / side
        image = image.resize((round(image.width * f), round(image.height * f)), Image.BICUBIC)
    m = torch.as_tensor(np.nan_to_num(np.asarray(attn_map, np.float32))).clamp(min=0)
    m = torch.nn.functional.interpolate(m[None, None], size=(image.height, image.width),
                                        mode="bilinear", align_corners=False)[0, 0].numpy()
    lo, hi = float(m.min()), float(m.max())
    heat = _jet((m - lo) / (hi - lo) if hi > lo else np.zeros_like(m))
    out = np.asarray(image, np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def labelled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]],
                  scale: int | None = None) -> Image.Image:
    """One row per prompt: its text on the left, its images to the right."""
    font = ImageFont.load_default()
    w0, h0 = rows[0][1][0].size
    scale = scale or _scale_for(max(w0, h0), 128)
    w, h = w0 * scale, h0 * scale
    label_w = min(420, 12 + 6 * max(len(t) for t, _ in rows))
    cols = max(len(ims) for _, ims in rows)
    grid = Image.new("RGB", (label_w + cols * (w + 4), len(rows) * (h + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (text, ims) in enumerate(rows):
        y = r * (h + 4)
        draw.text((4, y + h // 2 - 6), text[: (label_w - 8) // 6], fill="black", font=font)
        for c, im in enumerate(ims):
            grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST if scale > 1
                                                else Image.BICUBIC), (label_w + c * (w + 4), y))
    return grid


def read_losses(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN/logs/losses.jsonl`` (unreadable lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


def loss_curves(records: Sequence[dict[str, Any]], panel: tuple[int, int] = (300, 150)
                ) -> Image.Image | None:
    """Small multiples of the logged loss terms against the step (one panel per term).

    Each panel has its own y range; a grey vertical line marks the start of phase 2. Returns
    None when no term was logged.
    """
    keys = [k for k in _LOSS_KEYS
            if any(isinstance(r.get(k), int | float) and math.isfinite(r[k]) for r in records)]
    if not keys:
        return None
    font = ImageFont.load_default()
    pw, ph = panel
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    img = Image.new("RGB", (cols * pw, rows * ph), "white")
    draw = ImageDraw.Draw(img)
    phase2 = [r["step"] for r in records if r.get("phase") == 2]
    left, right, top, bottom = 52, 10, 18, 18
    for n, key in enumerate(keys):
        ox, oy = (n % cols) * pw, (n // cols) * ph
        pts = [(float(r["step"]), float(r[key])) for r in records
               if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        if x1 == x0:
            x1 = x0 + 1
        if y1 == y0:
            pad = abs(y0) * 0.05 or 1e-6
            y0, y1 = y0 - pad, y1 + pad
        ax0, ay0, ax1, ay1 = ox + left, oy + top, ox + pw - right, oy + ph - bottom

        def to_xy(x: float, y: float, ax0=ax0, ay0=ay0, ax1=ax1, ay1=ay1, x0=x0, x1=x1,
                  y0=y0, y1=y1) -> tuple[float, float]:
            return (ax0 + (x - x0) / (x1 - x0) * (ax1 - ax0),
                    ay1 - (y - y0) / (y1 - y0) * (ay1 - ay0))

        draw.rectangle((ax0, ay0, ax1, ay1), outline=(170, 170, 170))
        if phase2 and x0 < min(phase2) <= x1:
            px = to_xy(min(phase2), y0)[0]
            draw.line((px, ay0, px, ay1), fill=(200, 200, 200))
            draw.text((px + 2, ay0 + 1), "phase 2", fill=(150, 150, 150), font=font)
        colour = _LOSS_COLOURS[key]
        xy = [to_xy(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if len(xy) <= 20 else []:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((ax0, oy + 3), key, fill=colour, font=font)
        draw.text((ox + 2, ay0), _fmt(y1), fill=(90, 90, 90), font=font)
        draw.text((ox + 2, ay1 - 10), _fmt(y0), fill=(90, 90, 90), font=font)
        draw.text((ax0, ay1 + 3), f"{int(x0)}", fill=(90, 90, 90), font=font)
        draw.text((ax1 - 6 * len(str(int(max(xs)))), ay1 + 3), f"{int(max(xs))}",
                  fill=(90, 90, 90), font=font)
    return img


def contact_sheets(augmented: Path | None, limit: int = 12) -> list[tuple[Path, str]]:
    """``(sheet path, caption)`` of the augmented directory's contact sheets, up to ``limit``."""
    if augmented is None:
        return []
    index = augmented / "prompts.jsonl"
    if not index.is_file():
        return []
    out: list[tuple[Path, str]] = []
    for line in index.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        sheet = rec.get("sheet")
        if not sheet or not (augmented / sheet).is_file():
            continue
        out.append((augmented / sheet, str(rec.get("phrase_prompt") or rec.get("template", ""))))
        if len(out) >= limit:
            break
    return out


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
font-size:13px;text-align:left;vertical-align:top}th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img.px{image-rendering:pixelated}.row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}figcaption{font-size:12px;color:#555;max-width:260px}
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
.note{color:#8a5a00}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return '<td class="num">–</td>'
    return f'<td class="num">{stat["mean"]:.3f} ± {stat["std"]:.3f}</td>'


def _metrics_table(result: dict[str, Any]) -> str:
    names = [m for m in METRIC_LABELS if m in result.get("metrics", {})]
    head = "".join(f'<th title="{_e(result["metrics"][m])}">{_e(METRIC_LABELS[m])}</th>'
                   for m in names)
    rows = []
    for cat, stats in result.get("categories", {}).items():
        n = max((s.get("n", 0) for s in stats.values()), default=0)
        rows.append(f"<tr><th>{_e(cat)}</th><td class='num'>{n}</td>"
                    + "".join(_cell(stats.get(m)) for m in names) + "</tr>")
    overall = result.get("overall", {})
    n = max((s.get("n", 0) for s in overall.values()), default=0)
    rows.append(f"<tr><th>overall</th><td class='num'>{n}</td>"
                + "".join(_cell(overall.get(m)) for m in names) + "</tr>")
    legend = "".join(f"<li><b>{_e(METRIC_LABELS[m])}</b>: {_e(result['metrics'][m])}</li>"
                     for m in names)
    return (f"<table><tr><th>category</th><th>images</th>{head}</tr>{''.join(rows)}</table>"
            f"<ul style='font-size:13px'>{legend}</ul>")


def format_rate(stat: dict[str, Any] | None, interval: str = "ci95") -> str:
    """``"62.5 % [30.6, 86.3]"`` for a rate with its interval; ``"–"`` without data."""
    if not stat or stat.get("rate") is None:
        return "–"
    text = f"{100 * stat['rate']:.1f} %"
    ci = stat.get(interval)
    return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else text


def _exact_rows(result: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(category, source, {metric: rate}) rows: the run's, then the text ceiling's."""
    rows = []
    for key, source in (("exact", "this run"), ("exact_ceiling", "text ceiling")):
        block = result.get(key)
        if not block:
            continue
        for cat, stats in [*block.get("categories", {}).items(),
                           ("overall", block.get("overall", {}))]:
            rows.append((cat, source, stats))
    return rows


def exact_table(result: dict[str, Any]) -> str:
    """The exact metrics (and the text ceiling) as plain text, for the terminal; empty when
    the evaluation has none."""
    rows = _exact_rows(result)
    if not rows:
        return ""
    head = ["exact metrics", "source", "images", *EXACT_LABELS.values()]
    body = []
    for cat, source, stats in rows:
        body.append([cat, source, str(stats.get("images", "")),
                     *(format_rate(stats.get(m)) for m in EXACT_LABELS)])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *body]]
    return "\n".join(lines + ["(rates with 95 % Wilson intervals; identity and mixing per "
                               "image and prompted subject, action per image)"])


def _exact_html(result: dict[str, Any]) -> str:
    rows = _exact_rows(result)
    if not rows:
        return ""
    defs = result.get("exact", {}).get("definitions", {})
    head = "".join(f'<th title="{_e(defs.get(m, ""))}">{_e(label)}</th>'
                   for m, label in EXACT_LABELS.items())
    body = "".join(
        f"<tr><th>{_e(cat)}</th><td>{_e(source)}</td>"
        f"<td class='num'>{_e(stats.get('images', ''))}</td>"
        + "".join(f'<td class="num">{_e(format_rate(stats.get(m)))}</td>' for m in EXACT_LABELS)
        + "</tr>" for cat, source, stats in rows)
    refs = ", ".join(f"<code>&lt;asset{i}&gt;</code> {_e(' '.join(str(v) for v in (r.get('colour'), r.get('pattern'), r.get('class')) if v))}"
                     for i, r in enumerate(result.get("exact", {}).get("references", [])))
    legend = "".join(f"<li><b>{_e(EXACT_LABELS[m])}</b>: {_e(d)}</li>" for m, d in defs.items()
                     if m in EXACT_LABELS)
    ceiling = result.get("exact_ceiling")
    note = ""
    if ceiling:
        note = (f"<p>Text ceiling: the base model <code>{_e(ceiling.get('model'))}</code> "
                "prompted with each subject's identity phrase instead of its placeholder, same "
                "prompts and seeds.</p>")
    return ("<h2>Exact metrics (micro parser)</h2>"
            f"<p>reference identities: {refs}</p>{note}"
            f"<table><tr><th>category</th><th>source</th><th>images</th>{head}</tr>{body}"
            "</table>"
            "<p style='font-size:13px'>rate [95 % Wilson interval]; identity and mixing per "
            "image and prompted subject, action per image</p>"
            f"<ul style='font-size:13px'>{legend}</ul>")


def _detect_compare_rows(result: dict[str, Any]) -> list[list[str]]:
    """[category, embedding, subjects, score mean ± std, mixing rate [CI]] rows."""
    block = result.get("detect_compare")
    if not block:
        return []
    rows = []
    for cat, per in [*block.get("categories", {}).items(), ("overall", block.get("overall", {}))]:
        for emb, st in per.items():
            sc = st.get("score") or {}
            score = (f"{sc['mean']:+.3f} ± {sc['std']:.3f}" if sc.get("mean") is not None
                     else "–")
            rows.append([cat, emb.upper(), str(st["mixing"]["n"]), score,
                         format_rate(st["mixing"])])
    return rows


def _detect_compare_html(result: dict[str, Any]) -> str:
    rows = _detect_compare_rows(result)
    if not rows:
        return ""
    body = "".join("<tr><th>" + _e(r[0]) + "</th>"
                   + "".join(f"<td class='num'>{_e(c)}</td>" for c in r[1:]) + "</tr>"
                   for r in rows)
    return ("<h2>Identity mixing, approximate (Detect-and-Compare)</h2>"
            f"<p style='font-size:13px'>{_e(result['detect_compare'].get('definition', ''))}. "
            "Approximate: see docs/evaluation.md.</p>"
            "<table><tr><th>category</th><th>embedding</th><th>subjects</th>"
            "<th>own − other</th><th>mixing [95 % CI]</th></tr>" + body + "</table>")


def _exact_cell(p: dict[str, Any]) -> str:
    summary = (p.get("exact") or {}).get("summary")
    if not summary:
        return ""
    parts = []
    for m, short in (("identity_kept", "ID"), ("action_followed", "act"),
                     ("identity_mixing", "mix")):
        st = summary.get(m) or {}
        if st.get("n"):
            parts.append(f"{short} {st['k']}/{st['n']}")
    return f"<td>{_e(' · '.join(parts))}</td>"


def _prompt_table(prompts: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(METRIC_LABELS[m])}</th>" for m in names)
    if any(p.get("exact") for p in prompts):
        head += "<th>exact</th>"
    rows = []
    for p in prompts:
        grid = p.get("grid")
        img = (f'<a href="{_e(grid)}"><img class="px" src="{_e(grid)}" height="72" '
               f'alt="grid"></a>') if grid else ""
        fb = p.get("region_fallbacks", 0)
        fb_note = f"<br><span class='note'>region: whole image ×{fb}</span>" if fb else ""
        rows.append(
            f"<tr><td>{img}</td><td><code>{_e(p['prompt'])}</code><br>"
            f"<small>{_e(p['class_prompt'])}</small>{fb_note}</td>"
            + "".join(_cell(p["summary"].get(m)) for m in names) + _exact_cell(p) + "</tr>"
        )
    return f"<table><tr><th>images</th><th>prompt</th>{head}</tr>{''.join(rows)}</table>"


def write_report(
    out: str | Path,
    result: dict[str, Any],
    scene_image: Image.Image,
    masks: Sequence[np.ndarray],
    run: str | Path,
    augmented: str | Path | None = None,
    max_sheets: int = 12,
) -> Path:
    """Write ``report.html`` (and its pictures under :data:`ASSETS`) into ``out``.

    ``result`` is the evaluation's metrics dictionary (paths in it relative to ``out``). Only
    files that exist in ``out`` are linked. Returns the page's path.
    """
    from dynasyn.config import atomic_write_text

    out = Path(out)
    assets = out / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    names = [m for m in METRIC_LABELS if m in result.get("metrics", {})]
    classes = result.get("classes", [])
    parts: list[str] = []
    title = f"dynasyn evaluation — {Path(str(result.get('run', run))).name}"
    parts.append(f"<h1>{_e(title)}</h1>")
    s = result.get("settings", {})
    parts.append(
        "<p>" + _e(f"run {result.get('run', run)} · base model {result.get('base_model')} · "
                   f"mode {result.get('mode')} · prompts {s.get('prompt_set')} · "
                   f"{s.get('n')} image(s) per prompt, seeds {s.get('seed')}… · "
                   f"{s.get('steps')} DDIM steps · guidance {s.get('guidance')} · "
                   f"CLIP {s.get('clip_model')}") + ' · <a href="metrics.json">metrics.json</a></p>'
    )
    for note in result.get("notes", []):
        parts.append(f"<p class='note'>{_e(note)}</p>")

    parts.append("<h2>Metrics</h2>" + _metrics_table(result))
    parts.append(_exact_html(result))
    parts.append(_detect_compare_html(result))

    # scene
    scene_png = assets / "scene.png"
    outline_masks(scene_image, masks).save(scene_png)
    colours = _palette()
    legend = "".join(
        f"<li><span class='swatch' style='background:rgb{colours[i % len(colours)]}'></span>"
        f"<code>{_e(f'<asset{i}>')}</code> {_e(c)}</li>" for i, c in enumerate(classes))
    parts.append(f"<h2>Scene</h2><div class='row'><img class='px' src='{ASSETS}/scene.png' "
                 f"width='256' alt='scene'><ul>{legend}</ul></div>")

    # augmented data
    sheets = contact_sheets(Path(augmented) if augmented else None, max_sheets)
    if sheets:
        (assets / "sheets").mkdir(exist_ok=True)
        figs = []
        for k, (path, caption) in enumerate(sheets):
            dst = assets / "sheets" / f"{k:04d}.png"
            shutil.copyfile(path, dst)
            figs.append(f"<figure><img src='{ASSETS}/sheets/{dst.name}' alt='sheet'>"
                        f"<figcaption>{_e(caption)}</figcaption></figure>")
        parts.append("<h2>Augmented data</h2><p>draft → composed → final, masks outlined</p>"
                     f"<div class='row'>{''.join(figs)}</div>")

    # per category
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for p in result.get("prompts", []):
        by_cat.setdefault(p["category"], []).append(p)
    for cat, prompts in by_cat.items():
        parts.append(f"<h2>{_e(cat.capitalize())} prompts</h2>")
        rows = []
        for p in prompts:
            ims = [Image.open(out / f) for f in p["images"] if (out / f).is_file()]
            if ims:
                rows.append((p["prompt"], ims))
        if rows:
            name = f"grid_{re.sub(r'[^a-z0-9]+', '-', cat.lower())}.png"
            labelled_grid(rows).save(assets / name)
            parts.append(f"<img class='px' src='{ASSETS}/{name}' alt='{_e(cat)} grid' "
                         "style='max-width:100%'>")
        parts.append(_prompt_table(prompts, names))
        att = next((p for p in prompts if p.get("attention")), None)
        if att is not None:
            figs = "".join(
                f"<figure><img class='px' src='{_e(a['image'])}' width='192' alt='attention'>"
                f"<figcaption><code>{_e(a['placeholder'])}</code> ({_e(a['class'])})"
                "</figcaption></figure>" for a in att["attention"] if (out / a["image"]).is_file())
            parts.append(f"<h3>Placeholder attention: <code>{_e(att['prompt'])}</code></h3>"
                         f"<div class='row'>{figs}</div>")

    # text ceiling
    ceiling = (result.get("exact_ceiling") or {}).get("prompts", [])
    rows = []
    for p in ceiling:
        ims = [Image.open(out / f) for f in p.get("images", []) if (out / f).is_file()]
        if ims:
            rows.append((p["prompt"], ims))
    if rows:
        labelled_grid(rows).save(assets / "grid_ceiling.png")
        parts.append("<h2>Text ceiling</h2><p>the base model with identity phrases, same seeds"
                     f"</p><img class='px' src='{ASSETS}/grid_ceiling.png' alt='ceiling grid' "
                     "style='max-width:100%'>")
        parts.append(_prompt_table([dict(p, summary={}, class_prompt=p.get("class_prompt", ""))
                                    for p in ceiling], []))

    # training losses
    curves = loss_curves(read_losses(Path(run) / "logs" / "losses.jsonl"))
    parts.append("<h2>Training losses</h2>")
    if curves is not None:
        curves.save(assets / "losses.png")
        parts.append(f"<img src='{ASSETS}/losses.png' alt='loss curves'>")
    else:
        parts.append("<p>no loss log (RUN/logs/losses.jsonl) found</p>")

    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    path = out / "report.html"
    atomic_write_text(path, page)
    return path


def report_links(path: str | Path) -> list[str]:
    """Every ``src`` / ``href`` value of an HTML file (to check the report's links)."""
    text = Path(path).read_text()
    return [html.unescape(m.group(2)) for m in re.finditer(r"(src|href)=['\"]([^'\"]*)['\"]", text)]


def summary_table(result: dict[str, Any]) -> str:
    """The metrics table as plain text (categories × metrics, mean ± std), for the terminal."""
    names = [m for m in METRIC_LABELS if m in result.get("metrics", {})]
    head = ["category", "images", *(METRIC_LABELS[m] for m in names)]
    rows = []
    for cat, stats in [*result.get("categories", {}).items(), ("overall", result.get("overall", {}))]:
        n = max((s.get("n", 0) for s in stats.values()), default=0)
        cells = [f"{s['mean']:.3f} ± {s['std']:.3f}" if s and s.get("mean") is not None else "–"
                 for s in (stats.get(m) for m in names)]
        rows.append([cat, str(n), *cells])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    exact = exact_table(result)
    dc = _detect_compare_rows(result)
    if dc:
        head = ["detect-and-compare", "embedding", "subjects", "own - other", "mixing"]
        widths = [max(len(r[i]) for r in [head, *dc]) for i in range(len(head))]
        lines += [""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         for r in [head, *dc]] + ["(approximate identity mixing, docs/evaluation.md)"]
    return "\n".join(lines) + (f"\n\n{exact}" if exact else "")
