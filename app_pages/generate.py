"""Image generation: Stable Diffusion text-to-image on the shared GPU (core.generation, one run at a time per GPU).

A run is a core.jobs.Job kept in session state; a fragment polls it for progress, the latent preview and the place
in the GPU queue, and reruns the page once when it ends. Results go to this session's gallery, newest first, each
image a PNG that carries its settings; dropping such a PNG on the page fills the form with them.
"""
from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import streamlit as st

from app_pages.common import require_model, show_error
from core import generation, pnginfo
from core.app_state import get_manager
from core.errors import BadInputError, DashboardError
from core.formatting import human_bytes
from core.generation import GenerationResult, GenerationSettings, MemoryMode, Precision
from core.jobs import Job, JobState
from core.registry import MODELS

RUN_KEY, GALLERY_KEY, OUTCOME_KEY, PNG_ERROR_KEY = "generate:run", "generate:gallery", "generate:outcome", "generate:png_error"
CUSTOM = "custom"
GALLERY_LIMIT = 24  # runs kept per session; older ones drop off the end
DEFAULTS = GenerationSettings()


@dataclass(frozen=True)
class Run:
    job: Job[GenerationResult]
    settings: GenerationSettings


@dataclass(frozen=True)
class GalleryEntry:
    number: int  # this session's run number
    result: GenerationResult
    pngs: tuple[bytes, ...]  # each image with its settings in a `parameters` text chunk


def key(name: str) -> str:
    return f"generate:{name}"


def form_defaults() -> None:
    """The form's starting values, set once per session: widgets then read and write only session state."""
    values = {
        "prompt": DEFAULTS.prompt, "negative": DEFAULTS.negative_prompt, "steps": DEFAULTS.steps,
        "guidance": DEFAULTS.guidance_scale, "width": DEFAULTS.width, "height": DEFAULTS.height,
        "num_images": DEFAULTS.num_images, "random_seed": True, "seed": 0, "scheduler": DEFAULTS.scheduler,
        "precision": DEFAULTS.precision, "memory_mode": DEFAULTS.memory_mode,
    }
    for name, value in values.items():
        st.session_state.setdefault(key(name), value)


def fill_form(settings: GenerationSettings, model: str | None = None) -> None:
    """Put settings in the form's widgets (from a callback, before the widgets are drawn)."""
    state = st.session_state
    state[key("prompt")], state[key("negative")] = settings.prompt, settings.negative_prompt
    state[key("steps")], state[key("guidance")] = settings.steps, float(settings.guidance_scale)
    state[key("width")], state[key("height")], state[key("num_images")] = settings.width, settings.height, settings.num_images
    state[key("random_seed")] = settings.seed is None
    if settings.seed is not None:
        state[key("seed")] = settings.seed
    state[key("scheduler")], state[key("precision")], state[key("memory_mode")] = settings.scheduler, settings.precision, settings.memory_mode
    if model:
        known = {spec.repo_id: name for name, spec in MODELS.items() if name in generation.SD_MODEL_KEYS}
        state[key("model")] = known.get(model, CUSTOM)
        if model not in known:
            state[key("custom")] = model


def fill_from_png() -> None:
    upload = st.session_state.get(key("png"))
    st.session_state[PNG_ERROR_KEY] = None
    if upload is None:
        return
    try:
        parsed = pnginfo.parse_parameters(pnginfo.read_parameters(upload.getvalue(), upload.name))
    except BadInputError as error:
        st.session_state[PNG_ERROR_KEY] = error
        return
    fill_form(parsed.settings, parsed.model)


def form_settings() -> GenerationSettings:
    state = st.session_state
    return GenerationSettings(
        prompt=state[key("prompt")], negative_prompt=state[key("negative")],
        steps=int(state[key("steps")]), guidance_scale=float(state[key("guidance")]),
        width=int(state[key("width")]), height=int(state[key("height")]), num_images=int(state[key("num_images")]),
        seed=None if state[key("random_seed")] else int(state[key("seed")]),
        scheduler=state[key("scheduler")], precision=Precision(state[key("precision")]), memory_mode=MemoryMode(state[key("memory_mode")]),
    )


def session_gone() -> Callable[[], bool]:
    """True once this browser session has left (tab closed or reloaded), so its run gives up the GPU."""
    from streamlit.runtime import Runtime
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    context = get_script_run_ctx()
    if context is None or not Runtime.exists() or not Runtime.instance().is_active_session(context.session_id):
        return lambda: False  # AppTest and bare runs have no live session to watch
    runtime, session_id = Runtime.instance(), context.session_id
    return lambda: not runtime.is_active_session(session_id)


def start_run(spec, allow_standin: bool) -> None:
    try:
        settings = form_settings()
        generation.check_inputs(settings, get_manager().device)
    except BadInputError as error:
        st.session_state[OUTCOME_KEY] = error
        return
    gone = session_gone()

    def work(context):
        with get_manager().use(spec, allow_standin=allow_standin) as model:
            return generation.generate(model, settings, context, abandoned=gone)

    st.session_state[OUTCOME_KEY] = None
    st.session_state[RUN_KEY] = Run(Job(work, "image generation"), settings)


