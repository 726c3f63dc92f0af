"""core.models.cache_fill: which files it fetches, where it puts them, and the offline round trip with stand-in models."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from core.config import Settings
from core.models import cache_fill, loading, standins
from core.models.cache_fill import select_files
from core.models.manager import ModelManager
from core.models.registry import MODELS, ModelSpec

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SECRET = "hf_cache_fill_secret_0123456789"
COMMIT = "0" * 40  # a snapshot's name in the Hub cache is the commit it was taken at


class StandinHub:
    """A Hub that serves each model's stand-in, written where the real one writes (Hub cache layout, TORCH_HOME)."""

    def __init__(self, standin_dir: Path, cache_root: Path, fail_repo: str | None = None) -> None:
        self.standin_dir = standin_dir
        self.hf_cache = cache_root / "huggingface" / "hub"
        self.torch_hub_dir = cache_root / "torch" / "hub"
        self.fail_repo = fail_repo
        self.tokens_seen: list[str | None] = []

    def _standin(self, repo_id: str) -> Path:
        spec = next(spec for spec in MODELS.values() if spec.repo_id == repo_id)
        return standins.ensure_built(spec, self.standin_dir)

    def list_files(self, repo_id: str, revision: str, token: str | None) -> list[str]:
        self.tokens_seen.append(token)
        folder = self._standin(repo_id)
        return [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]

    def download(self, repo_id: str, revision: str, files: tuple[str, ...], token: str | None, local_dir: Path | None) -> Path:
        if repo_id == self.fail_repo:  # as a library might: the request, header and all, in the message
            raise RuntimeError(f"403 Forbidden for {repo_id} (Authorization: Bearer {token})")
        repo_cache = self.hf_cache / f"models--{repo_id.replace('/', '--')}"
        target = local_dir or repo_cache / "snapshots" / COMMIT
        for name in files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self._standin(repo_id) / name, target / name)
        if local_dir is None:
            (repo_cache / "refs").mkdir(exist_ok=True)
            (repo_cache / "refs" / revision).write_text(COMMIT)
        return target

    def fetch_torch_hub(self, spec: ModelSpec) -> tuple[str, ...]:
        """The repo (the stand-in's hubconf, which builds random weights) and, as the real fill does, the weights'
        checkpoint where torch.hub keeps downloads, so that a load finds it within reach offline."""
        name = loading.torch_hub_dir_name(spec)
        shutil.copytree(standins.ensure_built(spec, self.standin_dir), self.torch_hub_dir / name, dirs_exist_ok=True)
        checkpoint = Path("checkpoints") / Path(urlsplit(loading._hub_weights(spec, allow_pickle=False).url).path).name
        (self.torch_hub_dir / checkpoint).parent.mkdir(parents=True, exist_ok=True)
        (self.torch_hub_dir / checkpoint).write_bytes(b"never read: the stand-in hubconf ignores weights")
        return (name, checkpoint.as_posix())


def test_a_bin_only_repo_gets_its_bin_and_nothing_else():
    listing = ["config.json", "preprocessor_config.json", "pytorch_model.bin", "training_args.bin", "README.md",
               "runs/events.out.tfevents", "images/hot_dog/1.jpg", ".gitattributes"]
    assert select_files(MODELS["hotdog"], listing) == ("config.json", "preprocessor_config.json", "pytorch_model.bin")


def test_safetensors_win_over_bin_and_other_frameworks_are_left():
    listing = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "rust_model.ot", "flax_model.msgpack",
               "onnx/model.onnx", "onnx/config.json", "tokenizer_config.json", "vocab.txt", "map.jpeg", "README.md"]
    assert select_files(MODELS["sentiment"], listing) == ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt")


