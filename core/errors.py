"""Typed failures of the model core. Pages turn each into one message with its remedy."""
from __future__ import annotations


class DashboardError(Exception):
    """Base class: `remedy` tells the user what to do about it."""

    remedy: str = ""

    def __init__(self, message: str, remedy: str | None = None) -> None:
        super().__init__(message)
        if remedy is not None:
            self.remedy = remedy


class ModelUnavailableError(DashboardError):
    """The model's weights cannot be had: offline, unknown repo id, missing or broken files.

    `typed_by_user`: the model is one the user typed (a repo id or folder), so checking what they typed is a remedy;
    for a listed model the user typed nothing, and only the operator or the stand-in can help.
    """

    remedy = (
        "Use the stand-in model (random weights) to try the page; an operator can fill the model cache "
        "(python -m core.models.cache_fill) or point DASH_MODELS_ROOT at a folder that holds the model in Hub layout."
    )
    typed_remedy = (
        "Check the repo id (owner/name) or folder you typed, or use the stand-in model (random weights) to try the page."
    )

    def __init__(self, message: str, remedy: str | None = None, *, typed_by_user: bool = False) -> None:
        super().__init__(message, self.typed_remedy if remedy is None and typed_by_user else remedy)


class GatedModelError(ModelUnavailableError):
    """The repo exists but needs an accepted licence and a token."""

    remedy = (
        "Accept the model's licence on its Hub page, then set HF_TOKEN in the environment "
        "or in .streamlit/secrets.toml and restart the app."
    )


class GpuOutOfMemoryError(DashboardError):
    """The GPU ran out of memory; what the run held has been released."""

    remedy = "Try a smaller input or batch, unload other models on the VRAM monitor page, or use the CPU."


class BadInputError(DashboardError):
    """The user's input cannot be used; the message names the input and its value."""

    remedy = "Correct the input and try again."


class InsufficientMemoryError(BadInputError):
    """A run's own memory estimate is more than its device has available: refused before it starts, with both figures."""

    remedy = "Try a smaller size, fewer images per run, or a memory mode."


class SettingsError(ValueError):
    """One or more settings are invalid; the message has one line per variable, with its value."""
