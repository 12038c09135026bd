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
import math
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from models.errors import JobError
from worker.pipeline import LoadedModel
from worker.samples import CompatKey, Conditioning, Dropped, Prompt, Sample, StepDone, UnetCall


def encode_prompts(model: LoadedModel, prompts: list[Prompt]) -> list[Conditioning]:
    """The text conditioning of each prompt, checked: plain prompts in one encoder call, compel's
    one by one."""
    plain = [p for p in prompts if not p.use_compel]
    encoded = dict(zip(plain, encode_plain(model, plain))) if plain else {}
    for prompt in prompts:
        if prompt.use_compel and prompt not in encoded:
            encoded[prompt] = encode_compel(model, prompt)
    return [check_conditioning(p, encoded[p]) for p in prompts]


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
    from compel import Compel

    for name, text in (("prompt", prompt.text), ("negative_prompt", prompt.negative)):
        try:
            Compel.parse_prompt_string(text)
        except Exception as exc:  # pyparsing's and compel's own, or RecursionError: nested too deep
            reason = "nested too deeply" if isinstance(exc, RecursionError) else f"{type(exc).__name__}: {exc}"
            raise JobError(f"{name} {_short(text)} cannot be parsed by compel ({reason})"[:500],
                           "prompt-unparsable") from None
    result = model.compel()(prompt.text, negative_prompt=prompt.negative)
    return Conditioning(result.embeds.to(model.dtype), result.negative_embeds.to(model.dtype))


def check_conditioning(prompt: Prompt, conditioning: Conditioning) -> Conditioning:
    """A prompt whose embeddings are NaN or infinite would make a black image: its job fails instead."""
    for name, text, embeds in (("prompt", prompt.text, conditioning.embeds),
                               ("negative_prompt", prompt.negative, conditioning.negative_embeds)):
        if not bool(torch.isfinite(embeds).all()):
            hint = " (e.g. a compel blend whose weights are all 0)" if prompt.use_compel else ""
            raise JobError(f"{name} {_short(text)} gives text conditioning that is not finite (NaN or inf){hint}",
                           "conditioning-not-finite")
    return conditioning


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] NCHW -> HWC uint8, rounding as diffusers' image processor does."""
    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return list((array * 255).round().astype("uint8"))


def keep_rows(scheduler: Any, keep: torch.Tensor) -> None:
    """Drop the rows of leaving samples from per-sample state a multistep scheduler keeps."""
    for name in ("model_outputs", "derivatives", "ets"):
        history = getattr(scheduler, name, None)
        if isinstance(history, list):
            setattr(scheduler, name, [h[keep] if isinstance(h, torch.Tensor) and h.dim() > 0 else h for h in history])
    for name in ("sample", "prev_derivative", "dt"):
        value = getattr(scheduler, name, None)
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            setattr(scheduler, name, value[keep])


def _through_a_loop(model: LoadedModel, key: CompatKey, samples: list[Sample], conditioning: list[Conditioning],
                    unet_call: UnetCall | None, dropped: Dropped | None, step_done: StepDone | None) -> list[Any]:
    """A window batch of inpainting, upscaler or depth samples, denoised by the continuous loop's
    code (one loop, all admitted at once: the same steps and strength), which carries each one's
    mask and masked image, noised input and noise level, or depth map."""
    from worker.loop import ContinuousLoop

    loop = ContinuousLoop(model, key.width, key.height, None, unet_call)
    loop.admit(samples, conditioning, key.steps, samples[0].strength)
    results: list[Any] = [None] * len(samples)
    position = {id(s): i for i, s in enumerate(samples)}
    steps, done = key.steps - key.start_step, 0
    while loop.active:
        gone = dropped() if dropped is not None else ()
        if gone:
            loop.drop(gone)
            if not loop.active:
                break
        finished = loop.step()
        done += 1
        if step_done is not None:
            step_done(done, steps, list(dict.fromkeys(s.job_id for s in loop.active + finished)))
        for member, image in zip(finished, loop.decode(finished)):
            results[position[id(member.sample)]] = image
    return results


