"""Helpers for browser tests (imported by test modules; fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def screenshot(tab, name: str, settle: bool = True) -> Path:
    """Full-page screenshot under artifacts/screenshots/, for people to look at.

    With `settle`, waits for the run and every image and grows the window to the page first: Streamlit scrolls inside
    its own container, so a full-page screenshot of a short window would cut the page off. Without it, the page is
    taken as it is now (a run in progress).
    """
    if settle:
        _settle(tab)
    path = ARTIFACTS / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(path), full_page=True)
    return path


def _settle(tab) -> None:
    wait_for_app_idle(tab)
    tab.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')].every(img => img.complete && img.naturalWidth > 0)"
    )
    height = tab.evaluate(
        "() => Math.max(...[...document.querySelectorAll('[data-testid=\"stMain\"], [data-testid=\"stMainBlockContainer\"]')]"
        ".map(e => e.scrollHeight))"
    )
    tab.set_viewport_size({"width": 1400, "height": min(max(int(height) + 80, 1000), 6000)})
    wait_for_app_idle(tab)


def wait_for_app_idle(tab, timeout_ms: int = 60_000) -> None:
    """Streamlit shows its status widget ("Running…", with a Stop button) while a script runs; wait until it is gone."""
    tab.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
    tab.wait_for_function(
        """() => {
            const status = document.querySelector('[data-testid="stStatusWidget"]');
            return !status || !/Running|Stop/.test(status.innerText);
        }""",
        timeout=timeout_ms,
    )


def make_standin_lora(base_folder: Path, out_folder: Path, seed: int = 0, cross_attention_dim: int | None = None) -> Path:
    """A LoRA for the stand-in SD UNet in `base_folder`, saved as diffusers saves one (pytorch_lora_weights.safetensors).

    peft's default init makes B zero (a LoRA that changes nothing), so the weights are random. With another
    `cross_attention_dim` it is a LoRA for another base model, whose shapes do not fit.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    config = UNet2DConditionModel.load_config(base_folder / "unet")
    if cross_attention_dim is not None:
        config = {**config, "cross_attention_dim": cross_attention_dim}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(out_folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return out_folder / "pytorch_lora_weights.safetensors"


class DeviceHolder:
    """Pass `holder.abandoned` as a run's `abandoned` callback: the run then holds the device at its first step,
    `running` is set, and it goes on once `release` is set (a run on the GPU that others must wait for)."""

    def __init__(self, wait_s: float = 60) -> None:
        import threading

        self.running, self.release, self.wait_s = threading.Event(), threading.Event(), wait_s

    def abandoned(self) -> bool:
        self.running.set()
        assert self.release.wait(self.wait_s)
        return False


def wait_for_generation_runs(at, timeout_s: float) -> list[int]:
    """Wait until every run the generation page's AppTest session queued has ended; their job ids, oldest first.
    (The page collects them into its gallery at its next run.)"""
    from core.app_state import get_job_board

    job_ids = list(at.session_state["generate:runs"])
    assert job_ids, "no run was queued"
    for job_id in job_ids:
        assert get_job_board().wait(job_id, timeout_s)
    return job_ids


def sentiment_with_spread_weights(manager):
    """The stand-in sentiment model with larger random weights: its default init scores every text about 0.502, so a
    row-order mistake could hide; these give texts clearly different scores."""
    import torch

    from core.models.registry import MODELS

    loaded = manager.get(MODELS["sentiment"], allow_standin=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in loaded.obj.model.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    return loaded
