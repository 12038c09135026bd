"""Benchmark: streams of jobs through the producer, Redis and real `sdqueue worker` processes.

In one run, on one model and device, the same streams (same requests, same seeds) go through
  - a worker with SDQUEUE_BATCHING=continuous (jobs join and leave one denoising loop per step),
  - a worker with SDQUEUE_BATCHING=window (today's engine: batches form in a window, run to the end),
  - one diffusers pipeline call per job, what a hand-written Celery + diffusers worker does,
and each worker's figure is set beside the same scheduler driven directly in this process
(bench/stream_direct.py): what the queue, claims, encoding and uploads cost on top.

Streams: `mixed` (several sizes and step counts, num_images 1-4, varied guidance, a share of
img2img) and `uniform-SIZE` (all SIZExSIZE, one step count). Arrivals: all at once (throughput),
and Poisson at --rate jobs/s on the --poisson streams (latency under load; "auto" is 70% of the
slower mode's all-at-once job rate). Every measurement is repeated (--repeats), the modes taking
turns going first, and reported as median [min-max]; ratios are taken within a repeat. First of
all, the idle latency: one job at a time on an idle worker, submit to succeeded, p50/p95.

On the CPU torch runs one thread (--threads) in the workers (OMP_NUM_THREADS) and here
(torch.set_num_threads): on a shared machine more threads made the figures swing 5-20x.

  CPU:  python bench/stream.py --model tiny                          (about 10 minutes, 2 cores)
        python bench/stream.py --model tiny --scenarios mixed --repeats 1 --jobs 8 --idle 3  (a smoke test)
  GPU:  bench/gpu.sh                                                 (sd21-arch fp16, under 8 minutes)

Needs Redis (SDQUEUE_BROKER_URL or --broker-url); each worker's database and storage are a SQLite
file and a folder in a scratch directory unless SDQUEUE_DATABASE_URL / SDQUEUE_STORAGE_URL say
otherwise. Prints a summary table and writes every figure, with the machine's name, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stream_direct import Direct  # noqa: E402
from bench.stream_worker import WorkerProcess, percentile, starter_png  # noqa: E402
from models.registry import built_models_dir, resolve_model  # noqa: E402
from models.request import SIZES  # noqa: E402
from models.settings import load_settings  # noqa: E402

# Sizes and steps per device: the tiny model on a CPU must finish in minutes too.
PROFILES = {
    "cpu": {"sizes": [256, 320, 384], "steps": [4, 6], "uniform": [384, 256], "uniform_steps": 6, "jobs": 12},
    "gpu": {"sizes": [512, 640, 768], "steps": [20, 25], "uniform": [768, 512], "uniform_steps": 25, "jobs": 12},
}
MODES = ("continuous", "window")
# Poisson "auto": this share of what the slower mode serves when all jobs arrive at once, so that
# neither mode is overloaded (an overloaded queue's latency grows with the stream's length).
AUTO_LOAD = 0.7
ARRIVAL_SEED = 1


def make_stream(scenario: str, profile: dict[str, Any], count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    prompts = ["a lighthouse at dusk", "a watercolor fox", "a city street at night, neon", "a bowl of fruit",
               "a (red)++ cat on a sofa", "a mountain lake, morning fog"]
    stream = []
    for i in range(count):
        prompt = rng.choice(prompts)
        if scenario == "mixed":
            width, height = rng.choice(profile["sizes"]), rng.choice(profile["sizes"])
            steps = rng.choice(profile["steps"])
        else:
            width = height = int(scenario.removeprefix("uniform-"))
            steps = profile["uniform_steps"]
        request = {"prompt": prompt, "width": width, "height": height, "num_inference_steps": steps,
                   "num_images": rng.randint(1, 4), "guidance_scale": rng.choice([5.0, 7.5, 9.0]),
                   "negative_prompt": rng.choice(["", "blurry, low quality"]), "seed": rng.randrange(2**31),
                   "use_compel": "++" in prompt}
        if scenario == "mixed" and i % 6 == 5:
            request.update(image=starter_png(width), strength=rng.choice([0.6, 0.8]))
        stream.append(request)
    return stream


def shapes_of(stream: list[dict[str, Any]]) -> set[tuple[int, int, bool]]:
    return {(r["width"], r["height"], "image" in r) for r in stream}


def arrival_offsets(count: int, rate: float, seed: int = ARRIVAL_SEED) -> list[float]:
    """Seconds after the first job: all 0 for rate 0, else a Poisson process of `rate` jobs/s."""
    if rate <= 0:
        return [0.0] * count
    rng = random.Random(seed)
    offsets = [0.0]
    for _ in range(count - 1):
        offsets.append(offsets[-1] + rng.expovariate(rate))
    return offsets


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def machine() -> dict[str, Any]:
    import torch

    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        try:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                               if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return info


def scenario_names(spec: str, profile: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for name in spec.split(","):
        if name == "uniform":
            names += [f"uniform-{size}" for size in profile["uniform"]]
        elif name == "mixed" or (name.startswith("uniform-") and name[8:].isdigit() and int(name[8:]) in SIZES):
            names.append(name)
        else:
            raise SystemExit(f"--scenarios: {name!r} is not mixed, uniform or uniform-SIZE (SIZE one of {SIZES})")
    return list(dict.fromkeys(names))


def summarize(runs: list[dict[str, Any]], baseline: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Median [min-max] of each figure over the repeats; ratios paired within a repeat."""
    out = {key: spread([r[key] for r in runs]) for key in ("images_per_s", "latency_p50_s", "latency_p95_s")}
    direct = [r for r in runs if r.get("direct")]
    if direct:
        out["direct_images_per_s"] = spread([r["direct"]["images_per_s"] for r in direct])
        out["end_to_end_vs_direct"] = spread([r["end_to_end_vs_direct"] for r in direct])
    if baseline:
        out["speedup_vs_baseline"] = spread([r["images_per_s"] / b["images_per_s"] for r, b in zip(runs, baseline)])
    out["runs"] = runs
    return out


