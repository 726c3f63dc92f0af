from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torchvision

from core.accel import Acceleration, compiled, cuda_graphs

# Graphs of the eager functions only: a background compile finishing mid-test would change what is replayed.
GRAPHS = Acceleration(cuda_graphs=True, compile=False)
GRAPHS_AND_COMPILE = Acceleration(cuda_graphs=True, compile=True)


def call(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return module(inputs)


def test_cpu_inputs_run_eagerly_and_unchanged():
    module = torch.nn.Linear(4, 2).eval()
    inputs = torch.randn(1, 4)
    with torch.inference_mode():
        expected = module(inputs)
    assert torch.equal(cuda_graphs.graphed_forward(module, call, inputs, GRAPHS), expected)
    assert module not in cuda_graphs._graphs  # nothing captured off the GPU


@pytest.mark.gpu
def test_graph_replay_matches_eager_exactly_and_handles_other_shapes():
    model = torchvision.models.resnet50().cuda().half().eval().to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = False  # the same kernels in eager and in the graph, for an exact comparison
    images = [torch.randn(1, 3, 224, 224, device="cuda").half().contiguous(memory_format=torch.channels_last) for _ in range(3)]
    with torch.inference_mode():
        eager = [model(image) for image in images]
    graphed = [cuda_graphs.graphed_forward(model, call, image, GRAPHS) for image in images]
    for expected, actual in zip(eager, graphed, strict=True):
        assert torch.equal(expected, actual)
    assert any(isinstance(graph, cuda_graphs._Graph) for graph in cuda_graphs._graphs[model].graphs.values())
    batch = torch.cat(images).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.equal(cuda_graphs.graphed_forward(model, call, batch, GRAPHS), model(batch))  # batch of 3: eager


@pytest.mark.gpu
def test_concurrent_replays_return_each_callers_own_result():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda().eval()
    inputs = [torch.randn(1, 64, device="cuda") for _ in range(8)]
    with torch.inference_mode():
        expected = [model(x) for x in inputs]
    cuda_graphs.graphed_forward(model, call, inputs[0], GRAPHS)  # capture first
    results: dict[int, torch.Tensor] = {}

    def session(index: int) -> None:
        for _ in range(50):
            results[index] = cuda_graphs.graphed_forward(model, call, inputs[index], GRAPHS)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for index in range(8):
        torch.testing.assert_close(results[index], expected[index])


def test_unet_graphs_are_dropped_when_the_weights_move():
    unet = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.GroupNorm(2, 4))
    first = cuda_graphs._graphs_for(unet)
    assert cuda_graphs._graphs_for(unet) is first  # weights where they were: the same graphs
    unet.to(torch.float64)  # a cast allocates every weight anew, as precision changes and offload do
    assert cuda_graphs._graphs_for(unet) is not first
    moved = cuda_graphs._graphs_for(unet)
    unet.to(torch.float32)
    assert cuda_graphs._graphs_for(unet) is not moved


def test_graphed_unet_off_the_gpu_leaves_calls_eager_and_forward_as_it_was():
    unet = torch.nn.Linear(4, 4)
    with cuda_graphs.graphed_unet(unet, GRAPHS) as calls:
        assert "forward" not in vars(unet)
        unet(torch.randn(1, 4))
    assert calls.path == "eager" and "forward" not in vars(unet)


def test_graphed_text_encoder_off_the_gpu_leaves_forward_as_it_was():
    text_encoder = torch.nn.Embedding(10, 4)
    with cuda_graphs.graphed_text_encoder(text_encoder, GRAPHS):
        assert "forward" not in vars(text_encoder)
        text_encoder(torch.tensor([[1, 2]]))
    assert "forward" not in vars(text_encoder)


@pytest.mark.parametrize("timestep", [torch.tensor(981), torch.tensor(981.5), 981, 981.5])
def test_a_timestep_is_filled_in_on_the_device_as_one_float_per_row(timestep):
    on_device = cuda_graphs.timestep_on(torch.device("meta"), timestep, 2)  # meta: a device other than the CPU, no GPU needed
    assert on_device.device.type == "meta" and on_device.shape == (2,) and on_device.dtype == torch.float32
    on_cpu = cuda_graphs.timestep_on(torch.device("cpu"), timestep, 2)
    assert on_cpu.tolist() == [float(timestep)] * 2


def test_a_timestep_already_in_the_rows_form_on_the_device_is_passed_as_it_is():
    rows = torch.tensor([5.0, 7.0])
    assert cuda_graphs.timestep_on(torch.device("cpu"), rows, 2) is rows


@pytest.mark.parametrize("timestep", [torch.tensor(981), torch.tensor(981.25)])
def test_a_unet_gives_the_same_output_for_a_scalar_timestep_and_one_float_per_row(timestep):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        scalar = unet(sample, timestep, context, return_dict=False)[0]
        per_row = unet(sample, cuda_graphs.timestep_on(torch.device("cpu"), timestep, 2), context, return_dict=False)[0]
    assert torch.equal(scalar, per_row)


