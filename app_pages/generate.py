"""Image generation on the shared GPU, one run at a time per GPU: Stable Diffusion text to image, image to image and
inpaint (core.tasks.generation, with this session's LoRA adapters), and unconditional DDPM models (core.tasks.unconditional).

Each run goes on the process's job board (app_pages/generate_queue.py): a user may add several while one runs, and the
GPU's turns go round the users. The queue panel polls the board for places, progress and the preview, and reruns the
page when one of this session's runs ends. Results go to this session's gallery, newest first, and to the user's
history on disk (app_pages/generate_history.py), each image a PNG that carries its settings; dropping such a PNG on the
page, or "Use settings" in the history, fills the form with them.
"""
from __future__ import annotations

import io
import secrets
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import streamlit as st
from PIL import Image

from app_pages import generate_history, generate_queue
from app_pages.common import STANDIN_FILE_SUFFIX, literal, require_model, show_error
from app_pages.generate_hires import fill_hires_inputs, hires_inputs, with_hires_inputs
from app_pages.generate_inpaint import MASK_INPUTS, inpaint_source
from app_pages.generate_prompt import prompt_caption
from app_pages.generate_sweep import sweep_section
from app_pages.identity import session_owner
from core.api import (
    MODELS,
    BadInputError,
    DashboardError,
    GenerationResult,
    GenerationSettings,
    Job,
    JobContext,
    JobState,
    LoadedModel,
    LoraAdapter,
    LoraChoice,
    MemoryMode,
    Mode,
    ModelSpec,
    Precision,
    SourceImages,
    UnconditionalResult,
    UnconditionalSettings,
    decode_image,
    generation,
    human_bytes,
    lora,
    model_card,
    pnginfo,
    precision_label,
    queue_for,
    unconditional,
)
from core.app_state import get_backend, get_settings

if TYPE_CHECKING:
    import torch

GALLERY_KEY, OUTCOME_KEY, PNG_ERROR_KEY = "generate:gallery", "generate:outcome", "generate:png_error"
LORAS_KEY, LORA_ERROR_KEY = "generate:loras", "generate:lora_error"
CUSTOM = "custom"
UNCONDITIONAL = "unconditional (DDPM)"
GALLERY_LIMIT = 24  # runs kept per session; older ones drop off the end
DDPM_DEFAULTS = UnconditionalSettings()
IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]


@dataclass(frozen=True)
class GalleryEntry:
    number: int  # this session's run number
    result: GenerationResult | UnconditionalResult
    pngs: tuple[bytes, ...]  # each image with its settings in a `parameters` text chunk


def key(name: str) -> str:
    return f"generate:{name}"


# Each mode's inputs beyond the prompt and seed, to keep while another mode is shown.
SD_INPUTS = ("prompt", "negative", "steps", "guidance", "width", "height", "num_images", "scheduler", "precision", "memory_mode", "model", "custom", "lora_source")
IMAGE_INPUTS = ("strength", "source_origin", "source_gallery")
DDPM_INPUTS = ("ddpm_images", "ddpm_steps", "ddpm_model", "ddpm_custom")


def form_defaults() -> None:
    """The form's starting values, set once per session: widgets then read and write only session state. On a CPU
    a smaller size and fewer steps (generation.defaults_for), so that the first run finishes in under a minute."""
    defaults = generation.defaults_for(get_backend().device.type)
    values = {
        "prompt": defaults.prompt, "negative": defaults.negative_prompt, "steps": defaults.steps,
        "guidance": defaults.guidance_scale, "width": defaults.width, "height": defaults.height,
        "num_images": defaults.num_images, "random_seed": True, "seed": 0, "scheduler": defaults.scheduler,
        "precision": defaults.precision, "memory_mode": defaults.memory_mode, "mode": defaults.mode.value,
        "strength": defaults.strength, "ddpm_images": DDPM_DEFAULTS.num_images, "ddpm_steps": DDPM_DEFAULTS.steps,
    }
    for name, value in values.items():
        st.session_state.setdefault(key(name), value)


