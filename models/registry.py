"""The model registry: a short name -> where its weights live and how to run them.

A name that is not in the registry is taken as a path to a local diffusers folder.
Nothing here substitutes one model for another: a model that cannot be found is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import ModelUnavailable


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # A hub repository id, or None for models sdqueue builds itself (`sdqueue models build-*`).
    hub_id: str | None
    native_size: int
    prediction_type: str  # "v_prediction" or "epsilon"
    scheduler: str = "EulerDiscreteScheduler"
    revision: str | None = None
    # A local folder holding the weights (built models, or a local copy of hub weights).
    local_dir: Path | None = None
    description: str = ""
    # "diffusers": a pipeline of weights (worker/pipeline.py); "standin": the stand-in GPU
    # (worker/standin.py), no weights and no torch.
    backend: str = "diffusers"
    # The job modes it runs (a request's mode follows from its model and inputs), and what those
    # inputs must be, as `sdqueue models list` shows them.
    modes: tuple[str, ...] = ("txt2img", "img2img")
    inputs: str = "txt2img: none; img2img: --image, resized to width x height, with --strength"

    @property
    def random_weights(self) -> bool:
        return self.hub_id is None and self.backend == "diffusers"


INPAINT = ("inpaint",)
UPSCALE = ("upscale",)
DEPTH = ("depth",)
# The mask's threshold is diffusers' (VaeImageProcessor, do_binarize): grey at least 50% repaints.
INPAINT_INPUTS = ("--image and --mask of the same size; the mask is read as greyscale (RGB/RGBA converted, alpha "
                  "ignored): 128 and above repaints, below keeps; --strength 1 repaints the masked area from noise")

# The x4 upscaler's bounds are models/request.py's (UPSCALE_FACTOR, MAX_UPSCALE_INPUT_PIXELS).
UPSCALE_INPUTS = ("--image, at most 256x256 px (65,536 px; more where SDQUEUE_PIXEL_BUDGET allows 16x its "
                  "pixels), sides rounded down to multiples of 4; the output is 4x each side; --noise-level 0..350 "
                  "(default 20) noises the input first; no --width/--height, no --strength")

# How a caller's depth map is read is worker/inputs.py's prepare_depth_map (and diffusers'
# prepare_depth_map after it): relative values, so 8 or 16 bits, any scale and any size will do.
DEPTH_INPUTS = ("--image, resized to width x height, with --strength (default 0.8, as img2img); its depth map "
                "estimated by the model's DPT, or --depth-map: greyscale (RGB/RGBA converted, alpha ignored; 16 bits "
                "kept), any size (stretched to the image's), darkest farthest to brightest nearest")

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "sd21", "stabilityai/stable-diffusion-2-1", 768, "v_prediction",
            description="Stable Diffusion 2.1, 768-v",
        ),
        ModelSpec(
            "sd21-base", "stabilityai/stable-diffusion-2-1-base", 512, "epsilon",
            description="Stable Diffusion 2.1 base, 512",
        ),
        ModelSpec(
            "sd21-inpainting", "stabilityai/stable-diffusion-2-inpainting", 512, "epsilon", modes=INPAINT,
            inputs=INPAINT_INPUTS, description="Stable Diffusion 2 inpainting, 512 (a 9-channel UNet)",
        ),
        ModelSpec(
            "sd21-upscaler", "stabilityai/stable-diffusion-x4-upscaler", 512, "v_prediction", scheduler="DDIMScheduler",
            modes=UPSCALE, inputs=UPSCALE_INPUTS,
            description="Stable Diffusion x4 upscaler (a 7-channel UNet; the input's noise level as its class)",
        ),
        ModelSpec(
            "sd21-depth", "stabilityai/stable-diffusion-2-depth", 512, "epsilon", modes=DEPTH, inputs=DEPTH_INPUTS,
            description="Stable Diffusion 2 depth-to-image, 512 (a 5-channel UNet; a DPT-Hybrid depth estimator)",
        ),
        ModelSpec(
            "tiny", None, 64, "v_prediction",
            description="tiny SD 2.1-architecture pipeline with random weights (tests, demo)",
        ),
        ModelSpec(
            "tiny-inpainting", None, 64, "v_prediction", modes=INPAINT, inputs=INPAINT_INPUTS,
            description="tiny inpainting pipeline (a 9-channel UNet) with random weights (tests)",
        ),
        ModelSpec(
            "tiny-upscaler", None, 64, "v_prediction", scheduler="DDIMScheduler", modes=UPSCALE, inputs=UPSCALE_INPUTS,
            description="tiny x4 upscaler pipeline (a 7-channel UNet) with random weights (tests)",
        ),
        ModelSpec(
            "tiny-depth", None, 64, "v_prediction", modes=DEPTH, inputs=DEPTH_INPUTS,
            description="tiny depth-to-image pipeline (a 5-channel UNet, a tiny DPT) with random weights (tests)",
        ),
        ModelSpec(
            "sd21-arch", None, 768, "v_prediction",
            description="full SD 2.1 768-v architecture with random weights (benchmarks)",
        ),
        ModelSpec(
            "sd21-arch-inpainting", None, 768, "v_prediction", modes=INPAINT, inputs=INPAINT_INPUTS,
            description="full SD 2 inpainting architecture with random weights (benchmarks)",
        ),
        ModelSpec(
            "sd21-arch-upscaler", None, 512, "v_prediction", scheduler="DDIMScheduler", modes=UPSCALE,
            inputs=UPSCALE_INPUTS, description="full SD x4 upscaler architecture with random weights (benchmarks)",
        ),
        ModelSpec(
            "sd21-arch-depth", None, 768, "v_prediction", modes=DEPTH, inputs=DEPTH_INPUTS,
            description="full SD 2 depth-to-image architecture (a DPT-Hybrid-shaped estimator) with random weights "
                        "(benchmarks)",
        ),
        ModelSpec(
            "standin", None, 768, "v_prediction", scheduler="standin", backend="standin",
            description="a stand-in GPU: sleeps an H100's modelled time per UNet call, a pattern image "
                        "from the seed (control-plane tests and benchmarks; SDQUEUE_STANDIN_SCALE)",
        ),
    )
}


def model_key(name_or_path: str) -> str:
    """What a job's `model` holds and its queues are named by: a registry name as it is, a folder
    as its absolute path (the same on the producer's and the worker's hosts)."""
    if name_or_path in REGISTRY:
        return name_or_path
    return str(Path(name_or_path).expanduser().resolve())


def request_model(name: str, folders: list[Path] | tuple[Path, ...] = ()) -> str:
    """The model a request names, checked before anything is written; returns its key. A registry
    name, or a diffusers folder under one of `folders` (SDQUEUE_MODEL_FOLDERS). Raises ValueError
    saying which bound it is outside."""
    if name in REGISTRY:
        return name
    if "/" not in name and not name.startswith(("~", ".")):
        raise ValueError(f"is not a registry model (one of {', '.join(REGISTRY)}; `sdqueue models list` shows "
                         "them) nor a folder's path")
    path = Path(name).expanduser().resolve()
    if not folders:
        raise ValueError("is a folder, and requests may name registry models only (SDQUEUE_MODEL_FOLDERS is empty)")
    if not any(path.is_relative_to(root) for root in folders):
        raise ValueError(f"is a folder outside SDQUEUE_MODEL_FOLDERS ({', '.join(map(str, folders))})")
    if not (path / "model_index.json").is_file():
        raise ValueError("is not a diffusers folder (it has no model_index.json)")
    return str(path)


def model_modes(key: str) -> tuple[str, ...]:
    """The modes of a model key (request_model's): a registry entry's, or a folder's by its UNet's
    input channels (9: inpainting, 7: the x4 upscaler, 5: depth-to-image)."""
    if key in REGISTRY:
        return REGISTRY[key].modes
    return FOLDER_MODES.get(_read_json(Path(key) / "unet" / "config.json").get("in_channels"), ("txt2img", "img2img"))


# A folder's modes by its UNet's input channels: the latents, and what each mode puts beside them.
FOLDER_MODES = {9: INPAINT, 7: UPSCALE, 5: DEPTH}


def built_models_dir(data_dir: Path) -> Path:
    """Where `sdqueue models build-tiny/build-arch` put models by default."""
    return data_dir / "models"


def resolve_model(name_or_path: str, data_dir: Path) -> ModelSpec:
    """The spec for a registry name or a local diffusers folder."""
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        if spec.random_weights:
            folder = built_models_dir(data_dir) / spec.name
            revision = _read_json(folder / "sdqueue_model.json").get("revision")
            return ModelSpec(**{**spec.__dict__, "local_dir": folder, "revision": revision})
        return spec
    folder = Path(name_or_path).expanduser()
    if not (folder / "model_index.json").is_file():
        names = ", ".join(REGISTRY)
        raise ModelUnavailable(
            f"model {name_or_path!r} is neither a registry name ({names}) "
            f"nor a diffusers folder with a model_index.json"
        )
    return spec_for_folder(folder)


def spec_for_folder(folder: Path) -> ModelSpec:
    """Read prediction type and native size from a diffusers folder's configs."""
    folder = folder.resolve()
    scheduler_cfg = _read_json(folder / "scheduler" / "scheduler_config.json")
    unet_cfg = _read_json(folder / "unet" / "config.json")
    vae_cfg = _read_json(folder / "vae" / "config.json")
    built = _read_json(folder / "sdqueue_model.json")  # written by `sdqueue models build-*`
    sample = unet_cfg.get("sample_size", 96)
    scale = 2 ** (len(vae_cfg.get("block_out_channels", (0, 0, 0, 0))) - 1)
    modes = FOLDER_MODES.get(unet_cfg.get("in_channels"), ("txt2img", "img2img"))
    extra: dict[str, Any] = {}
    if modes == UPSCALE:  # it runs its own scheduler (DDIM); its VAE's 4x makes the output 4x its input
        extra = {"scheduler": str(scheduler_cfg.get("_class_name", "DDIMScheduler")), "inputs": UPSCALE_INPUTS}
    elif modes == INPAINT:
        extra = {"inputs": INPAINT_INPUTS}
    elif modes == DEPTH:
        extra = {"inputs": DEPTH_INPUTS}
    return ModelSpec(
        name=str(built.get("name") or folder.name),
        hub_id=None,
        native_size=int(sample * scale),
        prediction_type=str(scheduler_cfg.get("prediction_type", "epsilon")),
        revision=built.get("revision"),
        local_dir=folder,
        description=str(built.get("description", f"local diffusers folder {folder}")),
        modes=modes,
        **extra,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
