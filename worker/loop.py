"""Step-level continuous batching: samples join and leave one denoising loop at step boundaries.

A `ContinuousLoop` holds the samples of one resolution and one text-conditioning length. Unlike
worker/batch.py's generate_batch, its samples need not share a step count or an img2img strength:
each keeps its own place in its own schedule, and every `step()` makes ONE UNet call over all of
them with a timestep per row. New samples are admitted between steps; cancelled ones are dropped
between steps; a sample leaves when its own schedule ends.

Each sample starts exactly as generate_batch starts it (a CPU generator seeded with its seed), so
a sample's image is the one it would get alone, and the one diffusers' pipelines give (up to kernel
rounding; tests/test_loop.py checks it).

Scheduler state per sample:
- EulerDiscreteScheduler (the default): a vectorised step over all rows, each row with its own sigma
  and next sigma, computed as EulerDiscreteScheduler.step computes them (s_churn = 0).
- any other scheduler: a deep copy of the scheduler per sample, with scale_model_input and step
  called row by row (slower, but right for multistep schedulers that keep history).

Not yet wired into the worker engine (issue 9).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from models.errors import JobError
from worker.batch import Conditioning, Sample, UnetCall, to_uint8
from worker.pipeline import LoadedModel


@dataclass(eq=False)
class LoopSample:
    """One sample in the loop and its own place in its own schedule."""

    sample: Sample
    conditioning: Conditioning
    steps: int  # the num_inference_steps it was asked for
    strength: float | None  # img2img only
    scheduler: Any = field(repr=False)  # its own copy: timesteps set, begin index set for img2img
    timesteps: torch.Tensor = field(repr=False)  # the timesteps it runs (img2img: from its start step)
    first_index: int  # the scheduler's step index at its first timestep
    latents: torch.Tensor = field(repr=False)  # [1, C, h, w]
    calls: int = 0  # model calls done so far

    @property
    def job_id(self) -> str:
        return self.sample.job_id

    @property
    def done(self) -> bool:
        return self.calls >= len(self.timesteps)

    @property
    def t(self) -> torch.Tensor:
        return self.timesteps[self.calls]

    @property
    def guided(self) -> bool:
        return self.sample.guidance_scale > 1.0


class ContinuousLoop:
    """Samples of one size and one conditioning length, denoised together one UNet call per step."""

    def __init__(self, model: LoadedModel, width: int, height: int, tokens: int | None = None,
                 unet_call: UnetCall | None = None):
        pipe = model.txt2img
        if width % pipe.vae_scale_factor or height % pipe.vae_scale_factor:
            raise ValueError(f"width and height must be multiples of {pipe.vae_scale_factor}, got {width}x{height}")
        self.model = model
        self.width, self.height = width, height
        self.tokens = tokens  # None: fixed by the first admitted sample
        self.unet_call = unet_call or pipe.unet
        self.vectorised = type(pipe.scheduler) is EulerDiscreteScheduler
        self.active: list[LoopSample] = []

    def __len__(self) -> int:
        return len(self.active)

    # -- joining and leaving (between steps) -------------------------------------------------

    @torch.inference_mode()
    def admit(self, samples: list[Sample], conditioning: list[Conditioning], steps: int,
              strength: float | None = None) -> list[LoopSample]:
        """Add samples; they run from the next step. strength None: txt2img; else img2img of each
        sample's init_image, starting where diffusers' img2img pipeline would start."""
        pipe = self.model.txt2img
        device, dtype = self.model.device, self.model.dtype

        # 1. check inputs
        if not samples or len(samples) != len(conditioning):
            raise ValueError(f"admit needs one conditioning per sample, got {len(samples)} and {len(conditioning)}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        tokens = {c.tokens for c in conditioning} | ({self.tokens} if self.tokens is not None else set())
        if len(tokens) != 1:
            raise ValueError(f"a loop runs conditioning of one length, got lengths {sorted(tokens)}")
        img2img = strength is not None
        if img2img != all(s.init_image is not None for s in samples):
            raise ValueError("every img2img sample needs an input image, and only those")
        if img2img and not 0.0 <= strength <= 1.0:  # type: ignore[operator]
            raise ValueError(f"strength must be in [0, 1], got {strength}")

        # 2. the schedule: as the pipelines make it (img2img: get_timesteps)
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(steps, device=device)
        start = 0
        if img2img:
            start = steps - min(int(steps * strength), steps)  # type: ignore[operator]
            if start >= steps:
                raise ValueError(f"strength {strength} with {steps} steps runs no step")
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start * scheduler.order)
        timesteps = scheduler.timesteps[start * scheduler.order :]
        if img2img and getattr(scheduler, "begin_index", None) is not None:
            first_index = scheduler.begin_index
        elif hasattr(scheduler, "index_for_timestep"):
            first_index = scheduler.index_for_timestep(timesteps[0])
        else:
            first_index = 0

        # 3. initial latents, one CPU generator per sample, as generate_batch makes them
        shape = (1, pipe.unet.config.in_channels, self.height // pipe.vae_scale_factor, self.width // pipe.vae_scale_factor)
        admitted = []
        for sample, cond in zip(samples, conditioning):
            generator = torch.Generator("cpu").manual_seed(sample.seed)
            own = copy.deepcopy(scheduler)  # one each: multistep schedulers keep history
            if not img2img:
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * own.init_noise_sigma
            else:
                pixels = pipe.image_processor.preprocess(sample.init_image).to(device=device, dtype=dtype)
                if pixels.shape[-2:] != (self.height, self.width):
                    raise ValueError(f"input image of {sample.job_id} is {pixels.shape[-1]}x{pixels.shape[-2]}, "
                                     f"the loop runs {self.width}x{self.height}")
                init = pipe.vae.config.scaling_factor * retrieve_latents(pipe.vae.encode(pixels), generator=generator)
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                latents = own.add_noise(init, noise, timesteps[:1])
            admitted.append(LoopSample(sample, cond, steps, strength, own, timesteps, first_index, latents))
        self.tokens = tokens.pop()
        self.active.extend(admitted)
        return admitted

    def drop(self, job_ids: Iterable[str]) -> list[LoopSample]:
        """Remove the samples of `job_ids` (cancelled, lost); the others carry on unchanged."""
        gone = set(job_ids)
        dropped = [s for s in self.active if s.job_id in gone]
        self.active = [s for s in self.active if s.job_id not in gone]
        return dropped

    # -- one step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[LoopSample]:
        """One UNet call over every active sample; returns those whose schedule ended with it."""
        if not self.active:
            return []
        device = self.model.device
        active = self.active
        guided = [s for s in active if s.guided]

        # 1. model input: the unconditional rows of guided samples first, then every conditional row
        latents = torch.cat([s.latents for s in active])
        if self.vectorised:
            scaled = self._euler_scale(active, latents)
        else:
            scaled = torch.cat([s.scheduler.scale_model_input(s.latents, s.t) for s in active])
        guided_rows = torch.tensor([s.guided for s in active], device=device)
        model_input = torch.cat([scaled[guided_rows], scaled])
        timesteps = torch.stack([s.t for s in guided] + [s.t for s in active]).to(device)
        embeds = torch.cat([s.conditioning.negative_embeds for s in guided]
                           + [s.conditioning.embeds for s in active]).to(device)

        # 2. one UNet call, classifier-free guidance per sample
        noise_pred = self.unet_call(model_input, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        noise_uncond, noise_text = noise_pred[: len(guided)], noise_pred[len(guided) :]
        noise_pred = noise_text.clone()
        if guided:
            scale = torch.tensor([s.sample.guidance_scale for s in guided], device=device, dtype=noise_pred.dtype)
            scale = scale.view(-1, 1, 1, 1)
            noise_pred[guided_rows] = noise_uncond + scale * (noise_text[guided_rows] - noise_uncond)

        # 3. each sample's own scheduler step
        if self.vectorised:
            latents = self._euler_step(active, noise_pred, latents)
            for row, s in enumerate(active):
                s.latents = latents[row : row + 1]
        else:
            for row, s in enumerate(active):
                s.latents = s.scheduler.step(noise_pred[row : row + 1], s.t, s.latents, return_dict=False)[0]
        for s in active:
            s.calls += 1
        finished = [s for s in active if s.done]
        self.active = [s for s in active if not s.done]
        return finished

    def _sigmas(self, active: list[LoopSample], offset: int) -> torch.Tensor:
        """Each row's sigma (offset 0) or next sigma (offset 1), float32 on the schedulers' device (CPU)."""
        return torch.stack([s.scheduler.sigmas[s.first_index + s.calls + offset] for s in active]).view(-1, 1, 1, 1)

    def _euler_scale(self, active: list[LoopSample], latents: torch.Tensor) -> torch.Tensor:
        # EulerDiscreteScheduler.scale_model_input: x / sqrt(sigma^2 + 1), a float32 scalar per row
        sigma = self._sigmas(active, 0)
        return (latents.float() / ((sigma**2 + 1) ** 0.5).to(latents.device)).to(latents.dtype)

    def _euler_step(self, active: list[LoopSample], model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """EulerDiscreteScheduler.step with s_churn = 0 (so sigma_hat = sigma), one sigma per row.
        Products of the model output and a coefficient round to its dtype first, as diffusers' do."""
        prediction_type = active[0].scheduler.config.prediction_type
        device, out_dtype = model_output.device, model_output.dtype
        sigma = self._sigmas(active, 0)
        sigma_next = self._sigmas(active, 1)
        sample = sample.to(torch.float32)
        if prediction_type in ("original_sample", "sample"):
            pred_original = model_output
        elif prediction_type == "epsilon":
            pred_original = sample - (model_output.float() * sigma.to(device)).to(out_dtype)
        elif prediction_type == "v_prediction":
            c_out = (-sigma / (sigma**2 + 1) ** 0.5).to(device)
            c_skip = (sigma**2 + 1).to(device)
            pred_original = (model_output.float() * c_out).to(out_dtype) + sample / c_skip
        else:
            raise ValueError(f"prediction_type {prediction_type!r} must be one of epsilon, v_prediction, sample")
        derivative = (sample - pred_original) / sigma.to(device)
        dt = (sigma_next - sigma).to(device)
        return (sample + derivative * dt).to(out_dtype)

    # -- images -----------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, finished: list[LoopSample]) -> list[Any]:
        """The finished samples' images as HxWx3 uint8 arrays, in order; a JobError for a sample
        whose latents or pixels are not finite (a NaN would be a black image recorded as a success)."""
        if not finished:
            return []
        vae = self.model.txt2img.vae
        latents = torch.cat([s.latents for s in finished])
        finite_latents = torch.isfinite(latents).flatten(1).all(dim=1).tolist()
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        finite_pixels = torch.isfinite(images).flatten(1).all(dim=1).tolist()
        results: list[Any] = []
        for s, pixels, ok_latents, ok_pixels in zip(finished, to_uint8(images), finite_latents, finite_pixels):
            what = f"image {s.sample.index} (seed {s.sample.seed})"
            if not ok_latents:
                results.append(JobError(f"{what}: latents became NaN or inf while denoising"))
            elif not ok_pixels:
                results.append(JobError(f"{what}: the VAE decoded NaN or inf pixels"))
            else:
                results.append(pixels)
        return results


def drain(loop: ContinuousLoop) -> list[tuple[LoopSample, np.ndarray | JobError]]:
    """Step `loop` until it is empty; every finished sample with its image, in the order they finished."""
    out: list[tuple[LoopSample, Any]] = []
    while loop.active:
        finished = loop.step()
        out.extend(zip(finished, loop.decode(finished)))
    return out
