"""Load one pipeline for the worker's life.

The pipeline loads through `from_pretrained` from a hub id or a local folder (weights built by
`sdqueue models build-*` take the same path), fp16 on CUDA and fp32 on the CPU. Generation itself
is worker/batch.py.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (StableDiffusionDepth2ImgPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, StableDiffusionUpscalePipeline)

from models.errors import ModelUnavailable
from models.registry import ModelSpec
from worker.backend import dist_version

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A pinned pipeline and what identifies it in every image's record."""

    spec: ModelSpec
    source: str  # hub id or folder it was loaded from
    revision: str | None
    device: str
    dtype: torch.dtype
    # The pipeline whose parts every mode uses (the tokenizer, text encoder, UNet, VAE, scheduler);
    # an upscaler's is its StableDiffusionUpscalePipeline, a depth model's its
    # StableDiffusionDepth2ImgPipeline (and img2img None).
    txt2img: StableDiffusionPipeline
    img2img: StableDiffusionImg2ImgPipeline | None
    # An inpainting model's (a 9-channel UNet): its image and mask processors; None otherwise.
    inpainting: StableDiffusionInpaintPipeline | None = None
    # The x4 upscaler's (a 7-channel UNet): its low-resolution noise schedule; None otherwise.
    upscaler: StableDiffusionUpscalePipeline | None = None
    # A depth-to-image model's (a 5-channel UNet): its DPT depth estimator and image processor; None otherwise.
    depth: StableDiffusionDepth2ImgPipeline | None = None
    _compel: Any = field(default=None, repr=False)

    @property
    def scheduler_name(self) -> str:
        return type(self.txt2img.scheduler).__name__

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def compel(self) -> Any:
        """compel's weighted-prompt encoder, made on first use."""
        if self._compel is None:
            from compel import CompelForSD

            self._compel = CompelForSD(self.txt2img, device=self.device)
        return self._compel

    # -- what the engine asks of any model (worker/backend.py's Model) ---------------------------

    @property
    def unet(self) -> Any:
        return self.txt2img.unet

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.txt2img.scheduler.config)

    @property
    def device_memory(self) -> int | None:
        """The card's memory in bytes; None on the CPU."""
        if not self.device.startswith("cuda"):
            return None
        return int(torch.cuda.get_device_properties(torch.device(self.device)).total_memory)

    def versions(self) -> dict[str, str]:
        return library_versions()

    def encode(self, prompts: list[Any]) -> list[Any]:
        from worker.batch import encode_prompts

        return encode_prompts(self, prompts)

    def new_loop(self, width: int, height: int, tokens: int | None, unet_call: Any = None) -> Any:
        from worker.loop import ContinuousLoop

        return ContinuousLoop(self, width, height, tokens, unet_call)

    def generate(self, *args: Any, **kwargs: Any) -> list[Any]:
        """worker/batch.py's generate_batch on this model (window batching)."""
        from worker.batch import generate_batch

        return generate_batch(self, *args, **kwargs)

    def compile(self, settings: Any, pixel_budget: int) -> Any:
        """The UNet call per SDQUEUE_COMPILE (None: the plain UNet), compiled before the first job."""
        from worker.compiled import compiled_unet

        return compiled_unet(settings, self, pixel_budget)

    def reset_peak_memory(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> int | None:
        """The most GPU memory allocated since reset_peak_memory; None on the CPU."""
        return torch.cuda.max_memory_allocated() if self.device.startswith("cuda") else None

    def free_memory(self) -> None:
        """After out of memory: the allocator's cached blocks go back to the card."""
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset, `taskset`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_torch_threads(cores: int, workers_per_host: int) -> int:
    """SDQUEUE_TORCH_THREADS=0: the usable cores shared evenly by the host's workers, at least 1."""
    return max(1, cores // max(1, workers_per_host))


def pin_torch_threads(setting: int, workers_per_host: int, device: str) -> int:
    """Set torch's intra-op threads for a worker on `device`, before its first model call, and log
    why once. Threads beyond the cores a process gets make every worker of the host slower: two
    workers of 2 threads each on 2 cores ran about 5x slower than with 1 each. On CUDA the GPU
    does the work: torch's default is kept."""
    if device.startswith("cuda"):
        why = f"torch's default on {device}"
    elif setting > 0:
        torch.set_num_threads(setting)
        why = f"SDQUEUE_TORCH_THREADS={setting}"
    else:
        cores = usable_cores()
        torch.set_num_threads(auto_torch_threads(cores, workers_per_host))
        why = f"{cores} usable cores / {workers_per_host} worker(s) on this host, SDQUEUE_WORKERS_PER_HOST"
    threads = torch.get_num_threads()
    log.info("torch threads: %d (%s)", threads, why)
    return threads


def locate_weights(spec: ModelSpec) -> tuple[str, str | None]:
    """The local folder holding `spec`'s weights, downloading hub weights once; and their revision."""
    if spec.local_dir is not None:
        if not (spec.local_dir / "model_index.json").is_file():
            if spec.random_weights:
                raise ModelUnavailable(
                    f"model {spec.name!r} is not built yet: run "
                    f"`sdqueue models build-{'tiny' if spec.name.startswith('tiny') else 'arch'}`"
                )
            raise ModelUnavailable(f"no diffusers pipeline in {spec.local_dir} (model_index.json missing)")
        return str(spec.local_dir), spec.revision
    assert spec.hub_id is not None
    try:
        folder = StableDiffusionPipeline.download(spec.hub_id, revision=spec.revision)
    except Exception as exc:
        raise ModelUnavailable(
            f"the weights of {spec.name} ({spec.hub_id}) cannot be reached: no local copy in the Hugging Face "
            f"cache and the hub cannot be reached ({type(exc).__name__}). Download them where there is network "
            f"and set SDQUEUE_MODEL to that folder (or fill the cache, HF_HOME)"
        ) from None
    # A snapshot folder is named after the commit it holds: that is the revision that ran.
    return str(folder), Path(folder).name


def quiet_libraries() -> None:
    """No progress bars from diffusers/transformers in a worker's log, and their log lines through
    the worker's own handler (each library writes bare text on stderr with a handler of its own
    otherwise: not JSON with SDQUEUE_LOG_FORMAT=json)."""
    import huggingface_hub
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_default_handler()
        library.enable_propagation()
    hub = logging.getLogger(huggingface_hub.__name__)  # huggingface_hub has no disable_default_handler
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:
        hub.removeHandler(handler)
    hub.propagate = True


def load_model(spec: ModelSpec, device: str = "auto") -> LoadedModel:
    quiet_libraries()
    device = pick_device(device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    source, revision = locate_weights(spec)
    log.info("loading %s from %s (%s, %s)", spec.name, source, device, dtype)
    if is_upscaler(source):
        return _load_upscaler(spec, source, revision, device, dtype)
    if is_depth(source):
        return _load_depth(spec, source, revision, device, dtype)
    pipe = StableDiffusionPipeline.from_pretrained(
        source, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    scheduler_cls = getattr(diffusers, spec.scheduler)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    inpainting = None
    if pipe.unet.config.in_channels == 9:
        inpainting = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
        inpainting.set_progress_bar_config(disable=True)
    _warn_random(spec)
    return LoadedModel(spec, source, revision, device, dtype, pipe, img2img, inpainting)


def pipeline_class_name(folder: str) -> str | None:
    """The pipeline a diffusers folder's model_index.json names."""
    index = Path(folder) / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def is_upscaler(folder: str) -> bool:
    """A diffusers folder of the x4 upscaler."""
    return pipeline_class_name(folder) == StableDiffusionUpscalePipeline.__name__


def is_depth(folder: str) -> bool:
    """A diffusers folder of a depth-to-image model."""
    return pipeline_class_name(folder) == StableDiffusionDepth2ImgPipeline.__name__


def _load_depth(spec: ModelSpec, source: str, revision: str | None, device: str, dtype: torch.dtype) -> LoadedModel:
    """A depth-to-image model: its DPT estimator in the model's dtype, run under autocast as
    diffusers runs it. Its image processor is loaded apart and put in after: the checkpoint's
    model_index.json names DPTFeatureExtractor, which transformers 5 no longer has, and diffusers
    looks that class up even for a processor passed to from_pretrained (its
    preprocessor_config.json loads into DPT's image processor all the same)."""
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(source, dtype=dtype, feature_extractor=None)
    processor = depth_processor_class().from_pretrained(source, subfolder="feature_extractor")
    pipe = StableDiffusionDepth2ImgPipeline(**{**pipe.components, "feature_extractor": processor})
    pipe.scheduler = getattr(diffusers, spec.scheduler).from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    _warn_random(spec)
    return LoadedModel(spec, source, revision, device, dtype, pipe, None, depth=pipe)


def _load_upscaler(spec: ModelSpec, source: str, revision: str | None, device: str, dtype: torch.dtype) -> LoadedModel:
    """The x4 upscaler: its scheduler as the spec names it (the checkpoint's DDIM). Its VAE decodes
    in float32 where the model runs fp16 and the VAE's config asks for it (force_upcast), as
    StableDiffusionUpscalePipeline decodes: the decoder overflows fp16 at 4x the input's side."""
    pipe = StableDiffusionUpscalePipeline.from_pretrained(source, dtype=dtype, safety_checker=None,
                                                          feature_extractor=None, watermarker=None)
    pipe.scheduler = getattr(diffusers, spec.scheduler).from_config(pipe.scheduler.config)
    pipe.to(device)
    if dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    _warn_random(spec)
    return LoadedModel(spec, source, revision, device, dtype, pipe, None, upscaler=pipe)


def depth_processor_class() -> type:
    """DPT's image processor of PIL and numpy: transformers 5 names it DPTImageProcessorPil (its
    DPTImageProcessor resizes with torchvision where that is installed, with PIL where not);
    transformers 4 has only the PIL one. The same class on every host: the same estimated depth."""
    import transformers

    return getattr(transformers, "DPTImageProcessorPil", None) or transformers.DPTImageProcessor


def _warn_random(spec: ModelSpec) -> None:
    if spec.random_weights:
        log.warning("model %s has RANDOM weights: its images are noise (tests and benchmarks only)", spec.name)


def library_versions() -> dict[str, str]:
    import transformers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    try:
        import compel

        versions["compel"] = getattr(compel, "__version__", None) or dist_version("compel")
    except ImportError:
        pass
    versions["sdqueue"] = dist_version("sdqueue")
    return versions