def test_unet_calls_say_which_path_served_them():
    assert cuda_graphs.UNetCalls({}).path == "eager"
    assert cuda_graphs.UNetCalls({"CUDA graph": 51}).path == "CUDA graph"
    mixed = cuda_graphs.UNetCalls({"CUDA graph": 3, "eager": 1}).path
    assert mixed == "CUDA graph (3 of 4 UNet calls), eager (1 of 4 UNet calls)"


@pytest.mark.gpu
def test_a_graphed_unet_run_serves_plain_calls_from_graphs_and_the_rest_eagerly():
    class UNetLike(torch.nn.Module):  # diffusers' UNet call signature
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, sample, timestep, encoder_hidden_states, cross_attention_kwargs=None, return_dict=True):
            out = self.conv(sample) * timestep.float().reshape(-1, 1, 1, 1) + encoder_hidden_states.mean()
            return (out,) if not return_dict else {"sample": out}

    unet = UNetLike().cuda().half()
    sample, context = torch.randn(2, 4, 8, 8, device="cuda").half(), torch.randn(2, 3, 5, device="cuda").half()
    with torch.inference_mode():
        expected = [unet(sample, torch.tensor(t, device="cuda"), context, return_dict=False)[0] for t in (1, 2, 3)]
        with cuda_graphs.graphed_unet(unet, GRAPHS) as calls:
            actual = [unet(sample, torch.tensor(t, device="cuda"), context, return_dict=False)[0] for t in (1, 2, 3)]
            unet(sample, torch.tensor(1, device="cuda"), context, cross_attention_kwargs={"scale": 0.5}, return_dict=False)  # LoRA-style: eager
    for want, got in zip(expected, actual, strict=True):
        assert torch.equal(want, got)
    assert calls.paths == {"CUDA graph": 3, "eager": 1}
    assert "forward" not in vars(unet)


@pytest.mark.gpu
def test_a_graphed_text_encoder_serves_plain_encodings_from_a_graph_exactly_and_masked_ones_eagerly():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77)
    text_encoder = CLIPTextModel(config).cuda().half().eval()
    ids = torch.randint(0, 100, (1, 77), device="cuda")
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        expected = text_encoder(ids)[0]
        with cuda_graphs.graphed_text_encoder(text_encoder, GRAPHS):
            graphed = [text_encoder(ids)[0] for _ in range(2)]  # the first captures, the second replays
            masked = text_encoder(ids, attention_mask=mask)[0]
    assert all(torch.equal(expected, got) for got in graphed)
    assert torch.equal(masked, expected)  # an all-ones mask changes nothing: the eager path ran it
    assert len(cuda_graphs._graphs[text_encoder].graphs) == 1 and "forward" not in vars(text_encoder)


@pytest.mark.gpu
def test_a_batch_between_compiled_sizes_is_served_padded_by_the_compiled_step_within_tolerance(monkeypatch, tmp_path):
    model = torchvision.models.resnet50().eval().cuda().half().to(memory_format=torch.channels_last)
    batch = torch.randn(3, 3, 224, 224, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(batch).float()
    assert torch.equal(cuda_graphs.graphed_forward(model, call, batch, GRAPHS_AND_COMPILE), model(batch))  # eager while the 4-image compile runs
    assert compiled.wait_until_settled(300)
    assert [(r.shape, r.state) for r in compiled.records() if r.model == "ResNet"] == [("4×3×224×224", compiled.CompileState.READY)]
    served = cuda_graphs.graphed_forward(model, call, batch, GRAPHS_AND_COMPILE).float()
    assert served.shape == (3, 1000)
    assert ((served - expected).abs().max() / expected.abs().max()).item() < 1e-2
    compiled.forget(model)


@pytest.mark.gpu
def test_graphs_replay_correctly_after_an_unload_released_memory():
    """An unload or a failed run calls release_memory() while other models' graphs live on; in a process of its own,
    because a replay reading freed memory ends that process's CUDA context (it did, when cuBLAS's workspaces were
    cleared there: the next graph replay was an illegal memory access)."""
    script = """
import torch
from core.accel import Acceleration, cuda_graphs
from core.models.memory import release_memory

def call(module, inputs):
    return module(inputs)

torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).cuda().half().eval()
inputs = torch.randn(1, 2048, device="cuda", dtype=torch.half)
accel = Acceleration(cuda_graphs=True, compile=False)
with torch.inference_mode():
    expected = model(inputs)
    assert torch.equal(cuda_graphs.graphed_forward(model, call, inputs, accel), expected)  # captured here
    garbage = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    del garbage
    release_memory()
    for _ in range(5):
        assert torch.equal(cuda_graphs.graphed_forward(model, call, inputs, accel), expected)
    torch.cuda.synchronize()
print("replays after release_memory: equal")
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and "equal" in done.stdout, done.stderr[-3000:]
