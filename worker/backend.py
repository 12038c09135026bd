"""What the engine asks of a model, and opening the one a worker pins.

Two kinds of model implement `Model`: the diffusers pipeline (worker/pipeline.py's LoadedModel,
with worker/batch.py and worker/loop.py) and the stand-in GPU (worker/standin.py), which needs
neither torch nor weights. The engine, the batcher, the loops' admission, leases, records and
uploads see only this protocol, so they run the same whichever it is.
"""

from __future__ import annotations

from typing import Any, Protocol

from models.registry import ModelSpec, resolve_model
from models.settings import Settings
from worker.samples import CompatKey, Conditioning, Dropped, Prompt, Sample, StepDone, UnetCall


class Model(Protocol):
    spec: ModelSpec
    source: str  # the hub id or folder it was loaded from
    revision: str | None
    device: str

    @property
    def dtype_name(self) -> str: ...

    @property
    def scheduler_name(self) -> str: ...

    @property
    def scheduler_config(self) -> dict[str, Any]: ...

    @property
    def unet(self) -> UnetCall:
        """The plain UNet call (tests wrap it; a compiled one replaces it)."""

    @property
    def device_memory(self) -> int | None:
        """The accelerator's memory in bytes (sizes the default pixel budget); None on the CPU."""

    def versions(self) -> dict[str, str]:
        """The libraries that make its images, for every image's record."""

    def encode(self, prompts: list[Prompt]) -> list[Conditioning]:
        """Each prompt's text conditioning; a JobError for a prompt that cannot have one."""

    def new_loop(self, width: int, height: int, tokens: int | None, unet_call: UnetCall | None = None) -> Any:
        """A continuous loop of this size (worker/loop.py's ContinuousLoop has the interface)."""

    def generate(self, key: CompatKey, samples: list[Sample], conditioning: list[Conditioning],
                 unet_call: UnetCall | None = None, dropped: Dropped | None = None,
                 step_done: StepDone | None = None) -> list[Any]:
        """One window batch's images (worker/batch.py's generate_batch has the contract)."""

    def compile(self, settings: Settings, pixel_budget: int) -> UnetCall | None:
        """The UNet call SDQUEUE_COMPILE asks for, ready before the first job; None: the plain one."""

    def reset_peak_memory(self) -> None: ...

    def peak_memory(self) -> int | None: ...

    def free_memory(self) -> None: ...


def open_model(settings: Settings) -> Model:
    """The model SDQUEUE_MODEL names, loaded for this worker's life (torch's threads pinned first)."""
    spec = resolve_model(settings.model, settings.data_dir)
    if spec.backend == "standin":
        from worker.standin import StandinModel

        return StandinModel(spec, scale=settings.standin_scale)
    from worker.pipeline import load_model, pick_device, pin_torch_threads

    device = pick_device(settings.device)
    pin_torch_threads(settings.torch_threads, settings.workers_per_host, device)  # before the first model call
    return load_model(spec, device)


def dist_version(name: str) -> str:
    """An installed distribution's version, or "unknown"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
