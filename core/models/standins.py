"""Stand-in models: tiny, random-weight models saved in real Hub layout.

They let every page run with no Hub access, through exactly the same loading code as the real models.
Their outputs mean nothing, and every page says so. Built in about a second on the CPU, cached on disk.
"""
from __future__ import annotations

import shutil
import string
import tempfile
import threading
from pathlib import Path

import torch

from core.models.registry import Family, ModelSpec

STANDIN_SEED = 0  # fixed, so a stand-in gives the same outputs on every machine
_build_lock = threading.Lock()


def ensure_built(spec: ModelSpec, root: Path) -> Path:
    """The stand-in folder for `spec`'s kind of model (one per family and task), built on first use."""
    folder = root / f"{spec.family.name.lower()}-{spec.task}"
    with _build_lock:
        if (folder / ".complete").exists():
            return folder
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        try:
            torch.manual_seed(STANDIN_SEED)
            _BUILDERS[(spec.family, spec.task)](spec, building)
            (building / ".complete").write_text("random weights, built by core.models.standins\n")
            shutil.rmtree(folder, ignore_errors=True)
            building.rename(folder)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return folder


def _labels(spec: ModelSpec) -> dict[int, str]:
    return dict(enumerate(spec.standin_labels or ("LABEL_0", "LABEL_1")))


def build_image_classifier(spec: ModelSpec, folder: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    id2label = _labels(spec)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=224, patch_size=16, id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


# A small uncased WordPiece vocabulary: whole words for common text, then single characters and
# '##' pieces so that any text still tokenises (unknown words split into letters rather than [UNK]).
_COMMON_WORDS = (
    "the a an and or but not no is was are were be been it this that i you he she we they my your "
    "good great bad terrible love hate like movie film great awful best worst really very so too "
    "happy sad fun boring nice fine ok well amazing poor excellent horrible wonderful loved hated"
).split()


def _wordpiece_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    return specials + chars + pieces + [w for w in dict.fromkeys(_COMMON_WORDS) if w not in chars]


def build_text_classifier(spec: ModelSpec, folder: Path) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

    vocab = _wordpiece_vocab()
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = DistilBertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(folder)
    id2label = _labels(spec)
    config = DistilBertConfig(
        vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=512,
        id2label=id2label, label2id={v: k for k, v in id2label.items()}, pad_token_id=0,
    )
    DistilBertForSequenceClassification(config).save_pretrained(folder)


# A hubconf.py in the layout torch.hub.load(..., source="local") reads: one entry point per torchvision
# classification model, returning the full architecture with random weights (seeded for repeatability).
_HUBCONF = '''"""Stand-in torch.hub repo: torchvision architectures with random weights (no download)."""
import torch
import torchvision

dependencies = ["torch", "torchvision"]


def _random_weights(name):
    def entry(weights=None, **kwargs):
        torch.manual_seed({seed})
        return torchvision.models.get_model(name, weights=None, **kwargs)

    entry.__name__ = name
    return entry


{entries}
'''


def build_torch_hub_repo(spec: ModelSpec, folder: Path) -> None:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    entries = "\n".join(f"{name} = _random_weights({name!r})" for name in names)
    (folder / "hubconf.py").write_text(_HUBCONF.format(seed=STANDIN_SEED, entries=entries))


def clip_tokenizer_files(folder: Path) -> None:
    """A CLIP BPE vocabulary of single characters: enough to tokenise any prompt, and tiny."""
    import json

    letters = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab_tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab_tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_stable_diffusion(spec: ModelSpec, folder: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    clip_tokenizer_files(folder)
    # A bare vocab/merges tokenizer reports an enormous model_max_length and the pipeline overflows: pin CLIP's 77.
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    # The real SD 1.x scheduler settings, so sampler behaviour matches the real models.
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    for leftover in ("vocab.json", "merges.txt"):
        (folder / leftover).unlink()


def build_ddpm(spec: ModelSpec, folder: Path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")).save_pretrained(folder)


_BUILDERS = {
    (Family.TRANSFORMERS, "image-classification"): build_image_classifier,
    (Family.TRANSFORMERS, "text-classification"): build_text_classifier,
    (Family.TORCH_HUB, "imagenet-classification"): build_torch_hub_repo,
    (Family.DIFFUSERS, "text-to-image"): build_stable_diffusion,
    (Family.DIFFUSERS, "unconditional-image-generation"): build_ddpm,
}
