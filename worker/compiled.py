"""The UNet compiled with torch.compile, one graph per (size, batch bucket), ready before jobs come.

Both loops call the UNet with a batch whose row count changes from call to call (jobs join and
leave; guided samples take two rows). A graph compiled with `dynamic=False` holds for one shape
only, so `CompiledUnet` pads the rows up to a bucket (1, 2, 4, 8, ... rows) by repeating the last
row, and slices the real rows back out: a handful of graphs per size instead of one per row count.
The UNet's rows are independent of each other (group norm and attention work within a row), so
the padding does not change the real rows' outputs. The cost is the padded rows' compute (at worst
just under half the call, e.g. 5 rows run as 8): `buckets=` takes a finer list.

What the worker does with it, at start and before it takes jobs:

    use_compile_cache(settings.data_dir / "compile-cache")   # before anything compiles
    unet_call = prepare_unet(model, settings.compile)         # None: the plain UNet
    warm_up(unet_call, model, sizes, buckets_up_to(max_rows))
    save_compile_cache(settings.data_dir / "compile-cache")   # optional: a portable bundle

On the CPU "auto" is "off": compiling even the tiny test UNet takes one to two minutes on a
2-core machine, for little gain per call. The CPU paths exist for tests (tests/test_compiled.py).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Sequence

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from models.settings import Settings
from worker.pipeline import LoadedModel
from worker.samples import UnetCall

log = logging.getLogger(__name__)

COMPILE_SETTINGS = ("auto", "off", "default", "max-autotune")

# The attention kernels fastest_sdpa_backend races, by the names it returns.
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}

# The portable bundle of compiled artifacts inside the compile-cache directory (see use_compile_cache).
ARTIFACTS_FILE = "artifacts.bin"


def compile_mode(setting: str, device: str) -> str | None:
    """torch.compile's mode for SDQUEUE_COMPILE=`setting` on `device`; None: do not compile.
    "auto" compiles on CUDA only: on the CPU a compile costs minutes and gains little."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}")
    if setting == "auto":
        return "default" if device.startswith("cuda") else None
    if setting == "off":
        return None
    return setting