@dataclass
class Plan:
    """What one benchmark runs: the streams, which of them also go one call per job and with
    Poisson arrivals, and how often."""

    modes: list[str]
    streams: dict[str, list[dict[str, Any]]]
    baseline_on: list[str]
    poisson_on: list[str]
    rate: float | None  # Poisson jobs/s; None: AUTO_LOAD of the slower mode's all-at-once rate
    repeats: int
    time_limit: float  # 0: none
    timeout: float


def idle_latency(plan: Plan, workers: dict[str, WorkerProcess], direct: Direct, request: dict[str, Any],
                 count: int) -> dict[str, Any]:
    """Submit->succeeded of one job at a time on an idle worker, per mode; and the same request
    as one diffusers call here, for what the queue adds."""
    idle: dict[str, Any] = {"size": f"{request['width']}x{request['height']}",
                            "steps": request["num_inference_steps"], "jobs": count}
    for mode in plan.modes:
        latencies = workers[mode].idle_latency(request, count, plan.timeout)
        idle[mode] = {"p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
                      "min": round(min(latencies), 3), "max": round(max(latencies), 3), "runs": latencies}
        print(f"idle latency {mode}: p50 {idle[mode]['p50_s']} s, p95 {idle[mode]['p95_s']} s", flush=True)
    direct.timed_call(request)
    calls = [direct.timed_call({**request, "seed": request["seed"] + i}) for i in range(min(count, 5))]
    idle["one_call_p50_s"] = round(percentile(calls, 0.5), 3)
    return idle


