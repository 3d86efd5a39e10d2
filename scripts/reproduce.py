"""Run MVFA's experiment grid through the bundle's workflows and write a paper-style report.

    python scripts/reproduce.py --dataset-dir data/BMAD --output runs/mvfa \
        --clip-weights ~/weights/ViT-L-14-336px.pt --seed-dir MVFA-AD/dataset/fewshot_seed \
        [--datasets Brain Liver] [--shots 0 2 4 8 16] [--seeds 0 1 2 | --draws 10] [--seed-files F ...] [--epochs 50] \
        [--model-selection last|paper|both] [--methods mvfa,clip,memory,winclip] [--extra KEY=VALUE ...] [--dry-run | --report-only]

Zero-shot (shot 0): leave one data set out, train on all the others, evaluate on it. Few-shot:
for each k and support draw (the seeds of the seed files with --seed-dir: MVFA's <k>-shot.txt, or
SGGP's ten draws 4-shot.txt and shot4_sample1..9.txt; the seeds of --seed-files; else seeded random
picks), train on the target's k + k support images and evaluate on its test split. Each draw is a
cell of its own; the results give per data set the draws' mean, sample SD, min and max beside the
published numbers, and draws_report.html shows each draw's metrics and galleries.
--model-selection both runs each cell leak-free and with the paper's selection, side by side. ``--methods`` adds the
paper's baselines on the same backbone and data (no adapters, nothing trained): ``clip`` (CLIP's
projected tokens against the same prompts, one zero-shot cell per target) and ``memory`` (the
few-shot memory bank of the backbone's own tokens, at each k and pick) and ``winclip`` (WinCLIP's
window embeddings and harmonic aggregation, zero-shot per target and at each k and pick). Each cell is a folder
under --output; finished cells are skipped and interrupted ones resumed when run again. The
results go to results.csv, results.json and report.md in --output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medad.io.files import atomic_write
from medad.io.report import write_draws_report
from medad.model.methods import METHODS
from reproduction import (  # scripts/reproduction.py, beside this script
    SELECTIONS,
    CellFailed,
    GridOptions,
    collect_results,
    draw_groups,
    estimate_runtime,
    format_report,
    parse_assignments,
    plan_grid,
    run_grid,
    write_results,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", required=True, type=Path, help="prepared data (scripts/prepare_bmad.py)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the cells, results and report")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="target data sets (default: all in --dataset-dir)")
    parser.add_argument("--shots", nargs="+", type=int, default=[0, 2, 4, 8, 16], help="0 = zero-shot; k = k-shot (default: 0 2 4 8 16)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="with --seed-dir: seed-file indices (default: all the files hold, up to 5); "
                             "without: seeds of random support picks (default: 0 1 2 3 4)")
    parser.add_argument("--draws", type=int,
                        help="support draws per few-shot cell: the first N seeds of the seed files, or random picks with seeds 0..N-1")
    parser.add_argument("--seed-dir", type=Path,
                        help="seed files, <dir>/<Name>/<k>-shot.txt (MVFA) and shot<k>_sample<i>.txt beside it (SGGP: every seed a draw)")
    parser.add_argument("--seed-files", nargs="+", type=Path, metavar="FILE",
                        help="seed files to draw from, every seed of each a draw (one --datasets target, one k > 0)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the bundle's, 50)")
    parser.add_argument("--model-selection", choices=SELECTIONS, default="last",
                        help="last: leak-free final epoch (default); paper: best epoch on the target's test set, as the authors did; "
                             "both: each cell both ways, side by side")
    parser.add_argument("--methods", default="mvfa", help=f"comma-separated, of {', '.join(METHODS)} (default: mvfa; the others are baselines)")
    parser.add_argument("--clip-model", help="open_clip model name, hf-hub:<repo> or local-dir:<folder> (default: the bundle's, ViT-L-14-336)")
    parser.add_argument("--clip-weights", help="CLIP weights: a path to ViT-L-14-336px.pt or an open_clip tag")
    parser.add_argument("--tiny", action="store_true", help="tiny randomly initialised CLIP (configs/tiny.json): smoke tests only")
    parser.add_argument("--extra", action="append", metavar="KEY=VALUE", help="further bundle override; repeatable")
    parser.add_argument("--bundle", type=Path, help="bundle folder with configs/ (default: this repository)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands and a run-time estimate; run nothing")
    mode.add_argument("--report-only", action="store_true", help="collect the finished cells and write the report; run nothing")
    parser.add_argument("--seconds-per-image", type=float, default=0.05,
                        help="for the --dry-run estimate: seconds per training image (an assumption; default 0.05)")
    args = parser.parse_args(argv)

    try:
        options = GridOptions(
            dataset_dir=args.dataset_dir, output=args.output, seed_dir=args.seed_dir, epochs=args.epochs,
            model_selection=args.model_selection, clip_model=args.clip_model, clip_weights=args.clip_weights,
            tiny=args.tiny, extra=parse_assignments(args.extra, "--extra"),
            **({"bundle": args.bundle} if args.bundle else {}),
        )
        methods = [method.strip() for method in args.methods.split(",") if method.strip()]
        cells = plan_grid(args.dataset_dir, args.datasets, args.shots, args.seeds, args.seed_dir, methods,
                          draws=args.draws, seed_file_list=args.seed_files, selection=args.model_selection)
    except (FileNotFoundError, ValueError) as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 2

    try:
        if args.dry_run:
            pending = run_grid(cells, options, dry_run=True)
            print(estimate_runtime(pending, options, args.seconds_per_image))
            return 0
        failure = None
        if not args.report_only:
            try:
                run_grid(cells, options)
            except CellFailed as err:
                failure = err  # report what finished, then fail
        rows = collect_results(cells, options)
    except ValueError as err:  # a cell folder holds a run with other settings
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = write_results(rows, cells, options)
    report = format_report(rows, cells, options.protocol(), options)
    with atomic_write(args.output / "report.md", encoding="utf-8") as handle:
        handle.write(report)
    written = [csv_path, json_path, args.output / "report.md"]
    groups = draw_groups(cells, options)
    if groups:
        written.append(write_draws_report(groups, args.output / "draws_report.html"))
    print(report)
    print(f"wrote {', '.join(map(str, written))} ({len(rows)} of {len(cells)} cells finished)")
    if failure is not None:
        print(f"reproduce: error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
