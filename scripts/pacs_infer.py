"""Score a study in a PACS over DICOMweb and store the results back under the same study.

    python scripts/pacs_infer.py --url https://pacs.example.org/dicom-web \
        (--study 1.2.840.... | --query PatientID=123 [--query StudyDate=20260101 ...]) \
        --model models/model.pt [--clip-weights ViT-L-14-336px.pt] [--credentials FILE] \
        [--window abdomen] [--device cuda] [--json summary.json] [-v]

Each image series of the study is retrieved (WADO-RS) and scored (a series of slices or a
multi-frame image as a volume, a single-frame image alone); its anomaly map (Parametric Map),
anomalous region (Segmentation) and score and decision (TID 1500 Structured Report) are stored
(STOW-RS) under the study, marked for research use only. A rerun stores nothing twice: the
objects' UIDs follow from the sources and the model file, and objects the PACS already holds are
skipped (medad.surfaces.pacs).

Credentials never go on the command line: set MEDAD_DICOMWEB_TOKEN (bearer), or
MEDAD_DICOMWEB_USER and MEDAD_DICOMWEB_PASSWORD (basic), or give --credentials FILE, readable by
you only (chmod 600): JSON {"user": ..., "password": ...} or {"token": ...}, or netrc-like lines
"machine <host> login <user> password <password>".

Exit status: 0 when every series was scored and stored (or already present), 1 when a series
failed or the endpoint, credentials or study were refused (one line on stderr), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. PatientID=123), got {text!r}")
    return key.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pacs_infer", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    parser.add_argument("--url", required=True, help="DICOMweb endpoint root (QIDO-RS, WADO-RS and STOW-RS), without credentials")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="StudyInstanceUID of the study to score")
    which.add_argument("--query", action="append", type=_assignment, metavar="KEY=VALUE",
                       help="QIDO-RS study query by DICOM keyword (PatientID, AccessionNumber, StudyDate, ...); "
                            "repeatable; every matching study is scored")
    parser.add_argument("--model", required=True, help="the medad model.pt")
    parser.add_argument("--clip-weights", help="CLIP weights: a local file or an open_clip tag (default: the model's)")
    parser.add_argument("--credentials", metavar="FILE",
                        help="credentials file, mode 600 (default: MEDAD_DICOMWEB_TOKEN or MEDAD_DICOMWEB_USER/_PASSWORD)")
    parser.add_argument("--window", help="CT window for volumes: a name (abdomen, brain, ...) or \"[center,width]\"")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each HTTP answer (default: 300)")
    parser.add_argument("--json", metavar="FILE", help="also write the summary (per series: score, decision, object UIDs) as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each series")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    window = args.window
    if window and window.strip().startswith("["):
        try:
            window = [float(v) for v in json.loads(window)]
        except (ValueError, TypeError):
            parser.error(f"--window: expected a name or \"[center,width]\", got {args.window!r}")

    try:
        from medad.surfaces.pacs import PacsError, pacs_round_trip
    except ImportError as error:
        print(f"pacs_infer: error: {error}", file=sys.stderr)
        return 1
    where = args.study or ", ".join(f"{key}={value}" for key, value in args.query)
    try:
        summary = pacs_round_trip(
            args.url, args.model, study=args.study, query=dict(args.query) if args.query else None,
            clip_weights=args.clip_weights, credentials_file=args.credentials, device=args.device, window=window,
            timeout=args.timeout,
        )
    except PacsError as error:
        print(f"pacs_infer: error: {error}", file=sys.stderr)
        return 1
    except ImportError as error:
        print(f"pacs_infer: error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as error:  # the model file, the weights
        message = " ".join(str(error).split())
        print(f"pacs_infer: error: {args.url} ({where}): {type(error).__name__}: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pacs_infer: interrupted ({args.url}, {where}): objects stored so far stay; a rerun adds only the rest",
              file=sys.stderr)
        return 130
    for series, message in summary.failed:
        print(f"pacs_infer: error: {message}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"url": summary.url, "studies": summary.studies, "series_scored": summary.series_scored,
                       "objects_stored": summary.objects_stored, "objects_present": summary.objects_present,
                       "skipped": summary.skipped, "failed": summary.failed, "series": summary.series}, handle, indent=2)
    print(summary.line())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
