"""One stack through the app from a PACS (Orthanc, DICOMweb) versus from the local datastore: server start
until /info/ lists it (for the PACS: list + fetch + convert), next sample, infer, save a final label
(for the PACS: plus the DICOM-SEG upload). Needs Orthanc (scripts/install_system_deps.sh).

    python benchmarks/pacs_vs_local.py [--size 256] [--count 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from monailabel.client import MONAILabelClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pacs_fixtures import start_orthanc, stop_orthanc  # noqa: E402
from server_fixtures import free_port, running_server  # noqa: E402

from ichal.dicom import write_ct_series  # noqa: E402
from ichal.ensemble import save_ensemble  # noqa: E402
from ichal.io import write_nifti  # noqa: E402
from ichal.pacs import stow_series  # noqa: E402
from ichal.phantom import generate_pool  # noqa: E402
from ichal.train import TrainItem, TrainSettings, train_ensemble  # noqa: E402


def one_stack_round(studies: str, state: Path, tmp: Path, truth_by_id: dict[str, np.ndarray]) -> dict[str, float]:
    times: dict[str, float] = {}
    start = time.perf_counter()
    with running_server(studies, {"state_dir": str(state), "ensemble_size": "2"}, tmp / "server.log") as url:
        times["start until /info/ lists the pool"] = time.perf_counter() - start
        client = MONAILabelClient(url, client_id="bench", tmpdir=str(tmp))
        start = time.perf_counter()
        image_id = client.next_sample("random", {"budget_minutes": 600})["id"]
        times["next sample (random)"] = time.perf_counter() - start
        start = time.perf_counter()
        label_file, _ = client.infer("hemorrhage", image_id, {})
        times["infer hemorrhage"] = time.perf_counter() - start
        affine = nib.load(label_file).affine
        truth = tmp / "truth.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(truth_by_id[image_id], (2, 1, 0)), affine), str(truth))
        start = time.perf_counter()
        client.save_label(image_id, str(truth), tag="final")
        times["save final label"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--count", type=int, default=3)
    args = parser.parse_args()
    stacks = list(generate_pool(args.count, args.size, seed=5))
    model = train_ensemble([TrainItem(s.id, s.image_hu, s.label, s.spacing_mm) for s in stacks],
                           TrainSettings(ensemble_size=2, iterations=2, batch_size=2, spacing_mm=1.8))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        # Local datastore.
        pool = tmp / "pool"
        for s in stacks:
            write_nifti(s.image_hu, s.affine, pool / f"{s.id}.nii.gz")
        state = pool / ".ichal"
        save_ensemble(model, state / "models" / "ensemble.pt")
        results["local"] = one_stack_round(str(pool), state, tmp, {s.id: s.label for s in stacks})
        # PACS.
        folder, port = tmp / "orthanc", free_port()
        url = start_orthanc(folder, port)
        try:
            truth = {}
            for s in stacks:
                write_ct_series(s.image_hu, s.affine, tmp / "dicom" / s.id)
                truth[stow_series(url, tmp / "dicom" / s.id)[1]] = s.label
            state = tmp / "pacs_state"
            save_ensemble(model, state / "models" / "ensemble.pt")
            results["PACS"] = one_stack_round(url, state, tmp, truth)
        finally:
            stop_orthanc(folder)
    print(f"\n{args.count} stacks of {args.size}x{args.size}, 2-member committee at 1.8 mm, CPU\n")
    print("| step | local datastore (s) | PACS via DICOMweb (s) |\n|---|---|---|")
    for step in results["local"]:
        print(f"| {step} | {results['local'][step]:.2f} | {results['PACS'][step]:.2f} |")


if __name__ == "__main__":
    main()
