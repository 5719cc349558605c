"""Whether a GPU's TF32 mode reaches float32 products of the shapes relex uses.

Max error relative to the largest entry, against float64, with
torch.set_float32_matmul_precision "highest" and "high": Gram (T, m) x (m, T) and output
(K, T) x (T, m). relex makes them full float32 for its pass (engine._full_float32).
"""

import torch

for t, m, k in [(5, 4096, 1), (10, 1 << 21, 1), (10, 1 << 21, 2), (30, 1 << 21, 2),
                (75, 1 << 21, 3)]:
    d, w = torch.randn(t, m, device="cuda"), torch.randn(k, t, device="cuda")
    b = torch.randn(m, device="cuda")
    gref, oref = d.double() @ d.double().T, torch.addmm(b.double(), w.double(), d.double())
    for prec in ("highest", "high"):
        torch.set_float32_matmul_precision(prec)
        g, o = (d @ d.T).double(), torch.addmm(b, w, d).double()
        print(f"T={t} m={m} K={k} {prec:8s} gram {(g - gref).abs().max() / gref.abs().max():.1e}"
              f" output {(o - oref).abs().max() / oref.abs().max():.1e}")
    torch.set_float32_matmul_precision("highest")
