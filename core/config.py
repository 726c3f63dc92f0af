"""Settings read once from the environment and `.streamlit/secrets.toml`: the one place an operator configures.

Every field has an environment variable; the HF token may also come from `secrets.toml`. `Settings.from_env`
checks every value and raises one `SettingsError` naming each bad variable and its value, so a server refuses
to start on a typo instead of failing later in a page. `python -m core.config` runs that check on its own
(the systemd unit does, before starting the app). Nothing here touches CUDA or the network.
"""
from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from core.errors import SettingsError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SECRETS_FILE = PROJECT_ROOT / ".streamlit" / "secrets.toml"
STREAMLIT_CONFIG_FILE = PROJECT_ROOT / ".streamlit" / "config.toml"

# The task pages an operator can turn off with DASH_PAGES (their URL paths); Home is always on.
PAGE_KEYS = ("hotdog", "imagenet", "sentiment", "generate", "vram")

# Streamlit enforces the upload limit itself and reads it from this variable (or server.maxUploadSize in
# .streamlit/config.toml); Settings reads the same two places so that pages can quote the limit in force.
UPLOAD_LIMIT_VAR = "STREAMLIT_SERVER_MAX_UPLOAD_SIZE"
STREAMLIT_DEFAULT_UPLOAD_MB = 200

_UNIT_BYTES = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]+)$")
# A GitHub repo as torch.hub names it, without its ref: owner/name.
_GITHUB_REPO = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,98}[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]{0,98}[A-Za-z0-9])?$")
# torchvision's own repo: the only torch.hub code the dashboard needs (ResNet50 and the other ImageNet classifiers).
DEFAULT_TORCH_HUB_ALLOW = ("pytorch/vision",)
# An e-mail address as DASH_ADMINS lists it: something@somewhere, no spaces or commas.
_EMAIL = re.compile(r"^[^@\s,]+@[^@\s,]+$")
# Where the models run: in this process ("local"), or as Ray Serve deployments on a cluster ("ray", core/backends/ray_client.py).
BACKENDS = ("local", "ray")
T = TypeVar("T")


class EvictTo(StrEnum):
    """Where the least recently used idle model goes when a new one does not fit on its GPU (DASH_EVICT_TO)."""

    UNLOAD = "unload"  # the default: memory goes back everywhere; a session still running keeps its own reference
    CPU = "cpu"  # parked in RAM; the next use moves it back, much faster than loading from disk


MODEL_FOLDER_PREFIX = "DASH_MODEL_"  # DASH_MODEL_<KEY>=/folder: one model's local copy (keys: core.models.registry)


@dataclass(frozen=True)
class VramBudget:
    """How much GPU memory the models may hold on each GPU: a fixed size, or a share of the card."""

    size_bytes: int | None = None
    fraction: float | None = None  # of the card's total memory, in (0, 1]

    def limit_bytes(self, card_total_bytes: int) -> int:
        """The budget in bytes on a card of `card_total_bytes`; a fixed size never exceeds the card."""
        if self.size_bytes is not None:
            return min(self.size_bytes, card_total_bytes)
        return int(card_total_bytes * (self.fraction or 1.0))


def parse_bytes(text: str, variable: str) -> int:
    """'20GiB', '512 MiB', '8GB' -> bytes. Binary (KiB, MiB, GiB, TiB) or decimal (kB, MB, GB, TB) units."""
    match = _SIZE.match(text.strip().lower())
    if not match or match.group(2) not in _UNIT_BYTES:
        raise SettingsError(f"{variable} must be a size such as 20GiB or 512MiB, not {text!r}")
    size_bytes = int(float(match.group(1)) * _UNIT_BYTES[match.group(2)])
    if size_bytes <= 0:
        raise SettingsError(f"{variable} must be more than zero, not {text!r}")
    return size_bytes


def parse_vram_budget(text: str, variable: str = "DASH_VRAM_BUDGET") -> VramBudget:
    """'20GiB' (a size), '0.8' or '80%' (a share of each card)."""
    value = text.strip()
    try:
        fraction = float(value.removesuffix("%")) / (100 if value.endswith("%") else 1)
    except ValueError:
        return VramBudget(size_bytes=parse_bytes(value, variable))
    if not 0 < fraction <= 1:
        # A bare "20" is more likely GiB with the unit forgotten than 20 bytes or 2000 %: refuse, and say how.
        raise SettingsError(
            f"{variable} must be a share of the card between 0 and 1 (0.8), a percentage (80%), "
            f"or a size with its unit (20GiB), not {text!r}"
        )
    return VramBudget(fraction=fraction)