def keep_hidden_inputs(mode_name: str) -> None:
    """Streamlit forgets a widget's value in a run that does not draw it: write the inputs of the modes not shown
    back to themselves, so that switching modes loses nothing. (Only hidden ones: rewriting a drawn widget's value
    would override what its browser just sent.)"""
    state = st.session_state
    if mode_name == UNCONDITIONAL:
        lora_weights = tuple(f"lora_weight:{adapter.name}" for adapter in state.get(LORAS_KEY, []))
        hidden = SD_INPUTS + IMAGE_INPUTS + MASK_INPUTS + lora_weights
    else:
        hidden = DDPM_INPUTS + (IMAGE_INPUTS if mode_name == Mode.TEXT_TO_IMAGE else ()) + (MASK_INPUTS if mode_name != Mode.INPAINT else ())
    for name in hidden:
        if key(name) in state:
            state[key(name)] = state[key(name)]


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
    state[key("mode")], state[key("strength")] = settings.mode.value, float(settings.strength)
    fill_hires_inputs(settings)
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
    mode = Mode(state[key("mode")]) if state[key("mode")] != UNCONDITIONAL else Mode.TEXT_TO_IMAGE
    return with_hires_inputs(GenerationSettings(
        mode=mode, strength=float(state[key("strength")]),
        prompt=state[key("prompt")], negative_prompt=state[key("negative")],
        steps=int(state[key("steps")]), guidance_scale=float(state[key("guidance")]),
        width=int(state[key("width")]), height=int(state[key("height")]), num_images=int(state[key("num_images")]),
        seed=None if state[key("random_seed")] else int(state[key("seed")]),
        scheduler=state[key("scheduler")], precision=Precision(state[key("precision")]), memory_mode=MemoryMode(state[key("memory_mode")]),
    ))


def session_gone() -> Callable[[], bool]:
    """True once this browser session has left (tab closed or reloaded), so its run gives up the GPU."""
    from streamlit.runtime import Runtime
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    context = get_script_run_ctx()
    if context is None or not Runtime.exists() or not Runtime.instance().is_active_session(context.session_id):
        return lambda: False  # AppTest and bare runs have no live session to watch
    runtime, session_id = Runtime.instance(), context.session_id
    return lambda: not runtime.is_active_session(session_id)


def submit_run(owner: str, work: Callable[[JobContext], GenerationResult | UnconditionalResult], name: str, preview_width: int,
               gone: Callable[[], bool]) -> None:
    """Add the run to the owner's queue, or keep the message why not (the owner has too many queued)."""
    try:
        generate_queue.submit(owner, work, name, preview_width, abandoned=gone)
    except BadInputError as error:
        st.session_state[OUTCOME_KEY] = error
        return
    st.session_state[OUTCOME_KEY] = None


def start_run(spec: ModelSpec, model: LoadedModel, source: SourceImages | None, loras: tuple[LoraChoice, ...], owner: str) -> None:
    allow_standin = model.is_standin
    try:
        settings = form_settings()
        generation.check_inputs(settings, get_backend().device.type, source)
        get_backend().check_memory(model, settings)
        lora.check_choices(generation.with_lora_tags(settings.prompt, loras))  # the run applies the tags' weights itself
    except BadInputError as error:
        st.session_state[OUTCOME_KEY] = error
        return
    gone = session_gone()

    def work(context):
        with get_backend().use(spec, allow_standin=allow_standin) as model:
            return get_backend().generate(model, settings, context, abandoned=gone, source=source, loras=loras)

    submit_run(owner, work, "image generation", min(640, 256 * settings.num_images), gone)


def start_unconditional_run(spec: ModelSpec, allow_standin: bool, owner: str) -> None:
    state = st.session_state
    settings = UnconditionalSettings(int(state[key("ddpm_images")]), int(state[key("ddpm_steps")]), None if state[key("random_seed")] else int(state[key("seed")]))
    try:
        unconditional.check_inputs(settings)
    except BadInputError as error:
        state[OUTCOME_KEY] = error
        return
    gone = session_gone()

    def work(context):
        with get_backend().use(spec, allow_standin=allow_standin) as model:
            return get_backend().generate_unconditional(model, settings, context, abandoned=gone)

    submit_run(owner, work, "unconditional generation", 320, gone)


