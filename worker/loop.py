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

`Loops` runs many such loops, one per size: it admits claimed jobs under the pixel budget and picks
the loop that steps next, so that no size starves. The worker's engine (SDQUEUE_BATCHING=continuous)
and `run_direct` (the benchmark's loop without a queue) drive it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from models.errors import JobError
from models.tables import utcnow
from worker.batch import Conditioning, Sample, StepDone, UnetCall, is_out_of_memory
from worker.batcher import PixelBudget, Work, loop_group
from worker.pipeline import LoadedModel

log = logging.getLogger(__name__)


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
    shared_max: int = 0  # the most samples (itself included) of a model call it was in
    shared_total: int = 0  # the sum over its calls of the samples in each: shared_total / calls is the mean

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
        generators = [torch.Generator("cpu").manual_seed(sample.seed) for sample in samples]
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
            admitted.append(LoopSample(sample, cond, steps, strength, own, timesteps, first_index, latents))
        self.tokens = tokens.pop()
        self.active.extend(admitted)
        return admitted

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

    def drop(self, job_ids: Iterable[str]) -> list[LoopSample]:
        """Remove the samples of `job_ids` (cancelled, lost); the others carry on unchanged."""
        gone = set(job_ids)
        return self.drop_samples(s for s in self.active if s.job_id in gone)

    def drop_samples(self, samples: Iterable[LoopSample]) -> list[LoopSample]:
        """Remove these samples (one claim's: a job claimed again may have another in the loop)."""
        gone = {id(s) for s in samples}
        dropped = [s for s in self.active if id(s) in gone]
        self.active = [s for s in self.active if id(s) not in gone]
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
            s.shared_max = max(s.shared_max, len(active))
            s.shared_total += len(active)
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
        vae = self.model.txt2img.vae
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
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


# --- many loops: admission under the pixel budget, and which loop steps next ----------------------


@dataclass(eq=False)
class Member:
    """A job in a loop: its samples finish together (one schedule for all of a job's images)."""

    work: Work
    samples: list[LoopSample]
    admitted: float = field(default_factory=time.perf_counter)
    started_at: Any = field(default_factory=utcnow)


# A finished job (its Member: work, when it joined), its images in sample order (arrays, or a
# JobError per failed image), and per image what it shared: (steps run, most samples in one call,
# mean samples per call).
Finished = tuple[Member, list[Any], list[tuple[int, int, float]]]


class LoopFailed(Exception):
    """A model call failed for a loop's members (not out of memory): `members` are out of it."""

    def __init__(self, members: list[Member], cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.members = members
        self.cause = cause


class Loops:
    """The worker's continuous loops, one per (width, height, conditioning length), plus a loop of
    its own for a job that must run alone (`Work.alone`, `Work.isolated`).

    Admission (`admit`): a job joins its loop when the loop's pixels plus its own fit the budget
    for that size (an empty loop takes any one job). Each `step()` runs one UNet call on one loop:
    the loop holding the interactive job that has waited longest since its creation (the oldest
    job when only bulk work runs), except that while a bulk-only loop waits, every `bulk_share`-th
    step goes to the loop of the oldest job whatever its priority. So a size never starves: a
    newer job of another size never overtakes an older one for long, as its loop only steps while
    it holds the oldest job.
    """

    def __init__(self, model: LoadedModel, budget: PixelBudget, unet_call: UnetCall | None = None,
                 bulk_share: int = 4):
        self.model = model
        self.budget = budget
        self.unet_call = unet_call
        self.bulk_share = bulk_share
        self.loops: dict[Hashable, ContinuousLoop] = {}
        self.members: dict[Hashable, list[Member]] = {}
        self._ahead_of_bulk = 0
        # The last step's UNet call: (samples in it, seconds); None when it failed (the metrics).
        self.last_call: tuple[int, float] | None = None

    group = staticmethod(loop_group)

    def __len__(self) -> int:
        return sum(len(m) for m in self.members.values())

    @property
    def solo(self) -> str | None:
        """The suspect group in the loops (suspected of killing their worker, they run with nothing
        else), or None."""
        return next((m.work.suspects for ms in self.members.values() for m in ms if m.work.alone), None)

    def room(self, work: Work) -> tuple[int, int]:
        """(pixels in the loop `work` would join, the budget of its size)."""
        used = sum(m.work.pixels for m in self.members.get(self.group(work), []))
        return used, self.budget.for_key(work.key)

    # -- joining and leaving ------------------------------------------------------------------

    def admit(self, work: Work) -> Finished | None:
        """Put a prepared job into its loop from the next step. An img2img job of strength 0 runs
        no step: its images are its input, returned at once (as diffusers returns them)."""
        key = work.key
        if key.mode == "img2img" and key.start_step >= key.steps:
            images = [np.asarray(s.init_image.convert("RGB")) for s in work.samples]
            return Member(work, []), images, [(0, 0, 0.0)] * len(images)
        group = self.group(work)
        loop = self.loops.get(group)
        if loop is None:
            loop = self.loops[group] = ContinuousLoop(self.model, key.width, key.height, work.tokens, self.unet_call)
            self.members[group] = []
        strength = work.params.get("strength") if key.mode == "img2img" else None
        try:
            samples = loop.admit(work.samples, work.conditioning or [], key.steps, strength)
        except Exception:
            self._forget_if_empty(group)
            raise
        self.members[group].append(Member(work, samples))
        return None

    def drop(self, which: Callable[[Work], bool]) -> list[Work]:
        """Take the jobs `which` picks out of their loops (cancelled, lost, given back)."""
        gone: list[Work] = []
        for group, members in list(self.members.items()):
            leaving = [m for m in members if which(m.work)]
            if leaving:
                self.loops[group].drop_samples(s for m in leaving for s in m.samples)
                self.members[group] = [m for m in members if m not in leaving]
                gone += [m.work for m in leaving]
                self._forget_if_empty(group)
        return gone

    def _forget_if_empty(self, group: Hashable) -> None:
        if not self.members[group]:
            del self.members[group], self.loops[group]

    # -- stepping -------------------------------------------------------------------------------

    def next_group(self) -> Hashable | None:
        def oldest(members: list[Member], interactive_first: bool) -> tuple[Any, ...]:
            if interactive_first:
                return min((m.work.bulk, m.work.created_at, m.work.arrived) for m in members)
            return min((m.work.created_at, m.work.arrived) for m in members)

        if not self.members:
            return None
        bulk_waits = any(all(m.work.bulk for m in ms) for ms in self.members.values())
        by_age = bulk_waits and self._ahead_of_bulk >= self.bulk_share - 1
        group = min(self.members, key=lambda g: oldest(self.members[g], not by_age))
        led_by_interactive = not all(m.work.bulk for m in self.members[group])
        self._ahead_of_bulk = self._ahead_of_bulk + 1 if bulk_waits and not by_age and led_by_interactive else 0
        return group

    def step(self, step_done: StepDone | None = None) -> tuple[list[Finished], list[Work]]:
        """One UNet call on the loop that goes next. Returns the jobs it finished, and the jobs it
        put out of the loop to start again later (out of memory: the newest ones, after the
        budget of their size shrank); a LoopFailed for any other error of the call."""
        group = self.next_group()
        if group is None:
            return [], []
        loop, members = self.loops[group], self.members[group]
        self.last_call, samples, clock = None, len(loop), time.perf_counter()
        try:
            finished = loop.step()
            self.last_call = samples, time.perf_counter() - clock
        except Exception as exc:
            if is_out_of_memory(exc) and len(members) > 1:
                return [], self._shed(group)
            del self.members[group], self.loops[group]
            raise LoopFailed(members, exc) from exc
        if step_done is not None:
            for m in members:
                first = m.samples[0]
                order = getattr(first.scheduler, "order", 1)
                steps = math.ceil(len(first.timesteps) / order)
                step_done(math.ceil(first.calls / order), steps, [m.work.job_id])
        if not finished:
            return [], []
        ending = [m for m in members if all(s.done for s in m.samples)]
        self.members[group] = [m for m in members if m not in ending]
        self._forget_if_empty(group)
        try:
            images = dict(zip(map(id, finished), loop.decode(finished)))
        except Exception as exc:
            raise LoopFailed(ending, exc) from exc
        done: list[Finished] = []
        for m in ending:
            stats = [(s.calls, s.shared_max, round(s.shared_total / max(1, s.calls), 3)) for s in m.samples]
            done.append((m, [images[id(s)] for s in m.samples], stats))
        return done, []

    def _shed(self, group: Hashable) -> list[Work]:
        """Out of memory: the size's budget shrinks below what the loop held, and its newest jobs
        leave until the rest fit; they start again later (same seeds, same images)."""
        members = self.members[group]
        used = sum(m.work.pixels for m in members)
        key = members[0].work.key
        self.budget.shrink(key, used)
        if self.model.device.startswith("cuda"):
            torch.cuda.empty_cache()
        limit = self.budget.for_key(key)
        shed: list[Member] = []
        while len(members) - len(shed) > 1 and used > limit:
            newest = max((m for m in members if m not in shed), key=lambda m: m.admitted)
            shed.append(newest)
            used -= newest.work.pixels
        log.warning("out of memory on %d samples of %dx%d: %d job(s) start again later; budget now %d px",
                    sum(len(m.samples) for m in members), key.width, key.height, len(shed), limit)
        return self.drop(lambda work: any(m.work is work for m in shed))


def run_direct(model: LoadedModel, jobs: list[dict[str, Any]], pixel_budget: int,
               unet_call: UnetCall | None = None) -> dict[str, list[np.ndarray]]:
    """The worker's continuous loops driven in this process, without queue, database or storage:
    each job (job_id, params, seed, init_image, arrive_at seconds after the start) is admitted from
    its arrival as the engine admits it. Its images, by job id. For benchmarks and tests."""
    from worker.batch import ConditioningCache, compat_key, job_samples
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
            work = Work(job["job_id"], compat_key(params, job.get("init_image") is not None),
                        job_samples(job["job_id"], params, job["seed"], job.get("init_image")),
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