def test_a_diffusers_repo_gets_each_component_without_variants_or_root_checkpoints():
    listing = [
        "model_index.json", "README.md", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
        "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
        "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
        "safety_checker/config.json", "safety_checker/pytorch_model.bin",  # an older component with only a .bin
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ]
    assert select_files(MODELS["sd15"], listing) == tuple(sorted([
        "model_index.json", "README.md", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
        "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
        "safety_checker/config.json", "safety_checker/pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ]))


def test_torch_hub_models_are_not_hub_repos():
    with pytest.raises(ValueError, match="torch.hub"):
        select_files(MODELS["resnet50"], ["hubconf.py"])
    assert loading.torch_hub_dir_name(MODELS["resnet50"]) == "pytorch_vision_v0.29.1"  # torch.hub's own folder name


def test_the_real_client_passes_the_selection_and_the_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import huggingface_hub

    calls: dict[str, dict] = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: calls.setdefault("list", kw) and ["config.json"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.setdefault("download", kw) and str(tmp_path))
    client = cache_fill.HubClient()
    assert client.list_files("a/b", "main", SECRET) == ["config.json"]
    client.download("a/b", "main", ("config.json",), SECRET, None)
    assert calls["list"] == {"revision": "main", "token": SECRET}
    assert calls["download"]["allow_patterns"] == ["config.json"] and calls["download"]["token"] == SECRET
    assert calls["download"]["cache_dir"] == client.hf_cache and calls["download"]["local_dir"] is None


def test_models_root_round_trip_loads_real_not_standin(standin_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    keys = ["hotdog", "sentiment", "sd15", "ddpm-butterflies"]
    root = tmp_path / "models"
    hub = StandinHub(standin_dir, tmp_path / "cache")
    assert cache_fill.main([*keys, "--models-root", str(root)], hub=hub) == 0
    output = capsys.readouterr().out
    assert "Fetched 4 of 4 models" in output and "DASH_MODELS_ROOT" in output
    assert (root / MODELS["sd15"].repo_id / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # No stand-in can be built here, so a load that worked read the filled folders.
    manager = ModelManager(Settings(models_root=root, standin_dir=tmp_path / "no-standins", device="cpu"))
    for key in keys:
        model = manager.get(MODELS[key])
        assert not model.is_standin and model.source.location == str(root / MODELS[key].repo_id)
    assert not (tmp_path / "no-standins").exists()


_LOAD_OFFLINE = """
import sys
from core.config import Settings
from core.models.manager import ModelManager
from core.models.registry import MODELS

manager = ModelManager(Settings.from_env())
for key in sys.argv[1:]:
    model = manager.get(MODELS[key])
    print(key, "standin" if model.is_standin else "real", model.source.label)
"""


def test_hub_cache_round_trip_with_hub_offline(standin_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The app's own loading, in a fresh process as on the offline machine: HF_HOME, TORCH_HOME and HF_HUB_OFFLINE=1."""
    keys = ["hotdog", "resnet50", "sentiment", "sd15", "ddpm-butterflies"]
    cache = tmp_path / "cache"
    assert cache_fill.main(keys, hub=StandinHub(standin_dir, cache)) == 0
    assert "Fetched 5 of 5 models" in capsys.readouterr().out

    env = {name: value for name, value in os.environ.items() if not name.startswith(("DASH_", "HF_", "TORCH_HOME"))}
    env.update(HF_HOME=str(cache / "huggingface"), TORCH_HOME=str(cache / "torch"), HF_HUB_OFFLINE="1",
               DASH_STANDIN_DIR=str(tmp_path / "no-standins"), DASH_DEVICE="cpu")
    done = subprocess.run([sys.executable, "-c", _LOAD_OFFLINE, *keys], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[key, "real"] for key in keys]
    assert all("Hub: " in line for line in lines)  # from the cache by repo id, not from a local folder
    assert not (tmp_path / "no-standins").exists()


def test_a_failing_model_is_reported_without_the_token_and_the_rest_still_come(
    standin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = StandinHub(standin_dir, tmp_path / "cache", fail_repo=MODELS["sentiment"].repo_id)
    assert cache_fill.main(["hotdog", "sentiment", "ddpm-butterflies"], hub=hub) == 1
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert "sentiment" in captured.out and "FAILED" in captured.out and "[token hidden]" in captured.out
    assert "Fetched 2 of 3 models" in captured.out and "reaches huggingface.co" in captured.out
    assert hub.tokens_seen == [SECRET] * 3  # the token reached the Hub calls, and only them


def test_refuses_to_run_with_hub_offline_and_unknown_keys(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cache_fill.main(["hotdog"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        cache_fill.main(["hotdgo"])
    assert caught.value.code == 2 and "hotdgo" in capsys.readouterr().err
