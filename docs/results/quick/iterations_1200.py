"""Is the quick config training-limited? Seed set (5) and whole pool (40) at 1200 iterations (the run: 400).

    OMP_NUM_THREADS=1 python docs/results/quick/iterations_1200.py
"""
import dataclasses, json, torch
torch.set_num_threads(1)
from ichal.experiment import CONFIGS, make_data, train_labeled, evaluate
import numpy as np
cfg = dataclasses.replace(CONFIGS["quick"], iterations=1200)
data = make_data(cfg, progress=False)
print("fingerprint", data.fingerprint(), flush=True)
order = np.random.default_rng([0, 0]).permutation(len(data.pool))
seed_set = sorted(data.pool_ids[i] for i in order[:5])
for name, ids in (("whole pool", data.pool_ids), ("seed set", seed_set)):
    model, seconds = train_labeled(cfg, data, ids, 0, False)
    print(json.dumps({"set": name, "n": len(ids), "iterations": cfg.iterations, "train_seconds": round(seconds),
                      **{k: round(v, 3) for k, v in evaluate(cfg, model, data.test).items()}}), flush=True)
