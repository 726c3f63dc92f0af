"""Turning a ModelSpec into a live object through each library's public loading API.

Where a model comes from, in order: a per-model folder (`DASH_MODEL_<KEY>`), a typed folder or `<models_root>/<repo_id>`
(what a user typed only inside the root), then the Hub (or GitHub for torch.hub, from an allowed repo only). While
the Hub does not answer (`core.models.reachability`), Hub models load from the local cache only, and torch.hub ones from
torchvision's copy. Every failure comes out as a typed exception: `core.errors`, or `TorchHubRepoNotAllowedError` below.
"""
from __future__ import annotations

import collections
import functools
import importlib
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from core.config import MODEL_FOLDER_PREFIX, Settings
from core.errors import DashboardError, GatedModelError, ModelUnavailableError
from core.models import reachability
from core.models.registry import Family, ModelSpec, folder_in_models_root, repo_folder_in_models_root


class TorchHubRepoNotAllowedError(DashboardError):
    """A spec names a torch.hub repo that `DASH_TORCH_HUB_ALLOW` does not list; none of its code has run."""

    remedy = "If the repo's code is trusted to run in the app, an operator adds it (owner/name) to DASH_TORCH_HUB_ALLOW."


GITHUB = "https://github.com"  # where torch.hub fetches a repo's code
OFFLINE_REMEDY = (
    "Fill the caches on a machine with network (`python -m core.models.cache_fill`, README \"Offline\") and copy them here, "
    "or point DASH_MODELS_ROOT at a folder that holds the model; on a server without network set HF_HUB_OFFLINE=1. "
    "Or use the stand-in model (random weights) to try the page."
)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a local folder (Hub layout) or a Hub / GitHub repo id."""

    location: str
    is_local: bool
    is_standin: bool = False

    @property
    def label(self) -> str:
        if self.is_standin:
            return f"stand-in (random weights) at {self.location}"
        return f"local folder {self.location}" if self.is_local else f"Hub: {self.location}"


def env_var_for(spec: ModelSpec) -> str:
    """The variable that names the operator's folder for `spec` (read into `Settings.model_folders`)."""
    return MODEL_FOLDER_PREFIX + spec.key.split("@", 1)[0].upper().replace("-", "_")


def typed_by_user(spec: ModelSpec) -> bool:
    """A model the user typed (a repo id or folder: `core.models.registry.custom_spec`), not one of the app's own."""
    return "@" in spec.key


def resolve_source(spec: ModelSpec, settings: Settings) -> ModelSource:
    """The operator's `DASH_MODEL_<KEY>` folder, a typed folder, `<models_root>/<repo id>`, or else the Hub.

    A folder or repo id a user typed (a custom spec) is checked again here to lie inside the models root, symlinks
    followed (`core.models.registry.folder_in_models_root`): BadInputError otherwise. The operator's folders are used as set.
    """
    operator_folder = None if typed_by_user(spec) else settings.model_folder(spec.key)
    if operator_folder is not None:
        return ModelSource(str(operator_folder), is_local=True)
    if Path(spec.repo_id).is_absolute():
        return ModelSource(str(folder_in_models_root(spec.repo_id, settings.models_root, "model")), is_local=True)
    if settings.models_root is not None:
        repo = spec.repo_id.split(":", 1)[0]
        if typed_by_user(spec):
            folder = repo_folder_in_models_root(repo, settings.models_root, "model")
        else:
            folder = settings.models_root / repo if (settings.models_root / repo).is_dir() else None
        if folder is not None:
            return ModelSource(str(folder), is_local=True)
    return ModelSource(spec.repo_id, is_local=False)


