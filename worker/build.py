"""Build SD 2.1-architecture pipelines with random weights, offline, and save them.

`tiny` is a few MB: the same kinds of parts as SD 2.1 768-v (v-prediction scheduler, linear-
projection attention, an OpenCLIP-style CLIP text encoder with gelu, a byte-level CLIP
tokenizer made here) at toy widths, for tests and the demo. `sd21-arch` is the full-size
architecture (UNet 866M parameters): the same FLOPs as the real weights, for benchmarks.
Both are saved with `save_pretrained`, so they load through the same `from_pretrained` path as
real weights. Their images are noise: they never stand in for real weights silently.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler,
                       StableDiffusionDepth2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionUpscalePipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, DPTConfig, DPTForDepthEstimation

from worker.pipeline import depth_processor_class

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

CONFIGS = {
    "tiny": {
        "unet": dict(
            # Attention on the two coarser levels only: at 768 px the finest level has 9216
            # tokens, and full self-attention there would make the tiny model slow on a CPU.
            block_out_channels=(32, 64, 64),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            sample_size=96,
        ),
        # Four VAE levels: the latent is 1/8 of the image side, as in SD 2.1.
        "vae": dict(
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=768,
        ),
        "text_encoder": dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
        ),
    },
    "sd21-arch": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            sample_size=96,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=768,
        ),
        "text_encoder": dict(
            hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
        ),
    },
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer: 256 byte symbols, the same with `</w>`, then BOS and EOS."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + [BOS, EOS])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, bos_token=BOS, eos_token=EOS,
                         unk_token=EOS, pad_token=EOS)


# The variants of an architecture: `KIND-VARIANT` ("tiny-inpainting", "sd21-arch-inpainting").
# Inpainting (as stable-diffusion-2-inpainting): the UNet takes 9 channels, the latents with the
# mask and the masked image's latents.
# The x4 upscaler (as stable-diffusion-x4-upscaler): the UNet takes 7 channels, the latents with
# the noised low-resolution image, and the noise level as its class label (1000 classes); a VAE of
# three levels (latents 1/4 of the output's side, the input's size); DDIM with v-prediction, and a
# DDPM schedule that noises the input. Its full-size UNet is the checkpoint's, not SD 2.1's.
# Depth-to-image (as stable-diffusion-2-depth): the UNet takes 5 channels, the latents with the
# depth map at latent size; a DPT depth estimator and its image processor ship beside (DEPTH).
VARIANTS: dict[str, tuple[type, dict]] = {
    "": (StableDiffusionPipeline, {}),
    "inpainting": (StableDiffusionInpaintPipeline, {"in_channels": 9}),
    "upscaler": (StableDiffusionUpscalePipeline, {"in_channels": 7, "out_channels": 4, "num_class_embeds": 1000}),
    "depth": (StableDiffusionDepth2ImgPipeline, {"in_channels": 5, "out_channels": 4}),
}
UPSCALER = {
    # Attention at the coarsest level only: its latents are the input's size, up to 256x256.
    "tiny": {"unet": dict(down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
             "vae": dict(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                                     up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333)},
    "sd21-arch": {
        "unet": dict(
            block_out_channels=(256, 512, 512, 1024),
            attention_head_dim=8,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
            only_cross_attention=(True, True, True, False),
            sample_size=128,
        ),
        "vae": dict(block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333),
    },
}
MAX_NOISE_LEVEL = 350
# The depth estimators: (DPTConfig, the image processor's input side). sd21-arch's is shaped as the
# checkpoint's (Intel's DPT-Hybrid: a BiT backbone under a 12-layer ViT-Base, 384 px, 123M
# parameters). tiny's is a 2-layer ViT of width 32 at 64 px, tens of milliseconds on a CPU; its
# weights are drawn wider than DPT's default (0.02), with which the random head's output is about
# 1e-9: normalised min..max, that would be rounding noise (and 0 in fp16, a range of 0 to divide by).
DEPTH = {
    "tiny": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=64,
                  patch_size=16, backbone_out_indices=(0, 1), neck_hidden_sizes=(16, 32), reassemble_factors=(2, 1),
                  fusion_hidden_size=16, initializer_range=0.2), 64),
    "sd21-arch": (dict(is_hybrid=True, image_size=384, backbone_out_indices=(2, 5, 8, 11),
                       neck_hidden_sizes=(256, 512, 768, 768), reassemble_factors=(1, 1, 1, 0.5),
                       backbone_featmap_shape=(1, 1024, 24, 24)), 384),
}
KINDS = tuple(f"{base}-{variant}" if variant else base for base in CONFIGS for variant in VARIANTS)


def split_kind(kind: str) -> tuple[str, str]:
    """("tiny", "inpainting") of "tiny-inpainting"; ("sd21-arch", "") of "sd21-arch"."""
    for base in CONFIGS:
        if kind == base:
            return base, ""
        if kind.startswith(base + "-") and kind[len(base) + 1:] in VARIANTS:
            return base, kind[len(base) + 1:]
    raise ValueError(f"{kind!r} is not a buildable model (those are {', '.join(KINDS)})")


def build_pipeline(kind: str, seed: int = 0) -> StableDiffusionPipeline:
    """The pipeline of `kind` (one of KINDS) with seeded random weights, fp32 on the CPU."""
    base, variant = split_kind(kind)
    configs = CONFIGS[base]
    pipeline_class, unet_extra = VARIANTS[variant]
    unet_config, vae_config = dict(configs["unet"]), dict(configs["vae"])
    if variant == "upscaler":
        unet_config.update(UPSCALER[base]["unet"])
        vae_config.update(UPSCALER[base]["vae"])
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config, **unet_extra, use_linear_projection=True,
                                upcast_attention=variant != "upscaler")
    vae = AutoencoderKL(**vae_config)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **configs["text_encoder"],
            vocab_size=len(tokenizer) if base == "tiny" else 49408,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Halve the random weights so that fp16 activations stay finite through the full-size UNet.
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for param in module.parameters():
                if param.dim() > 1:
                    param.mul_(0.5)
    if variant == "upscaler":  # the checkpoint's schedulers (its scheduler_config.json and low_res_scheduler's)
        return StableDiffusionUpscalePipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            low_res_scheduler=DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"),
            scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1),
            safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=MAX_NOISE_LEVEL,
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        steps_offset=1,
        timestep_spacing="leading",
    )
    if variant == "depth":
        config, side = DEPTH[base]
        return StableDiffusionDepth2ImgPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            depth_estimator=DPTForDepthEstimation(DPTConfig(**config)).eval(),
            feature_extractor=depth_processor_class()(size={"height": side, "width": side}, keep_aspect_ratio=False,
                                                      image_mean=[0.5] * 3, image_std=[0.5] * 3),
        )
    return pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


DESCRIBED = {"": "", "inpainting": "inpainting ", "upscaler": "x4 upscaler ", "depth": "depth-to-image "}


def build_and_save(kind: str, folder: Path, seed: int = 0) -> Path:
    """Build `kind` and save it with save_pretrained into `folder`; returns the folder."""
    from worker.pipeline import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    build_pipeline(kind, seed).save_pretrained(folder, safe_serialization=True)
    digest = hashlib.sha256()
    for weights in sorted(folder.rglob("*.safetensors")):
        digest.update(weights.read_bytes())
    (folder / "sdqueue_model.json").write_text(
        json.dumps(
            {
                "name": kind,
                "description": f"{kind}: SD 2.1 {DESCRIBED[split_kind(kind)[1]]}architecture with random "
                               f"weights (seed {seed}), built by sdqueue",
                "random_weights": True,
                "seed": seed,
                "revision": "sha256:" + digest.hexdigest()[:16],
            },
            indent=1,
        )
    )
    return folder
