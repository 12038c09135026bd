"""The stand-in GPU: `SDQUEUE_MODEL=standin`, a model without weights and without torch.

It "denoises" by sleeping for the time an H100 takes (worker/standin.py `Timing`, from the
figures in the README's GPU section), and its images are a cheap pattern made from the seed: real
PNGs of the requested size, the same for the same seed. Everything else is the real worker: the
continuous loops and their admission (worker/loops.py), claims, leases and heartbeats, events, the
CPU pool, PNG encoding, uploads, records and the sweeper. So the control plane of a fleet can be
measured (bench/fleet.py) and tested on a machine without a GPU, and tests that only need a
worker's bookkeeping do not pay for torch (a worker process starts in about a second).

What it does not do: parse compel's syntax (every prompt is plain text of 77 tokens), fail with
NaN, or run out of memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.registry import ModelSpec
from models.settings import Settings
from worker.backend import dist_version
from worker.loops import LoopSample, SampleSet
from worker.samples import CompatKey, Conditioning, Dropped, Prompt, Sample, StepDone, UnetCall, start_step

TOKENS = 77  # what CLIP's tokenizer pads every plain prompt to
LATENT_SCALE = 8  # the VAE's: a 768x768 image is a 96x96 latent


@dataclass(frozen=True)
class Timing:
    """The seconds a modelled GPU takes. One UNet call of `rows` rows (two per guided sample) at
    768x768 costs `launch + per_row * rows`; per_row scales with the pixels (linear: a little
    cheap for sizes above 768, as attention grows faster). Each image's VAE decode costs `decode`
    at 768x768, scaled alike. `scale` multiplies all of it (0: no time at all).

    The defaults are an H100 with the UNet compiled, fitted to the measured figures (the README's
    GPU section, ../perf): 1.97 images/s at one image a loop (launch-bound) and about 4.5 images/s
    with 8 images of 768x768 a loop at 25 steps; decode about 10% of an image's time."""

    launch: float = 0.0140
    per_row: float = 0.00317
    decode: float = 0.020
    scale: float = 1.0

    def unet_seconds(self, rows: int, width: int, height: int) -> float:
        return self.scale * (self.launch + self.per_row * rows * width * height / (768 * 768))

    def decode_seconds(self, images: int, width: int, height: int) -> float:
        return self.scale * self.decode * images * width * height / (768 * 768)


class StandinUnet:
    """The UNet call: sleeps for its modelled time and predicts nothing (the latents are untouched)."""

    def __init__(self, timing: Timing):
        self.timing = timing

    def __call__(self, sample: np.ndarray, timestep: Any, encoder_hidden_states: Any = None,
                 return_dict: bool = False, **_: Any) -> tuple[np.ndarray]:
        rows, _, latent_h, latent_w = sample.shape
        seconds = self.timing.unet_seconds(rows, latent_w * LATENT_SCALE, latent_h * LATENT_SCALE)
        if seconds > 0:
            time.sleep(seconds)
        return (sample,)


