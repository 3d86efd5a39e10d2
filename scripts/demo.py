"""The embedded demo: build the demo data, then train, evaluate and run the bundle on it.

Runs every step through ``python -m monai.bundle`` exactly as a user would, with the tiny,
randomly initialised backbone of ``configs/tiny.json`` (no weights can be downloaded here):

1. zero-shot training on every demo domain but the held-out target, and its evaluation;
2. few-shot training on k normal + k abnormal images of the target, and its evaluation;
3. normal-only adaptation of the zero-shot model to k normal images (no training), and its evaluation;
4. the baselines on the same backbone and k support images, nothing trained: every registered
   method that trains nothing (:data:`medad.METHODS`: CLIP without adapters, ``method: clip``;
   the memory bank of the backbone's own tokens, ``method: memory``; WinCLIP, ``method: winclip``);
5. inference on a few target images (RGB PNG and JPEG): anomaly maps, overlays and a scores table.

It prints a results table and writes ``roc.png`` under the output folder; every evaluation also
writes its report (``eval/report.html``), and the demo prints the few-shot one's path.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medad.model.methods import METHODS
from medad.surfaces.workflow import bundle_command

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Log lines worth showing while a step runs (progress and results, not library chatter).
PROGRESS = ("Epoch:", "Epoch[", "Metrics --", "Saved", "Restored", "site threshold", "Error", "error")


def bundle(run_id: str, configs: list[str], bundle_root: Path, **overrides: object) -> None:
    """Run one bundle workflow, streaming its progress lines; stop the demo if it fails."""
    command = bundle_command(run_id, [CONFIGS / f"{name}.json" for name in [*configs, "tiny"]], bundle_root, overrides)
    # One thread per process: the tiny backbone's operations are too small to split, and on a
    # shared 2-core machine a second thread mostly waits (10x slower, measured).
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=environment)
    tail: list[str] = []
    for line in process.stdout:
        tail = (tail + [line])[-40:]
        if any(marker in line for marker in PROGRESS):
            print("   ", line.rstrip().split(" - ")[-1], flush=True)
    if process.wait() != 0:
        sys.exit(f"step failed: {' '.join(command)}\n{''.join(tail)}")


def step(title: str) -> float:
    print(f"\n==> {title}", flush=True)
    return time.time()


def read_scores(path: Path) -> tuple[list[int], list[float]]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return [int(row["label"]) for row in rows], [float(row["score"]) for row in rows]


def plot_roc(curves: dict[str, Path], output: Path) -> None:
    """Image-level ROC curves from the evaluations' scores tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    for name, path in curves.items():
        labels, scores = read_scores(path)
        fpr, tpr, _ = roc_curve(labels, scores)
        axes.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(labels, scores):.3f})")
    axes.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title="Image-level ROC (demo)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "demo", help="demo folder (default: ./demo)")
    parser.add_argument("--target", default="Brain_MRI", help="held-out domain")
    parser.add_argument("--shot", type=int, default=4)
    parser.add_argument("--zero-shot-epochs", type=int, default=2)
    parser.add_argument("--few-shot-epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="data loading worker processes")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo runs (the data is kept)")
    args = parser.parse_args()
    started = time.time()

    from demo_data import DEMO_DOMAINS, make_demo_dataset  # scripts/demo_data.py, beside this script

    data = args.output / "data"
    if args.fresh:
        for name in ("zero_shot", "few_shot", "normal_only", "clip_baseline", "memory_baseline"):
            shutil.rmtree(args.output / name, ignore_errors=True)
    if not data.exists():
        begin = step(f"Building the demo data set in {data}")
        summary = make_demo_dataset(data, seed=0)
        total = sum(n for splits in summary.values() for classes in splits.values() for n in classes.values())
        print(f"    {total} images in {len(summary)} domains ({', '.join(DEMO_DOMAINS)}) in {time.time() - begin:.0f} s")

    common = {"dataset_dir": data, "target": args.target, "num_workers": args.workers, "batch_size": 8}
    zero, few = args.output / "zero_shot", args.output / "few_shot"
    step(f"Zero-shot training on the other domains, {args.target} held out ({args.zero_shot_epochs} epochs)")
    bundle("training", ["train"], zero, epochs=args.zero_shot_epochs, **common)
    step(f"Zero-shot evaluation on {args.target}")
    bundle("evaluating", ["train", "evaluate"], zero, **common)
    step(f"Few-shot training on {args.shot} normal + {args.shot} abnormal {args.target} images ({args.few_shot_epochs} epochs)")
    bundle("training", ["train", "fewshot"], few, shot=args.shot, epochs=args.few_shot_epochs, **common)
    step(f"Site threshold for the few-shot model: conformal, 20 % false positives, on the {args.target} valid images it was not fitted on")
    bundle("thresholding", ["inference", "threshold"], few, dataset_dir=data, target_fpr=0.2, num_workers=args.workers)
    step(f"Few-shot evaluation on {args.target} (support and calibration images left out)")
    bundle("evaluating", ["train", "fewshot", "evaluate"], few, shot=args.shot, **common)
    normal = args.output / "normal_only"
    step(f"Normal-only adaptation of the zero-shot model to {args.shot} normal {args.target} images (no training)")
    bundle("training", ["train", "fewshot"], normal, shot=args.shot, abnormal_shots=0,
           init_checkpoint=zero / "models" / "model.pt", **common)
    step(f"Normal-only evaluation on {args.target}")
    bundle("evaluating", ["train", "fewshot", "evaluate"], normal, shot=args.shot, **common)
    baselines = {method: args.output / f"{method.name}_baseline" for method in METHODS.values() if not method.trained}
    for method, root in baselines.items():
        step(f"The {method.label} baseline (nothing trained) on the {args.shot}-shot support set, and its evaluation")
        bundle("training", ["train", "fewshot"], root, shot=args.shot, method=method.name, **common)
        bundle("evaluating", ["train", "fewshot", "evaluate"], root, shot=args.shot, **common)

    step("Inference on a few test images as RGB PNG and JPEG files (as BMAD ships them): maps, overlays, scores")
    from PIL import Image

    samples = few / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    samples.mkdir(parents=True)
    for cls, suffix in (("good", ".png"), ("Ungood", ".jpg")):
        for source in sorted((data / f"{args.target}_AD" / "test" / cls / "img").glob("*.png"))[:3]:
            with Image.open(source) as image:
                image.convert("RGB").save(samples / f"{cls}_{source.stem}{suffix}", quality=95)
    bundle("inferring", ["inference"], few, dataset_dir=samples, num_workers=args.workers, overwrite=True)

    runs = (("zero-shot", zero), (f"few-shot (k={args.shot})", few), (f"normal-only (k={args.shot})", normal),
            *((f"{method.label} baseline" + (f" (k={args.shot})" if method.takes_memory else ""), root) for method, root in baselines.items()))
    results = {name: json.loads((root / "eval" / "metrics.json").read_text()) for name, root in runs}
    plot_roc({name: root / "eval" / "scores.csv" for name, root in runs}, args.output / "roc.png")
    print(f"\nResults on the held-out domain {args.target} (test split):\n")
    print("| setting | image AUROC | pixel AUROC | pixel AP | AUPRO |\n| --- | --- | --- | --- | --- |")
    for name, metrics in results.items():
        # metrics.json is strict JSON: a metric the data cannot give (no masks) is null
        cells = [f"{value:.3f}" if value is not None else "n/a" for value in
                 (metrics[f"val_{key}"] for key in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro"))]
        print(f"| {name} | {' | '.join(cells)} |")
    decision = results[f"few-shot (k={args.shot})"]["decision"]
    print(f"\nFew-shot decision at the site threshold {decision['threshold']:.4g} ({decision['rule']}, test split): "
          + ", ".join(f"{name} {decision[name]:.3f} (95 % CI {decision[name + '_ci'][0]:.3f}-{decision[name + '_ci'][1]:.3f})"
                      for name in ("sensitivity", "specificity")))
    print(f"""
Written: {few / 'outputs'} (anomaly maps, overlays/, scores.csv), {args.output / 'roc.png'}
Evaluation report of the few-shot model (open it in a browser): {few / 'eval' / 'report.html'}
Total time {time.time() - started:.0f} s.

NOTE: this demo uses a small, RANDOMLY INITIALISED CLIP (configs/tiny.json): the numbers show
that the pipeline works end to end, not what MVFA achieves. With OpenAI's CLIP weights run, e.g.:
  python -m monai.bundle run training --config_file configs/train.json \\
      --dataset_dir /data/BMAD --target Brain --clip_weights /path/to/ViT-L-14-336px.pt
(README.md: "Running the bundle"; docs/reproducing.md for the paper's experiments).""")


if __name__ == "__main__":
    main()
