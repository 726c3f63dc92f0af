from __future__ import annotations

import threading

import pytest
import torch
import torchvision

from core import cuda_graphs


def test_cpu_inputs_run_eagerly_and_unchanged():
    module = torch.nn.Linear(4, 2).eval()
    inputs = torch.randn(1, 4)
    with torch.inference_mode():
        expected = module(inputs)
    assert torch.equal(cuda_graphs.graphed_forward(module, module, inputs), expected)
    assert module not in cuda_graphs._graphs  # nothing captured off the GPU


@pytest.mark.gpu
def test_graph_replay_matches_eager_exactly_and_handles_other_shapes():
    model = torchvision.models.resnet50().cuda().half().eval().to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = False  # the same kernels in eager and in the graph, for an exact comparison
    images = [torch.randn(1, 3, 224, 224, device="cuda").half().contiguous(memory_format=torch.channels_last) for _ in range(3)]
    with torch.inference_mode():
        eager = [model(image) for image in images]
    graphed = [cuda_graphs.graphed_forward(model, model, image) for image in images]
    for expected, actual in zip(eager, graphed, strict=True):
        assert torch.equal(expected, actual)
    assert any(graph is not None for graph in cuda_graphs._graphs[model].values())
    batch = torch.cat(images).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.equal(cuda_graphs.graphed_forward(model, model, batch), model(batch))  # batch of 3: eager


@pytest.mark.gpu
def test_concurrent_replays_return_each_callers_own_result():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda().eval()
    inputs = [torch.randn(1, 64, device="cuda") for _ in range(8)]
    with torch.inference_mode():
        expected = [model(x) for x in inputs]
    cuda_graphs.graphed_forward(model, model, inputs[0])  # capture first
    results: dict[int, torch.Tensor] = {}

    def session(index: int) -> None:
        for _ in range(50):
            results[index] = cuda_graphs.graphed_forward(model, model, inputs[index])

    threads = [threading.Thread(target=session, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for index in range(8):
        torch.testing.assert_close(results[index], expected[index])
