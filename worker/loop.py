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

worker/loops.py's `Loops` runs many such loops, one per size: it admits claimed jobs under the pixel
budget and picks the loop that steps next, so that no size starves. The worker's engine
(SDQUEUE_BATCHING=continuous) and `run_direct` (the benchmark's loop without a queue) drive it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import Any

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from models.errors import JobError
from worker.batcher import PixelBudget, Work
from worker.loops import LoopSample, Loops, SampleSet
from worker.pipeline import LoadedModel
from worker.samples import Conditioning, Sample, UnetCall, is_out_of_memory

log = logging.getLogger(__name__)


class ContinuousLoop(SampleSet):
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
        # A 9-channel UNet (inpainting): its samples each carry their mask and masked image.
        self.inpainting = pipe.unet.config.in_channels == 9
        # The x4 upscaler: its samples each carry their noised input and its noise level.
        self.upscaling = model.upscaler is not None
        # A 5-channel UNet (depth-to-image): its samples each carry their depth map.
        self.depth = model.depth is not None
        # The channels the UNet takes beside the latents: each sample's own (LoopSample.extra).
        self.extra_channels = pipe.unet.config.in_channels - pipe.vae.config.latent_channels
        super().__init__()

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
        upscale = samples[0].noise_level is not None
        if any((s.noise_level is not None) != upscale for s in samples) or upscale != self.upscaling:
            raise ValueError(f"this model {'upscales: samples with a noise level only' if self.upscaling else 'does not upscale'}")
        if upscale:
            return self._admit_upscaling(samples, conditioning, steps, tokens.pop())
        img2img = strength is not None
        inpaint = samples[0].mask_image is not None
        depth = samples[0].depth
        if img2img != all(s.init_image is not None for s in samples):
            raise ValueError("every img2img sample needs an input image, and only those")
        if any((s.mask_image is not None) != inpaint for s in samples):
            raise ValueError("every inpainting sample needs a mask, and only those")
        if inpaint != self.inpainting:
            raise ValueError(f"this model's UNet takes {pipe.unet.config.in_channels} channels: "
                             f"{'inpainting' if self.inpainting else 'no inpainting'} samples only")
        if inpaint and not img2img:
            raise ValueError("inpainting samples need a strength (1: the masked area from noise)")
        if any(s.depth != depth for s in samples) or depth != self.depth:
            raise ValueError(f"this model's UNet takes {pipe.unet.config.in_channels} channels: "
                             f"{'depth' if self.depth else 'no depth'} samples only")
        if depth and not img2img:
            raise ValueError("depth samples need an input image and a strength")
        if img2img and not 0.0 <= strength <= 1.0:  # type: ignore[operator]
            raise ValueError(f"strength must be in [0, 1], got {strength}")

        # 2. the schedule: as the pipelines make it (img2img: get_timesteps)
        scheduler, timesteps, first_index = self._schedule(steps, strength)

        # 3. initial latents, one CPU generator per sample, as generate_batch makes them
        shape = (1, pipe.vae.config.latent_channels, self.height // pipe.vae_scale_factor,
                 self.width // pipe.vae_scale_factor)
        generators = [torch.Generator("cpu").manual_seed(sample.seed) for sample in samples]
        if inpaint:
            return self._admit_inpainting(samples, conditioning, steps, strength, scheduler, timesteps,  # type: ignore[arg-type]
                                          first_index, shape, generators)
        # depth-to-image: its maps first (no random draws), then its latents as img2img's
        depth_maps = self._depth_maps(samples) if depth else [None] * len(samples)
        if img2img:
            init_latents = self._encode(samples, generators)
        admitted = []
        for row, (sample, cond, generator) in enumerate(zip(samples, conditioning, generators)):
            own = copy.deepcopy(scheduler)  # one each: multistep schedulers keep history
            if not img2img:
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * own.init_noise_sigma
            else:
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                latents = own.add_noise(init_latents[row : row + 1], noise, timesteps[:1])
            admitted.append(LoopSample(sample, cond, steps, strength, own, timesteps, first_index, latents,
                                       extra=depth_maps[row]))
        self.tokens = tokens.pop()
        self.active.extend(admitted)
        return admitted

    def _schedule(self, steps: int, strength: float | None) -> tuple[Any, Any, int]:
        """A scheduler of its own set for `steps` (strength None: from the first step; else from
        img2img's start step, as get_timesteps makes it), the timesteps it runs and the scheduler's
        step index at the first of them."""
        scheduler = copy.deepcopy(self.model.txt2img.scheduler)
        scheduler.set_timesteps(steps, device=self.model.device)
        start = 0
        if strength is not None:
            start = steps - min(int(steps * strength), steps)
            if start >= steps:
                raise ValueError(f"strength {strength} with {steps} steps runs no step")
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start * scheduler.order)
        timesteps = scheduler.timesteps[start * scheduler.order :]
        if strength is not None and getattr(scheduler, "begin_index", None) is not None:
            first_index = scheduler.begin_index
        elif hasattr(scheduler, "index_for_timestep"):
            first_index = scheduler.index_for_timestep(timesteps[0])
        else:
            first_index = 0
        return scheduler, timesteps, first_index

    def _encode(self, samples: list[Sample], generators: list[torch.Generator]) -> torch.Tensor:
        """The img2img samples' initial latents, in one VAE call: each distinct input image is
        prepared once, and each row's latent sample drawn from its own generator (as alone)."""
        pipe = self.model.txt2img
        prepared: dict[int, torch.Tensor] = {}
        for sample in samples:
            if id(sample.init_image) not in prepared:
                pixels = pipe.image_processor.preprocess(sample.init_image)
                if pixels.shape[-2:] != (self.height, self.width):
                    raise ValueError(f"input image of {sample.job_id} is {pixels.shape[-1]}x{pixels.shape[-2]}, "
                                     f"the loop runs {self.width}x{self.height}")
                prepared[id(sample.init_image)] = pixels.to(device=self.model.device, dtype=self.model.dtype)
        pixels = torch.cat([prepared[id(sample.init_image)] for sample in samples])
        return pipe.vae.config.scaling_factor * retrieve_latents(pipe.vae.encode(pixels), generator=generators)

    def _depth_maps(self, samples: list[Sample]) -> list[torch.Tensor]:
        """Each depth sample's map at latent size ([1, 1, h, w], -1 far to 1 near), as
        StableDiffusionDepth2ImgPipeline.prepare_depth_map makes it of one image: the caller's map,
        or the model's DPT's estimate from the input image; bicubic to latent size, then its own
        min..max to -1..1. Each distinct map is made once (a job's images share theirs)."""
        pipe = self.model.depth
        assert pipe is not None
        device, dtype = torch.device(self.model.device), self.model.dtype
        size = (self.height // pipe.vae_scale_factor, self.width // pipe.vae_scale_factor)
        # diffusers runs the DPT under autocast (DPT-Hybrid's batch norms do not run in fp16); in
        # float32 on the CPU autocast does nothing but warn, so it is left out there.
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        made: dict[int, torch.Tensor] = {}
        for sample in samples:
            source = sample.init_image if sample.depth_map is None else sample.depth_map
            if id(source) in made:
                continue
            if sample.depth_map is None:
                pixels = pipe.feature_extractor(images=[sample.init_image], return_tensors="pt").pixel_values
                with autocast:
                    depth = pipe.depth_estimator(pixels.to(device=device, dtype=dtype)).predicted_depth
            else:
                depth = torch.from_numpy(np.array(sample.depth_map, dtype=np.float32))[None].to(device, dtype)
            depth = torch.nn.functional.interpolate(depth.unsqueeze(1), size=size, mode="bicubic", align_corners=False)
            low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
            high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
            made[id(source)] = (2.0 * (depth - low) / (high - low) - 1.0).to(dtype)
        return [made[id(s.init_image if s.depth_map is None else s.depth_map)] for s in samples]

    def _admit_inpainting(self, samples: list[Sample], conditioning: list[Conditioning], steps: int, strength: float,
                          scheduler: Any, timesteps: Any, first_index: int, shape: tuple[int, ...],
                          generators: list[torch.Generator]) -> list[LoopSample]:
        """Inpainting samples, each started as StableDiffusionInpaintPipeline starts one image of
        its own with its generator: at strength 1 from noise, else from its image's latents with
        noise added; its mask and masked image's latents drawn after, as the pipeline draws them."""
        pipe, device, dtype = self.model.inpainting, self.model.device, self.model.dtype
        assert pipe is not None
        latent_size = (self.height // pipe.vae_scale_factor, self.width // pipe.vae_scale_factor)
        admitted = []
        for sample, cond, generator in zip(samples, conditioning, generators):
            own = copy.deepcopy(scheduler)
            image = pipe.image_processor.preprocess(sample.init_image, height=self.height, width=self.width)
            image = image.to(dtype=torch.float32)
            if image.shape[-2:] != (self.height, self.width):
                raise ValueError(f"input image of {sample.job_id} is {image.shape[-1]}x{image.shape[-2]}, "
                                 f"the loop runs {self.width}x{self.height}")
            if strength == 1.0:
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                latents = noise * own.init_noise_sigma
            else:
                image_latents = pipe._encode_vae_image(image.to(device=device, dtype=dtype), generator=generator)
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                latents = own.add_noise(image_latents, noise, timesteps[:1])
            mask = pipe.mask_processor.preprocess(sample.mask_image, height=self.height, width=self.width)
            masked = (image * (mask < 0.5)).to(device=device, dtype=dtype)
            masked_latents = pipe._encode_vae_image(masked, generator=generator)
            mask = torch.nn.functional.interpolate(mask, size=latent_size).to(device=device, dtype=dtype)
            admitted.append(LoopSample(sample, cond, steps, strength, own, timesteps, first_index, latents,
                                       extra=torch.cat([mask, masked_latents], dim=1)))
        self.tokens = conditioning[0].tokens
        self.active.extend(admitted)
        return admitted

    def _admit_upscaling(self, samples: list[Sample], conditioning: list[Conditioning], steps: int,
                         tokens: int) -> list[LoopSample]:
        """x4 upscaler samples, each started as StableDiffusionUpscalePipeline starts one image of
        its own with its generator: its input noised to its noise level (the low-resolution
        schedule), then its latents drawn; both travel with it into every UNet call."""
        pipe, device, dtype = self.model.upscaler, self.model.device, self.model.dtype
        assert pipe is not None
        if any(s.init_image is None for s in samples):
            raise ValueError("every upscaler sample needs an input image")
        scheduler, timesteps, first_index = self._schedule(steps, None)  # the upscale pipeline's own (DDIM)
        size = (self.height // pipe.vae_scale_factor, self.width // pipe.vae_scale_factor)
        admitted = []
        for sample, cond in zip(samples, conditioning):
            generator = torch.Generator("cpu").manual_seed(sample.seed)
            image = pipe.image_processor.preprocess(sample.init_image).to(device=device, dtype=dtype)
            if tuple(image.shape[-2:]) != size:
                raise ValueError(f"input image of {sample.job_id} is {image.shape[-1]}x{image.shape[-2]}, the loop "
                                 f"upscales {size[1]}x{size[0]} to {self.width}x{self.height}")
            level = torch.tensor([sample.noise_level], dtype=torch.long, device=device)
            noise = randn_tensor(image.shape, generator=generator, device=device, dtype=dtype)
            image = pipe.low_res_scheduler.add_noise(image, noise, level)
            own = copy.deepcopy(scheduler)
            latents = randn_tensor((1, pipe.vae.config.latent_channels, *size), generator=generator, device=device,
                                   dtype=dtype) * own.init_noise_sigma
            admitted.append(LoopSample(sample, cond, steps, None, own, timesteps, first_index, latents,
                                       extra=image, class_label=level))
        self.tokens = tokens
        self.active.extend(admitted)
        return admitted

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
        if self.extra_channels:  # each row's own beside its latents: a mask and masked image, a noised input, a depth map
            scaled = torch.cat([scaled, torch.cat([s.extra for s in active])], dim=1)
        guided_rows = torch.tensor([s.guided for s in active], device=device)
        model_input = torch.cat([scaled[guided_rows], scaled])
        timesteps = torch.stack([s.t for s in guided] + [s.t for s in active]).to(device)
        embeds = torch.cat([s.conditioning.negative_embeds for s in guided]
                           + [s.conditioning.embeds for s in active]).to(device)

        # 2. one UNet call, classifier-free guidance per sample (the upscaler's noise levels as class labels)
        labels = {}
        if self.upscaling:
            labels["class_labels"] = torch.cat([s.class_label for s in guided] + [s.class_label for s in active])
        noise_pred = self.unet_call(model_input, timesteps, encoder_hidden_states=embeds, return_dict=False,
                                    **labels)[0]
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
        return self.stepped(active)

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
        whose latents or pixels are not finite (a NaN would be a black image recorded as a success).
        Out of memory while decoding decodes again one sample at a time: the denoising is kept."""
        if not finished:
            return []
        latents = torch.cat([s.latents for s in finished])
        finite_latents = torch.isfinite(latents).flatten(1).all(dim=1).tolist()
        try:
            pixels, finite_pixels = self._decode(latents)
        except Exception as exc:
            if not is_out_of_memory(exc) or len(finished) == 1:
                raise
            if self.model.device.startswith("cuda"):
                torch.cuda.empty_cache()
            slices = [self._decode(latents[row : row + 1]) for row in range(len(finished))]
            pixels = [p for one, _ in slices for p in one]
            finite_pixels = [ok for _, oks in slices for ok in oks]
        results: list[Any] = []
        for s, image, ok_latents, ok_pixels in zip(finished, pixels, finite_latents, finite_pixels):
            what = f"image {s.sample.index} (seed {s.sample.seed})"
            if not ok_latents:
                results.append(JobError(f"{what}: latents became NaN or inf while denoising", "latents-not-finite"))
            elif not ok_pixels:
                results.append(JobError(f"{what}: the VAE decoded NaN or inf pixels", "pixels-not-finite"))
            else:
                results.append(image)
        return results

    def _decode(self, latents: torch.Tensor) -> tuple[list[np.ndarray], list[bool]]:
        """VAE decode, then uint8 on the device (rounded as to_uint8 rounds, in float32) and one
        copy to the host: into pinned memory without blocking on CUDA."""
        vae = self.model.txt2img.vae  # the upscaler's may run float32 beside a float16 UNet
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        finite = torch.isfinite(images).flatten(1).all(dim=1)
        pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        if pixels.is_cuda:
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            torch.cuda.current_stream().synchronize()
        else:
            host = pixels.contiguous()
        return list(host.numpy()), finite.tolist()


def drain(loop: ContinuousLoop) -> list[tuple[LoopSample, np.ndarray | JobError]]:
    """Step `loop` until it is empty; every finished sample with its image, in the order they finished."""
    out: list[tuple[LoopSample, Any]] = []
    while loop.active:
        finished = loop.step()
        out.extend(zip(finished, loop.decode(finished)))
    return out


def run_direct(model: LoadedModel, jobs: list[dict[str, Any]], pixel_budget: int,
               unet_call: UnetCall | None = None) -> dict[str, list[np.ndarray]]:
    """The worker's continuous loops driven in this process, without queue, database or storage:
    each job (job_id, params, seed, init_image, mask_image, depth and depth_map, arrive_at seconds
    after the start) is admitted from its arrival as the engine admits it. Its images, by job id.
    For benchmarks and tests."""
    from worker.samples import ConditioningCache, compat_key, job_samples
    from worker.batcher import Batcher

    cache = ConditioningCache(model)
    budget = PixelBudget(pixel_budget)
    loops = Loops(model, budget, unet_call)
    batcher = Batcher(budget, window=0.0)
    pending = sorted(jobs, key=lambda j: j.get("arrive_at", 0.0))
    images: dict[str, list[np.ndarray]] = {}
    started = time.perf_counter()
    while len(images) < len(jobs):
        now = time.perf_counter() - started
        while pending and pending[0].get("arrive_at", 0.0) <= now:
            job = pending.pop(0)
            params = job["params"]
            depth = bool(job.get("depth"))
            work = Work(job["job_id"], compat_key(params, job.get("init_image") is not None,
                                                  job.get("mask_image") is not None, depth),
                        job_samples(job["job_id"], params, job["seed"], job.get("init_image"), job.get("mask_image"),
                                    depth=depth, depth_map=job.get("depth_map")),
                        created_at=started + job.get("arrive_at", 0.0), params=params)
            work.conditioning = cache.get([s.prompt for s in work.samples])
            work.tokens = work.conditioning[0].tokens
            batcher.put(work)
        for work in batcher.admit(loops.room, wait=0.0 if len(loops) else 0.01):
            if (ready := loops.admit(work)) is not None:
                images[work.job_id] = ready[1]
        if not len(loops):
            if pending and not len(batcher):
                time.sleep(max(0.0, min(0.01, pending[0].get("arrive_at", 0.0) - now)))
            continue
        finished, again = loops.step()
        for work in again:
            batcher.put(work)
        for member, results, _ in finished:
            errors = [r for r in results if isinstance(r, JobError)]
            if errors:
                raise errors[0]
            images[member.work.job_id] = results
    return images