def load(spec: ModelSpec, source: ModelSource, device: torch.device, dtype: torch.dtype, settings: Settings) -> Any:
    """Load `spec` from `source` onto `device`; raises ModelUnavailableError / GatedModelError, or
    TorchHubRepoNotAllowedError for a torch.hub repo the operator has not allowed."""
    if source.is_local and not Path(source.location).is_dir():
        raise ModelUnavailableError(f"{spec.title}: the local folder {source.location} does not exist.", typed_by_user=typed_by_user(spec))
    try:
        if spec.family is Family.TRANSFORMERS:
            return _load_transformers(spec, source, device, dtype, settings)
        if spec.family is Family.TORCH_HUB:
            return _load_torch_hub(spec, source, device, dtype, settings)
        return _load_diffusers(spec, source, device, dtype, settings)
    except DashboardError:  # already typed, with its remedy
        raise
    except Exception as exc:  # each library raises its own zoo; classify once, here
        raise classify_load_error(spec, source, exc, token=settings.hf_token) from exc


def _load_transformers(spec: ModelSpec, source: ModelSource, device: torch.device, dtype: torch.dtype, settings: Settings) -> Any:
    from transformers import pipeline

    location, hub_args = _pretrained_source(spec, source, settings)
    pipe = pipeline(spec.task, model=location, device=device, dtype=dtype, **hub_args)
    # Inference only: no parameter gradients, so attributions that backpropagate to the inputs never
    # accumulate .grad tensors on a model every session shares.
    pipe.model.eval().requires_grad_(False)
    return pipe


# The file every load of a family reads first: where it lies in the Hub cache, so does the rest of the snapshot.
_FIRST_FILE = {Family.TRANSFORMERS: "config.json", Family.DIFFUSERS: "model_index.json"}


def _pretrained_source(spec: ModelSpec, source: ModelSource, settings: Settings) -> tuple[str, dict[str, Any]]:
    """What from_pretrained gets: a folder as it is; a Hub repo with its revision and token; or, while the Hub does not
    answer (`core.models.reachability`), the repo's snapshot folder in the local cache, so that no library asks the Hub
    (transformers' pipeline looks for an adapter file there even with local_files_only, through the client's retries).
    """
    if source.is_local:
        return source.location, {}
    if reachability.hub_reachable():
        return source.location, {"revision": spec.revision, "token": settings.hf_token}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.repo_id, _FIRST_FILE[spec.family], revision=spec.revision)
    if not isinstance(cached, str):  # None, or the cache's note that the file does not exist
        raise _not_in_cache(spec)
    return str(Path(cached).parent), {}


def _not_in_cache(spec: ModelSpec) -> ModelUnavailableError:
    # A typed id may be a typo that no cache could hold: that remedy first, then what helps offline.
    typed = "Check the repo id (owner/name) or folder you typed. " if typed_by_user(spec) else ""
    return ModelUnavailableError(
        f"{spec.title}: the Hub cannot be reached from this server and {spec.repo_id} is not in the local cache.", remedy=typed + OFFLINE_REMEDY
    )


def check_torch_hub_repo(spec: ModelSpec, settings: Settings) -> None:
    """Refuse a spec whose torch.hub repo (owner/name, any ref) is not in `settings.torch_hub_allow`."""
    repo = spec.repo_id.split(":", 1)[0]
    if repo.lower() not in settings.torch_hub_allow:
        raise TorchHubRepoNotAllowedError(f"{spec.title}: torch.hub repo {repo!r} is not allowed on this server (DASH_TORCH_HUB_ALLOW).")