def finish_run(run: Run) -> None:
    """Move a finished run's images to the gallery (or keep its error) and forget the run."""
    snapshot = run.job.snapshot()
    del st.session_state[RUN_KEY]
    if snapshot.state is JobState.DONE and run.job.result is not None:
        result = run.job.result
        gallery: list[GalleryEntry] = st.session_state.setdefault(GALLERY_KEY, [])
        pngs = tuple(pnginfo.png_bytes(image.image, result.settings_for(i), result.model_name) for i, image in enumerate(result.images))
        gallery.insert(0, GalleryEntry(gallery[0].number + 1 if gallery else 1, result, pngs))
        del gallery[GALLERY_LIMIT:]
        st.session_state[OUTCOME_KEY] = result
    elif snapshot.state is JobState.CANCELLED:
        st.session_state[OUTCOME_KEY] = "Cancelled: the unfinished images were dropped and the GPU is free."
    else:
        st.session_state[OUTCOME_KEY] = snapshot.error


def images_phrase(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


@st.fragment(run_every=0.5)
def run_progress() -> None:
    """Queue place, progress, preview and Cancel, refreshed without rerunning the page; the end reruns it once."""
    run: Run | None = st.session_state.get(RUN_KEY)
    if run is None:
        return
    if run.job.finished:
        st.rerun()
    snapshot = run.job.snapshot()
    st.progress(snapshot.fraction, text=capitalised(snapshot.detail))
    if snapshot.preview is not None:
        st.image(snapshot.preview, caption="Preview: a rough decode of the current latents", width=min(640, 256 * run.settings.num_images))
    st.button("Cancel", key=key("cancel"), on_click=run.job.cancel, icon="⏹️")


def settings_line(settings: GenerationSettings) -> str:
    return (
        f"{settings.steps} steps · {settings.scheduler} · CFG {settings.guidance_scale:g} · {settings.width}×{settings.height} · "
        f"seed {settings.seed} · {settings.precision} · memory mode {settings.memory_mode}"
    )


def zip_of(gallery: list[GalleryEntry]) -> Callable[[], bytes]:
    def build() -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
            for entry in gallery:
                for image, png in zip(entry.result.images, entry.pngs, strict=True):
                    archive.writestr(f"run{entry.number:03d}-seed{image.seed}.png", png)
        return buffer.getvalue()

    return build


def show_entry(entry: GalleryEntry) -> None:
    result = entry.result
    with st.container(border=True):
        st.markdown(f"**Run {entry.number}** · {result.model_title} · {images_phrase(len(result.images))} in {result.seconds:.1f} s ({result.steps_per_s:.2f} it/s)")
        st.caption(
            f"“{result.settings.prompt}”" + (f" · not: “{result.settings.negative_prompt}”" if result.settings.negative_prompt else "")
            + f"  \n{settings_line(result.settings)} · {result.device} ({result.dtype})"
            + (f" · peak {human_bytes(result.peak_memory_bytes)}" if result.peak_memory_bytes else "")
            + (" · stand-in model: these images are meaningless noise." if result.is_standin else "")
        )
        columns = st.columns(min(len(result.images), 4))
        for i, (image, png) in enumerate(zip(result.images, entry.pngs, strict=True)):
            with columns[i % len(columns)]:
                st.image(image.image, caption=f"Seed {image.seed}" + (" · blacked out by the safety checker" if image.blacked_out else ""), width="content", output_format="PNG")
                buttons = st.container(horizontal=True)
                buttons.download_button("PNG", png, file_name=f"run{entry.number:03d}-seed{image.seed}.png", mime="image/png",
                                     key=key(f"png:{entry.number}:{i}"), icon="⬇️", on_click="ignore")
                buttons.button("Reuse", key=key(f"reuse:{entry.number}:{i}"), on_click=fill_form, args=(result.settings_for(i), result.model_name),
                             icon="♻️", help="Fill the form with this image's settings and seed")


# Page ---------------------------------------------------------------------------------------------------------

st.title("🎨 Image generation")
st.caption("Stable Diffusion 1.x text-to-image through diffusers. Runs take turns on the GPU: one at a time, first come first served.")

choices = {name: MODELS[name].title for name in generation.SD_MODEL_KEYS} | {CUSTOM: "Another SD 1.x model (repo id or folder)"}
model_column, custom_column = st.columns([1, 2])
choice = model_column.selectbox("Model", list(choices), format_func=choices.get, key=key("model"))
custom = custom_column.text_input("Hub repo id (owner/name) or full path of a local folder in Hub layout", key=key("custom"), disabled=choice != CUSTOM)
try:
    spec = generation.model_spec_for(choice, custom)
except BadInputError as error:
    show_error(error)
    st.stop()
model = require_model(spec)
device = model.device
st.caption(
    f"**{model.spec.title}** on {device} ({str(model.dtype).removeprefix('torch.')}) from {model.source.label}; safety checker "
    + ("on (this model's config has one)." if model.obj.safety_checker is not None else "off (this model's config has none).")
)
if device.type == "cpu" and not model.is_standin:
    st.warning("This model runs on the CPU: a 512×512 image takes minutes. Smaller sizes and fewer steps are faster.", icon="🐢")

st.file_uploader("Drop a PNG made by this app (or AUTOMATIC1111) to fill the form with its settings", type=["png"], key=key("png"), on_change=fill_from_png)
if st.session_state.get(PNG_ERROR_KEY):
    show_error(st.session_state[PNG_ERROR_KEY])

form_defaults()
run: Run | None = st.session_state.get(RUN_KEY)
if run is not None and run.job.finished:
    finish_run(run)
    run = None

form_column, output_column = st.columns([1, 1], gap="large")
with form_column:
    st.text_area("Prompt", key=key("prompt"), height=90, placeholder="a watercolour painting of a lighthouse at dawn")
    st.text_area("Negative prompt", key=key("negative"), height=68, placeholder="blurry, low quality")
    prompt_length = generation.prompt_length(model.obj, st.session_state[key("prompt")])
    if prompt_length.truncated:
        st.warning(f"The prompt is {prompt_length.tokens} tokens and the model reads the first {prompt_length.limit}: “{prompt_length.ignored_text}” will be ignored.")
    else:
        st.caption(f"Prompt: {prompt_length.tokens} of {prompt_length.limit} tokens")
    steps_column, guidance_column, images_column = st.columns(3)
    steps_column.number_input("Steps", 1, generation.MAX_STEPS, key=key("steps"))
    guidance_column.number_input("Guidance scale (CFG)", 0.0, generation.MAX_GUIDANCE, step=0.5, key=key("guidance"))
    images_column.number_input("Images per run", 1, generation.MAX_IMAGES, key=key("num_images"))
    width_column, height_column = st.columns(2)
    limits = dict(min_value=generation.MIN_SIDE_PX, max_value=generation.MAX_SIDE_PX, step=8, help="A multiple of 8 pixels; SD 1.x was trained at 512")
    width_column.number_input("Width", key=key("width"), **limits)
    height_column.number_input("Height", key=key("height"), **limits)
    seed_column, random_column = st.columns([2, 1], vertical_alignment="bottom")
    random_column.toggle("Random seed", key=key("random_seed"))
    seed_column.number_input("Seed", 0, generation.MAX_SEED, key=key("seed"), disabled=st.session_state[key("random_seed")])
    scheduler_column, precision_column, memory_column = st.columns(3)
    scheduler_column.selectbox("Scheduler", generation.available_schedulers(), key=key("scheduler"))
    precision_column.selectbox(
        "Precision", generation.precisions_for(device), key=key("precision"),
        format_func=lambda p: f"auto ({str(model.dtype).removeprefix('torch.')})" if p is Precision.AUTO else str(p),
    )
    memory_column.selectbox("Memory mode", generation.memory_modes_for(device), key=key("memory_mode"))
    try:
        estimate = generation.estimate_memory(model.obj, form_settings(), device)
        st.caption(f"Estimated {device.type.upper()} memory for this run: about {human_bytes(estimate.total_bytes)} "
                   f"(weights {human_bytes(estimate.weights_bytes)}, working memory {human_bytes(estimate.activations_bytes)}).")
    except DashboardError:
        pass  # the settings are refused with a message when the user presses Generate
    st.button("Generate", type="primary", key=key("start"), icon="🎨", disabled=run is not None, on_click=start_run, args=(spec, model.is_standin))

with output_column:
    if run is not None:
        run_progress()
    outcome = st.session_state.get(OUTCOME_KEY)
    if isinstance(outcome, DashboardError):
        show_error(outcome)
    elif isinstance(outcome, str):
        st.info(outcome, icon="⏹️")
    elif isinstance(outcome, GenerationResult):
        st.success(f"{images_phrase(len(outcome.images))} in {outcome.seconds:.1f} s · seed {outcome.settings.seed}", icon="✅")
        for note in outcome.notes:
            st.warning(note)
    gallery: list[GalleryEntry] = st.session_state.get(GALLERY_KEY, [])
    if gallery and run is None:
        latest = gallery[0]
        st.image([image.image for image in latest.result.images], caption=[f"Seed {image.seed}" for image in latest.result.images], width=min(512, latest.result.settings.width), output_format="PNG")

if gallery:
    st.divider()
    header, download = st.columns([3, 1], vertical_alignment="bottom")
    header.subheader(f"This session's images ({sum(len(e.pngs) for e in gallery)}), newest first")
    download.download_button("Download all (zip)", zip_of(gallery), file_name="generated-images.zip", mime="application/zip", key=key("zip"), icon="🗂️", on_click="ignore")
    for entry in gallery:
        show_entry(entry)
