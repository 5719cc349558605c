"""The pipeline relex replaces, for comparison: fp16 delta files first, then SVD per tensor.

Modelled on the paper's released scripts (not their code): every checkpoint's delta from the
base is written to disk in fp16 (a second copy of the trajectory), then each tensor's deltas
are read back, stacked, decomposed through their Gram matrix and extrapolated with a linear fit
of the rank-1 coefficient; the model is assembled in memory and saved at the end.

    python benchmarks/baseline_delta_files.py RUN_DIR BASE_DIR OUT_DIR TARGET
Prints one JSON line: {"seconds": ..., "delta_bytes": ...}.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def main(run: Path, base_dir: Path, out: Path, target: int) -> None:
    start = time.perf_counter()
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    steps = np.array([int(p.name.split("-")[1]) for p in ckpts], dtype=np.float64)
    base = load_file(str(base_dir / "model.safetensors"))
    deltas = out / "deltas"
    deltas.mkdir(parents=True)
    for i, ck in enumerate(ckpts):  # step 1: a delta file per checkpoint
        sd = load_file(str(ck / "model.safetensors"))
        save_file({k: (v.float() - base[k].float()).half() for k, v in sd.items()},
                  str(deltas / f"delta_{i}.safetensors"))
        del sd
    delta_bytes = sum(f.stat().st_size for f in deltas.iterdir())
    handles = [safe_open(str(deltas / f"delta_{i}.safetensors"), "pt") for i in range(len(ckpts))]
    result = {}
    for name, b in base.items():  # step 2: per tensor, stack the deltas and decompose
        if name not in handles[0].keys():
            result[name] = b
            continue
        d = torch.stack([h.get_tensor(name).float().reshape(-1) for h in handles])
        lam, u = np.linalg.eigh((d @ d.T).double().numpy())
        if lam[-1] <= 0:
            result[name] = b
            continue
        sigma, u1 = np.sqrt(lam[-1]), u[:, -1]
        v = (torch.from_numpy(u1).float() @ d) / sigma
        c = sigma * u1
        slope, icpt = np.polyfit(steps, c, 1)
        result[name] = (b.float() + float(slope * target + icpt) * v.reshape(b.shape)).to(b.dtype)
    out_model = out / f"step-{target}"
    out_model.mkdir()
    save_file(result, str(out_model / "model.safetensors"), metadata={"format": "pt"})
    print(json.dumps({"seconds": time.perf_counter() - start, "delta_bytes": delta_bytes}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