def pngs_of(result: GenerationResult | UnconditionalResult) -> tuple[bytes, ...]:
    if isinstance(result, UnconditionalResult):
        return tuple(pnginfo.png_with_parameters(image.image, pnginfo.unconditional_parameters_text(
            result.settings.steps, image.seed, result.model_name, is_standin=result.is_standin)) for image in result.images)
    return tuple(pnginfo.png_bytes(image.image, result.settings_for(i), result.model_name, is_standin=result.is_standin) for i, image in enumerate(result.images))


def finish_run(job: Job[GenerationResult | UnconditionalResult], owner: str | None) -> None:
    """Move a finished run's images to the gallery and the owner's history (or keep its error)."""
    snapshot = job.snapshot()
    if snapshot.state is JobState.DONE and job.result is not None:
        result = job.result
        gallery: list[GalleryEntry] = st.session_state.setdefault(GALLERY_KEY, [])
        gallery.insert(0, GalleryEntry(gallery[0].number + 1 if gallery else 1, result, pngs_of(result)))
        del gallery[GALLERY_LIMIT:]
        generate_history.keep(owner, result, gallery[0].pngs)
        st.session_state[OUTCOME_KEY] = result
    elif snapshot.state is JobState.CANCELLED:
        st.session_state[OUTCOME_KEY] = cancelled_message(get_backend().device)
    else:
        st.session_state[OUTCOME_KEY] = snapshot.error


def cancelled_message(device: torch.device) -> str:
    """What a cancelled run left behind; the device is called free only when no other run holds or waits for it."""
    others = len(queue_for(device))
    if others == 0:
        return f"Cancelled: the unfinished images were dropped and the {device_word(device)} is free."
    return f"Cancelled: the unfinished images were dropped; the {device_word(device)} went to the next run ({others} running or waiting)."


def device_word(device: torch.device) -> str:
    return "GPU" if device.type == "cuda" else "CPU"


