"""What every model backend shares, without torch: the compatibility key of a job, its samples,
their prompts and text conditioning (cached by prompt), and the callables the denoising loops take.

The diffusers pipeline (worker/pipeline.py, worker/batch.py, worker/loop.py) and the stand-in GPU
(worker/standin.py) both work on these; the engine, the batcher and the loops' admission
(worker/loops.py) only ever see these, so they never need torch themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from PIL import Image

    from worker.backend import Model


@dataclass(frozen=True)
class CompatKey:
    """What samples must share to run in one denoising loop (the model is the worker's own)."""

    mode: str  # txt2img | img2img | inpaint | upscale | depth
    width: int
    height: int
    steps: int
    start_step: int = 0  # img2img, inpaint, depth: the first of `steps` scheduler steps that runs

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.mode}-{self.width}x{self.height}-{self.steps}s-from{self.start_step}"


def start_step(steps: int, strength: float) -> int:
    """img2img's first step, as diffusers computes it: strength 1 starts at 0, strength 0 never starts."""
    return steps - min(int(steps * strength), steps)


def compat_key(params: dict[str, Any], img2img: bool, inpaint: bool = False, depth: bool = False) -> CompatKey:
    """A job's key; `img2img`: it has an input image (an upscaler's, where it has a noise level);
    `depth`: a depth-to-image job (its row's mode: its depth map may be the model's own estimate)."""
    steps = params["num_inference_steps"]
    if img2img and params.get("noise_level") is not None:  # the x4 upscaler: from noise, its input beside
        return CompatKey("upscale", params["width"], params["height"], steps)
    if img2img or inpaint or depth:
        mode = "inpaint" if inpaint else "depth" if depth else "img2img"
        return CompatKey(mode, params["width"], params["height"], steps, start_step(steps, params["strength"]))
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
    # Inpainting: white (at least 50% grey) repaints, black keeps; the size of init_image.
    mask_image: Image.Image | None = field(default=None, repr=False)
    strength: float | None = None  # img2img, inpainting and depth: how much of the input is denoised
    # The x4 upscaler: the noise level its input (init_image, a quarter of the output's side) is noised to.
    noise_level: int | None = None
    # Depth-to-image: conditioned on a depth map of init_image, the caller's (`depth_map`, as
    # worker/inputs.py prepares it: float, 0 farthest to 1 nearest, any size) or, where None, the
    # one the model's DPT estimates from init_image.
    depth: bool = False
    depth_map: Image.Image | None = field(default=None, repr=False)


def job_samples(job_id: str, params: dict[str, Any], seed: int, init_image: Image.Image | None,
                mask_image: Image.Image | None = None, *, depth: bool = False,
                depth_map: Image.Image | None = None) -> list[Sample]:
    """A job's samples: image i from seed + i, all with the job's prompt and guidance."""
    prompt = Prompt(params["prompt"], params["negative_prompt"], params["use_compel"])
    noise_level = params.get("noise_level") if init_image is not None else None
    strength = params["strength"] if init_image is not None and noise_level is None else None
    return [Sample(job_id, i, seed + i, prompt, params["guidance_scale"], init_image, mask_image, strength, noise_level,
                   depth, depth_map)
            for i in range(params["num_images"])]


@dataclass
class Conditioning:
    embeds: Any  # [1, tokens, dim]: a torch tensor (the stand-in's: a numpy array)
    negative_embeds: Any  # [1, tokens, dim]

    @property
    def tokens(self) -> int:
        return int(self.embeds.shape[1])


class ConditioningCache:
    """Text embeddings by prompt: a prompt repeated across jobs or batches is encoded once. Plain
    prompts are encoded together, in one text-encoder call; compel's one at a time."""

    def __init__(self, model: Model, capacity: int = 256):
        self.model = model
        self.capacity = capacity
        self._cache: dict[Prompt, Conditioning] = {}

    def get(self, prompts: list[Prompt]) -> list[Conditioning]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        plain = [p for p in missing if not p.use_compel]
        if plain:
            for prompt, conditioning in zip(plain, self.model.encode(plain)):
                self._store(prompt, conditioning)
        for prompt in (p for p in missing if p.use_compel):
            self._store(prompt, self.model.encode([prompt])[0])
        return [self._cache[p] for p in prompts]

    def _store(self, prompt: Prompt, conditioning: Conditioning) -> None:
        if len(self._cache) >= self.capacity:
            self._cache.pop(next(iter(self._cache)))  # the oldest entry
        self._cache[prompt] = conditioning


# The UNet call (a torch tensor in, a tuple whose first item is the prediction out): tests wrap it
# to count rows, hold a step or simulate a CUDA out-of-memory error; the compiled UNet replaces it.
UnetCall = Callable[..., Any]

# What the loop asks at every step: the job ids whose samples must leave it now (cancelled, or
# no longer this worker's). Their batch mates carry on unchanged.
Dropped = Callable[[], "set[str] | frozenset[str]"]

# What the loop reports after each step: (step, steps, job_ids): step `step` (1-based) of the
# `steps` this loop runs (for img2img, those after its start step) is done for the jobs whose samples
# are still in it. The worker publishes progress from it; it must be quick and must not raise.
StepDone = Callable[[int, int, "list[str]"], None]

# One sample's outcome: its pixels, None when it left the loop, or the JobError that failed it.
SampleResult = "np.ndarray | JobError | None"


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (found by name: this module does not import torch), or any error
    saying so (a CUDA driver's RuntimeError)."""
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__) or "out of memory" in str(exc).lower()
