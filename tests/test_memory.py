"""core.models.memory: budget arithmetic, the eviction plan, moving models, measuring what an action freed."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core.config import EvictTo, Settings, VramBudget
from core.errors import SettingsError
from core.models.memory import (
    DoesNotFitError,
    MemoryPolicy,
    Resident,
    measure_freed,
    move_model,
    plan_placement,
)

GIB = 2**30


def resident(key: str, size_bytes: int, last_used_seq: int, gpu_index: int = 0, busy: bool = False) -> Resident:
    return Resident(key, key.upper(), gpu_index, size_bytes, last_used_seq, busy)


@pytest.mark.parametrize(
    ("card_bytes", "budget_bytes"),
    [(16 * GIB, 14 * GIB), (80 * GIB, 72 * GIB), (40 * GIB, 36 * GIB), (GIB, 0)],
    ids=["T4: 2 GiB floor", "H100: 10 %", "A100-40: 10 %", "tiny card: nothing"],
)
def test_default_budget_is_the_card_less_a_margin(card_bytes, budget_bytes):
    assert MemoryPolicy().budget_bytes(card_bytes) == budget_bytes


def test_configured_budget_is_a_size_capped_at_the_card_or_a_share():
    assert MemoryPolicy(VramBudget(size_bytes=20 * GIB)).budget_bytes(16 * GIB) == 16 * GIB
    assert MemoryPolicy(VramBudget(size_bytes=4 * GIB)).budget_bytes(16 * GIB) == 4 * GIB
    assert MemoryPolicy(VramBudget(fraction=0.5)).budget_bytes(16 * GIB) == 8 * GIB


def test_policy_from_settings_and_environment():
    assert MemoryPolicy.from_settings(Settings.from_env({"DASH_VRAM_BUDGET": "80%"})) == MemoryPolicy(VramBudget(fraction=0.8), EvictTo.UNLOAD)
    assert MemoryPolicy.from_settings(Settings.from_env({"DASH_EVICT_TO": " CPU "})).evict_to is EvictTo.CPU
    with pytest.raises(SettingsError, match="DASH_EVICT_TO must be unload or cpu, not 'ram'"):
        Settings.from_env({"DASH_EVICT_TO": "ram"})


def test_a_model_that_fits_evicts_nothing():
    placement = plan_placement("new", 3, {0: 10}, [resident("a", 4, 1), resident("b", 3, 2)])
    assert placement.gpu_index == 0 and placement.evict == ()


def test_least_recently_used_idle_models_leave_first_and_only_as_many_as_needed():
    residents = [resident("newest", 3, 9), resident("oldest", 3, 1), resident("middle", 3, 5)]
    placement = plan_placement("new", 6, {0: 10}, residents)  # 1 free: two must go
    assert [r.key for r in placement.evict] == ["oldest", "middle"] and placement.evicted_bytes == 6


def test_a_busy_model_is_never_evicted_even_when_least_recently_used():
    residents = [resident("running", 5, 1, busy=True), resident("idle", 3, 2)]
    assert [r.key for r in plan_placement("new", 4, {0: 10}, residents).evict] == ["idle"]
    with pytest.raises(DoesNotFitError, match=r"RUNNING \(5 B on GPU 0\)"):
        plan_placement("new", 6, {0: 10}, residents)


def test_larger_than_the_budget_says_so_and_names_the_setting():
    with pytest.raises(DoesNotFitError, match="more than the VRAM budget.*DASH_VRAM_BUDGET"):
        plan_placement("Stable Diffusion", 11, {0: 10, 1: 10}, [])


def test_two_gpus_prefer_no_eviction_then_the_most_headroom():
    residents = [resident("a", 6, 1, gpu_index=0), resident("b", 2, 2, gpu_index=1)]
    assert plan_placement("new", 3, {0: 10, 1: 10}, residents).gpu_index == 1  # fits on both: 5 left on 1, 1 on 0
    full = [resident("a", 9, 1, gpu_index=0), resident("b", 8, 2, gpu_index=1)]
    placement = plan_placement("new", 3, {0: 10, 1: 10}, full)  # both need an eviction: the smaller one goes
    assert placement.gpu_index == 1 and [r.key for r in placement.evict] == ["b"]


def test_a_pinned_gpu_is_the_only_candidate():
    residents = [resident("a", 9, 1, gpu_index=0)]
    placement = plan_placement("new", 3, {0: 10, 1: 10}, residents, gpu_index=0)
    assert placement.gpu_index == 0 and [r.key for r in placement.evict] == ["a"]
    with pytest.raises(DoesNotFitError, match="there is no GPU 2"):
        plan_placement("new", 3, {0: 10, 1: 10}, residents, gpu_index=2)


def test_move_model_handles_modules_and_both_kinds_of_pipeline():
    module = torch.nn.Linear(2, 2)
    move_model(module, torch.device("meta"))
    assert module.weight.device.type == "meta"

    transformers_like = SimpleNamespace(model=torch.nn.Linear(2, 2), device=torch.device("cpu"))
    move_model(transformers_like, torch.device("meta"))
    assert transformers_like.model.weight.device.type == "meta" and transformers_like.device == torch.device("meta")

    moved_to = []
    diffusers_like = SimpleNamespace(components={}, to=moved_to.append)
    move_model(diffusers_like, torch.device("meta"))
    assert moved_to == [torch.device("meta")]

    with pytest.raises(TypeError, match="cannot move a str"):
        move_model("not a model", torch.device("cpu"))


def test_measure_freed_reports_the_action_bytes():
    freed = measure_freed(lambda: 1234)
    assert freed.model_bytes == 1234
    if not torch.cuda.is_available():
        assert freed.allocated_bytes == freed.reserved_bytes == 0