def images_phrase(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def settings_line(settings: GenerationSettings) -> str:
    width, height = settings.output_size
    return (
        f"{settings.mode} · {settings.steps} steps · {settings.scheduler} · CFG {settings.guidance_scale:g} · "
        + (f"{settings.width}×{settings.height} → hires fix {width}×{height} ({settings.hires_upscaler}, "
           f"{settings.hires_denoising_steps} step{'' if settings.hires_denoising_steps == 1 else 's'} at strength {settings.hires_strength:g})" if settings.hires else f"{width}×{height}")
        + f" · seed {settings.seed}"
        + (f" · variation seed {settings.variation_seed} at {settings.variation_strength:g}" if settings.varied else "")
        + f" · {settings.precision} · memory mode {settings.memory_mode}"
        + (f" · strength {settings.strength:g}" if settings.mode is not Mode.TEXT_TO_IMAGE else "")
        + "".join(f" · LoRA {literal(name)} ×{weight:g}" for name, weight in settings.loras)
    )


def png_file_name(entry: GalleryEntry, what: str) -> str:
    """run003-seed42.png: a stand-in's images say so in the name, as their settings text does."""
    return f"run{entry.number:03d}-{what}{STANDIN_FILE_SUFFIX if entry.result.is_standin else ''}.png"


def zip_of(gallery: list[GalleryEntry]) -> Callable[[], bytes]:
    def build() -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
            for entry in gallery:
                for image, png in zip(entry.result.images, entry.pngs, strict=True):
                    archive.writestr(png_file_name(entry, f"seed{image.seed}"), png)
        return buffer.getvalue()

    return build


def show_entry(entry: GalleryEntry) -> None:
    result = entry.result
    with st.container(border=True):
        st.markdown(f"**Run {entry.number}** · {literal(result.model_title)} · {images_phrase(len(result.images))} in {result.seconds:.1f} s ({result.steps_per_s:.2f} it/s · steps: {result.unet_path})")
        if isinstance(result, UnconditionalResult):
            described = f"unconditional · {result.settings.steps} steps · seeds {result.settings.seed} to {result.images[-1].seed}"
        else:
            described = (f"“{literal(result.settings.prompt)}”" + (f" · not: “{literal(result.settings.negative_prompt)}”" if result.settings.negative_prompt else "")
                         + f"  \n{settings_line(result.settings)}")
        st.caption(
            described + f" · {result.device} ({precision_label(result.dtype)})"
            + (f" · peak {human_bytes(result.peak_memory_bytes)}" if result.peak_memory_bytes else "")
            + (" · stand-in model: these images are meaningless noise." if result.is_standin else "")
        )
        if isinstance(result, UnconditionalResult):  # small samples: one grid, each image in the zip
            st.image(result.grid, width=min(384, 4 * result.grid.width), output_format="PNG")
            # The grid PNG is encoded when the button is clicked, not on every rerun of the page.
            text = pnginfo.unconditional_parameters_text(result.settings.steps, result.settings.seed, result.model_name, is_standin=result.is_standin)
            st.download_button("Grid PNG", lambda: pnginfo.png_with_parameters(result.grid, text), file_name=png_file_name(entry, "grid"), mime="image/png",
                               key=key(f"grid:{entry.number}"), icon="⬇️", on_click="ignore")
            return
        columns = st.columns(min(len(result.images), 4))
        for i, (image, png) in enumerate(zip(result.images, entry.pngs, strict=True)):
            with columns[i % len(columns)]:
                st.image(image.image, caption=f"Seed {image.seed}" + (" · blacked out by the safety checker" if image.blacked_out else ""), width="content", output_format="PNG")
                buttons = st.container(horizontal=True)
                buttons.download_button("PNG", png, file_name=png_file_name(entry, f"seed{image.seed}"), mime="image/png",
                                        key=key(f"png:{entry.number}:{i}"), icon="⬇️", on_click="ignore")
                buttons.button("Reuse", key=key(f"reuse:{entry.number}:{i}"), on_click=fill_form, args=(result.settings_for(i), result.model_name),
                               icon="♻️", help="Fill the form with this image's settings and seed")


def gallery_images() -> dict[str, Image.Image]:
    """This session's images by a label a user can pick from ("Run 3 · seed 42")."""
    return {f"Run {entry.number} · seed {image.seed}": image.image for entry in st.session_state.get(GALLERY_KEY, []) for image in entry.result.images}


def source_image_input() -> Image.Image | None:
    """The input picture of image to image and inpaint: an upload, or an image from this session's gallery."""
    origin = st.radio("Input image", ["Upload", "From the gallery"], horizontal=True, key=key("source_origin"))
    if origin == "Upload":
        upload = st.file_uploader("Input image (JPEG, PNG, WebP, ...)", type=IMAGE_TYPES, key=key("source_upload"))
        if upload is None:
            return None
        try:
            decoded = decode_image(upload.getvalue(), upload.name)
        except BadInputError as error:
            show_error(error)
            return None
        return decoded.image
    images = gallery_images()
    if not images:
        st.info("This session's gallery is empty: generate an image first, or upload one.")
        return None
    return images[st.selectbox("Image from the gallery", list(images), key=key("source_gallery"))]


def add_lora(read: Callable[[], LoraAdapter]) -> None:
    """Read an adapter for this session (replacing one of the same name), or keep the message why not."""
    st.session_state[LORA_ERROR_KEY] = None
    try:
        adapter = read()
    except DashboardError as error:
        st.session_state[LORA_ERROR_KEY] = error
        return
    adapters: list[LoraAdapter] = st.session_state.setdefault(LORAS_KEY, [])
    adapters[:] = [a for a in adapters if a.name != adapter.name] + [adapter]
    st.session_state.setdefault(key(f"lora_weight:{adapter.name}"), 1.0)


def add_lora_from_source() -> None:
    text = st.session_state[key("lora_source")]
    if text.strip():
        add_lora(lambda: lora.read_source(text, get_settings()))


def add_lora_from_upload() -> None:
    upload = st.session_state.get(key("lora_upload"))
    if upload is not None:
        add_lora(lambda: lora.read_upload(upload.name, upload.getvalue()))


def remove_lora(name: str) -> None:
    st.session_state[LORAS_KEY] = [a for a in st.session_state.get(LORAS_KEY, []) if a.name != name]


def lora_section() -> tuple[LoraChoice, ...]:
    """This session's LoRA adapters with a weight each: they change only this session's runs."""
    adapters: list[LoraAdapter] = st.session_state.get(LORAS_KEY, [])
    with st.expander(f"LoRA adapters ({len(adapters)})", expanded=bool(adapters) or bool(st.session_state.get(LORA_ERROR_KEY))):
        st.caption("Only your runs use them: they go onto the shared model while your run holds the GPU and come off after it. Safetensors files only.")
        source_column, add_column = st.columns([4, 1], vertical_alignment="bottom")
        source_column.text_input("Hub repo id (owner/name), or a folder with a .safetensors LoRA inside the models root", key=key("lora_source"),
                                 help="Folders must be inside DASH_MODELS_ROOT: a full path there, or ./name relative to it")
        add_column.button("Add", key=key("lora_add"), on_click=add_lora_from_source, icon="➕")
        st.file_uploader("Or upload a LoRA (.safetensors)", key=key("lora_upload"), on_change=add_lora_from_upload)
        if st.session_state.get(LORA_ERROR_KEY):
            show_error(st.session_state[LORA_ERROR_KEY])
        for adapter in adapters:
            name_column, weight_column, remove_column = st.columns([3, 1, 1], vertical_alignment="bottom")
            name_column.markdown(f"**{literal(adapter.name)}**  \n{literal(adapter.source)} · {human_bytes(adapter.size_bytes)}")
            weight_column.number_input("Weight", -lora.MAX_WEIGHT, lora.MAX_WEIGHT, step=0.1, key=key(f"lora_weight:{adapter.name}"))
            remove_column.button("Remove", key=key(f"lora_remove:{adapter.name}"), on_click=remove_lora, args=(adapter.name,), icon="🗑️")
    return tuple(LoraChoice(adapter, float(st.session_state[key(f"lora_weight:{adapter.name}")])) for adapter in adapters)


def trigger_phrase_of(model: LoadedModel) -> str | None:
    """The DreamBooth trigger phrase from the model's card, read once per model and session."""
    phrases: dict[str, str | None] = st.session_state.setdefault(key("trigger_phrases"), {})
    if model.spec.key not in phrases:
        phrases[model.spec.key] = model_card.trigger_phrase(model_card.read_card(model.spec, model.source, get_settings()))
    return phrases[model.spec.key]


def add_to_prompt(phrase: str) -> None:
    prompt = st.session_state[key("prompt")]
    if phrase not in prompt:
        st.session_state[key("prompt")] = f"{phrase}, {prompt}" if prompt.strip() else phrase


def seed_inputs() -> None:
    seed_column, random_column = st.columns([2, 1], vertical_alignment="bottom")
    random_column.toggle("Random seed", key=key("random_seed"))
    seed_column.number_input("Seed", 0, generation.MAX_SEED, key=key("seed"), disabled=st.session_state[key("random_seed")])


def chosen_model(keys: tuple[str, ...], other: str, spec_for: Callable[..., ModelSpec], prefix: str = "") -> tuple[ModelSpec, LoadedModel]:
    """A model picked from `keys`, or typed as a repo id or folder; stops the page with a message when it cannot be had."""
    choices = {name: MODELS[name].title for name in keys} | {CUSTOM: other}
    model_column, custom_column = st.columns([1, 2])
    choice = model_column.selectbox("Model", list(choices), format_func=choices.get, key=key(f"{prefix}model"))
    custom = custom_column.text_input("Hub repo id (owner/name), or a folder in Hub layout inside the models root", key=key(f"{prefix}custom"),
                                      disabled=choice != CUSTOM, help="Folders must be inside DASH_MODELS_ROOT: a full path there, or ./name relative to it")
    try:
        spec = spec_for(choice, custom, get_settings())
    except BadInputError as error:
        show_error(error)
        st.stop()
    return spec, require_model(spec)


def cpu_warning(is_standin: bool) -> str:
    cpu = generation.CPU_DEFAULTS
    what = "The stand-in model (random weights, tiny) runs on the CPU too" if is_standin else "This model runs on the CPU"
    return (f"{what}: a 512×512 image takes minutes. The form starts at {cpu.width}×{cpu.height} in {cpu.steps} steps, "
            "which finishes in under a minute; larger sizes and more steps take much longer.")


def stable_diffusion_form(mode: Mode, owner: str, history_owner: str | None) -> None:
    # Above the model: a PNG that names a model this app refuses must not hide the way to drop another one.
    st.file_uploader("Drop a PNG made by this app (or AUTOMATIC1111) to fill the form with its settings", type=["png"], key=key("png"), on_change=fill_from_png)
    if st.session_state.get(PNG_ERROR_KEY):
        show_error(st.session_state[PNG_ERROR_KEY])
    spec, model = chosen_model(generation.SD_MODEL_KEYS, "Another SD 1.x model (repo id or folder)", generation.model_spec_for)
    device = model.device
    st.caption(
        f"**{literal(model.spec.title)}** on {device} ({precision_label(model.dtype)}) from {literal(model.source.label)}; safety checker "
        + ("on (this model's config has one)." if model.info.has_safety_checker else "off (this model's config has none).")
    )
    if device.type == "cpu":
        st.warning(cpu_warning(model.is_standin), icon="🐢")
    phrase = trigger_phrase_of(model)
    if phrase:
        phrase_column, add_column = st.columns([4, 1], vertical_alignment="center")
        phrase_column.info(f"This DreamBooth model learned its concept as **{literal(phrase)}**: put that in the prompt.", icon="🔑")
        add_column.button("Add to prompt", key=key("add_phrase"), on_click=add_to_prompt, args=(phrase,))

    source = None
    if mode is not Mode.TEXT_TO_IMAGE:
        image = source_image_input()
        if mode is Mode.INPAINT:
            source = inpaint_source(image, key, IMAGE_TYPES)
        elif image is not None:
            st.image(image, width=256, caption=f"{image.width}×{image.height}")
            source = SourceImages(image)
        st.slider("Strength: how much of the input is repainted (1 = all of it)", generation.MIN_STRENGTH, 1.0, step=0.01, key=key("strength"))
    st.text_area("Prompt", key=key("prompt"), height=90, placeholder="a watercolour painting of a lighthouse at dawn")
    st.text_area("Negative prompt", key=key("negative"), height=68, placeholder="blurry, low quality")
    prompt_caption(model, st.session_state[key("prompt")], st.session_state[key("negative")])
    steps_column, guidance_column, images_column = st.columns(3)
    steps_column.number_input("Steps", 1, generation.MAX_STEPS, key=key("steps"))
    guidance_column.number_input("Guidance scale (CFG)", 0.0, generation.MAX_GUIDANCE, step=0.5, key=key("guidance"))
    images_column.number_input("Images per run", 1, generation.MAX_IMAGES, key=key("num_images"))
    width_column, height_column = st.columns(2)
    limits = dict(min_value=generation.MIN_SIDE_PX, max_value=generation.MAX_SIDE_PX, step=8,
                  help="A multiple of 8 pixels; SD 1.x was trained at 512. An input image is resized to this size.")
    width_column.number_input("Width", key=key("width"), **limits)
    height_column.number_input("Height", key=key("height"), **limits)
    seed_inputs()
    scheduler_column, precision_column, memory_column = st.columns(3)
    scheduler_column.selectbox("Scheduler", generation.available_schedulers(), key=key("scheduler"))
    precision_column.selectbox(
        "Precision", generation.precisions_for(device.type), key=key("precision"),
        format_func=lambda p: f"auto ({precision_label(model.dtype)})" if p is Precision.AUTO else str(p),
    )
    memory_column.selectbox("Memory mode", generation.memory_modes_for(device.type), key=key("memory_mode"))
    loras = lora_section()
    hires_inputs(mode)
    try:
        estimate = generation.estimate_memory(model.info, form_settings())
        st.caption(f"Estimated {device.type.upper()} memory for this run: about {human_bytes(estimate.total_bytes)} "
                   f"(weights {human_bytes(estimate.weights_bytes)}, working memory {human_bytes(estimate.activations_bytes)}).")
    except DashboardError:
        pass  # the settings are refused with a message when the user presses Generate
    st.button("Generate", type="primary", key=key("start"), icon="🎨", on_click=start_run, args=(spec, model, source, loras, owner),
              help="Adds a run to your queue; you may add more while it runs.")
    if mode is Mode.TEXT_TO_IMAGE:
        sweep_section(spec, model.is_standin, form_settings(), loras, abandoned=session_gone(), history_owner=history_owner)


def unconditional_form(owner: str) -> None:
    spec, model = chosen_model(unconditional.DDPM_MODEL_KEYS, "Another DDPM model (repo id or folder)", unconditional.model_spec_for, prefix="ddpm_")
    st.caption(f"**{literal(model.spec.title)}** on {model.device} ({precision_label(model.dtype)}) from {literal(model.source.label)}. "
               "No prompt: the model draws samples like its training images.")
    images_column, steps_column = st.columns(2)
    images_column.number_input("Images", 1, unconditional.MAX_IMAGES, key=key("ddpm_images"))
    steps_column.number_input("Denoising steps", 1, unconditional.MAX_STEPS, key=key("ddpm_steps"), help="DDPM's own schedule has 1000; fewer skip noise levels (faster, blurrier)")
    seed_inputs()
    st.button("Generate", type="primary", key=key("start"), icon="🦋", on_click=start_unconditional_run, args=(spec, model.is_standin, owner),
              help="Adds a run to your queue; you may add more while it runs.")


def show_outcome() -> None:
    outcome = st.session_state.get(OUTCOME_KEY)
    if isinstance(outcome, DashboardError):
        show_error(outcome)
    elif isinstance(outcome, str):
        st.info(outcome, icon="⏹️")
    elif outcome is not None:
        st.success(f"{images_phrase(len(outcome.images))} in {outcome.seconds:.1f} s · seed {outcome.settings.seed}", icon="✅")
        for note in getattr(outcome, "notes", ()):
            st.warning(literal(note))


def show_latest(entry: GalleryEntry) -> None:
    result = entry.result
    if isinstance(result, UnconditionalResult):
        st.image(result.grid, caption=f"Seeds {result.settings.seed} to {result.images[-1].seed}", width=min(384, 8 * result.grid.width), output_format="PNG")
    else:
        st.image([image.image for image in result.images], caption=[f"Seed {image.seed}" for image in result.images], width=min(512, result.settings.output_size[0]), output_format="PNG")


# Page ---------------------------------------------------------------------------------------------------------

st.title("🎨 Image generation")
st.caption("Stable Diffusion 1.x (text to image, image to image, inpaint, with LoRA adapters) and unconditional DDPM models, through diffusers. "
           "Runs take turns on the GPU, one at a time: add several, and the turns go round the users.")
form_defaults()
history_owner = session_owner()  # None until the browser has sent its id: images made before are kept once it has
generate_history.keep_pending(history_owner)
# The queue needs an owner from the first run on: without a login or a browser id, the session is its own owner.
queue_owner = history_owner or st.session_state.setdefault(key("session_owner"), f"session:{secrets.token_hex(16)}")
mode_name = st.radio("Mode", [m.value for m in Mode] + [UNCONDITIONAL], horizontal=True, key=key("mode"))
keep_hidden_inputs(mode_name)
for finished_job in generate_queue.take_finished():
    finish_run(finished_job, history_owner)

form_column, output_column = st.columns([1, 1], gap="large")
with form_column:
    if mode_name == UNCONDITIONAL:
        unconditional_form(queue_owner)
    else:
        stable_diffusion_form(Mode(mode_name), queue_owner, history_owner)

with output_column:
    generate_queue.queue_panel(queue_owner, device_word(get_backend().device))
    show_outcome()
    gallery: list[GalleryEntry] = st.session_state.get(GALLERY_KEY, [])
    if gallery and not generate_queue.session_runs():
        show_latest(gallery[0])

if gallery:
    st.divider()
    header, download = st.columns([3, 1], vertical_alignment="bottom")
    header.subheader(f"This session's images ({sum(len(e.pngs) for e in gallery)}), newest first")
    download.download_button("Download all (zip)", zip_of(gallery), file_name="generated-images.zip", mime="application/zip", key=key("zip"), icon="🗂️", on_click="ignore")
    for entry in gallery:
        show_entry(entry)

generate_history.history_panel(history_owner, fill_form)
