"""Settings read once from the environment and `.streamlit/secrets.toml`.

Every field has an environment variable; the HF token may also come from `secrets.toml`.
Nothing here touches CUDA or the network.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SECRETS_FILE = PROJECT_ROOT / ".streamlit" / "secrets.toml"


def _read_token(environ: dict[str, str], secrets_file: Path) -> str | None:
    token = environ.get("HF_TOKEN") or environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    if secrets_file.is_file():
        with secrets_file.open("rb") as handle:
            secrets = tomllib.load(handle)
        return secrets.get("HF_TOKEN") or None
    return None


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    # Folder holding models in Hub layout (<root>/<owner>/<name>/config.json ...); it wins over the Hub.
    models_root: Path | None = None
    # Where stand-in models (tiny, random weights) are built; rebuilt on demand, so any cache folder does.
    standin_dir: Path = Path.home() / ".cache" / "model-dashboard" / "standins"
    # When a real model cannot be had, load its stand-in without asking (demos and CI with no Hub).
    standin_fallback: bool = False
    # "auto" picks CUDA when present; "cpu" forces the CPU even on a GPU machine.
    device: str = "auto"
    # Kept out of repr so that printing the settings never shows it.
    hf_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, secrets_file: Path = SECRETS_FILE) -> Settings:
        env = dict(os.environ if environ is None else environ)
        root = env.get("DASH_MODELS_ROOT")
        standin_dir = env.get("DASH_STANDIN_DIR")
        device = env.get("DASH_DEVICE", "auto").strip().lower()
        if device not in {"auto", "cpu", "cuda"}:
            raise ValueError(f"DASH_DEVICE must be auto, cpu or cuda, not {device!r}")
        return cls(
            models_root=Path(root).expanduser() if root else None,
            standin_dir=Path(standin_dir).expanduser() if standin_dir else cls.standin_dir,
            standin_fallback=_flag(env.get("DASH_STANDIN_FALLBACK"), default=False),
            device=device,
            hf_token=_read_token(env, secrets_file),
        )