def parse_pages(text: str, variable: str = "DASH_PAGES") -> tuple[str, ...]:
    """'all' or a comma-separated list of page keys -> the enabled keys, in menu order."""
    if text.strip().lower() in {"", "all"}:
        return PAGE_KEYS
    wanted = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [key for key in wanted if key not in PAGE_KEYS]
    if unknown:
        raise SettingsError(f"{variable} has unknown page(s) {', '.join(map(repr, unknown))}: choose from all, {', '.join(PAGE_KEYS)}")
    return tuple(key for key in PAGE_KEYS if key in wanted)


def parse_repo_list(text: str, variable: str = "DASH_TORCH_HUB_ALLOW") -> tuple[str, ...]:
    """'owner/name, other/repo' -> the repos, lower-cased (GitHub ignores case); empty -> the default."""
    repos = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    bad = [repo for repo in repos if ".." in repo or not _GITHUB_REPO.match(repo)]
    if bad:
        raise SettingsError(f"{variable} must be GitHub repos as owner/name, separated by commas, not {', '.join(map(repr, bad))}")
    return repos or DEFAULT_TORCH_HUB_ALLOW


def parse_admins(text: str, variable: str = "DASH_ADMINS") -> tuple[str, ...]:
    """'a@x.org, B@y.org' -> ('a@x.org', 'b@y.org'): lower-cased, as e-mail providers treat addresses."""
    admins = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    bad = [address for address in admins if not _EMAIL.match(address)]
    if bad:
        raise SettingsError(f"{variable} must be e-mail addresses separated by commas (a@example.org,b@example.org), not {', '.join(map(repr, bad))}")
    return admins


def read_token(environ: Mapping[str, str], secrets_file: Path = SECRETS_FILE) -> str | None:
    """HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) from the environment, else from `secrets.toml`; None when neither has one."""
    token = environ.get("HF_TOKEN") or environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    if secrets_file.is_file():
        with secrets_file.open("rb") as handle:
            secrets = tomllib.load(handle)
        return secrets.get("HF_TOKEN") or None
    return None


def _upload_limit_mb(environ: dict[str, str], streamlit_config: Path) -> int:
    text = environ.get(UPLOAD_LIMIT_VAR, "").strip()
    if not text and streamlit_config.is_file():
        with streamlit_config.open("rb") as handle:
            text = str(tomllib.load(handle).get("server", {}).get("maxUploadSize", ""))
    if not text:
        return STREAMLIT_DEFAULT_UPLOAD_MB
    if not text.isdigit() or int(text) <= 0:
        raise SettingsError(f"{UPLOAD_LIMIT_VAR} (or server.maxUploadSize) must be a whole number of MiB above 0, not {text!r}")
    return int(text)


