"""Batch labeling time predicted from the ensemble masks, from the TRUE masks, and true (cost protocol, every seed).

    OMP_NUM_THREADS=1 python docs/results/quick/oracle_times.py   # needs out/experiments/quick
"""
import json, numpy as np
from ichal.experiment import CONFIGS, make_data, load_records
from ichal.cost import LabelTimeModel
data = make_data(CONFIGS["quick"], progress=False)
print("fingerprint", data.fingerprint())
records = {(r["method"], r["seed"], r["round"]): r for r in load_records("out/experiments/quick", "cost")}
rows = []
for (method, seed, rnd), r in sorted(records.items()):
    if rnd == 0:
        continue
    prev = records[(method, seed, rnd - 1)]["labeled_ids"]
    tm = LabelTimeModel().fit([data.true_features[i] for i in prev], [data.true_seconds([i]) for i in prev])
    oracle = float(tm.predict([data.true_features[i] for i in r["picked_ids"]]).sum())
    rows.append((method, seed, rnd, r["picked_predicted_seconds"], oracle, r["picked_true_seconds"]))
    print(f"{method:18s} seed {seed} round {rnd}: predicted {r['picked_predicted_seconds']/3600:.2f} h, on true masks {oracle/3600:.2f} h, true {r['picked_true_seconds']/3600:.2f} h, r2 {tm.r2_:.2f}")
a = np.array([x[3:] for x in rows])
print("sum over all batches: predicted %.2f h, on true masks %.2f h, true %.2f h" % tuple(a.sum(0) / 3600))