def _load_torch_hub(spec: ModelSpec, source: ModelSource, device: torch.device, dtype: torch.dtype, settings: Settings) -> torch.nn.Module:
    # 1. The repo's hubconf.py runs in this process: only an allowed repo's, wherever its copy lies.
    check_torch_hub_repo(spec, settings)
    # 2. The weights enum member the entry point gets: its checkpoint loads weights-only unless full pickle is allowed.
    weights = _hub_weights(spec, settings.allow_pickle)
    # 3. Its checkpoint is in TORCH_HOME or can be downloaded: torch.hub's download has no time-out to end a hang.
    #    (A stand-in's entry points build random weights and download nothing.)
    if not source.is_standin:
        _check_checkpoint_within_reach(spec, weights)
    # 4. The model, built by the repo's own entry point with those weights, or by torchvision's copy of it.
    if source.is_local:
        model = torch.hub.load(source.location, spec.hub_entry, source="local", weights=weights)
    else:
        model = _load_from_github(spec, weights) if reachability.SERVERS.reachable(GITHUB) else _load_from_cached_repo(spec, weights)
        if model is None:  # GitHub unreachable or rate-limited, no copy: the same network and weights ship inside torchvision
            import torchvision

            model = torchvision.models.get_model(spec.hub_entry, weights=weights)
    model.eval()
    if settings.fold_batchnorm:
        fold_batch_norms(model)  # in fp32, before the cast, so the folded weights lose nothing to fp16 rounding twice
    model = model.to(device=device, dtype=dtype).requires_grad_(False)
    if device.type == "cuda":
        # Classifier inputs have one fixed size (224²), so cuDNN's one-off algorithm search pays for itself.
        torch.backends.cudnn.benchmark = True
    # NHWC convolutions, in cuDNN and in oneDNN on the CPU (ResNet50 on 2 cores: 16 images 390 ms instead of 640-760 ms)
    return model.to(memory_format=torch.channels_last)


def torch_hub_dir_name(spec: ModelSpec) -> str:
    """The folder torch.hub keeps a GitHub repo in: "pytorch/vision:v0.29.1" -> "pytorch_vision_v0.29.1"."""
    return spec.repo_id.replace(":", "/").replace("/", "_")


def _load_from_cached_repo(spec: ModelSpec, weights: Any) -> torch.nn.Module | None:
    """The repo's copy in torch.hub's folder (`python -m core.models.cache_fill` puts it there), run without GitHub."""
    folder = Path(torch.hub.get_dir()) / torch_hub_dir_name(spec)
    if not (folder / "hubconf.py").is_file():
        return None
    return torch.hub.load(str(folder), spec.hub_entry, source="local", weights=weights)


def _load_from_github(spec: ModelSpec, weights: Any) -> torch.nn.Module | None:
    try:
        return torch.hub.load(spec.repo_id, spec.hub_entry, weights=weights, trust_repo=True)
    except (urllib.error.URLError, OSError):
        return None


def _check_checkpoint_within_reach(spec: ModelSpec, weights: Any) -> None:
    """ModelUnavailableError at once when the checkpoint is neither in torch.hub's folder nor downloadable now."""
    if weights is None:
        return
    # Where torch.hub.load_state_dict_from_url keeps a download: <hub dir>/checkpoints/<the URL's file name>.
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(weights.url).path).name
    if not cached.is_file() and not reachability.SERVERS.reachable(weights.url):
        raise ModelUnavailableError(
            f"{spec.title}: {urlsplit(weights.url).netloc} cannot be reached from this server and the checkpoint "
            f"{cached.name} is not in {cached.parent}.",
            remedy=OFFLINE_REMEDY,
        )


