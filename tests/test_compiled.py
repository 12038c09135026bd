"""The compiled UNet: the same noise predictions and images as the eager UNet, one graph per
bucket, and a compile cache that a restart finds. On the CPU with Inductor ("default" mode),
one graph compiled once for the whole module: every test runs 3 or 4 rows of 128x128 latents."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import max_diff
from worker.batch import generate_batch
from worker.samples import CompatKey, Prompt, Sample
from worker.compiled import (
    ARTIFACTS_FILE,
    CompiledUnet,
    bucket_for,
    buckets_up_to,
    compile_mode,
    fastest_sdpa_backend,
    fuse_attention_projections,
    prepare_unet,
    save_compile_cache,
    use_compile_cache,
    warm_up,
)
from worker.loop import ContinuousLoop, drain

# torch.compile's first use imports torch.utils.mkldnn, which uses torch.jit.script_method (torch 2.13)
# (the warning); and a graph takes 20-60 s to compile on an idle 2-core machine, 5 to 10 times that
# beside a load of 14: more than the suite's 300 s a test (the timeout)
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.timeout(900)]

SIZE = 128  # latents of 16x16
TOKENS = 77


def graphs() -> int:
    """Graphs Dynamo has compiled in this process."""
    return counters["stats"]["unique_graphs"]


def inputs(model: Any, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A UNet call's sample, per-row timesteps (as continuous batching makes them) and text."""
    unet = model.txt2img.unet
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, unet.config.in_channels, SIZE // 8, SIZE // 8, generator=g)
    timesteps = torch.tensor([999.0, 601.0, 21.0, 400.0][:rows])
    text = torch.randn(rows, TOKENS, unet.config.cross_attention_dim, generator=g)
    return sample, timesteps, text


