"""Replicas, resources and batching of each Ray Serve deployment (the ray backend), from one TOML file.

Plain data, no ray import: `core.config` checks the file at start, on machines that may not have Ray installed.
The file has a table per kind of model and, optionally, one per model key that overrides its kind:

    [classifier]            # the hot dog model and every ImageNet classifier
    num_gpus = 0.25
    max_replicas = 4
    [models.sd15]           # one model
    max_replicas = 8

See deploy/ray-cluster.example.toml for every option with its meaning.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from core.errors import SettingsError
from core.models.registry import MODELS, ModelSpec

# Kinds of deployment, by the task of the model they serve.
KIND_OF_TASK = {
    "image-classification": "classifier",
    "imagenet-classification": "classifier",
    "text-classification": "sentiment",
    "text-to-image": "generation",
    "unconditional-image-generation": "generation",
}
KINDS = ("classifier", "sentiment", "generation")


@dataclass(frozen=True)
class DeploymentOptions:
    # Ray resources of one replica. A fraction of a GPU lets small models share a card; SD takes a whole one, so
    # Ray puts one SD replica on each GPU and Serve spreads requests over them.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Autoscaling on queue length: Serve keeps about `target_ongoing_requests` in flight per replica, adding
    # replicas (up to max) when requests queue and removing idle ones (down to min) after a while.
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    # How fast autoscaling reacts (Serve's defaults): queue lengths are reported every metrics_interval_s and averaged
    # over look_back_period_s; a replica is added after upscale_delay_s of demand, removed after downscale_delay_s idle.
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    # Requests one replica accepts at once; beyond it they wait in the caller's queue (and count for autoscaling).
    max_ongoing_requests: int = 16
    # Dynamic batching (classifiers, sentiment): requests from every session that arrive within the wait are one
    # forward pass, up to this many requests.
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    # Serve calls the replica's check_health this often; a replica that fails it (or dies) is replaced.
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0


# What a kind gets with no file: CPU replicas, one each, so that `backend = "ray"` runs on any machine as it is.
# A GPU cluster sets num_gpus (deploy/ray-cluster.example.toml).
DEFAULTS = {
    "classifier": DeploymentOptions(max_replicas=2, target_ongoing_requests=8, max_ongoing_requests=64, max_batch_size=32),
    "sentiment": DeploymentOptions(max_replicas=2, target_ongoing_requests=8, max_ongoing_requests=64, max_batch_size=32),
    # A generation replica runs one image batch at a time (core.gpu.queue inside it); a few more wait there, with
    # their place in line streamed back to the page, and the rest wait in Serve's queue.
    "generation": DeploymentOptions(target_ongoing_requests=1, max_ongoing_requests=4, max_batch_size=1),
}
_FIELDS = {f.name: f.type for f in fields(DeploymentOptions)}


def kind_of(spec: ModelSpec) -> str:
    return KIND_OF_TASK[spec.task]


@dataclass(frozen=True)
class ServingOptions:
    """Options per kind and per model key; `for_spec` says what one model's deployment gets."""

    kinds: dict[str, DeploymentOptions]
    models: dict[str, DeploymentOptions]

    def for_spec(self, spec: ModelSpec) -> DeploymentOptions:
        return self.models.get(spec.key) or self.kinds[kind_of(spec)]


def load_deployment_options(path: Path | None) -> ServingOptions:
    """The options in `path` over the defaults; raises SettingsError naming the table, key and value that is wrong."""
    if path is None:
        return ServingOptions(dict(DEFAULTS), {})
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise SettingsError(f"DASH_RAY_DEPLOYMENTS: cannot read {str(path)!r} ({error.strerror})") from error
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"DASH_RAY_DEPLOYMENTS: {str(path)!r} is not valid TOML ({error})") from error
    unknown = sorted(set(data) - {*KINDS, "models"})
    if unknown:
        raise SettingsError(f"DASH_RAY_DEPLOYMENTS: unknown table(s) {', '.join(map(repr, unknown))} in {str(path)!r}; use {', '.join(KINDS)} or models.<key>")
    kinds = {kind: _options(f"[{kind}]", data.get(kind, {}), DEFAULTS[kind]) for kind in KINDS}
    models = {}
    for key, table in data.get("models", {}).items():
        if key not in MODELS:
            raise SettingsError(f"DASH_RAY_DEPLOYMENTS: [models.{key}] names no model; keys are {', '.join(MODELS)}")
        models[key] = _options(f"[models.{key}]", table, kinds[kind_of(MODELS[key])])
    return ServingOptions(kinds, models)


def _options(where: str, table: dict, base: DeploymentOptions) -> DeploymentOptions:
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise SettingsError(f"DASH_RAY_DEPLOYMENTS: {where} has unknown option(s) {', '.join(map(repr, unknown))}; options are {', '.join(_FIELDS)}")
    for name, value in table.items():
        whole = _FIELDS[name] == "int"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value < 0:
            raise SettingsError(f"DASH_RAY_DEPLOYMENTS: {where} {name} must be a {'whole number' if whole else 'number'} of 0 or more, not {value!r}")
    options = replace(base, **table)
    if not 1 <= options.min_replicas <= options.max_replicas:
        raise SettingsError(f"DASH_RAY_DEPLOYMENTS: {where} needs 1 <= min_replicas <= max_replicas, not {options.min_replicas} and {options.max_replicas}")
    if options.max_batch_size < 1 or options.max_ongoing_requests < 1:
        raise SettingsError(f"DASH_RAY_DEPLOYMENTS: {where} max_batch_size and max_ongoing_requests must be at least 1")
    return options
