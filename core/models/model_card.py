"""What a model's card (its README.md) tells a user: the trigger phrase of a DreamBooth model.

DreamBooth teaches a model a new concept under a rare phrase (`sks mr potato head`); without it in the prompt the
concept does not appear. diffusers' training script writes it as `instance_prompt:` in the card's metadata, and the
sd-dreambooth-library cards write it in the text as "`instance_prompt`: **...**".
"""
from __future__ import annotations

import re
from pathlib import Path

from core.config import Settings
from core.models.loading import ModelSource
from core.models.reachability import hub_reachable
from core.models.registry import ModelSpec

CARD_FILE = "README.md"
_METADATA = re.compile(r"^instance_prompt:\s*(.+?)\s*$", re.MULTILINE)
_TEXT = re.compile(r"instance_prompt`?\s*:?\s*\*\*(.+?)\*\*")


def trigger_phrase(card: str) -> str | None:
    """The phrase a DreamBooth model card names, or None."""
    found = _METADATA.search(card) or _TEXT.search(card)
    if not found:
        return None
    phrase = found.group(1).strip().strip("'\"").strip()
    return phrase or None


def read_card(spec: ModelSpec, source: ModelSource, settings: Settings) -> str:
    """The model card's text: from the model's folder, or from the Hub (only its cache while the Hub does not answer);
    empty when there is none."""
    if source.is_local:
        path = Path(source.location) / CARD_FILE
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(spec.repo_id, CARD_FILE, revision=spec.revision, token=settings.hf_token, local_files_only=not hub_reachable())
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except Exception:  # a card is optional: offline, no README or any Hub error means "no card", never a failed page
        return ""