def run_repeats(plan: Plan, workers: dict[str, WorkerProcess], direct: Direct,
                clock: float) -> tuple[dict[str, Any], dict[str, float], int]:
    """Every stream, `plan.repeats` times (fewer past the time limit), the modes taking turns
    going first: runs by stream, arrivals and mode; the Poisson rates; the repeats done."""
    runs: dict[str, Any] = {name: {"burst": {m: [] for m in plan.modes} | {"baseline": []},
                                   "poisson": {m: [] for m in plan.modes}} for name in plan.streams}
    rates: dict[str, float] = {}
    repeat_seconds = 0.0
    for repeat in range(plan.repeats):
        elapsed = time.monotonic() - clock
        if repeat and plan.time_limit and elapsed + repeat_seconds > plan.time_limit:
            print(f"stopping after {repeat} repeat(s): another ({repeat_seconds:.0f} s) would end past "
                  f"--time-limit {plan.time_limit:g} s", flush=True)
            return runs, rates, repeat
        started = time.monotonic()
        order = plan.modes if repeat % 2 == 0 else plan.modes[::-1]
        for name, stream in plan.streams.items():
            tag = f"[{name} {repeat + 1}/{plan.repeats}"
            # 1. all at once, through each worker, then the same loop driven directly
            for mode in order:
                worker = workers[mode]
                run = worker.serve(stream, arrival_offsets(len(stream), 0), plan.timeout)
                if mode == "continuous":
                    run["direct"] = direct.continuous(Direct.jobs_of(worker, run["job_ids"]))
                else:
                    run["direct"] = direct.window(worker, run["batch_ids"], warm=repeat == 0)
                run["end_to_end_vs_direct"] = round(run["images_per_s"] / run["direct"]["images_per_s"], 3)
                del run["job_ids"], run["batch_ids"]
                runs[name]["burst"][mode].append(run)
                print(f"{tag} all at once, {mode}] {run['images']} images in {run['wall_s']} s: "
                      f"{run['images_per_s']} img/s, latency p50 {run['latency_p50_s']} s p95 "
                      f"{run['latency_p95_s']} s; direct {run['direct']['images_per_s']} img/s "
                      f"(end to end / direct {run['end_to_end_vs_direct']}); {held(run)}", flush=True)
            # 2. one diffusers call per job
            if name in plan.baseline_on:
                base = direct.baseline(stream, warm=repeat == 0)
                runs[name]["burst"]["baseline"].append(base)
                print(f"{tag} one call per job] {base['images_per_s']} img/s", flush=True)
            # 3. Poisson arrivals (the same times in every repeat and mode); the wall is the arrivals'
            #    here, so no direct figure: latency is what counts
            if name in plan.poisson_on:
                if name not in rates:
                    slower = min(runs[name]["burst"][m][-1]["jobs_per_s"] for m in plan.modes)
                    rates[name] = round(AUTO_LOAD * slower, 3) if plan.rate is None else plan.rate
                offsets = arrival_offsets(len(stream), rates[name])
                for mode in order:
                    run = workers[mode].serve(stream, offsets, plan.timeout)
                    del run["job_ids"], run["batch_ids"]
                    runs[name]["poisson"][mode].append(run)
                    print(f"{tag} Poisson {rates[name]} jobs/s, {mode}] {run['images_per_s']} img/s, latency "
                          f"p50 {run['latency_p50_s']} s p95 {run['latency_p95_s']} s; {held(run)}", flush=True)
        repeat_seconds = time.monotonic() - started
    return runs, rates, plan.repeats


