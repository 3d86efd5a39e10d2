"""Archive inference benchmark (issue 29): images per second and peak resident memory of the
bundle's ``inferring`` over N generated images, with 1 and 2 processes of one thread each.

Everything runs as users run it: ``python -m monai.bundle run inferring`` for one process,
``torchrun --standalone --nproc_per_node=2`` with ``configs/multi_gpu_inference.json`` for two
(gloo on the CPU; ``--gpu`` keeps the GPUs visible, one process per GPU). The model is the tiny
backbone (``medad-tiny``, seeded random weights, 112 px, as ``configs/tiny.json``) with a
few-shot memory and calibration; the inputs are N PNG files of 128 x 128 generated once per
``--work`` folder. Each run writes maps, overlays and ``scores.csv`` into a fresh output folder.

Reported per run: the scoring rate (N over the slowest process's input checks plus engine time,
from the run's ``checked N inputs in S s`` and Ignite's ``Engine run finished`` lines, so that the
~10 s of imports do not count) and the wall time with start-up; the peak resident memory of the largest process (``resource.getrusage`` of the
children, measured in a fresh wrapper process per run); and the parallel efficiency, the 2-process
rate per process over the 1-process rate. The CPU's model name and SIMD flags are printed.
``--images 200`` takes about a minute on a quiet 2-core CPU, the default ``--images 200 2000`` a
few minutes; the JSON's ``peak_rss_ratio`` (memory for the most images over the fewest) and
``parallel_efficiency`` are the ratios the targets are stated in (:func:`summary`).

Usage: ``python scripts/benchmark_archive.py --images 200 2000 --output docs/benchmark_archive.json``
(``main(argv)`` is what ``scripts/benchmark.py --archive N`` calls).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
IMAGE_SIZE = 112


def _prepare(work: Path, images: int) -> tuple[Path, Path]:
    """The bundle root with the tiny few-shot ``models/model.pt``, and the folder of ``images`` PNGs."""
    import numpy as np
    import torch
    from PIL import Image

    import medad
    from medad.model.checkpoint import save_model

    root = work / "bundle"
    model = root / "models" / "model.pt"
    if not model.is_file():
        torch.manual_seed(0)
        detector = medad.build_detector(["Brain"], "Brain", model_name=medad.TINY_MODEL_NAME, image_size=IMAGE_SIZE,
                                        pretrained=None, random_init=True, levels=(1, 2, 3, 4)).eval()
        with torch.no_grad():
            detector.build_memory(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
            detector.calibrate(torch.rand(6, 3, IMAGE_SIZE, IMAGE_SIZE), labels=torch.tensor([0, 0, 0, 1, 1, 1]))
        save_model(detector, model)
    folder = work / f"images_{images}"
    if not folder.is_dir() or len(list(folder.glob("*.png"))) != images:
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        ramp = np.linspace(0, 180, 128)[None, :] + np.linspace(0, 60, 128)[:, None]
        for index in range(images):
            pixels = ramp + rng.normal(0, 12, (128, 128))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img{index:06d}.png")
    return root, folder


def _command(processes: int, root: Path, inputs: Path, output: Path, batch_size: int, workers: int) -> list[str]:
    from medad.surfaces.workflow import bundle_command

    configs = [CONFIGS / "inference.json"] + ([CONFIGS / "multi_gpu_inference.json"] if processes > 1 else [])
    command = bundle_command("inferring", configs, root, {"dataset_dir": inputs, "output_dir": output,
                                                          "batch_size": batch_size, "num_workers": workers})
    if processes > 1:
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [str(torchrun), "--standalone", f"--nproc_per_node={processes}", *command[1:]]
    return command


def _measure(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command`` from a fresh wrapper process whose children's peak RSS is that run's alone."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "start = time.perf_counter()\n"
        "done = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True)\n"
        "print(json.dumps({'returncode': done.returncode, 'wall_s': time.perf_counter() - start,\n"
        "                  'peak_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,\n"
        "                  'log': done.stdout + done.stderr}))\n"
    )
    result = subprocess.run([sys.executable, "-c", wrapper, json.dumps(command)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"the measuring wrapper failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout)


def _seconds(log: str) -> tuple[float, float]:
    """The slowest process's input checks (``checked N inputs in S s``, :class:`medad.engine.archive.ArchiveRun`)
    and engine time (Ignite's ``Engine run finished. Time taken: H:M:S.f``) from a run's log."""
    checks = [float(s) for s in re.findall(r"checked \d+ inputs in ([\d.]+) s", log)]
    times = [int(h) * 3600 + int(m) * 60 + float(s)
             for h, m, s in re.findall(r"Engine run finished\. Time taken: (\d+):(\d+):([\d.]+)", log)]
    if not times or not checks:
        raise RuntimeError("no 'checked ... inputs' or 'Engine run finished' line in the run's log:\n" + log[-3000:])
    return max(checks), max(times)


def _cpu() -> dict:
    from medad.model.backbone import cpu_flags

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    simd = sorted(flag for flag in cpu_flags() if flag.startswith(("avx", "amx", "fma", "sse4")))
    return {"model": model, "cores": os.cpu_count(), "simd_flags": simd}


def summary(runs: Sequence[dict]) -> dict:
    """The ratios the issue's targets are stated in, from ``runs`` of one invocation:
    ``parallel_efficiency`` (per image count, per process count above 1: the rate per process over
    the 1-process rate) and ``peak_rss_ratio`` (per process count: the peak resident memory of the
    most images over that of the fewest; 1 means memory does not grow with the images).

    >>> runs = [{"images": 200, "processes": 1, "images_per_s": 30.0, "images_per_s_per_process": 30.0, "peak_rss_mib": 400.0},
    ...         {"images": 200, "processes": 2, "images_per_s": 57.0, "images_per_s_per_process": 28.5, "peak_rss_mib": 800.0},
    ...         {"images": 2000, "processes": 1, "images_per_s": 31.0, "images_per_s_per_process": 31.0, "peak_rss_mib": 410.0}]
    >>> summary(runs)
    {'parallel_efficiency': {'200': {'2': 0.95}}, 'peak_rss_ratio': {'1': 1.025}}
    """
    efficiency: dict[str, dict[str, float]] = {}
    for run in runs:
        single = next((r for r in runs if r["images"] == run["images"] and r["processes"] == 1), None)
        if single is not None and run["processes"] > 1:
            efficiency.setdefault(str(run["images"]), {})[str(run["processes"])] = round(
                run["images_per_s_per_process"] / single["images_per_s"], 6)
    growth: dict[str, float] = {}
    for processes in sorted({run["processes"] for run in runs}):
        sized = sorted((r for r in runs if r["processes"] == processes), key=lambda r: r["images"])
        if len(sized) > 1 and sized[-1]["images"] > sized[0]["images"]:
            growth[str(processes)] = round(sized[-1]["peak_rss_mib"] / sized[0]["peak_rss_mib"], 6)
    return {"parallel_efficiency": efficiency, "peak_rss_ratio": growth}


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; print and return the result (also written to ``--output`` if given)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[200, 2000],
                        help="numbers of generated images (N), each run with every process count")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--work", type=Path, default=Path("benchmark_archive_work"), help="generated data and outputs")
    parser.add_argument("--gpu", action="store_true", help="keep the GPUs visible (one process per GPU)")
    parser.add_argument("--output", type=Path, default=None, help="JSON result file")
    args = parser.parse_args(argv)

    cpu = _cpu()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['simd_flags']) or 'none found'}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if not args.gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    runs = []
    for images in args.images:
        root, inputs = _prepare(args.work, images)
        for processes in args.processes:
            output = args.work / f"out_{images}_{processes}p_{int(time.time())}"
            measured = _measure(_command(processes, root, inputs, output, args.batch_size, args.workers), env)
            if measured["returncode"] != 0:
                raise RuntimeError(f"{processes}-process run over {images} images failed:\n{measured['log'][-4000:]}")
            checks, engine = _seconds(measured["log"])
            scoring = checks + engine
            runs.append({
                "images": images,
                "processes": processes,
                "images_per_s": images / scoring,
                "images_per_s_per_process": images / scoring / processes,
                "check_s": checks,
                "engine_s": engine,
                "wall_s": measured["wall_s"],
                "peak_rss_mib": measured["peak_rss_kib"] / 1024,
            })
            print(json.dumps(runs[-1]), flush=True)
    result = {"images": args.images, "batch_size": args.batch_size, "workers": args.workers, "threads_per_process": 1,
              "cpu": cpu, "runs": runs, **summary(runs)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        from medad.io.files import atomic_write

        with atomic_write(args.output) as handle:
            handle.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