def job(job_id: str, prompt: str, seed: int, guidance: float) -> list[Sample]:
    return [Sample(job_id, 0, seed, Prompt(prompt, "", False), guidance)]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A compile cache of this module's own, cold; the process's previous one afterwards."""
    from torch._inductor.utils import clear_caches

    directory = tmp_path_factory.mktemp("compile-cache")
    with pytest.MonkeyPatch.context() as patch:
        # set here first, so that what use_compile_cache sets is put back (or removed) afterwards
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(directory / "inductor"))
        use_compile_cache(directory)
        yield directory
    clear_caches()


@pytest.fixture(scope="module")
def compiled(model: Any, compile_cache: Path) -> CompiledUnet:
    return CompiledUnet(model.txt2img.unet, "default")


@pytest.mark.parametrize("setting, device, mode", [
    ("auto", "cuda", "default"), ("auto", "cuda:1", "default"), ("auto", "cpu", None),
    ("off", "cuda", None), ("off", "cpu", None),
    ("default", "cpu", "default"), ("max-autotune", "cuda", "max-autotune"), ("max-autotune", "cpu", "max-autotune"),
])
def test_compile_mode_resolves_auto_by_device(setting: str, device: str, mode: str | None) -> None:
    assert compile_mode(setting, device) == mode


def test_compile_mode_refuses_an_unknown_setting() -> None:
    with pytest.raises(ValueError, match="'fast'"):
        compile_mode("fast", "cuda")


def test_rows_go_to_power_of_two_buckets() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 64, 64, 128]
    assert [bucket_for(n, [6, 12]) for n in (1, 6, 7, 12, 13)] == [6, 6, 12, 12, 16]
    assert buckets_up_to(1) == [1] and buckets_up_to(5) == [1, 2, 4, 8] and buckets_up_to(16) == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError):
        bucket_for(0)


@torch.inference_mode()
def test_compiled_unet_predicts_what_the_eager_unet_predicts(model: Any, compiled: CompiledUnet) -> None:
    unet = model.txt2img.unet
    sample, timesteps, text = inputs(model, 3)
    eager = unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0]
    (out,) = compiled(sample, timesteps, encoder_hidden_states=text, return_dict=False)
    assert out.shape == eager.shape == sample.shape
    assert (out - eager).abs().max() < 1e-4
    # one timestep for every row, as window batching passes it: a 0-d tensor or a number
    for t in (torch.tensor(601.0), 601, 601.0):
        eager = unet(sample, t, encoder_hidden_states=text, return_dict=False)[0]
        out = compiled(sample, t, encoder_hidden_states=text, return_dict=False)[0]
        assert (out - eager).abs().max() < 1e-4
    assert compiled.shapes == {(4, SIZE // 8, SIZE // 8, TOKENS)}
    assert compiled(sample, t, encoder_hidden_states=text, return_dict=True).sample.shape == sample.shape


@torch.inference_mode()
def test_padding_rows_does_not_change_the_real_rows(model: Any, compiled: CompiledUnet) -> None:
    sample, timesteps, text = inputs(model, 4, seed=1)
    four = compiled(sample, timesteps, encoder_hidden_states=text)[0]
    three = compiled(sample[:3], timesteps[:3], encoder_hidden_states=text[:3])[0]
    assert three.shape[0] == 3
    assert (three - four[:3]).abs().max() < 1e-5


@torch.inference_mode()
def test_three_rows_then_four_compile_one_graph_for_bucket_4(model: Any, compiled: CompiledUnet) -> None:
    before = graphs()
    sample, timesteps, text = inputs(model, 4, seed=2)
    compiled(sample[:3], timesteps[:3], encoder_hidden_states=text[:3])
    after_three = graphs()
    assert after_three - before <= 1  # 1 when no earlier test compiled bucket 4
    compiled(sample, timesteps, encoder_hidden_states=text)
    compiled(sample[:3], torch.tensor(500.0), encoder_hidden_states=text[:3])
    assert graphs() == after_three
    assert compiled.shapes == {(4, SIZE // 8, SIZE // 8, TOKENS)}


def test_the_loops_make_the_eager_images_with_the_compiled_unet(model: Any, cache: Any, compiled: CompiledUnet) -> None:
    # a guided sample (2 rows) and an unguided one (1 row): 3 rows a call, bucket 4
    samples = job("a", "a red fox", 3, guidance=6.0) + job("b", "a harbour", 8, guidance=1.0)
    conditioning = cache.get([s.prompt for s in samples])
    images = {}
    for name, call in (("eager", None), ("compiled", compiled)):
        loop = ContinuousLoop(model, SIZE, SIZE, unet_call=call)
        loop.admit(samples, conditioning, steps=3)
        images[name, "loop"] = [image for _, image in drain(loop)]
        key = CompatKey("txt2img", SIZE, SIZE, 3)
        images[name, "batch"] = generate_batch(model, key, samples, conditioning, unet_call=call)
    for kind in ("loop", "batch"):
        for eager, built in zip(images["eager", kind], images["compiled", kind], strict=True):
            assert max_diff(eager, built) <= 1
    assert max_diff(images["eager", "loop"][0], images["eager", "loop"][1]) > 10  # really two images
    assert compiled.shapes == {(4, SIZE // 8, SIZE // 8, TOKENS)}


def test_warm_up_calls_once_per_size_and_bucket(model: Any) -> None:
    calls: list[tuple[Any, ...]] = []

    def recording(sample, timestep, encoder_hidden_states, return_dict=False):  # type: ignore[no-untyped-def]
        calls.append((tuple(sample.shape), tuple(timestep.shape), tuple(encoder_hidden_states.shape),
                       sample.dtype, torch.is_inference_mode_enabled()))
        return (sample,)

    assert warm_up(recording, model, [(128, 128), (192, 64)], [1, 4], tokens=154) >= 0
    assert calls == [
        ((1, 4, 16, 16), (1,), (1, 154, 32), torch.float32, True),
        ((4, 4, 16, 16), (4,), (4, 154, 32), torch.float32, True),
        ((1, 4, 8, 24), (1,), (1, 154, 32), torch.float32, True),
        ((4, 4, 8, 24), (4,), (4, 154, 32), torch.float32, True),
    ]
    assert warm_up(None, model, [(128, 128)], [1]) == 0.0


def test_warm_up_leaves_nothing_to_compile_for_the_loops(model: Any, cache: Any, compiled: CompiledUnet) -> None:
    warm_up(compiled, model, [(SIZE, SIZE)], [4])
    before = graphs()
    samples = job("c", "a lighthouse", 5, guidance=4.0) + job("d", "a tree", 6, guidance=1.0)
    loop = ContinuousLoop(model, SIZE, SIZE, unet_call=compiled)
    loop.admit(samples, cache.get([s.prompt for s in samples]), steps=2)
    drain(loop)
    assert graphs() == before


def test_prepare_unet_on_the_cpu_compiles_only_when_asked(model: Any) -> None:
    assert prepare_unet(model, "auto") is None
    assert prepare_unet(model, "off") is None
    call = prepare_unet(model, "default")  # lazy: nothing compiles until it is called
    assert isinstance(call, CompiledUnet) and call.mode == "default" and call.sdpa_backend is None
    assert call.unet is model.txt2img.unet
    assert fastest_sdpa_backend(model, SIZE, SIZE, 2) is None


@torch.inference_mode()
def test_fused_attention_projections_keep_the_outputs(model: Any) -> None:
    pipe = model.txt2img
    unet, vae = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.vae)
    assert fuse_attention_projections(unet) and fuse_attention_projections(vae)
    assert fuse_attention_projections(torch.nn.Linear(2, 2)) is False
    sample, timesteps, text = inputs(model, 2)
    expected = pipe.unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0]
    assert (unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0] - expected).abs().max() < 1e-5
    assert (vae.decode(sample, return_dict=False)[0] - pipe.vae.decode(sample, return_dict=False)[0]).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prepare_unet_on_cuda_picks_an_attention_kernel_and_compiles(data_dir: Path) -> None:
    from models.registry import resolve_model
    from worker.pipeline import load_model

    gpu_model = load_model(resolve_model("tiny", data_dir), "cuda")
    sample, timesteps, text = (x.to("cuda") for x in inputs(gpu_model, 3))
    sample, text = sample.half(), text.half()
    with torch.inference_mode():
        eager = gpu_model.txt2img.unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0]
    call = prepare_unet(gpu_model, "auto", probe_size=(SIZE, SIZE), probe_batch=2)
    assert isinstance(call, CompiledUnet) and call.mode == "default"
    assert call.sdpa_backend in ("flash", "efficient", "cudnn")
    warm_up(call, gpu_model, [(SIZE, SIZE)], [4])
    with torch.inference_mode():
        out = call(sample, timesteps, encoder_hidden_states=text)[0]
    assert (out.float() - eager.float()).abs().max() < 2e-2  # fp16, fused projections, another kernel


@torch.inference_mode()
def test_a_restart_finds_the_compiled_graph_in_the_cache(model: Any, compiled: CompiledUnet, compile_cache: Path,
                                                         tmp_path: Path) -> None:
    """Near the end of this module: it resets Dynamo, which stands in for a restart (a new process also
    traces again, then finds Inductor's output on disk)."""
    sample, timesteps, text = inputs(model, 3)
    expected = compiled(sample, timesteps, encoder_hidden_states=text)[0]  # bucket 4 is compiled
    assert any((compile_cache / "inductor" / "fxgraph").rglob("*"))  # Inductor wrote its output here

    torch._dynamo.reset()
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    again = CompiledUnet(model.txt2img.unet, "default")
    assert (again(sample, timesteps, encoder_hidden_states=text)[0] - expected).abs().max() < 1e-5
    assert counters["inductor"]["fxgraph_cache_hit"] - hits == 1
    assert counters["inductor"]["fxgraph_cache_miss"] == misses


def test_the_cache_bundle_seeds_an_empty_cache(model: Any, compiled: CompiledUnet, compile_cache: Path,
                                               tmp_path: Path) -> None:
    """What save_compile_cache writes, use_compile_cache loads into another machine's empty cache.
    (Not compiled from here: on the CPU the bundle holds the generated C++ source, not the built
    kernels, so gcc runs again; on CUDA Triton's kernels travel in it.)"""
    sample, timesteps, text = inputs(model, 3)
    with torch.inference_mode():
        compiled(sample, timesteps, encoder_hidden_states=text)
    bundle = save_compile_cache(compile_cache)
    assert bundle == compile_cache / ARTIFACTS_FILE and bundle.stat().st_size > 0
    fresh = tmp_path / "compile-cache"
    fresh.mkdir()
    shutil.copy(bundle, fresh / ARTIFACTS_FILE)
    use_compile_cache(fresh)
    assert any((fresh / "inductor" / "fxgraph").rglob("*")) and any((fresh / "inductor" / "aotautograd").rglob("*"))
