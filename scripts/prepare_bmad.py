"""Lay out the BMAD download as the bundle reads it (MVFA's layout), linking rather than copying.

    python scripts/prepare_bmad.py --source ~/Downloads/BMAD --output data/BMAD \
        [--datasets Brain Liver ...] [--map Liver=Liver/Train/hist_DIY ...] \
        [--link hard | --copy] [--skip-unpaired] [--seed-dir MVFA-AD/dataset/fewshot_seed]

Writes ``<output>/<Name>_AD/{valid,test}/{good,Ungood}/img/<file>`` and, for Brain, Liver and
Retina_RESC, ``<output>/<Name>_AD/{valid,test}/Ungood/anomaly_mask/<file>``. The folder names it
looks for in the download are ``download_folders`` in ``medad.io.data.BMAD`` (listed by ``--help``);
``--map`` overrides them. The work is done by ``scripts/reproduction.py``.
"""

from __future__ import annotations

import argparse
import sys

from reproduction import BMADLayoutError, parse_assignments, prepare_bmad  # scripts/reproduction.py

from medad.io.data import BMAD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="folders looked for:\n" + "\n".join(f"  {n}: {', '.join(d.download_folders)}" for n, d in BMAD.items()))
    parser.add_argument("--source", required=True, help="folder the BMAD archives were extracted into")
    parser.add_argument("--output", required=True, help="new or empty folder: the bundle's dataset_dir")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="data sets to prepare (default: all six that are found)")
    parser.add_argument("--map", action="append", metavar="NAME=FOLDER", dest="mapping",
                        help="a data set's folder in the download (relative to --source or absolute); repeatable")
    placing = parser.add_mutually_exclusive_group()
    placing.add_argument("--link", choices=("symlink", "hard"), default="symlink", help="how to link files (default: symlink)")
    placing.add_argument("--copy", action="store_true", help="copy files instead of linking them")
    parser.add_argument("--skip-unpaired", action="store_true",
                        help="leave out abnormal images without a mask (listed) instead of stopping")
    parser.add_argument("--seed-dir", help="MVFA's fewshot_seed folder: check that the files it names exist")
    args = parser.parse_args(argv)

    try:
        result = prepare_bmad(
            args.source, args.output, datasets=args.datasets, mapping=parse_assignments(args.mapping, "--map"),
            link="copy" if args.copy else args.link, skip_unpaired=args.skip_unpaired, seed_dir=args.seed_dir,
        )
    except (BMADLayoutError, FileExistsError, ValueError) as err:
        print(f"prepare_bmad: error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
