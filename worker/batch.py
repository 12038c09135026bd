"""One denoising loop for many samples: the batch generation function.

A batch is a list of samples that share a compatibility key (mode, size, steps, and for img2img
the start step); they may differ in prompt, negative prompt, seed, guidance scale and compel use.
Each sample starts from its own CPU generator seeded with its seed, and guidance is applied per
sample, so a sample's image does not depend on its batch mates (up to kernel rounding).

It reads like diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline `__call__`,
and for a single job gives their images (tests/test_batch.py checks it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from worker.pipeline import LoadedModel


@dataclass(frozen=True)
class CompatKey:
    """What samples must share to run in one denoising loop (the model is the worker's own)."""

    mode: str  # txt2img | img2img
    width: int
    height: int
    steps: int
    start_step: int = 0  # img2img: the first of `steps` scheduler steps that runs

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.mode}-{self.width}x{self.height}-{self.steps}s-from{self.start_step}"


def start_step(steps: int, strength: float) -> int:
    """img2img's first step, as diffusers computes it: strength 1 starts at 0, strength 0 never starts."""
    return steps - min(int(steps * strength), steps)


def compat_key(params: dict[str, Any], img2img: bool) -> CompatKey:
    steps = params["num_inference_steps"]
    if img2img:
        return CompatKey("img2img", params["width"], params["height"], steps, start_step(steps, params["strength"]))
    return CompatKey("txt2img", params["width"], params["height"], steps)


@dataclass(frozen=True)
class Prompt:
    text: str
    negative: str
    use_compel: bool


@dataclass
class Sample:
    """One image to make: image `index` of job `job_id`."""

    job_id: str
    index: int
    seed: int
    prompt: Prompt
    guidance_scale: float
    init_image: Image.Image | None = field(default=None, repr=False)


def job_samples(job_id: str, params: dict[str, Any], seed: int, init_image: Image.Image | None) -> list[Sample]:
    """A job's samples: image i from seed + i, all with the job's prompt and guidance."""
    prompt = Prompt(params["prompt"], params["negative_prompt"], params["use_compel"])
    return [Sample(job_id, i, seed + i, prompt, params["guidance_scale"], init_image) for i in range(params["num_images"])]


@dataclass
class Conditioning:
    embeds: torch.Tensor  # [1, tokens, dim]
    negative_embeds: torch.Tensor  # [1, tokens, dim]

    @property
    def tokens(self) -> int:
        return int(self.embeds.shape[1])


class ConditioningCache:
    """Text embeddings by prompt: a prompt repeated across jobs or batches is encoded once."""

    def __init__(self, model: LoadedModel, capacity: int = 256):
        self.model = model
        self.capacity = capacity
        self._cache: dict[Prompt, Conditioning] = {}

    def get(self, prompts: list[Prompt]) -> list[Conditioning]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        plain = [p for p in missing if not p.use_compel]
        if plain:
            for prompt, conditioning in zip(plain, encode_plain(self.model, plain)):
                self._store(prompt, conditioning)
        for prompt in (p for p in missing if p.use_compel):
            self._store(prompt, encode_compel(self.model, prompt))
        return [self._cache[p] for p in prompts]

    def _store(self, prompt: Prompt, conditioning: Conditioning) -> None:
        if len(self._cache) >= self.capacity:
            self._cache.pop(next(iter(self._cache)))  # the oldest entry
        self._cache[prompt] = conditioning


@torch.inference_mode()
def encode_plain(model: LoadedModel, prompts: list[Prompt]) -> list[Conditioning]:
    """CLIP embeddings of prompts and negatives as diffusers' encode_prompt makes them (77 tokens)."""
    pipe = model.txt2img
    texts = [p.text for p in prompts] + [p.negative for p in prompts]
    ids = pipe.tokenizer(
        texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(model.device)
    hidden = pipe.text_encoder(ids)[0].to(model.dtype)
    n = len(prompts)
    return [Conditioning(hidden[i : i + 1], hidden[n + i : n + i + 1]) for i in range(n)]


@torch.inference_mode()
def encode_compel(model: LoadedModel, prompt: Prompt) -> Conditioning:
    """compel's weighted embeddings; longer prompts give more than 77 tokens, negative padded alike."""
    result = model.compel()(prompt.text, negative_prompt=prompt.negative)
    return Conditioning(result.embeds.to(model.dtype), result.negative_embeds.to(model.dtype))


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] NCHW -> HWC uint8, rounding as diffusers' image processor does."""
    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return list((array * 255).round().astype("uint8"))


# Stand-in for the UNet call: tests wrap it to simulate a CUDA out-of-memory error.
UnetCall = Callable[..., torch.Tensor]


@torch.inference_mode()
def generate_batch(
    model: LoadedModel,
    key: CompatKey,
    samples: list[Sample],
    conditioning: list[Conditioning],
    unet_call: UnetCall | None = None,
) -> list[np.ndarray]:
    """The images of `samples`, in order, as HxWx3 uint8 arrays."""
    pipe = model.txt2img
    device, dtype = model.device, model.dtype
    unet_call = unet_call or pipe.unet

    # 1. check inputs
    if not samples or len(samples) != len(conditioning):
        raise ValueError(f"a batch needs one conditioning per sample, got {len(samples)} and {len(conditioning)}")
    if len({c.tokens for c in conditioning}) != 1:
        raise ValueError("samples of one batch must have conditioning of one length")
    if (key.mode == "img2img") != all(s.init_image is not None for s in samples):
        raise ValueError(f"batch {key}: every img2img sample needs an input image, and only those")
    n = len(samples)

    # 2. text conditioning: unconditional first, as diffusers concatenates it
    prompt_embeds = torch.cat([c.negative_embeds for c in conditioning] + [c.embeds for c in conditioning]).to(device)
    guidance = torch.tensor([s.guidance_scale for s in samples], device=device, dtype=dtype).view(n, 1, 1, 1)

    # 3. timesteps, on a scheduler of this batch's own (schedulers keep a step index)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(key.steps, device=device)
    timesteps = scheduler.timesteps[key.start_step * scheduler.order :]
    if key.mode == "img2img" and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(key.start_step * scheduler.order)

    # 4. initial latents: one CPU generator per sample
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in samples]
    shape = (1, pipe.unet.config.in_channels, key.height // pipe.vae_scale_factor, key.width // pipe.vae_scale_factor)
    if key.mode == "txt2img":
        latents = torch.cat([randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators])
        latents = latents * scheduler.init_noise_sigma
    else:
        init = []
        for sample, generator in zip(samples, generators):
            pixels = pipe.image_processor.preprocess(sample.init_image).to(device=device, dtype=dtype)
            init.append(retrieve_latents(pipe.vae.encode(pixels), generator=generator))
        init_latents = pipe.vae.config.scaling_factor * torch.cat(init)
        noise = torch.cat([randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators])
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(n))

    # 5. denoising loop, classifier-free guidance applied per sample
    for t in timesteps:
        latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet_call(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    # 6. decode
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return to_uint8(images)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