def stream_figures(plan: Plan, name: str, runs: dict[str, Any], rate: float | None) -> dict[str, Any]:
    """One stream's figures: median [min-max] over the repeats, ratios paired within a repeat."""
    stream, modes = plan.streams[name], plan.modes
    burst, baseline = runs["burst"], runs["burst"]["baseline"]
    figures: dict[str, Any] = {"jobs": len(stream), "images": sum(r["num_images"] for r in stream),
                               "all_at_once": {m: summarize(burst[m], baseline) for m in modes}}
    if baseline:
        figures["all_at_once"]["baseline_one_call_per_job"] = {
            "images_per_s": spread([b["images_per_s"] for b in baseline]), "runs": baseline}
    if len(modes) == 2:
        figures["all_at_once"]["continuous_vs_window"] = spread(
            [c["images_per_s"] / w["images_per_s"] for c, w in zip(burst["continuous"], burst["window"])])
    if rate is not None:
        figures["poisson"] = {"rate_jobs_per_s": rate, **{m: summarize(runs["poisson"][m], None) for m in modes}}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (CPU) or sd21-arch (GPU), or a diffusers folder")
    parser.add_argument("--scenarios", default="mixed,uniform",
                        help="comma-separated: mixed, uniform (each of the device's uniform sizes), uniform-SIZE")
    parser.add_argument("--modes", default=",".join(MODES), help="batching modes to run (default: both)")
    parser.add_argument("--jobs", type=int, help="jobs per stream (default 12)")
    parser.add_argument("--repeats", type=int, default=3, help="times each measurement runs (default 3)")
    parser.add_argument("--rate", default="auto",
                        help="Poisson arrival rate, jobs/s; auto: 70%% of the slower mode's rate; 0: no Poisson runs")
    parser.add_argument("--poisson", default="mixed", help="streams that also run with Poisson arrivals (or none)")
    parser.add_argument("--baseline", default="mixed",
                        help="streams also made with one diffusers call per job (default mixed; all, none or a list)")
    parser.add_argument("--idle", type=int, default=10, help="idle-latency jobs per mode (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU (default 1)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="seconds: start no repeat after the first that would end past this (0: none)")
    parser.add_argument("--broker-url", default=os.environ.get("SDQUEUE_BROKER_URL", "redis://127.0.0.1:6379/14"))
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON results go")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for one stream")
    args = parser.parse_args()
    clock = time.monotonic()

    import torch

    # 1. device, threads and the plan
    on_gpu = torch.cuda.is_available()
    profile = PROFILES["gpu" if on_gpu else "cpu"]
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--modes: {args.modes!r}; choose from {', '.join(MODES)}")
    try:
        rate = None if args.rate == "auto" else float(args.rate)
    except ValueError:
        raise SystemExit(f"--rate: {args.rate!r} is not a number of jobs/s or auto") from None
    scenarios = scenario_names(args.scenarios, profile)
    plan = Plan(
        modes=modes, streams={name: make_stream(name, profile, args.jobs or profile["jobs"]) for name in scenarios},
        baseline_on=scenarios if args.baseline == "all" else [] if args.baseline == "none"
        else scenario_names(args.baseline, profile),
        poisson_on=[] if rate == 0 or args.poisson == "none" else scenario_names(args.poisson, profile),
        rate=rate, repeats=args.repeats, time_limit=args.time_limit, timeout=args.timeout,
    )
    native = profile["uniform"][0]
    idle_request = {"prompt": "a lighthouse at dusk", "negative_prompt": "", "width": native, "height": native,
                    "num_inference_steps": profile["uniform_steps"], "num_images": 1, "guidance_scale": 7.5,
                    "seed": 1000, "use_compel": False}
    env = {"SDQUEUE_BROKER_URL": args.broker_url, "SDQUEUE_MODEL": args.model, "HF_HUB_OFFLINE": "1"}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sdqueue-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env["SDQUEUE_DATA_DIR"] = os.environ.get("SDQUEUE_DATA_DIR", str(workdir))
    if not on_gpu:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        torch.set_num_threads(args.threads)
    os.environ.update(env)
    settings = load_settings()

    # 2. the model (built if it is a random-weights one not built yet), in each worker and here
    spec = resolve_model(args.model, settings.data_dir)
    if spec.random_weights and not (spec.local_dir and (spec.local_dir / "model_index.json").is_file()):
        from worker.build import build_and_save

        target = built_models_dir(settings.data_dir) / spec.name
        print(f"building {spec.name} into {target} ...", flush=True)
        build_and_save(spec.name, target)
    workers: dict[str, WorkerProcess] = {}
    direct = None
    try:
        for mode in modes:  # they load their model while this process loads its own
            workers[mode] = WorkerProcess(mode, env, workdir)
        from worker.engine import default_pixel_budget
        from worker.pipeline import load_model

        model = load_model(resolve_model(args.model, settings.data_dir), settings.device)
        pixel_budget = settings.pixel_budget or default_pixel_budget(model)
        direct = Direct(model, pixel_budget)
        results: dict[str, Any] = {
            "machine": machine(), "model": args.model, "device": "cuda" if on_gpu else "cpu",
            "dtype": "float16" if on_gpu else "float32",
            "setup": {"modes": modes, "jobs": args.jobs or profile["jobs"], "repeats": args.repeats,
                      "threads": None if on_gpu else args.threads, "pixel_budget": pixel_budget,
                      "worker_slots": settings.worker_slots, "batch_window_ms": settings.batch_window_ms,
                      "compile": os.environ.get("SDQUEUE_COMPILE", "auto"), "arrival_seed": ARRIVAL_SEED},
            "scenarios": {},
        }

        # 3. warm-up: a short job per shape through each worker and each path here (kernels depend
        #    on the shape, not on the step count)
        shapes = set().union(*(shapes_of(s) for s in plan.streams.values()), shapes_of([idle_request]))
        print(f"warm-up: {len(shapes)} shapes through {', '.join(modes)} ...", flush=True)
        for worker in workers.values():
            worker.warm_up(shapes, args.timeout)
        if "continuous" in modes:
            direct.warm_continuous(shapes)

        # 4. idle latency, 5. the streams, repeated, 6. their figures
        if args.idle:
            results["idle_latency"] = idle_latency(plan, workers, direct, idle_request, args.idle)
        runs, rates, results["setup"]["repeats_done"] = run_repeats(plan, workers, direct, clock)
        for name in plan.streams:
            results["scenarios"][name] = stream_figures(plan, name, runs[name], rates.get(name))
        results["seconds"] = round(time.monotonic() - clock, 1)
    finally:
        for worker in workers.values():
            worker.stop()
        if direct is not None:
            direct.close()

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"stream-{results['device']}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print_summary(results)
    print(f"results: {path}")
    return 0