def bucket_for(rows: int, buckets: Sequence[int] | None = None) -> int:
    """The batch size a call of `rows` rows runs at: the smallest of `buckets` that holds it, else
    the next power of two (so the number of shapes stays small however large batches grow)."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    for bucket in sorted(buckets or ()):
        if bucket >= rows:
            return bucket
    return 1 << (rows - 1).bit_length()


def buckets_up_to(rows: int) -> list[int]:
    """The power-of-two buckets a worker whose calls have at most `rows` rows will use."""
    return [1 << i for i in range(bucket_for(rows).bit_length())]


def allow_recompiles(graphs: int) -> None:
    """Let Dynamo keep `graphs` graphs of the UNet's forward. Each bucket and size is a recompile
    by design here; past torch's limit (8 by default) Dynamo would fall back to the eager UNet
    for new shapes, silently but for a warning. Doubled, plus a margin, for guard variants (e.g.
    a call outside inference mode)."""
    import torch._dynamo

    wanted = 2 * graphs + 8
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, wanted)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, wanted)


class CompiledUnet:
    """A UNet call (`pipe.unet`'s signature, as both loops make it) through a torch.compile'd UNet,
    its rows padded to a bucket.

    `timestep` may be one value for every row (a python number or a 0-d tensor: window batching)
    or one per row (a 1-d tensor: continuous batching). Either way the graph gets one float32
    timestep per row: the UNet broadcasts a single timestep to every row and casts timesteps to
    float32 itself, so this is the same computation, and both kinds of batching share a graph.

    `shapes` holds the (rows, latent height, latent width, tokens) of every graph called so far.
    """

    def __init__(self, unet: torch.nn.Module, mode: str = "default", buckets: Sequence[int] | None = None,
                 sdpa_backend: str | None = None):
        if mode not in ("default", "max-autotune"):
            raise ValueError(f"mode must be 'default' or 'max-autotune', got {mode!r}")
        if sdpa_backend is not None and sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {', '.join(SDPA_BACKENDS)} or None, got {sdpa_backend!r}")
        self.unet = unet
        self.mode = mode
        self.buckets = sorted(buckets) if buckets else None
        self.sdpa_backend = sdpa_backend
        self.shapes: set[tuple[int, int, int, int]] = set()
        device = next(unet.parameters()).device
        # max-autotune brings CUDA graphs: outputs live in buffers the next replay overwrites.
        self.cuda_graphs = mode == "max-autotune" and device.type == "cuda"
        self.compiled = torch.compile(unet, mode=mode, dynamic=False)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                 encoder_hidden_states: torch.Tensor, return_dict: bool = False,
                 class_labels: torch.Tensor | None = None) -> Any:
        # 1. check inputs, and one timestep per row
        rows = sample.shape[0]
        if encoder_hidden_states.shape[0] != rows:
            raise ValueError(f"encoder_hidden_states has {encoder_hidden_states.shape[0]} rows, sample has {rows}")
        timesteps = torch.as_tensor(timestep, device=sample.device).to(torch.float32).reshape(-1)
        if timesteps.shape[0] == 1:
            timesteps = timesteps.expand(rows)
        elif timesteps.shape[0] != rows:
            raise ValueError(f"timestep must be one value or one per row ({rows}), got {timesteps.shape[0]}")

        # 2. pad to the bucket: fresh contiguous tensors, so the graph's stride guards always hold
        bucket = bucket_for(rows, self.buckets)
        sample, timesteps, encoder_hidden_states = (
            _pad_rows(x, bucket) for x in (sample, timesteps, encoder_hidden_states))
        labels = {} if class_labels is None else {"class_labels": _pad_rows(class_labels, bucket)}  # the upscaler's
        shape = (bucket, sample.shape[2], sample.shape[3], encoder_hidden_states.shape[1])
        new = shape not in self.shapes
        if new:
            self.shapes.add(shape)
            allow_recompiles(len(self.shapes))
            started = time.perf_counter()

        # 3. the compiled call, then the real rows
        with self._attention():
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = self.compiled(sample, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                                **labels)[0]
        out = out[:rows]
        if self.cuda_graphs:
            out = out.clone()
        if new:
            log.info("UNet compiled for %d rows of %dx%d latents, %d tokens (%s) in %.1f s",
                     *shape, self.mode, time.perf_counter() - started)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _attention(self) -> ContextManager[Any]:
        """The chosen attention kernel, around every call: Inductor bakes the kernel that is
        allowed when it traces into the graph, so tracing and running must agree."""
        if self.sdpa_backend is None:
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[self.sdpa_backend]))


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with its last row repeated up to `rows` rows."""
    missing = rows - x.shape[0]
    if missing == 0:
        return x.contiguous()
    return torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])


def fuse_attention_projections(module: torch.nn.Module) -> bool:
    """diffusers' fused QKV projections (one matmul for q, k and v of self-attention, one for k
    and v of cross-attention) where `module` offers them (UNet2DConditionModel, AutoencoderKL).
    diffusers marks the API experimental: a module that refuses it keeps its own projections."""
    fuse = getattr(module, "fuse_qkv_projections", None)
    if fuse is None:
        return False
    try:
        fuse()
    except ValueError as exc:  # e.g. added KV projections
        log.warning("%s keeps separate attention projections: %s", type(module).__name__, exc)
        return False
    return True