@torch.inference_mode()
def generate_batch(
    model: LoadedModel,
    key: CompatKey,
    samples: list[Sample],
    conditioning: list[Conditioning],
    unet_call: UnetCall | None = None,
    dropped: Dropped | None = None,
    step_done: StepDone | None = None,
) -> list[Any]:
    """The images of `samples`, in order, as HxWx3 uint8 arrays (a SampleResult each: None for a
    sample that left the loop, a JobError for one whose latents or pixels are not finite)."""
    pipe = model.txt2img
    device, dtype = model.device, model.dtype
    unet_call = unet_call or pipe.unet

    # 1. check inputs
    if not samples or len(samples) != len(conditioning):
        raise ValueError(f"a batch needs one conditioning per sample, got {len(samples)} and {len(conditioning)}")
    if len({c.tokens for c in conditioning}) != 1:
        raise ValueError("samples of one batch must have conditioning of one length")
    if (key.mode in ("img2img", "inpaint", "upscale", "depth")) != all(s.init_image is not None for s in samples):
        raise ValueError(f"batch {key}: every img2img sample needs an input image, and only those")
    if key.mode in ("inpaint", "upscale", "depth"):
        return _through_a_loop(model, key, samples, conditioning, unet_call, dropped, step_done)
    n = len(samples)

    # 2. text conditioning. A sample with guidance 1.0 runs its conditional row only (as diffusers
    #    does: guidance 1 is the conditional prediction); the others also run their unconditional
    #    (negative prompt) row, placed first as diffusers concatenates it.
    negative_embeds = torch.cat([c.negative_embeds for c in conditioning]).to(device)
    text_embeds = torch.cat([c.embeds for c in conditioning]).to(device)
    guidance = torch.tensor([s.guidance_scale for s in samples], device=device, dtype=dtype).view(n, 1, 1, 1)
    guided = torch.tensor([s.guidance_scale > 1.0 for s in samples], device=device)

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

    # 5. denoising loop, classifier-free guidance applied per sample; samples whose jobs must
    #    leave (cancelled, lost) drop their rows at the step boundary. A scheduler of order 2 makes
    #    two model calls a step: progress counts steps, as diffusers' progress bar does.
    alive = list(range(n))  # positions in `samples` of the rows still in the loop
    alive_jobs = list(dict.fromkeys(s.job_id for s in samples))
    steps = math.ceil(len(timesteps) / scheduler.order)
    for call, t in enumerate(timesteps, 1):
        gone = dropped() if dropped is not None else ()
        if gone and any(samples[i].job_id in gone for i in alive):
            keep = [row for row, i in enumerate(alive) if samples[i].job_id not in gone]
            alive = [alive[row] for row in keep]
            if not alive:
                return [None] * n
            alive_jobs = [job_id for job_id in alive_jobs if job_id not in gone]
            rows = torch.tensor(keep, device=latents.device)
            latents, guidance, guided = latents[rows], guidance[rows], guided[rows]
            negative_embeds, text_embeds = negative_embeds[rows], text_embeds[rows]
            keep_rows(scheduler, rows)
        latent_model_input = scheduler.scale_model_input(torch.cat([latents[guided], latents]), t)
        prompt_embeds = torch.cat([negative_embeds[guided], text_embeds])
        noise_pred = unet_call(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        uncond_rows = int(guided.sum())
        noise_uncond, noise_text = noise_pred[:uncond_rows], noise_pred[uncond_rows:]
        noise_pred = noise_text.clone()
        noise_pred[guided] = noise_uncond + guidance[guided] * (noise_text[guided] - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if step_done is not None and (call % scheduler.order == 0 or call == len(timesteps)):
            step_done(math.ceil(call / scheduler.order), steps, alive_jobs)

    # 6. decode, and refuse what is not finite: a NaN would be a black image recorded as a success
    finite_latents = torch.isfinite(latents).flatten(1).all(dim=1).tolist()
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    finite_pixels = torch.isfinite(images).flatten(1).all(dim=1).tolist()
    results: list[Any] = [None] * n
    for row, (i, pixels) in enumerate(zip(alive, to_uint8(images))):
        if not finite_latents[row]:
            results[i] = JobError(f"image {samples[i].index} (seed {samples[i].seed}): latents became NaN or inf while denoising",
                                  "latents-not-finite")
        elif not finite_pixels[row]:
            results[i] = JobError(f"image {samples[i].index} (seed {samples[i].seed}): the VAE decoded NaN or inf pixels",
                                  "pixels-not-finite")
        else:
            results[i] = pixels
    return results