def _positive_int(value: str | None, default: int, variable: str) -> int:
    text = (value or "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) <= 0:
        raise SettingsError(f"{variable} must be a whole number above 0, not {value!r}")
    return int(text)


# A longer window would add its wait to every request that meets another: more than this is surely a unit mistake (s).
MAX_BATCH_WINDOW_MS = 100.0


def _window_ms(value: str | None, default: float, variable: str) -> float:
    text = (value or "").strip()
    if not text:
        return default
    try:
        window_ms = float(text)
        in_range = 0 <= window_ms <= MAX_BATCH_WINDOW_MS  # False for nan too
    except ValueError:
        in_range = False
    if not in_range:
        raise SettingsError(f"{variable} must be a number of milliseconds from 0 to {MAX_BATCH_WINDOW_MS:g}, not {value!r}")
    return window_ms


def _flag(value: str | None, default: bool, variable: str) -> bool:
    if value is None or value.strip() == "":
        return default
    text = value.strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{variable} must be 1 or 0 (true/false, yes/no, on/off), not {value!r}")


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
    # GPU memory the models may hold per card; None leaves it to core.models.memory (the card less its margin).
    vram_budget: VramBudget | None = None
    # Task pages in the menu (Home is always there); an operator turns off, say, generation on a CPU box.
    enabled_pages: tuple[str, ...] = PAGE_KEYS
    # MiB per uploaded file, as Streamlit enforces it; 200 is Streamlit's own default.
    max_upload_mb: int = STREAMLIT_DEFAULT_UPLOAD_MB
    # GitHub repos whose hubconf.py torch.hub may run (owner/name, lower case); any other is refused before it loads.
    torch_hub_allow: tuple[str, ...] = DEFAULT_TORCH_HUB_ALLOW
    # Full pickle (torch.load with weights_only=False) can run code from a checkpoint: off, so torchvision weights
    # load weights-only; on only for checkpoints that need it, and then the ImageNet page says so.
    allow_pickle: bool = False
    # Replay fixed-shape GPU forwards (single-image classifiers, SD UNet steps) from CUDA graphs: the same kernels as
    # eager, several times faster where launches bind; off runs everything eagerly (core.accel.cuda_graphs).
    cuda_graphs: bool = True
    # Fold each BatchNorm into the convolution before it when a torchvision classifier loads (core.models.loading): fewer
    # kernels, the same function up to rounding; off keeps the checkpoint's layers as they are.
    fold_batchnorm: bool = True
    # torch.compile on CUDA, in the background (core.accel.compiled): each new input shape is served eagerly until its
    # compile is done, then from fused kernels; close to the eager results (tests state the tolerance), not bit-equal.
    compile: bool = True
    # bf16 for the hot dog and sentiment models on a CPU that computes it natively (AVX512-BF16, AMX): about 3.5 times
    # faster than fp32 there, within 1 % of fp32's logits (as fp16 on a GPU); off keeps fp32 on every CPU.
    cpu_bf16: bool = True
    # Inductor's caches, kept between starts so that a restart's compiles take seconds (TORCHINDUCTOR_CACHE_DIR wins).
    compile_cache_dir: Path = Path.home() / ".cache" / "model-dashboard" / "inductor"
    # "local": every model in this process (the default); "ray": every model a Ray Serve deployment (docs/RAY.md).
    backend: str = "local"
    # The Ray cluster the ray backend joins: "auto" (a node of this machine joined it), "ray://head:10001", or None to
    # start a Ray of its own inside this process (for trying it on one machine).
    ray_address: str | None = None
    # Replicas, resources and batching per deployment, from the TOML file named by DASH_RAY_DEPLOYMENTS
    # (deploy/ray-cluster.example.toml); kinds or model keys missing from it keep core.backends.ray_config's defaults.
    ray_deployments: Path | None = None
    # E-mail addresses (lower case) whose logged-in sessions may unload models and empty the cache for everyone
    # (core.access); with login off only a localhost-bound app has an admin, whoever uses it.
    admins: tuple[str, ...] = ()
    # Text-to-image runs of different sessions that wait at the same time share UNet calls (core.tasks.shared_batch),
    # each image as its run alone makes it (within rounding). On a GPU only (the model manager's Acceleration): on the
    # H100 8 simultaneous images were done 1.49 times sooner and a lone run within 2 % (docs/BATCHING.md).
    shared_batches: bool = True
    # Classifier and sentiment requests of different sessions that reach a model together share one forward
    # (core.tasks.cross_session), each request's probabilities as alone within rounding. A lone request runs at once:
    # only requests still preprocessing when a forward starts are waited for, at most `batch_window_ms`.
    batch_sessions: bool = True
    # How long a forward may wait for requests that announced themselves (sessions preprocessing their input); a few
    # ms lets 16 sessions that ask together share one or two forwards instead of the first going alone.
    batch_window_ms: float = 2.0
    # Every generated image with its settings (core.tasks.image_history): SQLite and PNG files, per user or browser.
    # On a Space it belongs on the persistent volume (the Dockerfile sets /data/history).
    history_dir: Path = Path.home() / ".cache" / "model-dashboard" / "history"
    # PNG bytes the history keeps in all, every owner together; the oldest images go first past it.
    history_max_bytes: int = 2 * 2**30
    # Runs one user (or browser) may have queued or running at once; one more is refused with a message.
    max_queued_runs: int = 10
    # What happens to the least recently used idle model when a new one does not fit: unloaded, or parked in RAM.
    evict_to: EvictTo = EvictTo.UNLOAD
    # The operator's folder per model (DASH_MODEL_<KEY>), upper-case key -> folder; it wins over every other source.
    model_folders: tuple[tuple[str, Path], ...] = ()
    # Kept out of repr so that printing the settings never shows it.
    hf_token: str | None = field(default=None, repr=False)

    def model_folder(self, key: str) -> Path | None:
        """The operator's folder (DASH_MODEL_<KEY>) for the model whose registry key is `key`, if one is set."""
        return dict(self.model_folders).get(key.upper().replace("-", "_"))

    @classmethod
    def from_env(
        cls,
        environ: dict[str, str] | None = None,
        secrets_file: Path = SECRETS_FILE,
        streamlit_config: Path = STREAMLIT_CONFIG_FILE,
    ) -> Settings:
        """Settings from the environment; raises SettingsError listing every bad value at once."""
        env = dict(os.environ if environ is None else environ)
        errors: list[str] = []

        def checked(parse: Callable[..., T], *args: object) -> T | None:  # every error, so all are fixed in one go
            try:
                return parse(*args)
            except SettingsError as error:
                errors.append(str(error))
                return None

        models_root = checked(_models_root, env.get("DASH_MODELS_ROOT", ""))
        device = env.get("DASH_DEVICE", "auto").strip().lower() or "auto"
        if device not in {"auto", "cpu", "cuda"}:
            errors.append(f"DASH_DEVICE must be auto, cpu or cuda, not {device!r}")
        budget_text = env.get("DASH_VRAM_BUDGET", "").strip()
        vram_budget = checked(parse_vram_budget, budget_text) if budget_text else None
        enabled_pages = checked(parse_pages, env.get("DASH_PAGES", ""))
        max_upload_mb = checked(_upload_limit_mb, env, streamlit_config)
        standin_fallback = checked(_flag, env.get("DASH_STANDIN_FALLBACK"), False, "DASH_STANDIN_FALLBACK")
        torch_hub_allow = checked(parse_repo_list, env.get("DASH_TORCH_HUB_ALLOW", ""))
        allow_pickle = checked(_flag, env.get("DASH_ALLOW_PICKLE"), False, "DASH_ALLOW_PICKLE")
        cuda_graphs = checked(_flag, env.get("DASH_CUDA_GRAPHS"), True, "DASH_CUDA_GRAPHS")
        fold_batchnorm = checked(_flag, env.get("DASH_FOLD_BATCHNORM"), True, "DASH_FOLD_BATCHNORM")
        compile_ = checked(_flag, env.get("DASH_COMPILE"), True, "DASH_COMPILE")
        cpu_bf16 = checked(_flag, env.get("DASH_CPU_BF16"), True, "DASH_CPU_BF16")
        shared_batches = checked(_flag, env.get("DASH_SHARED_BATCH"), True, "DASH_SHARED_BATCH")
        batch_sessions = checked(_flag, env.get("DASH_BATCH_SESSIONS"), True, "DASH_BATCH_SESSIONS")
        batch_window_ms = checked(_window_ms, env.get("DASH_BATCH_WINDOW_MS"), cls.batch_window_ms, "DASH_BATCH_WINDOW_MS")
        backend = env.get("DASH_BACKEND", "local").strip().lower() or "local"
        if backend not in BACKENDS:
            errors.append(f"DASH_BACKEND must be {' or '.join(BACKENDS)}, not {backend!r}")
        ray_deployments = checked(_ray_deployments, env.get("DASH_RAY_DEPLOYMENTS", ""))
        admins = checked(parse_admins, env.get("DASH_ADMINS", ""))
        history_max_bytes = checked(_positive_int, env.get("DASH_HISTORY_MAX_BYTES"), cls.history_max_bytes, "DASH_HISTORY_MAX_BYTES")
        max_queued_runs = checked(_positive_int, env.get("DASH_MAX_QUEUED_RUNS"), cls.max_queued_runs, "DASH_MAX_QUEUED_RUNS")
        evict_to = env.get("DASH_EVICT_TO", "").strip().lower() or EvictTo.UNLOAD.value
        if evict_to not in {e.value for e in EvictTo}:
            errors.append(f"DASH_EVICT_TO must be unload or cpu, not {evict_to!r}")
        if errors:
            raise SettingsError("\n".join(errors))
        standin_dir = env.get("DASH_STANDIN_DIR", "").strip()
        compile_cache_dir = env.get("DASH_COMPILE_CACHE", "").strip()
        history_dir = env.get("DASH_HISTORY_DIR", "").strip()
        return cls(
            models_root=models_root,
            standin_dir=Path(standin_dir).expanduser() if standin_dir else cls.standin_dir,
            standin_fallback=standin_fallback,
            device=device,
            vram_budget=vram_budget,
            enabled_pages=enabled_pages,
            max_upload_mb=max_upload_mb,
            torch_hub_allow=torch_hub_allow,
            allow_pickle=allow_pickle,
            cuda_graphs=cuda_graphs,
            fold_batchnorm=fold_batchnorm,
            compile=compile_,
            cpu_bf16=cpu_bf16,
            compile_cache_dir=Path(compile_cache_dir).expanduser() if compile_cache_dir else cls.compile_cache_dir,
            backend=backend,
            ray_address=env.get("DASH_RAY_ADDRESS", "").strip() or None,
            ray_deployments=ray_deployments,
            admins=admins,
            evict_to=EvictTo(evict_to),
            shared_batches=shared_batches,
            batch_sessions=batch_sessions,
            batch_window_ms=batch_window_ms,
            history_dir=Path(history_dir).expanduser() if history_dir else cls.history_dir,
            history_max_bytes=history_max_bytes,
            max_queued_runs=max_queued_runs,
            model_folders=tuple(sorted(
                (name.removeprefix(MODEL_FOLDER_PREFIX), Path(value.strip()).expanduser())
                for name, value in env.items() if name.startswith(MODEL_FOLDER_PREFIX) and value.strip()
            )),
            hf_token=read_token(env, secrets_file),
        )


def _models_root(text: str) -> Path | None:
    if not text.strip():
        return None
    root = Path(text.strip()).expanduser()
    if not root.is_dir():
        raise SettingsError(f"DASH_MODELS_ROOT must be an existing folder, not {text!r}")
    return root


def _ray_deployments(text: str) -> Path | None:
    """The deployment options file, read and checked now so that a typo stops the start, not the first request."""
    from core.backends.ray_config import load_deployment_options

    if not text.strip():
        return None
    path = Path(text.strip()).expanduser()
    load_deployment_options(path)
    return path


def describe(settings: Settings) -> str:
    """The settings in force, one per line, for a start-up log; the token only as set / not set."""
    budget = settings.vram_budget
    return "\n".join((
        f"models root:      {settings.models_root or 'none (the Hub, or its local cache; typed local folders refused)'}",
        f"device:           {settings.device}",
        f"VRAM budget:      {_describe_budget(budget) if budget else 'default (the card less a margin)'}",
        f"pages:            {', '.join(settings.enabled_pages) or 'none (Home only)'}",
        f"upload limit:     {settings.max_upload_mb} MiB per file",
        f"stand-ins:        {'automatic' if settings.standin_fallback else 'on request'}, in {settings.standin_dir}",
        f"torch.hub repos:  {', '.join(settings.torch_hub_allow)}",
        f"full pickle:      {'ALLOWED (DASH_ALLOW_PICKLE)' if settings.allow_pickle else 'refused (torchvision weights load weights-only)'}",
        f"CUDA graphs:      {'on' if settings.cuda_graphs else 'off (DASH_CUDA_GRAPHS)'}",
        f"fold BatchNorm:   {'on' if settings.fold_batchnorm else 'off (DASH_FOLD_BATCHNORM)'}",
        f"torch.compile:    {f'on CUDA, in the background, cache {settings.compile_cache_dir}' if settings.compile else 'off (DASH_COMPILE)'}",
        f"CPU bf16:         {'hot dog and sentiment, where the CPU has it natively' if settings.cpu_bf16 else 'off (DASH_CPU_BF16)'}",
        f"shared batches:   {'on a GPU, text-to-image runs of different sessions share UNet calls' if settings.shared_batches else 'off (DASH_SHARED_BATCH): each run alone'}",
        f"session batches:  {f'sentiment requests that meet share a forward, and classifier requests except on a GPU with CUDA graphs (window {settings.batch_window_ms:g} ms)' if settings.batch_sessions else 'off (DASH_BATCH_SESSIONS): each request its own forward'}",
        f"image history:    {settings.history_dir}, at most {settings.history_max_bytes / 2**30:.1f} GiB (oldest removed first)",
        f"queued runs:      at most {settings.max_queued_runs} per user",
        f"backend:          {_describe_backend(settings)}",
        f"admins:           {', '.join(settings.admins) or 'none listed (DASH_ADMINS); with login off, whoever uses a localhost-bound app'}",
        f"HF token:         {'set' if settings.hf_token else 'not set'}",
    ))


def _describe_backend(settings: Settings) -> str:
    if settings.backend == "local":
        return "local (every model in this process)"
    cluster = settings.ray_address or "a Ray started inside this process"
    return f"ray (Serve deployments on {cluster}; options from {settings.ray_deployments or 'the defaults'})"


def _describe_budget(budget: VramBudget) -> str:
    if budget.size_bytes is not None:
        return f"{budget.size_bytes / 2**30:.1f} GiB per card"
    return f"{budget.fraction:.0%} of each card"


def main() -> int:
    """Check the settings as the app will read them: exit 0 and print them, or exit 2 with every error."""
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"Invalid settings:\n{error}", file=sys.stderr)
        return 2
    print(describe(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
