"""Pool writers of the phantom: NIfTI image, ground-truth label and JSON meta per stack, optional DICOM series.

Layout of docs/architecture.md ("Data layout"): a MONAI Label local datastore plus `phantom_truth/` (never
read by the app) and, with DICOM, `dicom/<id>/*.dcm` for the PACS.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ichal.dicom import write_ct_series
from ichal.io import atomic_write_bytes, write_nifti
from ichal.phantom.generator import PhantomError, PhantomStack, check_size, generate_pool

TRUTH_DIR = "phantom_truth"
FINAL_LABELS_DIR = Path("labels") / "final"
DICOM_DIR = "dicom"
LABELED_NEGATIVE_SHARE = 0.25


def write_stack(stack: PhantomStack, pool_dir: Path, labeled: bool, dicom: bool = False) -> None:
    """Write one stack into `pool_dir`: image, truth label + meta, the final label if `labeled`, DICOM if asked."""
    pool_dir = Path(pool_dir)
    write_nifti(stack.image_hu, stack.affine, pool_dir / f"{stack.id}.nii.gz")
    write_nifti(stack.label, stack.affine, pool_dir / TRUTH_DIR / f"{stack.id}.nii.gz")
    atomic_write_bytes(pool_dir / TRUTH_DIR / f"{stack.id}.json", (json.dumps(stack.meta, indent=1) + "\n").encode())
    if labeled:
        write_nifti(stack.label, stack.affine, pool_dir / FINAL_LABELS_DIR / f"{stack.id}.nii.gz")
    if dicom:
        number = stack.id.rsplit("_", 1)[-1]
        write_ct_series(
            stack.image_hu,
            stack.affine,
            pool_dir / DICOM_DIR / stack.id,
            series_description=f"Synthetic head CT {stack.id}",
            patient_id=f"PHANTOM-{number}",
            patient_name=f"Phantom^{stack.id}",
        )


def choose_labeled(metas: list[dict], labeled_count: int) -> list[str]:
    """Ids to label: about a quarter negatives (at least one when asked for 2+), the rest positives, in id order."""
    negatives = [m["id"] for m in metas if m["negative"]]
    positives = [m["id"] for m in metas if not m["negative"]]
    want_negatives = min(len(negatives), max(1 if labeled_count >= 2 else 0, round(labeled_count * LABELED_NEGATIVE_SHARE)))
    chosen = negatives[:want_negatives] + positives[: labeled_count - want_negatives]
    chosen += [i for i in negatives[want_negatives:]][: labeled_count - len(chosen)]
    return sorted(chosen)


def write_pool(
    out: Path,
    count: int,
    size: int,
    seed: int,
    labeled_count: int = 0,
    dicom: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Generate `count` stacks into `out` (see `write_stack`), label `labeled_count` of them; return all ids.

    Raises `PhantomError` for a bad count, size, labeled count, or a non-empty `out` without `overwrite`.
    """
    out = Path(out)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise PhantomError(f"count must be a positive integer, got {count!r}")
    check_size(size)
    if not 0 <= labeled_count <= count:
        raise PhantomError(f"labeled count must be between 0 and count ({count}), got {labeled_count}")
    if out.exists() and not out.is_dir():
        raise PhantomError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PhantomError(f"output directory {out} is not empty; choose another or pass overwrite (--overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    metas = []
    for stack in tqdm(generate_pool(count, size, seed), total=count, desc="phantom stacks", unit="stack", disable=not progress):
        write_stack(stack, out, labeled=False, dicom=dicom)
        metas.append(stack.meta)
    for stack_id in choose_labeled(metas, labeled_count):
        truth = out / TRUTH_DIR / f"{stack_id}.nii.gz"
        atomic_write_bytes(out / FINAL_LABELS_DIR / f"{stack_id}.nii.gz", truth.read_bytes())
    return [meta["id"] for meta in metas]
