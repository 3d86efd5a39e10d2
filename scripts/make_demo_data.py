"""Write medad's demo anomaly-detection benchmark (BMAD layout) from images that ship with
nilearn, scikit-image and pydicom; no downloads.

    python scripts/make_demo_data.py --output data/demo [--seed 0] [--per-split 24] [--size 240] [--overwrite]
"""

from __future__ import annotations

import argparse
import math
import time

from demo_data import make_demo_dataset  # scripts/demo_data.py, beside this script


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write <Name>_AD/... into")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--per-split", type=int, default=24,
                        help="good and Ungood images each in test; valid gets a third of that (rounded up)")
    parser.add_argument("--size", type=int, default=240, help="side of the square images")
    parser.add_argument("--overwrite", action="store_true", help="replace demo data in a non-empty folder")
    args = parser.parse_args(argv)

    n_valid = math.ceil(args.per_split / 3)
    counts = {"valid": {"good": n_valid, "Ungood": n_valid}, "test": {"good": args.per_split, "Ungood": args.per_split}}
    start = time.perf_counter()
    try:
        summary = make_demo_dataset(args.output, seed=args.seed, size=args.size, counts=counts,
                                    overwrite=args.overwrite)
    except FileExistsError as err:
        parser.error(f"{err} (on the command line: --overwrite)")
    elapsed = time.perf_counter() - start

    total = 0
    for domain, splits in summary.items():
        parts = ", ".join(f"{split} {c['good']} good + {c['Ungood']} Ungood" for split, c in splits.items())
        print(f"{domain}_AD: {parts}")
        total += sum(n for c in splits.values() for n in c.values())
    print(f"wrote {total} images to {args.output} in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
