"""The generation form's "Variation and hires fix" inputs (text to image only): a variation seed and its strength, and
the hires fix's second pass at a larger size. Off by default: strength 0 and scale 1."""
from __future__ import annotations

from dataclasses import replace

import streamlit as st

from core.api import GenerationSettings, HiresUpscaler, Mode, generation

HIRES_DEFAULTS = GenerationSettings()
# Widget key -> (settings field, default), so that reading, filling and defaults name each input once.
INPUTS = {
    "generate:variation_strength": ("variation_strength", HIRES_DEFAULTS.variation_strength),
    "generate:variation_seed": ("variation_seed", 0),
    "generate:hires_scale": ("hires_scale", HIRES_DEFAULTS.hires_scale),
    "generate:hires_steps": ("hires_steps", HIRES_DEFAULTS.hires_steps),
    "generate:hires_strength": ("hires_strength", HIRES_DEFAULTS.hires_strength),
    "generate:hires_upscaler": ("hires_upscaler", HIRES_DEFAULTS.hires_upscaler),
}
RANDOM_VARIATION_KEY = "generate:random_variation_seed"


def with_hires_inputs(settings: GenerationSettings) -> GenerationSettings:
    """`settings` with the variation and hires inputs, in text to image (the only mode they apply to)."""
    state = st.session_state
    if settings.mode is not Mode.TEXT_TO_IMAGE:
        return settings
    values = {field: state.get(name, default) for name, (field, default) in INPUTS.items()}
    values["variation_seed"] = None if state.get(RANDOM_VARIATION_KEY, True) else int(values["variation_seed"])
    return replace(settings, **values)


def fill_hires_inputs(settings: GenerationSettings) -> None:
    """Put a PNG's variation and hires settings in the inputs (from a callback, before they are drawn)."""
    state = st.session_state
    for name, (field, default) in INPUTS.items():
        value = getattr(settings, field)
        state[name] = default if value is None else value
    state[RANDOM_VARIATION_KEY] = settings.variation_seed is None


def hires_inputs(mode: Mode) -> None:
    """The expander; its inputs are kept (drawn, disabled) in the other modes so that switching loses nothing."""
    for name, (_, default) in INPUTS.items():
        st.session_state.setdefault(name, default)
    st.session_state.setdefault(RANDOM_VARIATION_KEY, True)
    off = mode is not Mode.TEXT_TO_IMAGE
    strength, scale = st.session_state["generate:variation_strength"], st.session_state["generate:hires_scale"]
    summary = ", ".join(part for part in (f"variation {strength:g}" if strength else "", f"hires ×{scale:g}" if scale > 1 else "") if part) or "off"
    with st.expander(f"Variation and hires fix ({summary})"):
        if off:
            st.caption("Text to image only: these settings are not used in this mode.")
        st.caption("Variation: the starting noise blends this seed's with the variation seed's; 0 is this seed's image, 1 the variation seed's.")
        strength_column, seed_column, random_column = st.columns([2, 2, 1], vertical_alignment="bottom")
        strength_column.slider("Variation strength", 0.0, 1.0, step=0.01, key="generate:variation_strength", disabled=off)
        random_column.toggle("Random", key=RANDOM_VARIATION_KEY, disabled=off)
        seed_column.number_input("Variation seed", 0, generation.MAX_SEED, key="generate:variation_seed", disabled=off or st.session_state[RANDOM_VARIATION_KEY])
        st.caption("Hires fix: a second pass at a larger size repaints the upscaled first image, for detail SD 1.x cannot draw at 512 px. 1 = off.")
        scale_column, steps_column, denoise_column, upscaler_column = st.columns(4)
        scale_column.number_input("Upscale by", 1.0, generation.MAX_HIRES_SCALE, step=0.25, key="generate:hires_scale", disabled=off)
        steps_column.number_input("Hires steps", 0, generation.MAX_STEPS, key="generate:hires_steps", disabled=off, help="0: as many as the first pass")
        denoise_column.slider("Denoising strength", generation.MIN_STRENGTH, 1.0, step=0.01, key="generate:hires_strength", disabled=off)
        upscaler_column.selectbox("Upscaler", list(HiresUpscaler), key="generate:hires_upscaler", disabled=off,
                                  help="latent: interpolate the latents (sharper, may change details); image: decode and upscale the picture (Lanczos)")
