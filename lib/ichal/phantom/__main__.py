"""Command line: generate a pool of synthetic head-CT stacks (`python -m ichal.phantom --out DIR ...`).

DESIGN.md "Data": NIfTI + ground truth + JSON meta per stack, optional DICOM series, with a progress bar.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ichal.phantom.generator import MAX_SIZE, MIN_SIZE, PhantomError
from ichal.phantom.writers import write_pool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ichal.phantom", description="Generate a pool of synthetic head-CT stacks with exact labels."
    )
    parser.add_argument("--out", type=Path, required=True, help="output pool directory (MONAI Label local datastore)")
    parser.add_argument("--count", type=int, default=200, help="number of stacks (default 200)")
    parser.add_argument("--size", type=int, default=512, help=f"in-plane pixels, {MIN_SIZE}-{MAX_SIZE} (default 512 = ~0.45 mm)")
    parser.add_argument("--seed", type=int, default=0, help="pool seed (default 0)")
    parser.add_argument("--labeled", type=int, default=0, help="stacks whose final label is written (default 0)")
    parser.add_argument("--dicom", action="store_true", help="also write DICOM CT series under OUT/dicom/<id>/")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    if not MIN_SIZE <= args.size <= MAX_SIZE:
        parser.error(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {args.size}")
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    if not 0 <= args.labeled <= args.count:
        parser.error(f"--labeled must be between 0 and --count ({args.count}), got {args.labeled}")
    try:
        ids = write_pool(
            args.out, args.count, args.size, args.seed,
            labeled_count=args.labeled, dicom=args.dicom, progress=not args.quiet, overwrite=args.overwrite,
        )
    except PhantomError as error:
        parser.error(str(error))
    print(f"wrote {len(ids)} stacks to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
