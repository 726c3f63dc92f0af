"""The ray backend (core.backends.ray_client) on a local Ray cluster started for this module: every page's path gives what the
local backend gives for the same stand-in model and seed; progress and cancel cross the process boundary; a replica
that dies while loading or between requests is replaced without the caller seeing it; replicas are listed with
their device and memory; a page runs unchanged with DASH_BACKEND=ray."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")  # the GPU machine runs the other GPU tests without Ray installed

from ray import serve  # noqa: E402

from core.backends import ray_client as serving  # noqa: E402
from core.backends.base import held_for_the_run  # noqa: E402
from core.backends.local import LocalBackend  # noqa: E402
from core.backends.ray_config import KINDS, DeploymentOptions, ServingOptions  # noqa: E402
from core.config import Settings  # noqa: E402
from core.errors import BadInputError, ModelUnavailableError  # noqa: E402
from core.gpu.nvml import GpuSnapshot  # noqa: E402
from core.models import loading  # noqa: E402
from core.models.manager import ModelState  # noqa: E402
from core.models.registry import MODELS  # noqa: E402
from core.tasks import imagenet, sd_settings, sentiment  # noqa: E402
from core.tasks.images import decode_image  # noqa: E402
from core.tasks.jobs import Job, JobState  # noqa: E402
from core.tasks.sd_settings import GenerationSettings  # noqa: E402
from core.tasks.unconditional import UnconditionalSettings  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
WAIT_S = 120


def wait_for(condition, what: str, timeout_s: float = WAIT_S, poll_s: float = 0.05):
    """Poll `condition()` until it returns something true; fail naming `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def ray_settings(standin_dir: Path) -> Settings:
    return Settings(standin_dir=standin_dir, device="auto", standin_fallback=True, backend="ray")


@pytest.fixture(scope="module")
def cluster(ray_settings: Settings):
    """One local Ray (4 CPUs, so that a few replicas fit on this 2-core machine) for the whole module."""
    ray.init(num_cpus=4, include_dashboard=False, namespace=serving.NAMESPACE, log_to_driver=False,
             runtime_env=serving.code_runtime_env())
    serving.connect(ray_settings)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def local(ray_settings: Settings):
    """The local backend with the same settings: the reference. Its loads also build every stand-in before a replica
    needs it, so replicas never build the same folder at once.

    It computes with one CPU thread, as a replica with num_cpus=1 does (Ray sets OMP_NUM_THREADS): with another
    thread count, convolutions sum in another order and probabilities differ in their last bits (about 1e-6).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LocalBackend(replace(ray_settings, backend="local"))
    torch.set_num_threads(threads)


# One replica per model and a quarter of a CPU each: the six deployments here fit the 4 CPUs of the test cluster.
SMALL_REPLICA = DeploymentOptions(num_cpus=0.25, max_ongoing_requests=8)
TEST_OPTIONS = ServingOptions({kind: SMALL_REPLICA for kind in KINDS}, {})


@pytest.fixture(scope="module")
def remote(cluster, ray_settings: Settings):
    manager = serving.RayManager(ray_settings, options=TEST_OPTIONS)
    yield manager
    manager.unload_all()


def both(local, remote, spec):
    return local.get(spec), remote.get(spec)


def images(*names: str):
    return [decode_image((SAMPLES / name).read_bytes(), name) for name in names]


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image.image) for image in result.images]


def test_hot_dog_page_path_matches_the_local_backend(local, remote):
    here, served = both(local, remote, MODELS["hotdog"])
    assert isinstance(served.obj, serving.ServedModel) and not isinstance(here.obj, serving.ServedModel)
    batch = images("hot-dog.png", "salad.png", "beach.png")
    ours, theirs = local.classify_images(here, batch), remote.classify_images(served, batch)
    assert theirs.results == ours.results
    assert (theirs.device, theirs.dtype, theirs.model_title, theirs.is_standin) == (ours.device, ours.dtype, ours.model_title, True)
    assert remote.wait_for_compiles(served, 5)  # what benchmarks wait on; on the CPU nothing is compiled


def test_imagenet_top_k_and_grad_cam_match_the_local_backend(local, remote):
    here, served = both(local, remote, MODELS["resnet50"])
    batch = images("hot-dog.png", "beach.png")
    assert remote.classify(served, batch, 3).results == local.classify(here, batch, 3).results
    assert [len(r.scores) for r in remote.classify(served, batch, 7).results] == [7, 7]
    ours, theirs = local.grad_cam(here, batch[0], 934), remote.grad_cam(served, batch[0], 934)
    assert (theirs.class_label, theirs.layer) == (ours.class_label, ours.layer)
    np.testing.assert_array_equal(theirs.heatmap, ours.heatmap)


def test_sentiment_one_text_many_lines_and_attributions_match_the_local_backend(local, remote):
    here, served = both(local, remote, MODELS["sentiment"])
    # What the page reads of the model: the replica's description is the local one's.
    assert (served.info.max_tokens, served.info.labels, served.info.dtype_name) == (here.info.max_tokens, here.info.labels, here.info.dtype_name)
    assert served.info.tokenizer.model_max_length == here.info.tokenizer.model_max_length
    assert remote.score_texts(served, ["what a lovely day"]).result(0, "x") == local.score_texts(here, ["what a lovely day"]).result(0, "x")
    lines = ["great film", "terrible service and cold food", "ok " * 600]  # the last one is cut to the model's limit
    ours, theirs = local.score_texts(here, lines), remote.score_texts(served, lines)
    np.testing.assert_array_equal(theirs.probabilities, ours.probabilities)
    np.testing.assert_array_equal(theirs.truncated, ours.truncated)
    assert theirs.labels == ours.labels and theirs.max_tokens == ours.max_tokens
    assert remote.explain(served, "great film", sentiment.INTEGRATED_GRADIENTS, 4, None) == local.explain(here, "great film", sentiment.INTEGRATED_GRADIENTS, 4, None)


def test_sentiment_file_job_reports_progress_across_the_boundary(local, remote, monkeypatch):
    texts = [f"text number {i} is {'good' if i % 2 else 'bad'}" for i in range(300)]
    job = Job(held_for_the_run(remote, MODELS["sentiment"], True, lambda model, context: remote.score_texts(model, texts, context)), "scoring")
    assert job.wait(WAIT_S)
    snapshot = job.snapshot()
    assert snapshot.state is JobState.DONE and snapshot.done == snapshot.total == 300
    np.testing.assert_array_equal(job.result.probabilities, local.score_texts(local.get(MODELS["sentiment"]), texts).probabilities)


def test_concurrent_sessions_are_batched_and_each_gets_its_own_answer(local, remote):
    here, served = both(local, remote, MODELS["hotdog"])
    batches = [images("hot-dog.png"), images("salad.png", "beach.png"), [], images("beach.png")]
    expected = [local.classify_images(here, batch).results if batch else None for batch in batches]
    answers: list = [None] * len(batches)

    def ask(index: int) -> None:
        try:
            answers[index] = remote.classify_images(served, batches[index]).results
        except BadInputError as error:
            answers[index] = error

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert isinstance(answers[2], BadInputError)  # the empty request's typed error reaches only its caller
    # Each caller gets its own images' answers. Requests Serve put in one pass ran other matrix shapes than alone,
    # which moves a probability in its last float32 bits (3e-8 seen): labels exact, scores to 1e-6.
    for i in (0, 1, 3):
        assert [(r.name, [s.label for s in r.scores]) for r in answers[i]] == [(r.name, [s.label for s in r.scores]) for r in expected[i]]
        np.testing.assert_allclose([s.score for r in answers[i] for s in r.scores], [s.score for r in expected[i] for s in r.scores], atol=1e-6)


def test_text_to_image_matches_the_local_backend(local, remote):
    here, served = both(local, remote, MODELS["sd15"])
    settings = GenerationSettings(prompt="a red bicycle", width=64, height=64, steps=3, seed=1234, num_images=2)
    # What the generation page reads: the replica's description (tokenizer, components) is the local one's.
    assert sd_settings.prompt_usage(served.info, "a (red) bicycle") == sd_settings.prompt_usage(here.info, "a (red) bicycle")
    assert sd_settings.estimate_memory(served.info, settings) == sd_settings.estimate_memory(here.info, settings)
    assert served.info.has_safety_checker == here.info.has_safety_checker
    ours, theirs = local.generate(here, settings), remote.generate(served, settings)
    for a, b in zip(pixels(theirs), pixels(ours), strict=True):
        np.testing.assert_array_equal(a, b)
    assert theirs.settings == ours.settings and [i.seed for i in theirs.images] == [1234, 1235]


def test_ddpm_matches_the_local_backend_with_progress(local, remote):
    here, served = both(local, remote, MODELS["ddpm-butterflies"])
    settings = UnconditionalSettings(num_images=4, steps=5, seed=42)
    job = Job(lambda context: remote.generate_unconditional(served, settings, context), "ddpm")
    assert job.wait(WAIT_S)
    snapshot = job.snapshot()
    assert snapshot.state is JobState.DONE and snapshot.done == snapshot.total == 5
    assert snapshot.detail.startswith("step 5 of 5") and snapshot.preview.size == (64, 64)  # the replica's preview
    ours = local.generate_unconditional(here, settings)
    np.testing.assert_array_equal(np.asarray(job.result.grid), np.asarray(ours.grid))


def test_cancel_reaches_the_replica_within_one_step(remote):
    served = remote.get(MODELS["ddpm-butterflies"])
    job = Job(lambda context: remote.generate_unconditional(served, UnconditionalSettings(num_images=1, steps=1000, seed=1), context), "long ddpm")
    wait_for(lambda: job.snapshot().done >= 3, "three steps reported from the replica")
    job.cancel()
    assert job.wait(WAIT_S) and job.snapshot().state is JobState.CANCELLED
    assert job.snapshot().done < 1000

    def cancelled_run_reported():
        return [r for r in remote.replicas() if r.key == "ddpm-butterflies" and r.steps_after_cancel and r.busy == 0]

    report = wait_for(cancelled_run_reported, "the replica to report the cancelled run")[0]
    assert report.steps_after_cancel[-1] <= 1  # the step that was running when the cancel came, at most


def test_a_replica_that_dies_while_loading_is_replaced(cluster, ray_settings, local, tmp_path):
    marker = tmp_path / "crashed-once"

    def crash_once_then_load(spec, source, device, dtype, settings):
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # the replica process dies mid-load, as it would when the node kills it for memory
        return loading.load(spec, source, device, dtype, settings)

    spec = imagenet.spec_for("resnet18")
    manager = serving.RayManager(ray_settings, loader=crash_once_then_load, options=TEST_OPTIONS)
    try:
        served = manager.get(spec)
        assert marker.exists()  # the first replica did die
        batch = images("salad.png")
        assert manager.classify(served, batch, imagenet.DEFAULT_TOP_K).results == local.classify(local.get(spec), batch, imagenet.DEFAULT_TOP_K).results
    finally:
        manager.unload_all()


def test_a_model_that_cannot_be_had_gives_the_typed_error_and_then_the_stand_in(cluster, ray_settings):
    """The page's stand-in offer: the replica's ModelUnavailableError reaches the page with its remedy, the failed
    deployment is removed, and asking again with the stand-in allowed deploys it."""
    manager = serving.RayManager(replace(ray_settings, standin_fallback=False), options=TEST_OPTIONS)
    spec = MODELS["ddpm-cifar10"]
    try:
        with pytest.raises(ModelUnavailableError) as failure:
            manager.get(spec)
        assert failure.value.remedy and manager.status([spec])[0].state is ModelState.FAILED
        assert serving.app_name(spec) not in serve.status().applications
        served = manager.get(spec, allow_standin=True)
        assert served.is_standin and manager.generate_unconditional(served, UnconditionalSettings(num_images=1, steps=2, seed=0)).is_standin
    finally:
        manager.unload_all()


def test_a_killed_replica_is_replaced_and_the_request_sent_again(local, remote):
    here, served = both(local, remote, MODELS["hotdog"])
    batch = images("hot-dog.png")
    expected = local.classify_images(here, batch).results
    (old,) = wait_for(lambda: [r for r in remote.replicas() if r.key == "hotdog"], "the hot dog replica's report")
    replica = ray.get_actor(f"SERVE_REPLICA::{old.app}#ModelServer#{old.replica_id}", namespace="serve")
    ray.kill(replica, no_restart=True)
    assert remote.classify_images(served, batch).results == expected  # routed to the dead replica at first, then sent again
    new = wait_for(lambda: [r for r in remote.replicas() if r.key == "hotdog" and r.replica_id != old.replica_id], "a new replica")
    assert new[0].state is ModelState.READY


def test_status_lists_every_replica_with_its_device_and_memory(local, remote):
    here, _ = both(local, remote, MODELS["hotdog"])
    rows = wait_for(lambda: [r for r in remote.status() if r.key.startswith("hotdog#")], "the hot dog replica's row")
    assert all(r.state is ModelState.READY and r.device.startswith("cpu @ ") and r.memory_bytes == here.memory_bytes for r in rows)
    assert "replica 1 of" in rows[0].title and rows[0].is_standin
    assert any(r.key == "sd14" and r.state is ModelState.NOT_LOADED for r in remote.status())  # never deployed
    assert remote.gpu_budgets() == () and remote.evictions() == ()


def test_cluster_gpu_monitor_shows_each_replicas_card(remote):
    monitor = serving.ClusterGpuMonitor(remote, ttl_s=0)
    assert monitor.snapshot().gpus == () and "no Ray Serve replica runs on a GPU" in monitor.snapshot().unavailable_reason
    card = GpuSnapshot(0, "NVIDIA H100", "GPU-1", 80 * 2**30, 10 * 2**30, 70 * 2**30, 50, 20, 40, 300.0, 700.0, 1800, 1980, 2600, ())
    base = wait_for(lambda: [r for r in remote.replicas() if r.key == "hotdog"], "a replica report")[0]
    board = serving.board()
    for replica_id, reserved in (("gpu-a", 3 * 2**30), ("gpu-b", 5 * 2**30)):  # two replicas on one card of another node
        ray.get(board.put.remote(replace(base, replica_id=replica_id, node_ip="10.0.0.9", gpu=card, torch_reserved_bytes=reserved)))
    try:
        (shown,) = monitor.snapshot().gpus
        assert shown.name == "NVIDIA H100 on 10.0.0.9" and shown.used_bytes == 10 * 2**30
        assert sorted(p.used_bytes for p in shown.processes) == [3 * 2**30, 5 * 2**30]
        assert all("Serve replica gpu-" in p.name for p in shown.processes)
    finally:
        ray.get(board.forget_app.remote(base.app))


def test_the_hot_dog_page_runs_unchanged_on_the_ray_backend(cluster, local, monkeypatch, standin_dir, tmp_path):
    from streamlit.testing.v1 import AppTest

    from core.app_state import get_backend, get_gpu_monitor, get_settings

    deployments = tmp_path / "deployments.toml"
    deployments.write_text("[classifier]\nnum_cpus = 0.25\nmax_replicas = 1\n[sentiment]\nnum_cpus = 0.25\nmax_replicas = 1\n")
    monkeypatch.setenv("DASH_BACKEND", "ray")
    monkeypatch.setenv("DASH_RAY_DEPLOYMENTS", str(deployments))
    monkeypatch.setenv("DASH_STANDIN_DIR", str(standin_dir))
    monkeypatch.setenv("DASH_STANDIN_FALLBACK", "1")
    for cached in (get_settings, get_backend, get_gpu_monitor):
        cached.clear()
    try:
        at = AppTest.from_file(HOME, default_timeout=WAIT_S).run()
        at.switch_page("app_pages/hotdog.py").run()
        at.radio(key="hotdog:source").set_value("Samples").run()  # hot-dog.png is the sample chosen first
        assert not at.exception
        assert isinstance(get_backend(), serving.RayManager)
        expected = local.classify_images(local.get(MODELS["hotdog"]), images("hot-dog.png")).results[0]
        assert at.subheader[0].value == ("🌭 Hot dog!" if expected.top.label == "hot dog" else f"🚫 {expected.top.label.capitalize()}")
        assert [bar.proto.text for bar in at.get("progress")][0] == f"**{expected.top.label}: {expected.top.score:.1%}**"
        at.switch_page("app_pages/vram.py").run()
        assert not at.exception
        models = next(frame.value for frame in at.dataframe if "Running now" in frame.value.columns)  # the models table
        assert any(title.startswith("Hot dog") and "replica 1 of" in title for title in models["Model"])
        # The page's Unload on a replica's row removes the model's deployment, every replica of it.
        row = next(r for r in get_backend().status() if r.key.startswith("hotdog#"))
        assert get_backend().unload(row.key) == row.memory_bytes > 0
        assert serving.app_name(MODELS["hotdog"]) not in serve.status().applications
    finally:
        get_backend().unload_all()
        for cached in (get_settings, get_backend, get_gpu_monitor):
            cached.clear()


def test_requests_queued_beyond_the_target_scale_a_deployment_out_to_its_maximum(cluster, ray_settings, local):
    """Serve's autoscaling on queue length, reacting within seconds (Serve's defaults wait 30 s to add a replica): with
    one request in flight per replica as the target, four long runs at once bring a second replica."""
    spec = replace(MODELS["ddpm-butterflies"], key="ddpm-autoscaling")  # its own application, beside the module's
    local.get(spec, allow_standin=True)  # the stand-in built before either replica looks for it
    quick = DeploymentOptions(num_cpus=0.25, min_replicas=1, max_replicas=2, target_ongoing_requests=1, max_ongoing_requests=2,
                              upscale_delay_s=0, metrics_interval_s=0.2, look_back_period_s=1)
    manager = serving.RayManager(ray_settings, options=ServingOptions({kind: quick for kind in KINDS}, {}))
    jobs = []
    try:
        served = manager.get(spec, allow_standin=True)
        assert len([r for r in manager.replicas() if r.key == spec.key]) == 1
        long_run = UnconditionalSettings(num_images=1, steps=1000, seed=7)
        jobs = [Job(lambda context: manager.generate_unconditional(served, long_run, context), f"long ddpm {i}") for i in range(4)]
        wait_for(lambda: len({r.replica_id for r in manager.replicas() if r.key == spec.key}) == 2, "a second replica", timeout_s=90)
    finally:
        for job in jobs:
            job.cancel()
        assert all(job.wait(WAIT_S) for job in jobs)
        manager.unload_all()


@pytest.mark.gpu
def test_on_a_gpu_replicas_hold_the_card_and_answer_as_the_local_backend(cluster, ray_settings, local):
    """On the GPU machine (Ray from scripts/pack_ray_for_device.sh): a replica with a quarter of the card loads the
    hot dog model in fp16 there, answers as the local backend does on the same card, and the VRAM views show it."""
    manager = serving.RayManager(ray_settings, options=ServingOptions({kind: replace(SMALL_REPLICA, num_gpus=0.25) for kind in KINDS}, {}))
    try:
        here, served = local.get(MODELS["hotdog"]), manager.get(MODELS["hotdog"])
        assert served.device.type == "cuda" and served.dtype == here.dtype == torch.float16
        batch = images("hot-dog.png", "salad.png")
        ours, theirs = local.classify_images(here, batch), manager.classify_images(served, batch)
        assert [r.top.label for r in theirs.results] == [r.top.label for r in ours.results]
        for mine, yours in zip(ours.results, theirs.results, strict=True):
            np.testing.assert_allclose([s.score for s in yours.scores], [s.score for s in mine.scores], atol=1e-3)  # fp16 on one card
        (row,) = wait_for(lambda: [r for r in manager.status() if r.key.startswith("hotdog#")], "the GPU replica's row")
        assert row.device.startswith("cuda:0 @ ") and row.memory_bytes == here.memory_bytes
        (card,) = serving.ClusterGpuMonitor(manager, ttl_s=0).snapshot().gpus
        replica = next(p for p in card.processes if "Hot dog" in p.name)
        assert replica.used_bytes and replica.used_bytes >= here.memory_bytes  # torch reserved in the replica
    finally:
        manager.unload_all()


CONNECT_FROM_A_SCRIPT_THREAD = """
import threading
from core.backends import ray_client as serving
from core.config import Settings
from core.models.registry import MODELS

settings = Settings(backend="ray", standin_fallback=True, standin_dir=__import__("pathlib").Path({standin_dir!r}))
manager = serving.RayManager(settings)
first = threading.Thread(target=lambda: manager.get(MODELS["hotdog"]))  # a Streamlit rerun: connects, deploys, ends
first.start()
first.join()
later = threading.Thread(target=lambda: print("replicas", len(manager.replicas())))  # the next rerun, or the sampler
later.start()
later.join(60)
print("hung" if later.is_alive() else "answered", flush=True)
__import__("os")._exit(0)
"""


def test_ray_keeps_answering_after_the_thread_that_connected_has_ended(standin_dir, local):
    """Streamlit connects from a script thread that ends with its rerun; Ray's control calls (the replica board)
    hung after that until the connection got a thread of its own. A process of its own: Ray connects once per process."""
    import subprocess
    import sys

    local.get(MODELS["hotdog"])  # the stand-in is built before the replica looks for it
    script = CONNECT_FROM_A_SCRIPT_THREAD.format(standin_dir=str(standin_dir))
    done = subprocess.run([sys.executable, "-c", script], cwd=serving.PROJECT_ROOT, capture_output=True, text=True, timeout=WAIT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "answered" in done.stdout and "replicas 1" in done.stdout, done.stdout + done.stderr[-2000:]
