"""Fill the model cache on a machine with Hub access, for a server or a Space that has none.

    python -m core.models.cache_fill                         # every model, into the Hub cache (HF_HOME) and TORCH_HOME
    python -m core.models.cache_fill hotdog sentiment        # some of them
    python -m core.models.cache_fill --models-root /models   # Hub-layout folders instead, for DASH_MODELS_ROOT

Only what the loaders read is fetched: configs, tokenizer and scheduler files, safetensors weights, and a `.bin`
only where a folder has no safetensors (julien-c/hotdog-not-hotdog ships only a `.bin`); no fp16 or EMA variants,
no ONNX, TF or Flax copies. ResNet50 (torch.hub repo and torchvision weights) always goes to TORCH_HOME.
Copy the folders to the offline machine and run the app there with HF_HUB_OFFLINE=1 (README, "Offline").
The HF token (environment or secrets.toml) is passed to the Hub and never printed.
"""
from __future__ import annotations

import argparse
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from core.config import Settings
from core.errors import GatedModelError, SettingsError
from core.formatting import human_bytes
from core.models import loading
from core.models.registry import MODELS, Family, ModelSpec

# Configs, vocabularies and merges, sentencepiece tokenizers, weights.
_KEPT_SUFFIXES = (".json", ".txt", ".model", ".safetensors")
# The .bin weight files transformers and diffusers load (not training_args.bin, optimizer.bin, ...).
_BIN_WEIGHT_PREFIXES = ("pytorch_model", "diffusion_pytorch_model")
# The loaders' remedies speak to a page's user (stand-ins, restart the app); here the machine or the repo is at fault.
_FETCH_REMEDY = (
    "Check that this machine reaches huggingface.co (for ResNet50: github.com and download.pytorch.org), "
    "the repo id, and HF_TOKEN for a private repo."
)


def _is_variant(path: PurePosixPath) -> bool:
    # Both libraries name variants <name>.<variant>.<ext> (fp16, non_ema, ema); the loaders read the plain file.
    return "." in path.stem


def select_files(spec: ModelSpec, repo_files: list[str]) -> tuple[str, ...]:
    """The files of a Hub repo that the model's loader reads, sorted."""
    paths = [PurePosixPath(name) for name in repo_files]
    if spec.family is Family.TRANSFORMERS:
        candidates = [path for path in paths if len(path.parts) == 1]  # pipeline() reads the top level only
    elif spec.family is Family.DIFFUSERS:  # model_index.json, then one folder per component
        candidates = [path for path in paths if len(path.parts) == 2 or str(path) == "model_index.json"]
    else:
        raise ValueError(f"{spec.key} comes from torch.hub, not from a Hub repo")
    chosen = [path for path in candidates if path.suffix in _KEPT_SUFFIXES and not (path.suffix == ".safetensors" and _is_variant(path))]
    with_safetensors = {path.parent for path in chosen if path.suffix == ".safetensors"}
    chosen += [
        path for path in candidates
        if path.suffix == ".bin" and path.name.startswith(_BIN_WEIGHT_PREFIXES) and not _is_variant(path)
        and path.parent not in with_safetensors
    ]
    if spec.family is Family.DIFFUSERS:
        chosen += [path for path in paths if str(path) == "README.md"]  # the model card names a DreamBooth trigger phrase
    return tuple(sorted(str(path) for path in chosen))


class Hub(Protocol):
    """Where models come from; the tests put stand-in models behind the same three calls."""

    hf_cache: Path
    torch_hub_dir: Path

    def list_files(self, repo_id: str, revision: str, token: str | None) -> list[str]: ...

    def download(self, repo_id: str, revision: str, files: tuple[str, ...], token: str | None, local_dir: Path | None) -> Path: ...

    def fetch_torch_hub(self, spec: ModelSpec) -> tuple[str, ...]: ...