def held(run: dict[str, Any]) -> str:
    """What the denoising loop held: samples per model call (continuous), or the batches (window)."""
    if "samples_per_call_mean" in run:
        return f"{run['samples_per_call_mean']} samples per model call (most {run['samples_per_call_max']})"
    return f"{run['batches']} batches of {run['images'] / max(1, run['batches']):.1f} images"


def show(figure: dict[str, Any] | None, digits: int = 2) -> str:
    if not figure:
        return "-"
    if figure["n"] == 1:
        return f"{figure['median']:.{digits}f}"
    return f"{figure['median']:.{digits}f} [{figure['min']:.{digits}f}-{figure['max']:.{digits}f}]"


def print_summary(results: dict[str, Any]) -> None:
    setup = results["setup"]
    threads = f", {setup['threads']} torch thread(s)" if setup["threads"] else ""
    print(f"\n{results['model']} on {results['machine'].get('gpu') or results['machine']['cpu']} ({results['dtype']}"
          f"{threads}), {setup['repeats_done']} repeat(s): median [min-max]")
    header = (f"{'stream':<12} {'arrivals':<16} {'mode':<11} {'images/s':<20} {'latency p50 s':<20} "
              f"{'p95 s':<20} {'direct img/s':<20} {'e2e / direct':<20} {'vs one call':<20}")
    print(header)
    print("-" * len(header))
    for name, figures in results["scenarios"].items():
        sections = [("all at once", figures["all_at_once"])]
        if "poisson" in figures:
            sections.append((f"Poisson {figures['poisson']['rate_jobs_per_s']}/s", figures["poisson"]))
        for arrivals, section in sections:
            for mode in setup["modes"]:
                f = section[mode]
                print(f"{name:<12} {arrivals:<16} {mode:<11} {show(f['images_per_s']):<20} "
                      f"{show(f['latency_p50_s']):<20} {show(f['latency_p95_s']):<20} "
                      f"{show(f.get('direct_images_per_s')):<20} {show(f.get('end_to_end_vs_direct'), 3):<20} "
                      f"{show(f.get('speedup_vs_baseline')):<20}")
            if "baseline_one_call_per_job" in section:
                print(f"{name:<12} {arrivals:<16} {'one call':<11} "
                      f"{show(section['baseline_one_call_per_job']['images_per_s']):<20}")
    idle = results.get("idle_latency")
    if idle:
        print(f"\nidle latency, {idle['size']}, {idle['steps']} steps, 1 image, {idle['jobs']} jobs one at a time "
              f"(submit -> succeeded):")
        for mode in setup["modes"]:
            print(f"  {mode:<11} p50 {idle[mode]['p50_s']} s, p95 {idle[mode]['p95_s']} s "
                  f"[{idle[mode]['min']}-{idle[mode]['max']}]")
        print(f"  one diffusers call, no queue: p50 {idle['one_call_p50_s']} s")
    if "continuous" in setup["modes"]:
        print("\nagainst the targets (GPU: sd21-arch fp16):")
        mixed = results["scenarios"].get("mixed", {}).get("all_at_once", {}).get("continuous", {})
        if "speedup_vs_baseline" in mixed:
            print(f"  mixed stream, continuous vs one diffusers call per job: {show(mixed['speedup_vs_baseline'])}x "
                  f"(target 2.5x)")
        for name, figures in results["scenarios"].items():
            f = figures["all_at_once"]["continuous"]
            print(f"  {name}: {show(f['images_per_s'])} img/s; end to end / direct {show(f['end_to_end_vs_direct'], 3)}"
                  f" (target >= 0.95)")
        if idle:
            print(f"  idle latency p50, {idle['size']} {idle['steps']} steps: {idle['continuous']['p50_s']} s")


if __name__ == "__main__":
    sys.exit(main())
