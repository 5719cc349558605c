"""The CPU pass's compiled loops (numba): the Gram step, where BLAS is slow at its shape, and the
output step, which remakes the same deltas in cache instead of storing them (delta_combine).

A block's Gram matrix D D^T has a tiny output (T x T, T = 30-75 checkpoints) and a long inner
dimension (the block's elements). BLAS libraries tune for square-ish products: on one core of
the 2-core Xeon (Cascade Lake, AVX-512) this was measured on, numpy's OpenBLAS syrk ran it at
11-17 useful GFLOP/s for T=30 and torch's MKL gemm at 9-11; the loop below, 4 x 4 register
tiles over cache-sized column chunks, ran at 27-43 (T=30) and 33-44 (T=75)
(`python benchmarks/bench_gram.py` prints the table). That is the Gram step of every CPU run,
so it is written here; fits and everything else stay on torch/numpy.

Each chunk of CHUNK columns is summed in float32 (as BLAS does over the whole block) and added
into a float64 result, so long blocks lose less than with BLAS. The order of additions is fixed
by the code, so results do not depend on threads. Without numba (not installed, or a platform
it does not support) `gram` falls back to numpy's syrk with identical semantics.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

log = logging.getLogger(__name__)

#: columns summed in float32 before adding into the float64 result; 4 rows x 2 x CHUNK x 4 bytes
#: (32 KiB) stay in L1 while a tile is computed. 1024 beat 256 and 4096 at T=30 and 75.
CHUNK = 1024
#: floats between the chunk buffer's rows: two cache lines more than CHUNK, so that the 8 rows
#: a tile reads are not all 4 KiB apart (the same L1 set). The Gram step of 2^17 bf16 columns,
#: 3 alternating runs on 2 cores (AVX-512): T=30 1.13 -> 1.00 ns per element and row
#: (median), T=75 1.85 -> 1.62; a one-line padding of 16 floats gave 1.02 and 1.68.
STRIDE = CHUNK + 32


def _tiles(buf, t, n, g):
    """g += X @ X.T on and above the diagonal's 4 x 4 tiles, X = the (t, n) rows of buf at
    stride STRIDE (rows past the end repeat the last row; their products are not stored)."""
    last = t - 1
    # The i and j row set-ups are written out, as is the bf16 conversion in both kernels:
    # helpers returning the row views (a tuple of 4, or one converted row) were inlined but
    # measured 1.3-1.8x slower per Gram step (same process, 9 alternations).
    for i0 in range(0, t, 4):
        i1 = min(i0 + 1, last) * STRIDE
        i2 = min(i0 + 2, last) * STRIDE
        i3 = min(i0 + 3, last) * STRIDE
        r0 = buf[i0 * STRIDE: i0 * STRIDE + n]
        r1 = buf[i1: i1 + n]
        r2 = buf[i2: i2 + n]
        r3 = buf[i3: i3 + n]
        for j0 in range(i0, t, 4):
            j1 = min(j0 + 1, last) * STRIDE
            j2 = min(j0 + 2, last) * STRIDE
            j3 = min(j0 + 3, last) * STRIDE
            s0 = buf[j0 * STRIDE: j0 * STRIDE + n]
            s1 = buf[j1: j1 + n]
            s2 = buf[j2: j2 + n]
            s3 = buf[j3: j3 + n]
            z = np.float32(0.0)
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = z
            # The loop the compiler vectorizes: 16 independent float32 sums of products.
            for k in range(n):
                x0 = r0[k]
                x1 = r1[k]
                x2 = r2[k]
                x3 = r3[k]
                y0 = s0[k]
                y1 = s1[k]
                y2 = s2[k]
                y3 = s3[k]
                a00 += x0 * y0
                a01 += x0 * y1
                a02 += x0 * y2
                a03 += x0 * y3
                a10 += x1 * y0
                a11 += x1 * y1
                a12 += x1 * y2
                a13 += x1 * y3
                a20 += x2 * y0
                a21 += x2 * y1
                a22 += x2 * y2
                a23 += x2 * y3
                a30 += x3 * y0
                a31 += x3 * y1
                a32 += x3 * y2
                a33 += x3 * y3
            acc = (a00, a01, a02, a03, a10, a11, a12, a13,
                   a20, a21, a22, a23, a30, a31, a32, a33)
            for p in range(4):
                for q in range(4):
                    i = i0 + p
                    j = j0 + q
                    if i <= last and j <= last:
                        g[i, j] += acc[4 * p + q]


def _mirror(g):
    """Copy the (exact) upper triangle down."""
    for i in range(g.shape[0]):
        for j in range(i + 1, g.shape[0]):
            g[j, i] = g[i, j]
    return g


def _delta_gram(bf16, addrs, base, buf, bits):
    """The Gram matrix of rows - base: chunk by chunk, the deltas into buf, then their products
    while they are in cache. bfloat16 -> float32 is a 16-bit shift, written through bits (buf's
    uint32 view)."""
    t = addrs.shape[0]
    m = base.shape[0]
    g = np.zeros((t, t), np.float64)
    for c0 in range(0, m, CHUNK):
        n = min(CHUNK, m - c0)
        b = base[c0:c0 + n]
        for r in range(t):
            row = buf[r * STRIDE: r * STRIDE + n]
            if bf16:
                src16 = _carray(_pointer(addrs[r] + 2 * c0), n, np.uint16)
                out = bits[r * STRIDE: r * STRIDE + n]
                for k in range(n):
                    out[k] = np.uint32(src16[k]) << np.uint32(16)
                for k in range(n):
                    row[k] -= b[k]
            else:
                src32 = _carray(_pointer(addrs[r] + 4 * c0), n, np.float32)
                for k in range(n):
                    row[k] = src32[k] - b[k]
        _tiles(buf, t, n, g)
    return _mirror(g)


def _delta_combine(bf16, addrs, base, w, out, buf, bits):
    """out = base + w @ (rows - base), chunk by chunk: each row's chunk is converted (in buf)
    and subtracted as in _delta_gram (the same float32 deltas), then added, times its weight,
    into the K output rows, which stay in cache until the chunk is done. Sums run over the
    checkpoints in order, in float32 (as torch's addmm does)."""
    k, t = w.shape
    m = base.shape[0]
    row = buf[:CHUNK]
    acc = buf[CHUNK: CHUNK + k * CHUNK]
    for c0 in range(0, m, CHUNK):
        n = min(CHUNK, m - c0)
        b = base[c0:c0 + n]
        for q in range(k):
            a = acc[q * CHUNK: q * CHUNK + n]
            for j in range(n):
                a[j] = 0.0
        for r in range(t):
            if bf16:
                src16 = _carray(_pointer(addrs[r] + 2 * c0), n, np.uint16)
                for j in range(n):
                    bits[j] = np.uint32(src16[j]) << np.uint32(16)
                x = row[:n]
            else:
                x = _carray(_pointer(addrs[r] + 4 * c0), n, np.float32)
            for q in range(k):
                wq = w[q, r]
                a = acc[q * CHUNK: q * CHUNK + n]
                for j in range(n):
                    a[j] += wq * (x[j] - b[j])
        for q in range(k):
            a = acc[q * CHUNK: q * CHUNK + n]
            dst = out[q, c0:c0 + n]
            for j in range(n):
                dst[j] = b[j] + a[j]


_carray = _pointer = None  # numba.carray and an int -> pointer cast, set by available()


def _pointer_cast(numba):
    """An int64 address as a void pointer inside compiled code (for numba.carray): the rows
    come as addresses so that the engine hands over each checkpoint's row as read (a view of
    the mapped file), without first copying the rows side by side."""
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def pointer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return numba.types.voidptr(numba.types.int64), codegen
    return pointer


#: "numpy" (env RELEX_GRAM) uses numpy's BLAS for every Gram matrix: for comparing, or to sidestep
#: a numba problem
USE = os.environ.get("RELEX_GRAM", "kernel") != "numpy"
_COMPILED = ("_tiles", "_mirror", "_delta_gram", "_delta_combine")  # the functions numba compiles
_compiled = None  # True once the kernels are compiled, False where numba cannot be used
_lock = threading.Lock()


def available() -> bool:
    """Whether the compiled kernels can be used (numba is imported on first use: its import and
    loading the cached machine code take ~0.6 s, which commands without a Gram step skip)."""
    global _compiled
    with _lock:
        if _compiled is None:
            _compiled = False
            if USE:
                try:  # numba is a dependency, but relex must still run where it cannot load
                    import numba
                    if numba.config.DISABLE_JIT:  # the loops would run as Python: hours
                        raise RuntimeError("NUMBA_DISABLE_JIT is set")
                    # reassoc lets the compiler vectorize the sums; no flag that assumes no
                    # NaN/Inf: a diverged checkpoint must show up as a non-finite Gram entry.
                    _prefer_512_bit_vectors(numba)
                    jit = numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
                    here = globals()
                    for name in _COMPILED:
                        here[name] = jit(here[name])
                    here["_carray"], here["_pointer"] = numba.carray, _pointer_cast(numba)
                    # Compile (or load from numba's cache) now, with the types of the real
                    # calls: a failure is a fallback here, not a crash in a worker, and the
                    # other workers wait on the lock instead of compiling the same code.
                    base = np.zeros(3, np.float32)
                    buf = np.zeros(3 * STRIDE, np.float32)
                    for rows in (np.zeros((2, 3), np.uint16), np.zeros((2, 3), np.float32)):
                        bf16 = rows.dtype == np.uint16
                        addrs = addresses(rows)
                        here["_delta_gram"](bf16, addrs, base, buf, buf.view(np.uint32))
                        here["_delta_combine"](bf16, addrs, base, np.zeros((1, 2), np.float32),
                                               np.zeros((1, 3), np.float32), buf,
                                               buf.view(np.uint32))
                    _compiled = True
                except Exception as exc:  # noqa: BLE001 (ImportError, a broken llvmlite, or
                    # a compile error on an unusual platform)
                    log.warning("numba unavailable (%s): the Gram step uses torch and numpy "
                                "(slower)", exc)
    return _compiled


def _prefer_512_bit_vectors(numba) -> None:
    """Let LLVM use 512-bit vectors on AVX-512 CPUs, where it prefers 256 bits by default (some
    older chips lowered their clock for 512-bit code). The 4 x 4 tiles then do twice the work
    per instruction: 100M x 75 cached, 3 alternating runs, 15.1 s vs 18.0 s end to end
    (bench_extrapolate.py --variant NUMBA_CPU_FEATURES=<host>,-prefer-256-bit). numba sets its
    target once per process, at its first compile: this applies when relex compiles first and
    the user did not set NUMBA_CPU_FEATURES (other numba code compiled later in the process gets
    the same preference; the instructions are the host's either way)."""
    if numba.config.CPU_FEATURES is not None:
        return
    try:
        import llvmlite.binding as ll
        features = ll.get_host_cpu_features()
    except Exception:  # noqa: BLE001 - a tuning hint only: keep numba's default
        return
    if features.get("avx512f"):
        numba.config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"


def gram(x: np.ndarray) -> np.ndarray:
    """x @ x.T in float64 for a (t, m) float32 or float64 matrix (C-contiguous rows).

    float32 goes through the compiled kernel (as deltas from a zero base; numpy without numba);
    float64 through numpy's BLAS, which is accurate and not the bottleneck there."""
    if x.dtype == np.float32 and x.flags.c_contiguous and available():
        return delta_gram(x, np.zeros(x.shape[1], np.float32), False)
    return np.dot(x, x.T).astype(np.float64, copy=False)


def addresses(rows: np.ndarray) -> np.ndarray:
    """The rows' addresses of a C-contiguous (t, m) array, as delta_gram and delta_combine take
    them (the array must outlive the call)."""
    if rows.ndim != 2 or not rows.flags.c_contiguous:
        raise ValueError("kernels: rows must be a C-contiguous (t, m) array")
    start, step = rows.ctypes.data, rows.strides[0]
    return np.arange(start, start + step * rows.shape[0], step, dtype=np.int64)[: rows.shape[0]]


def _addresses(rows: np.ndarray, m: int, what: str) -> np.ndarray:
    if rows.ndim == 2:
        if rows.shape[1] != m:  # numba does not check bounds: a mismatch reads past the end
            raise ValueError(f"{what}: rows {rows.shape} and base ({m},) do not match")
        return addresses(rows)
    if rows.dtype != np.int64 or rows.ndim != 1:
        raise ValueError(f"{what}: rows must be a (t, m) array or int64 row addresses")
    return rows


def delta_gram(rows: np.ndarray, base: np.ndarray, bf16: bool) -> np.ndarray:
    """The Gram matrix (float64, (t, t)) of the float32 deltas rows - base.

    rows: a C-contiguous (t, m) float32 array, or bfloat16 bit patterns as uint16 (bf16=True);
    or the int64 addresses of t such rows of m elements each (the caller keeps them alive).
    base: (m,) float32. The deltas are what torch's `rows.float() - base` gives. Converting,
    subtracting and multiplying a chunk while it is in cache saves the extra passes over memory
    of torch's convert, then subtract, then Gram. Callers check available().
    """
    addrs = _addresses(rows, base.shape[0], "delta_gram")
    buf = _scratch(len(addrs))
    return _delta_gram(bf16, addrs, base, buf, buf.view(np.uint32))


def delta_combine(rows: np.ndarray, base: np.ndarray, w: np.ndarray, out: np.ndarray,
                  bf16: bool) -> None:
    """out = base + w @ (rows - base) in float32: the output step of the CPU pass.

    rows: as in delta_gram; base: (m,) float32; w: (k, t) float32 weights; out: (k, m)
    float32, written. The deltas are the ones delta_gram computes, made again chunk by chunk in
    cache: storing them as float32 would double what a tensor kept in memory takes and add a
    pass over memory. Callers check available()."""
    m = base.shape[0]
    addrs = _addresses(rows, m, "delta_combine")
    # numba does not check bounds: a shape mismatch would write outside the arrays
    if w.ndim != 2 or w.shape[1] != len(addrs) or out.shape != (w.shape[0], m):
        raise ValueError(f"delta_combine: {len(addrs)} rows, base ({m},), w {w.shape}, "
                         f"out {out.shape} do not match")
    buf = _scratch(1 + w.shape[0])
    _delta_combine(bf16, addrs, base, np.ascontiguousarray(w, np.float32), out, buf,
                   buf.view(np.uint32))


_local = threading.local()


def _scratch(t: int) -> np.ndarray:
    """This thread's chunk buffer (t rows at stride STRIDE)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < t * STRIDE:
        _local.buf = buf = np.empty(t * STRIDE, np.float32)
    return buf[: t * STRIDE]