@torch.inference_mode()
def fastest_sdpa_backend(model: LoadedModel, width: int, height: int, batch: int, repeats: int = 3) -> str | None:
    """The attention kernel ("flash", "efficient" or "cudnn") under which the eager UNet runs a
    `batch`-row call at `width`x`height` fastest on this GPU; None on the CPU, or when none runs.
    Which is fastest depends on the GPU, the dtype, the head size and the torch build: measured
    rather than assumed. Each candidate runs once untimed (cuDNN plans, allocations), then
    `repeats` times between CUDA events."""
    if not model.device.startswith("cuda"):
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pipe = model.txt2img
    unet = pipe.unet
    device, dtype = model.device, model.dtype
    factor = pipe.vae_scale_factor
    sample = torch.randn(batch, unet.config.in_channels, height // factor, width // factor, device=device, dtype=dtype)
    timesteps = torch.full((batch,), 500.0, device=device)
    text = torch.randn(batch, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=device, dtype=dtype)
    timings: dict[str, float] = {}
    for name, member in SDPA_BACKENDS.items():
        try:
            # A kernel that cannot run these shapes warns why, then raises: the log line says it.
            with warnings.catch_warnings(), sdpa_kernel(getattr(SDPBackend, member)):
                warnings.simplefilter("ignore")
                unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)
                end.record()
                torch.cuda.synchronize()
        except RuntimeError as exc:
            log.info("attention kernel %s does not run here: %s", name, str(exc).splitlines()[0][:200])
            continue
        timings[name] = start.elapsed_time(end) / repeats
    if not timings:
        return None
    best = min(timings, key=timings.__getitem__)
    log.info("attention kernels, ms per UNet call of %d rows at %dx%d: %s; using %s", batch, width, height,
             ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), best)
    return best


def prepare_unet(model: LoadedModel, setting: str, probe_size: tuple[int, int] = (768, 768),
                 probe_batch: int = 4) -> CompiledUnet | None:
    """Make `model`'s UNet fast for SDQUEUE_COMPILE=`setting`; the call the loops should use, or
    None for the plain `pipe.unet` (compile off).

    On CUDA, whatever the setting (these help the eager UNet too): channels-last memory for the
    UNet and VAE convolutions, and fused attention projections. When compiling, the attention
    kernel is also chosen by timing (`fastest_sdpa_backend` at `probe_size`, `probe_batch` rows)
    and pinned around every call, and Inductor lowers 1x1 convolutions to matmuls (and, for
    max-autotune, tunes its kernels by coordinate descent), as diffusers' guide to torch.compile
    does. On the CPU the modules are left as they are. Compilation itself happens lazily, per
    shape: call `warm_up` before taking jobs.
    """
    mode = compile_mode(setting, model.device)
    pipe = model.txt2img
    backend = None
    if model.device.startswith("cuda"):
        # 1. memory layout and fused projections: they change the modules, so before any trace
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        fused = [type(m).__name__ for m in (pipe.unet, pipe.vae) if fuse_attention_projections(m)]
        log.info("channels-last UNet and VAE; fused attention projections in %s", ", ".join(fused) or "none")
        if mode is not None:
            # 2. the attention kernel, and Inductor's settings for convolution-heavy UNets
            backend = fastest_sdpa_backend(model, *probe_size, probe_batch)
            import torch._inductor.config as inductor

            inductor.conv_1x1_as_mm = True
            if mode == "max-autotune":
                inductor.coordinate_descent_tuning = True
                inductor.coordinate_descent_check_all_directions = True
                inductor.epilogue_fusion = False
    if mode is None:
        log.info("UNet not compiled (SDQUEUE_COMPILE=%s on %s)", setting, model.device)
        return None
    log.info("UNet compiles with mode %s (SDQUEUE_COMPILE=%s), attention kernel %s", mode, setting, backend or "torch's choice")
    return CompiledUnet(pipe.unet, mode, sdpa_backend=backend)