def pattern(seed: int, width: int, height: int) -> np.ndarray:
    """The stand-in's image of `seed`: a vertical blend of two colours drawn from the seed, each row
    one colour (cheap to make, and cheap for PNG to encode: about 4 ms at 512x512 here, where a
    pixel-by-pixel gradient took 27). HxWx3 uint8.

    Filled by doubling: column 0, then columns 0-1 copied to 2-3, and so on, in log2(width) block
    copies; 0.4 ms at 512x512 where one broadcast copy took 2.8 (numpy copies a zero-stride source
    element by element), and this is CPU the fleet benchmark counts as the worker's."""
    ends = np.random.default_rng([seed, width, height]).integers(0, 256, size=(2, 3)).astype(np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    image = np.empty((height, width, 3), np.uint8)
    image[:, 0, :] = np.rint(ends[0] * (1 - y) + ends[1] * y).astype(np.uint8)
    filled = 1
    while filled < width:
        more = min(filled, width - filled)
        image[:, filled : filled + more] = image[:, :more]
        filled += more
    return image


class StandinLoop(SampleSet):
    """worker/loop.py's ContinuousLoop without the tensors: each sample counts its steps, and every
    `step()` is one (sleeping) UNet call over all of them."""

    def __init__(self, model: StandinModel, width: int, height: int, tokens: int | None = None,
                 unet_call: UnetCall | None = None):
        if width % LATENT_SCALE or height % LATENT_SCALE:
            raise ValueError(f"width and height must be multiples of {LATENT_SCALE}, got {width}x{height}")
        self.model = model
        self.width, self.height = width, height
        self.tokens = tokens
        self.unet_call = unet_call or model.unet
        super().__init__()

    def admit(self, samples: list[Sample], conditioning: list[Conditioning], steps: int,
              strength: float | None = None) -> list[LoopSample]:
        if not samples or len(samples) != len(conditioning):
            raise ValueError(f"admit needs one conditioning per sample, got {len(samples)} and {len(conditioning)}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        img2img = strength is not None
        if img2img != all(s.init_image is not None for s in samples):
            raise ValueError("every img2img sample needs an input image, and only those")
        start = start_step(steps, strength) if img2img else 0  # type: ignore[arg-type]
        return self.admit_from(samples, conditioning, steps, start, strength)

    def admit_from(self, samples: list[Sample], conditioning: list[Conditioning], steps: int, start: int,
                   strength: float | None) -> list[LoopSample]:
        """Admit samples that run the steps from `start` to `steps`."""
        if start >= steps:
            raise ValueError(f"strength {strength} with {steps} steps runs no step")
        for sample in samples:
            if strength is not None and sample.init_image.size != (self.width, self.height):
                raise ValueError(f"input image of {sample.job_id} is {sample.init_image.width}x"
                                 f"{sample.init_image.height}, the loop runs {self.width}x{self.height}")
        admitted = [LoopSample(sample, cond, steps, strength, None, range(start, steps), start, None)
                    for sample, cond in zip(samples, conditioning)]
        self.tokens = self.tokens or TOKENS
        self.active.extend(admitted)
        return admitted

    def step(self) -> list[LoopSample]:
        if not self.active:
            return []
        active = self.active
        rows = sum(2 if s.guided else 1 for s in active)
        latents = np.empty((rows, 4, self.height // LATENT_SCALE, self.width // LATENT_SCALE), dtype=np.float16)
        self.unet_call(latents, [s.t for s in active], encoder_hidden_states=None, return_dict=False)
        return self.stepped(active)

    def decode(self, finished: list[LoopSample]) -> list[np.ndarray]:
        """Each finished sample's image: its seed's pattern (img2img: blended into its input by its
        strength), after the modelled decode time."""
        if not finished:
            return []
        seconds = self.model.timing.decode_seconds(len(finished), self.width, self.height)
        if seconds > 0:
            time.sleep(seconds)
        images = []
        for s in finished:
            image = pattern(s.sample.seed, self.width, self.height)
            if s.strength is not None:
                init = np.asarray(s.sample.init_image.convert("RGB"), dtype=np.float32)
                image = np.rint(init * (1 - s.strength) + image * s.strength).astype(np.uint8)
            images.append(image)
        return images


class StandinModel:
    """worker/backend.py's Model without weights: see the module's docstring."""

    device = "standin"
    dtype_name = "float16"
    scheduler_name = "standin"
    device_memory = 80 * 2**30  # an H100's: the default pixel budget is 8 images of 768x768

    def __init__(self, spec: ModelSpec, scale: float = 1.0, timing: Timing | None = None):
        self.spec = spec
        self.source = spec.name
        self.revision = None
        self.timing = timing or Timing(scale=scale)
        self.unet = StandinUnet(self.timing)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return {"standin_timing": {"launch": self.timing.launch, "per_row": self.timing.per_row,
                                   "decode": self.timing.decode, "scale": self.timing.scale}}

    def versions(self) -> dict[str, str]:
        return {"sdqueue": dist_version("sdqueue"), "standin": "1"}

    def encode(self, prompts: list[Prompt]) -> list[Conditioning]:
        empty = np.zeros((1, TOKENS, 0), dtype=np.float16)  # 77 tokens of nothing
        return [Conditioning(empty, empty) for _ in prompts]

    def new_loop(self, width: int, height: int, tokens: int | None, unet_call: UnetCall | None = None) -> StandinLoop:
        return StandinLoop(self, width, height, tokens, unet_call)

    def generate(self, key: CompatKey, samples: list[Sample], conditioning: list[Conditioning],
                 unet_call: UnetCall | None = None, dropped: Dropped | None = None,
                 step_done: StepDone | None = None) -> list[Any]:
        """A window batch: its samples in one loop from the first step to the last; a sample of a
        job in `dropped` leaves at the next step (None in its place)."""
        loop = self.new_loop(key.width, key.height, None, unet_call)
        strength = 1 - key.start_step / key.steps if key.mode == "img2img" else None
        admitted = loop.admit_from(samples, conditioning, key.steps, key.start_step, strength)
        steps = key.steps - key.start_step
        results: dict[int, Any] = {}
        for step in range(1, steps + 1):
            if dropped is not None:
                loop.drop(dropped())
            finished = loop.step()
            results.update(zip(map(id, finished), loop.decode(finished)))
            if step_done is not None:
                step_done(step, steps, list(dict.fromkeys(s.job_id for s in loop.active)))
            if not loop.active:
                break
        return [results.get(id(s)) for s in admitted]

    def compile(self, settings: Settings, pixel_budget: int) -> UnetCall | None:
        return None  # nothing to compile

    def reset_peak_memory(self) -> None:
        pass

    def peak_memory(self) -> int | None:
        return None

    def free_memory(self) -> None:
        pass
