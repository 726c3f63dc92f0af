"""Freehand inpainting masks: paint on the picture with the mouse, a pen or a finger.

A custom component (`st.components.v2`, inline HTML/CSS/JavaScript served by the app itself: no build step, no CDN)
shows the picture with the mask over it in translucent red, as `core.tasks.images.mask_overlay` does, with a brush size, a
paint/erase toggle, undo and clear. Strokes are painted on a canvas of the mask's size in the browser and sent to
Python as a PNG data URL only when a stroke ends (or on undo / clear): one rerun per stroke, none per mouse move.

Python trusts none of it: `core.tasks.outpaint.decode_mask_payload` checks the format, the size and the length.
"""
from __future__ import annotations

import base64
import hashlib
import io

import streamlit as st
from PIL import Image

from app_pages.common import show_error
from core.api import BadInputError, outpaint

DISPLAY_MAX_PX = 512  # the picture is shown at most this wide and this high; the mask keeps the full resolution
BRUSH_SIZES_PX = (4, 96, 24)  # smallest, largest, first brush diameter, in displayed pixels

_CSS = """
.painter { display: inline-flex; flex-direction: column; gap: 0.4rem; font-family: var(--st-font); color: var(--st-text-color); }
.tools { display: flex; flex-wrap: wrap; align-items: center; gap: 0.4rem; }
.tools button { font: inherit; padding: 0.2rem 0.7rem; border-radius: var(--st-button-radius); cursor: pointer;
    border: 1px solid var(--st-border-color); background: var(--st-secondary-background-color); color: inherit; }
.tools button[aria-pressed="true"] { border-color: var(--st-primary-color); color: var(--st-primary-color); }
.tools label { display: inline-flex; align-items: center; gap: 0.3rem; }
.stage { position: relative; line-height: 0; max-width: 100%; }
.stage img, .stage canvas { width: 100%; height: auto; display: block; user-select: none; -webkit-user-drag: none; }
.stage canvas { position: absolute; inset: 0; height: 100%; opacity: 0.55; touch-action: none; cursor: crosshair; }
"""

_HTML = """
<div class="painter">
  <div class="tools">
    <button type="button" data-tool="paint" aria-pressed="true">Paint</button>
    <button type="button" data-tool="erase" aria-pressed="false">Erase</button>
    <label>Brush <input type="range" name="brush" aria-label="Brush size"></label>
    <button type="button" data-action="undo">Undo</button>
    <button type="button" data-action="clear">Clear</button>
  </div>
  <div class="stage"><img alt="Picture to paint a mask on"><canvas aria-label="Mask: paint where the picture is repainted"></canvas></div>
</div>
"""

# The function runs again on every rerun that changes its data or theme, on the same element and without the cleanup
# of the run before: it sets the painter up once per element and keeps the strokes on it. The strokes (not bitmaps)
# are the undo history, so undo costs no memory per step; a clear is a stroke too, so it can be undone.
_JS = """
export default function ({ data, parentElement, setStateValue }) {
    const root = parentElement.querySelector(".painter");
    if (root.dataset.imageId === data.image_id) return;
    root.dataset.imageId = data.image_id;
    const image = root.querySelector("img"), canvas = root.querySelector("canvas"), brush = root.querySelector("input[name=brush]");
    const stage = root.querySelector(".stage");
    stage.style.width = data.display_width + "px";
    image.src = data.preview_url;
    canvas.width = data.mask_width;
    canvas.height = data.mask_height;
    [brush.min, brush.max, brush.value] = data.brush_sizes;
    const context = canvas.getContext("2d");
    const strokes = [];
    let tool = "paint", current = null;

    const draw = (stroke) => {
        if (stroke.tool === "clear") { context.clearRect(0, 0, canvas.width, canvas.height); return; }
        context.globalCompositeOperation = stroke.tool === "erase" ? "destination-out" : "source-over";
        context.strokeStyle = context.fillStyle = "rgb(255, 40, 40)";
        context.lineWidth = stroke.width;
        context.lineCap = context.lineJoin = "round";
        const [first, ...rest] = stroke.points;
        context.beginPath();
        if (rest.every(([x, y]) => x === first[0] && y === first[1])) {  // a click is a dot (a line of length 0 draws nothing)
            context.arc(first[0], first[1], stroke.width / 2, 0, 2 * Math.PI);
            context.fill();
            return;
        }
        context.moveTo(first[0], first[1]);
        for (const [x, y] of rest) context.lineTo(x, y);
        context.stroke();
    };
    const redraw = () => {
        context.clearRect(0, 0, canvas.width, canvas.height);
        strokes.forEach(draw);
    };
    const report = () => setStateValue("mask", canvas.toDataURL("image/png"));
    const at = (event) => {
        const box = canvas.getBoundingClientRect();
        return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
    };

    canvas.addEventListener("pointerdown", (event) => {
        if (event.button !== 0) return;
        canvas.setPointerCapture(event.pointerId);
        const scale = canvas.width / canvas.getBoundingClientRect().width;
        current = { tool, width: Number(brush.value) * scale, points: [at(event)] };
        strokes.push(current);
        draw(current);
    });
    canvas.addEventListener("pointermove", (event) => {
        if (!current) return;
        current.points.push(at(event));
        redraw();
    });
    const end = () => {
        if (!current) return;
        current = null;
        report();
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    for (const button of root.querySelectorAll("[data-tool]")) {
        button.addEventListener("click", () => {
            tool = button.dataset.tool;
            root.querySelectorAll("[data-tool]").forEach((other) => other.setAttribute("aria-pressed", String(other === button)));
        });
    }
    root.querySelector("[data-action=undo]").addEventListener("click", () => {
        if (strokes.pop()) { redraw(); report(); }
    });
    root.querySelector("[data-action=clear]").addEventListener("click", () => {
        strokes.push({ tool: "clear" });
        redraw();
        report();
    });
}
"""
_component = st.components.v2.component("model_dashboard_mask_painter", html=_HTML, css=_CSS, js=_JS)


def paint_mask(image: Image.Image, key: str) -> Image.Image | None:
    """The mask painted on `image`: an "L" image of its size, white where it is repainted; None while nothing is
    painted, and after a refused payload (whose message is shown).

    A new picture gets a new, empty mask. Above MAX_SIDE_PX a side, the mask is painted at that size and scaled up.
    """
    mask_size = outpaint.painted_mask_size(image.size)
    preview = image.convert("RGB")
    preview.thumbnail((DISPLAY_MAX_PX, DISPLAY_MAX_PX))
    buffer = io.BytesIO()
    preview.save(buffer, format="JPEG", quality=90)
    preview_url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    image_id = hashlib.blake2b(f"{mask_size}{preview_url}".encode(), digest_size=8).hexdigest()
    result = _component(
        key=f"{key}-{image_id}",  # the key names the picture: another picture starts with a fresh mask
        data={"image_id": image_id, "preview_url": preview_url, "display_width": preview.width,
              "mask_width": mask_size[0], "mask_height": mask_size[1], "brush_sizes": BRUSH_SIZES_PX},
        on_mask_change=lambda: None,
    )
    payload = result.get("mask")
    if payload is None:
        return None
    try:
        mask = outpaint.decode_mask_payload(payload, mask_size)
    except BadInputError as error:
        show_error(error)
        return None
    if mask is None or mask.size == image.size:
        return mask
    return mask.resize(image.size, Image.Resampling.NEAREST)