class HubClient:
    """The Hugging Face Hub, GitHub and download.pytorch.org, into the caches the app reads."""

    def __init__(self) -> None:
        import torch
        from huggingface_hub import constants

        self.hf_cache = Path(constants.HF_HUB_CACHE)
        self.torch_hub_dir = Path(torch.hub.get_dir())

    def list_files(self, repo_id: str, revision: str, token: str | None) -> list[str]:
        from huggingface_hub import HfApi

        return HfApi().list_repo_files(repo_id, revision=revision, token=token)

    def download(self, repo_id: str, revision: str, files: tuple[str, ...], token: str | None, local_dir: Path | None) -> Path:
        from huggingface_hub import snapshot_download

        # Exact names as patterns: the download is exactly the selection, and a repo that grows later adds nothing.
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(files), token=token,
            cache_dir=None if local_dir else self.hf_cache, local_dir=local_dir,
        )
        return Path(folder)

    def fetch_torch_hub(self, spec: ModelSpec) -> tuple[str, ...]:
        """The repo and the weights, as `core.models.loading` reads them; names relative to `torch_hub_dir`."""
        import torch
        import torchvision

        weights = torchvision.models.get_weight(spec.hub_weights) if spec.hub_weights else None
        try:
            torch.hub.load(spec.repo_id, spec.hub_entry, weights=spec.hub_weights, trust_repo=True)
        except (urllib.error.URLError, OSError):
            if weights is None:
                raise
            # GitHub unreachable or rate-limited: the loader then uses torchvision's own copy, which needs only the weights.
            weights.get_state_dict(progress=False)
        names = [loading.torch_hub_dir_name(spec)] + ([f"checkpoints/{Path(weights.url).name}"] if weights else [])
        return tuple(name for name in names if (self.torch_hub_dir / name).exists())


@dataclass(frozen=True)
class Fetched:
    """One model now on disk: where, which files (relative to `location`), how many bytes."""

    spec: ModelSpec
    location: Path
    files: tuple[str, ...]
    size_bytes: int


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def fetch(spec: ModelSpec, hub: Hub, token: str | None, models_root: Path | None = None) -> Fetched:
    """Fetch one model into the Hub cache, or into `<models_root>/<repo id>` when given (not for torch.hub)."""
    if spec.family is Family.TORCH_HUB:
        location, files = hub.torch_hub_dir, hub.fetch_torch_hub(spec)
    else:
        files = select_files(spec, hub.list_files(spec.repo_id, spec.revision, token))
        if not files:
            raise FileNotFoundError(f"{spec.repo_id} has none of the files the loader reads")
        local_dir = models_root / spec.repo_id if models_root else None
        location = hub.download(spec.repo_id, spec.revision, files, token, local_dir)
    return Fetched(spec, location, files, sum(_size_bytes(location / name) for name in files))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m core.models.cache_fill",
        description="Fetch the dashboard's models from the Hub into the local caches, for offline use.",
    )
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"model keys (default: all): {', '.join(MODELS)}")
    parser.add_argument("--models-root", type=Path, help="write <root>/<owner>/<name>/ folders (for DASH_MODELS_ROOT) instead of the Hub cache")
    args = parser.parse_args(argv)
    unknown = [key for key in args.models if key not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return args


def main(argv: list[str] | None = None, hub: Hub | None = None) -> int:
    """Exit 0 when every model was fetched, 1 when some failed (each says why), 2 on bad settings."""
    args = _parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"Invalid settings:\n{error}", file=sys.stderr)
        return 2
    if hub is None:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            print("HF_HUB_OFFLINE is set: unset it here, on the machine that fills the cache.", file=sys.stderr)
            return 2
        hub = HubClient()
    specs = [MODELS[key] for key in args.models or MODELS]
    fetched: list[Fetched] = []
    for spec in specs:
        print(f"{spec.key}: {spec.repo_id} ...", flush=True)
        try:
            result = fetch(spec, hub, settings.hf_token, args.models_root)
        except Exception as exc:  # one gated or missing repo must not stop the others; say why, without the token
            error = loading.classify_load_error(spec, loading.ModelSource(spec.repo_id, is_local=False), exc, token=settings.hf_token)
            remedy = error.remedy if isinstance(error, GatedModelError) else _FETCH_REMEDY
            print(f"  FAILED: {error}\n  What to do: {remedy}", flush=True)
            continue
        fetched.append(result)
        print(f"  {len(result.files)} files, {human_bytes(result.size_bytes)} in {result.location}", flush=True)
        for name in result.files:
            print(f"    {name}")
    print(f"\nFetched {len(fetched)} of {len(specs)} models, {human_bytes(sum(item.size_bytes for item in fetched))}.")
    if fetched:
        print(_offline_hint(hub, args.models_root))
    return 0 if len(fetched) == len(specs) else 1


def _offline_hint(hub: Hub, models_root: Path | None) -> str:
    torch_home = hub.torch_hub_dir.parent
    if models_root:
        return f"Offline machine: copy {models_root} and {torch_home}; set DASH_MODELS_ROOT, TORCH_HOME and HF_HUB_OFFLINE=1."
    hf_home = hub.hf_cache.parent
    return f"Offline machine: copy {hf_home} and {torch_home}; set HF_HOME, TORCH_HOME and HF_HUB_OFFLINE=1."


if __name__ == "__main__":
    sys.exit(main())
