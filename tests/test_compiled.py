"""core.accel.compiled: torch.compile in the background, with a stand-in compiler so that the hand-over is tested here."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from core.accel import Acceleration, compiled
from core.accel.compiled import CompileState


@pytest.fixture
def compiler(monkeypatch):
    """A compiler whose compiles wait for `release` and whose compiled steps add 1000, so their results are told apart.

    As torch.compile's, the wait is in the compiled step's first call (the worker's), not in wrapping the step."""
    release = threading.Event()

    def compile_step(step):
        def compiled_step(module, *inputs):
            release.wait(30)
            return step(module, *inputs) + 1000

        return compiled_step

    monkeypatch.setattr(compiled, "_compiler", compile_step)
    monkeypatch.setattr(compiled, "_on_gpu", lambda tensor: True)
    return release


COMPILE = Acceleration(cuda_graphs=False, compile=True)  # batches: the compiled step, padded


def linear_step(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return module(inputs)


def states(module) -> list[CompileState]:
    return [record.state for record in compiled.records() if record.model == type(module).__name__ and record.shape in {"1×4", "2×4"}]


def test_a_shape_is_served_eagerly_until_its_background_compile_is_done(compiler):
    module, one = torch.nn.Linear(4, 4), torch.randn(1, 4)
    assert compiled.ready(module, linear_step, (one,), True) is None  # queued: this call runs eagerly
    assert compiled.ready(module, linear_step, (one,), True) is None  # still compiling: still eager, not queued twice
    assert states(module) == [CompileState.COMPILING]
    compiler.set()
    assert compiled.wait_until_settled(30)
    fast = compiled.ready(module, linear_step, (one,), True)
    assert fast is not None and torch.allclose(fast(module, one), module(one) + 1000)
    assert compiled.ready(module, linear_step, (torch.randn(2, 4),), True) is None  # another shape waits for its own compile


def test_a_failed_compile_leaves_the_eager_path_serving(monkeypatch, compiler):
    def broken(step):
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(compiled, "_compiler", broken)
    module, one = torch.nn.Linear(4, 4), torch.randn(1, 4)
    assert compiled.ready(module, lambda m, x: m(x), (one,), True) is None
    assert compiled.wait_until_settled(30)
    assert states(module) == [CompileState.FAILED]
    assert compiled.ready(module, linear_step, (one,), True) is None


def test_forgotten_compiles_are_redone_for_moved_weights(compiler):
    compiler.set()
    module, one = torch.nn.Linear(4, 4), torch.randn(1, 4)
    compiled.ready(module, linear_step, (one,), True)
    assert compiled.wait_until_settled(30) and compiled.ready(module, linear_step, (one,), True) is not None
    compiled.forget(module)  # what core.accel.cuda_graphs does when the weights are no longer where they were
    assert compiled.ready(module, linear_step, (one,), True) is None  # compiled again, in the background


def test_off_or_on_the_cpu_nothing_is_compiled():
    module = torch.nn.Linear(4, 4)
    assert compiled.ready(module, linear_step, (torch.randn(1, 4),), False) is None
    assert compiled.ready(module, linear_step, (torch.randn(1, 4),), True) is None  # on, but a CPU tensor
    assert states(module) == []


def test_the_compile_cache_goes_where_configured_unless_an_operator_chose_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing diffusers leaves there
    compiled.use_cache_dir(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator's"))
    compiled.use_cache_dir(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "operator's")


def test_batches_compile_at_a_few_sizes_and_other_sizes_are_padded_up_to_them(compiler):
    from core.accel import cuda_graphs

    def batch_step(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:  # its own: compiled steps are kept per function
        return module(inputs)

    module = torch.nn.Linear(4, 4)
    batches = {count: torch.randn(count, 4) for count in (1, 3, 4, 5, 7)}  # 1: here (no CUDA) without a graph
    for batch in batches.values():
        assert torch.equal(cuda_graphs.graphed_forward(module, batch_step, batch, COMPILE), module(batch))  # eager meanwhile
    assert sorted(r.shape for r in compiled.records() if r.model == "Linear") == ["1×4", "4×4", "8×4"]  # not one per size
    compiler.set()
    assert compiled.wait_until_settled(30)
    for count, batch in batches.items():
        served = cuda_graphs.graphed_forward(module, batch_step, batch, COMPILE)
        assert served.shape == (count, 4) and torch.allclose(served, module(batch) + 1000)  # its own rows, compiled


def test_padding_repeats_the_first_row_in_the_inputs_memory_format():
    from core.accel import cuda_graphs

    images = torch.randn(3, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    padded = cuda_graphs._padded(images, 4)
    assert padded.is_contiguous(memory_format=torch.channels_last) and padded.shape == (4, 3, 8, 8)
    assert torch.equal(padded[:3], images) and torch.equal(padded[3], images[0])


def test_a_compile_that_met_a_graph_capture_is_run_again_and_other_failures_are_not(compiler, monkeypatch):
    attempts = []

    def compile_step(step):
        def compiled_step(module, *inputs):
            attempts.append(step.__name__)
            if step is clashing and len(attempts) == 1:
                raise RuntimeError(f"{compiled.CAPTURE_CLASH} encountered unexpectedly.")
            if step is broken:
                raise RuntimeError("inductor failed")
            return step(module, *inputs) + 1000

        return compiled_step

    def clashing(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return module(inputs)

    def broken(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return module(inputs)

    monkeypatch.setattr(compiled, "_compiler", compile_step)
    module, one = torch.nn.Linear(4, 4), torch.randn(1, 4)
    compiled.ready(module, clashing, (one,), True)
    assert compiled.wait_until_settled(30)
    assert attempts == ["clashing", "clashing"] and compiled.ready(module, clashing, (one,), True) is not None
    compiled.ready(module, broken, (torch.randn(2, 4),), True)
    assert compiled.wait_until_settled(30)
    assert attempts.count("broken") == 1 and compiled.ready(module, broken, (torch.randn(2, 4),), True) is None