@torch.inference_mode()
def warm_up(unet_call: UnetCall | None, model: LoadedModel, sizes: list[tuple[int, int]], buckets: list[int],
            tokens: int = 77) -> float:
    """One call of zeros per (width, height) in `sizes` and row count in `buckets`, so that every
    graph compiles at worker start rather than in the first jobs of its shape. Runs in inference
    mode, as the loops do (Dynamo guards on it: another mode would be another graph). Seconds it
    took; 0 for no call (compile off)."""
    if unet_call is None:
        return 0.0
    pipe = model.txt2img
    device, dtype = model.device, model.dtype
    channels, dim = pipe.unet.config.in_channels, pipe.unet.config.cross_attention_dim
    factor = pipe.vae_scale_factor
    if isinstance(unet_call, CompiledUnet):
        allow_recompiles(len(unet_call.shapes) + len(sizes) * len(buckets))
    started = time.perf_counter()
    for width, height in sizes:
        for rows in buckets:
            sample = torch.zeros(rows, channels, height // factor, width // factor, device=device, dtype=dtype)
            timesteps = torch.zeros(rows, device=device)
            text = torch.zeros(rows, tokens, dim, device=device, dtype=dtype)
            labels = {}
            if pipe.unet.config.num_class_embeds:  # the upscaler: a noise level per row
                labels["class_labels"] = torch.zeros(rows, device=device, dtype=torch.long)
            unet_call(sample, timesteps, encoder_hidden_states=text, return_dict=False, **labels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    log.info("UNet warm-up: %d size(s) x %d bucket(s) %s, %d tokens, in %.1f s", len(sizes), len(buckets),
             buckets, tokens, elapsed)
    return elapsed


def use_compile_cache(directory: Path) -> None:
    """Keep torch.compile's on-disk caches in `directory`, so that a restarted worker reuses what
    the last one compiled. Call it before anything compiles.

    In torch 2.13 Inductor's FX graph cache and the AOTAutograd cache (both on by default) and
    the autotuning results live under TORCHINDUCTOR_CACHE_DIR (Triton's kernels too, in its
    triton/ folder); the default is /tmp/torchinductor_<user>, which a container restart loses.
    With them a restart skips Inductor's lowering and kernel compilation; Dynamo still traces
    each graph (seconds each). Entries are keyed by torch version, device and graph, so an
    upgrade only adds entries beside the old ones.

    A bundle written by `save_compile_cache` (torch.compiler.save_cache_artifacts) in
    `directory` is loaded into those caches: it seeds a fresh machine with another's compiles.
    """
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.utils import clear_caches

    inductor_dir = directory / "inductor"
    inductor_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir.resolve())
    clear_caches()  # paths under the old directory that Inductor memoised
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    bundle = directory / ARTIFACTS_FILE
    if bundle.is_file():
        try:
            info = torch.compiler.load_cache_artifacts(bundle.read_bytes())
        except Exception as exc:  # a cache is an optimisation: a bad bundle only means compiling
            log.warning("compile cache bundle %s not loaded (%s: %s)", bundle, type(exc).__name__, exc)
        else:
            loaded = sum(len(v) for v in info.artifacts.values()) if info is not None else 0
            log.info("compile cache: %s, %d artifacts loaded from %s", inductor_dir, loaded, bundle)
            return
    log.info("compile cache: %s", inductor_dir)


def save_compile_cache(directory: Path) -> Path | None:
    """Write what this process compiled, or found in the cache, as one portable bundle
    (torch.compiler.save_cache_artifacts) into `directory`; its path, or None when nothing was
    compiled. Call it after `warm_up`. The on-disk caches already make this machine's restarts
    warm: the bundle is for copying to another machine of the same GPU and torch. On CUDA it
    holds Triton's built kernels; on the CPU only the generated C++, which gcc builds again
    (measured: 34 s of the tiny UNet's cold 50 to 90 s)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, _ = saved
    directory.mkdir(parents=True, exist_ok=True)
    bundle = directory / ARTIFACTS_FILE
    partial = bundle.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(bundle)
    log.info("compile cache bundle: %s (%.1f MB)", bundle, len(data) / 2**20)
    return bundle


def compiled_unet(settings: Settings, model: LoadedModel, pixel_budget: int) -> UnetCall | None:
    """The UNet call per SDQUEUE_COMPILE (None: the plain UNet), its graphs compiled for the
    warm-up sizes and every batch bucket the budget allows, before the worker takes a job; the
    compile cache lives in the data dir, so a restarted worker compiles from it."""
    cache = settings.data_dir / "compile-cache"
    if compile_mode(settings.compile, model.device) is not None:
        use_compile_cache(cache)
    call = prepare_unet(model, settings.compile)
    if call is not None:
        native = model.spec.native_size
        sizes = settings.warmup_size_list or [(native, native)]
        rows = 2 * max(1, pixel_budget // min(w * h for w, h in sizes))  # guided: two rows a sample
        warm_up(call, model, sizes, buckets_up_to(rows))
        save_compile_cache(cache)
    return call