def fold_batch_norms(model: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the Conv2d whose output it alone normalises; returns how many.

    Inference then runs one kernel where it ran two (a conv, then a pass over its whole output): a third fewer
    kernels in ResNet50, and the same function up to rounding. The data flow comes from an FX trace, not from
    attribute order; each folded BatchNorm becomes an Identity, so the module tree (and hooks on it, Grad-CAM's)
    stays as it was. A model FX cannot trace is left as it is.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - tracing fails in many ways on dynamic models; unfolded is always correct
        return 0
    modules = dict(model.named_modules())
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (
            isinstance(modules.get(node.target), torch.nn.BatchNorm2d) and isinstance(source, torch.fx.Node) and source.op == "call_module"
            and isinstance(modules[source.target], torch.nn.Conv2d) and len(source.users) == 1 and calls[source.target] == calls[node.target] == 1
        ):
            pairs.append((source.target, node.target))
    for conv_name, norm_name in pairs:
        model.set_submodule(conv_name, fuse_conv_bn_eval(modules[conv_name], modules[norm_name]))
        model.set_submodule(norm_name, torch.nn.Identity())
    return len(pairs)


def _hub_weights(spec: ModelSpec, allow_pickle: bool) -> Any:
    """torchvision's weights enum member for `spec`, or a private copy of it whose checkpoint loads weights-only.

    A torchvision builder loads its checkpoint with `weights.get_state_dict(...)`, that is
    `torch.hub.load_state_dict_from_url`, whose default is `weights_only=False`: full pickle, which can run code.
    The builder also sets up the architecture from the weights (the class count, GoogLeNet's input transform, ViT's
    image size) and renames old keys (DenseNet), so it has to stay the one that loads them. The copy is a member of
    the same enum class (the builder checks that) with the same value; only its `get_state_dict` passes
    `weights_only=True`. It is made per load, so the enum every other caller sees is left as it is.
    """
    import torchvision

    if not spec.hub_weights:
        return None
    weights = torchvision.models.get_weight(spec.hub_weights)
    if allow_pickle:
        return weights
    weights_only = object.__new__(type(weights))
    weights_only._name_, weights_only._value_ = weights.name, weights.value
    weights_only.get_state_dict = functools.partial(weights.get_state_dict, weights_only=True)
    return weights_only


def _load_diffusers(spec: ModelSpec, source: ModelSource, device: torch.device, dtype: torch.dtype, settings: Settings) -> Any:
    import diffusers

    pipeline_class = getattr(diffusers, spec.pipeline_class or "DiffusionPipeline")
    location, hub_args = _pretrained_source(spec, source, settings)
    pipe = pipeline_class.from_pretrained(location, dtype=dtype, **hub_args)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device.type == "cuda" and isinstance(getattr(pipe, "unet", None), torch.nn.Module):
        # cuDNN's NHWC convolutions: an SD 1.5 step took 10.2 ms of GPU time instead of 12.2 (H100, batch 2).
        pipe.unet.to(memory_format=torch.channels_last)
    return pipe


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures and time-outs, whichever HTTP client this huggingface_hub uses (httpx2 for 2.x, httpx for 1.x)."""
    errors: list[type[BaseException]] = [TimeoutError, ConnectionError, urllib.error.URLError]
    for client in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(client)
        except ImportError:
            continue
        errors += [module.NetworkError, module.TimeoutException]
    return tuple(errors)


def classify_load_error(spec: ModelSpec, source: ModelSource, exc: BaseException, token: str | None = None) -> ModelUnavailableError:
    """One typed error, with the cause in words, for whatever a library raised while loading.

    The library's own message is quoted only as a last resort, with the token (if it ever appears there) cut out.
    """
    from huggingface_hub import errors as hub_errors

    where, typed = source.label, typed_by_user(spec)
    for cause in _exception_chain(exc):
        if isinstance(cause, hub_errors.GatedRepoError):
            return GatedModelError(f"{spec.title}: {spec.repo_id} is a gated repo and needs an accepted licence and a token.")
        if isinstance(cause, hub_errors.RepositoryNotFoundError):
            return ModelUnavailableError(
                f"{spec.title}: no repo {spec.repo_id} on the Hub (or it is private and needs a token).",
                remedy="Check the spelling of the repo id (owner/name), or set HF_TOKEN for a private repo." if typed else None,
            )
        if isinstance(cause, hub_errors.RevisionNotFoundError):
            return ModelUnavailableError(f"{spec.title}: {spec.repo_id} has no revision {spec.revision!r}.", typed_by_user=typed)
        if isinstance(cause, (hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError)):
            return _not_in_cache(spec)
        if isinstance(cause, _network_errors()):
            return ModelUnavailableError(
                f"{spec.title}: the Hub, GitHub or download.pytorch.org could not be reached (the connection failed or timed out).", typed_by_user=typed,
            )
    message = str(exc).splitlines()[0] if str(exc) else "the library gave no reason (the server log has the details)"
    if token:
        message = message.replace(token, "[token hidden]")
    return ModelUnavailableError(f"{spec.title}: could not load from {where}: {message[:300]}", typed_by_user=typed)
