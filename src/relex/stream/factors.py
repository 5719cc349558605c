"""LoRA runs: an adapted weight's Gram matrix and outputs from its factors, never its delta.

There delta_t = s_t B_t A_t, so the Gram matrix comes from (T r) x (T r) products of the factors
in float64 (factor_gram, O((T r)^2 (m + n)) instead of O(T^2 m n)) and the output
theta_0 + sum_t w_t s_t B_t A_t is formed row block by row block from them (FactorPath.merge),
or compressed to an adapter (compress_factors). The other tensors of a LoRA run (lora_B biases,
modules_to_save) take their exact deltas from the reader (Reader.delta) on the torch path
(blocks.py), so nothing is rounded to the base's dtype before the subtraction.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from relex.formats import DTYPES
from relex.stream.prefetch import Prefetcher
from relex.stream.trajectory import TensorPlan, Trajectory


def factor_gram(left: torch.Tensor, right: torch.Tensor, owner: torch.Tensor,
                t: int) -> np.ndarray:
    """The T x T Gram matrix of deltas D_t = L_t @ R_t from the factors alone (float64).

    <L_i R_i, L_j R_j> = trace((L_i^T L_j)(R_j R_i^T)): the (i, j) block sum of the elementwise
    product of L^T L and R R^T (both (T r) x (T r)), with L = [L_1 .. L_T] (m, T r) and R the
    R_t stacked (T r, n)."""
    if left.shape[1] == 0:
        return np.zeros((t, t))
    prod = (left.T @ left) * (right @ right.T)
    ind = torch.zeros(t, len(owner), dtype=torch.float64)
    ind[owner, torch.arange(len(owner))] = 1.0
    return (ind @ prod @ ind.T).numpy()


def compress_factors(left: torch.Tensor, right: torch.Tensor,
                     rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` approximation of left @ right ((m, q) @ (q, n), q = T r), as
    factors (lo (m, rank), hi (rank, n)) split sqrt(sigma) each, and the share of the
    Frobenius norm it keeps, sqrt(sum_kept sigma^2 / sum sigma^2).

    QR of both factors (Householder, Q never formed: ormqr applies it to the k kept vectors;
    forming Q took twice the time on a 4864 x 480 factor), then the SVD of the small core
    R_l R_r^T (at most q x q): never an m x n matrix. Columns past the product's rank are
    zero."""
    m, n = left.shape[0], right.shape[1]
    a_l, tau_l = torch.geqrf(left)
    a_r, tau_r = torch.geqrf(right.T.contiguous())
    r_l, r_r = a_l[: len(tau_l)].triu(), a_r[: len(tau_r)].triu()
    u, sigma, vh = torch.linalg.svd(r_l @ r_r.T)
    k = min(rank, len(sigma))
    root = sigma[:k].sqrt()
    lo = torch.zeros(m, rank, dtype=left.dtype)
    hi_t = torch.zeros(n, rank, dtype=left.dtype)
    lo[: u.shape[0], :k] = u[:, :k] * root
    hi_t[: vh.shape[1], :k] = vh[:k].T * root
    lo = torch.ormqr(a_l, tau_l, lo)  # Q_l @ [U_k sqrt(S_k); 0]
    hi = torch.ormqr(a_r, tau_r, hi_t).T
    total = float((sigma ** 2).sum())
    share = 1.0 if total == 0 else float(((sigma[:k] ** 2).sum() / total).sqrt())
    return lo, hi, share


class FactorPath:
    """The factored tensors of one pass (every checkpoint's delta a LoRA product, or zero): their
    factors, and their outputs formed from them. Runs on the CPU: the factors are small.

    count(nbytes): bytes read, for the pass's total and progress."""

    def __init__(self, traj: Trajectory, block: int, prefetch: Prefetcher,
                 count: Callable[[int], None]):
        self.traj, self.block, self.prefetch, self.count = traj, block, prefetch, count

    def factors(self, plan: TensorPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(left (m, T r), right (T r, n), owner (T r,)) in float64: every checkpoint's
        scaling * L_t and R_t side by side, owner[j] = the checkpoint of column j; delta_t =
        L_t @ R_t."""
        shape = plan.shape
        n = shape[-1] if len(shape) >= 1 and shape[-1] else 1
        m = plan.numel // n
        lefts, rights, owner = [], [], []
        for t, (ckpt, kind) in enumerate(zip(self.traj.checkpoints, plan.kinds)):
            if kind != "factors":
                continue
            lo, hi, scaling = ckpt.factors(plan.name)
            lefts.append(lo.to(torch.float64) * scaling)
            rights.append(hi.to(torch.float64))
            owner += [t] * lo.shape[1]
            self.count(ckpt.factor_nbytes(plan.name))
        if not lefts:
            return (torch.zeros(m, 0, dtype=torch.float64),
                    torch.zeros(0, n, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
        return torch.cat(lefts, 1), torch.cat(rights, 0), torch.tensor(owner)

    @staticmethod
    def compress(plan: TensorPlan, left: torch.Tensor, right: torch.Tensor, owner: torch.Tensor,
                 w: torch.Tensor, writers: list) -> list[float]:
        """Each writer's adapter entry: sum_t w_t L_t R_t compressed to its rank; returns the
        share of the norm each kept. w: (K, T) float64."""
        shares = []
        for k, writer in enumerate(writers):
            lo, hi, share = compress_factors(left * w[k][owner], right, writer.rank_of(plan.name))
            writer.write_factors(plan.name, lo, hi)
            shares.append(share)
        return shares

    def merge(self, plan: TensorPlan, left: torch.Tensor, right: torch.Tensor,
              owner: torch.Tensor, w: torch.Tensor, writers: list) -> None:
        """Each writer's theta_0 + sum_t w_t L_t R_t, row block by row block (about `block`
        elements each) in the compute dtype. w: (K, T) float64."""
        cd, code = plan.compute_dtype, DTYPES[plan.out_dtype]
        lws = [(left * w[k][owner]).to(cd) for k in range(len(writers))]
        right_cd = right.to(cd)
        n = right.shape[1]
        rows = max(1, self.block // n)
        for r0 in range(0, left.shape[0], rows):
            r1 = min(r0 + rows, left.shape[0])
            a, b = r0 * n, r1 * n
            self.prefetch.advance(plan, 0, a)
            base = self.traj.read(plan, 0, a, b).to(cd).view(r1 - r0, n)
            self.count(plan.base.itemsize * (b - a))
            for lw, writer in zip(lws, writers):
                out = base if lw.shape[1] == 0 else torch.addmm(base, lw[r0:r1], right_cd)
                writer.write_at(plan.name, a, out.reshape(-1).to(code))


def factor_bytes(traj: Trajectory, plan: TensorPlan) -> int:
    """Bytes of the LoRA factors of a factored tensor, over all checkpoints."""
    return sum(c.factor_nbytes(plan.name) for c, k in zip(traj.checkpoints, plan.kinds)
               if k == "factors")
