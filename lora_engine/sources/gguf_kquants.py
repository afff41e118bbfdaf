"""ggml's K-quants Q4_K, Q5_K and Q6_K in numpy, byte for byte what llama.cpp's quantizer writes.

    quantize_k(w, "Q4_K")   # float32 (rows, cols), cols a multiple of 256 -> uint8 (rows, cols // 256 * 144)

The algorithm is ggml-quants.c's reference quantizers (quantize_row_q{4,5,6}_K_ref), which
llama-quantize runs for these types when no importance matrix is given. A super-block holds 256
weights; rows are independent, so every super-block of a tensor is processed at once and the
loops below run over candidate scales, never over blocks.

- Q4_K / Q5_K (144 / 176 bytes): 8 sub-blocks of 32, each x ~ d_j * q - m_j with q in [0, 15] / [0, 31].
  Per sub-block, weights w = sqrt(mean(x^2)) + |x|; start from the (min, max) grid, then try
  nstep + 1 grids with nmax + rmin + rdelta * i levels across [min, max] (Q4_K: rmin -1, nstep 20;
  Q5_K: rmin -0.5, nstep 15), fit scale and min by weighted least squares on each grid's levels
  (min clamped to <= 0), keep the grid of least weighted squared error (make_qkx2_quants). The 8
  scales and 8 mins are then quantized to 6 bits against the largest of each (fp16 d = max/63,
  dmin likewise) and packed into 12 bytes; the weights are requantized against those 6-bit values.
  Layout: d, dmin (fp16), scales[12], (Q5_K: qh[32], the fifth bits), qs[128] (two 4-bit values a byte,
  element l of a 64-chunk in the low nibble, l + 32 in the high one).
- Q6_K (210 bytes): 16 sub-blocks of 16, x ~ d * s_j * q with q in [-32, 31]; per sub-block the
  scale minimising sum x^2 (x - s q)^2 over 19 grids (make_qx_quants, rmse_type 1), the 16 scales
  quantized to int8 against the one of largest magnitude (d = max / -128, fp16).
  Layout: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d (fp16).

Bit-exactness: llama.cpp compiles these in ggml-base without -march flags, so on x86-64 every
operation is one IEEE float32 operation in source order (no FMA there to contract into, no
reassociation without -ffast-math; on aarch64, where FMA is baseline, a compiler may fuse a * b + c
and llama.cpp's own bytes can then differ from its x86-64 ones). We mirror the x86-64 build:
float32 arrays and float32 scalars throughout, products associated as the C source writes them
(w * l * x is (w * l) * x), and every sum accumulated left to right (np.add.accumulate, never
np.sum's pairwise order). ggml's nearest_int (add 1.5 * 2**23) rounds half to even: np.rint.
fp16 conversions round to nearest even in both.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
F32 = np.float32
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
GROUP_MAX_EPS = F32(1e-15)
ROWS_PER_CHUNK = 4096  # super-blocks handled at once: bounds the temporaries to ~100 MB


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum (n, S) over its first axis, in order, in float32, as a C `for` loop adds: (S,).

    Sub-blocks lie along the columns so each step adds two contiguous rows (fast), and the order is
    explicit (numpy's own sums may pair terms differently)."""
    acc = a[0].copy()
    for row in a[1:]:
        acc += row
    return acc


def _fit_min_scale(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants for sub-blocks x (n, S) (one per column) with weights w: (levels uint8 (n, S), scale (S,),
    -min (S,))."""
    lo = x.min(axis=0)
    lo = np.where(lo > 0, F32(0), lo)
    hi = x.max(axis=0)
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo)  # flat sub-blocks are answered below; avoid 0/0 here
    xm = x - lo
    sum_w, sum_x = _sum(w), _sum(w * x)
    iscale = F32(nmax) / span
    scale = F32(1) / iscale
    levels = np.clip(np.rint(iscale * xm), 0, nmax)
    diff = scale * levels + lo - x
    best = _sum(w * (diff * diff))
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            # ggml moves `min` to each better fit's min and keeps using it for the next grids' span
            # and offset: so do we (xm and span follow lo)
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
            lv = np.clip(np.rint(iscale * xm), 0, nmax)
            wl = w * lv
            sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * lv), _sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, F32(0), this_min)
            diff = this_scale * lv + this_min - x
            err = _sum(w * (diff * diff))
            better = (det > 0) & (err < best) & ~flat
            levels = np.where(better, lv, levels)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
            if better.any():
                span = np.where(flat, F32(1), hi - lo)
                xm = x - lo
    levels = np.where(flat, F32(0), levels)
    scale = np.where(flat, F32(0), scale)
    return levels.astype(np.uint8), scale, -lo


def _fit_scale(x: np.ndarray, nmax: int):
    """make_qx_quants(rmse_type=1) for sub-blocks x (n, S) (one per column): (levels + nmax, int (n, S); scale (S,))."""
    cols = np.arange(x.shape[1])
    peak = x[np.argmax(np.abs(x), axis=0), cols]  # the first element of largest magnitude, with its sign
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)
    w = x * x
    wx = w * x

    def trial(iscale):
        lv = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        return lv, _sum(wx * lv), _sum(w * lv * lv)

    levels, sumlx, suml2 = trial(F32(-nmax) / peak)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            lv, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / peak)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            levels = np.where(better, lv, levels)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    levels = np.where(zero, -nmax, levels)  # an all-zero sub-block stores level 0, i.e. -nmax + nmax
    return (levels + nmax).astype(np.int32), np.where(zero, F32(0), scale)


def _to_fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _q45_k(x: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K (bits 4) or Q5_K (bits 5) of super-blocks x (B, 256) -> uint8 (B, 144 | 176)."""
    nmax, rmin, nstep = (15, -1.0, 20) if bits == 4 else (31, -0.5, 15)
    nb = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, sub-blocks)
    av = np.sqrt(_sum(sub * sub) / F32(32))
    weights = av + np.abs(sub)
    levels, scales, mins = _fit_min_scale(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    max_scale = np.where(max_scale > 0, max_scale, F32(0))  # the C loop starts at +0 and keeps it
    max_min = np.where(max_min > 0, max_min, F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # nearest_int into a uint8 (wraps), then at most 63
    ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d, dmin = _to_fp16(max_scale / F32(63)), _to_fp16(max_min / F32(63))
    # requantize against the 6-bit scale and min the file stores
    dd = (d.astype(F32)[:, None] * ls.astype(F32)).reshape(-1)
    dm = (dmin.astype(F32)[:, None] * lm.astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(np.rint((sub + dm) / dd), 0, nmax).astype(np.uint8)
    levels = np.where(dd != 0, again, levels).T.reshape(nb, 4, 2, 32)  # (block, 64-chunk, half, l)

    packed = np.empty((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    low = levels & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    parts = [d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), packed]
    if bits == 5:
        high = (levels >> 4).astype(np.uint8)  # (nb, 4, 2, 32): bit 2c + half of qh[l]
        shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
        qh = np.bitwise_or.reduce(high << shifts[None, :, :, None], axis=(1, 2))
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K of super-blocks x (B, 256) -> uint8 (B, 210)."""
    nb = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(nb * 16, 16).T)  # (16, sub-blocks)
    levels, scales = _fit_scale(sub, 32)
    scales = scales.reshape(nb, 16)
    mags = np.abs(scales)
    first = np.argmax(mags, axis=1)
    max_abs = mags[np.arange(nb), first]
    zero = max_abs < GROUP_MAX_EPS
    max_scale = np.where(zero, F32(1), scales[np.arange(nb), first])
    iscale = F32(-128) / max_scale
    d = _to_fp16(F32(1) / iscale)
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    dd = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(np.rint(sub / dd), -32, 31).astype(np.int32) + 32
    levels = np.where(dd != 0, again, levels).astype(np.uint8).T.reshape(nb, 2, 4, 32)  # (blk, 128-chunk, q, l)
    low, high = levels & 0xF, levels >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                          d.view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0  # an all-zero super-block is written as zero bytes, d included
    return out


def quantize_k(w: np.ndarray, type_name: str) -> np.ndarray:
    """float32 (..., cols) with cols % 256 == 0 -> the ggml `type_name` bytes, uint8 (..., cols // 256 * bytes)."""
    if type_name not in BLOCK_BYTES:
        raise ValueError(f"quantize_k: type {type_name!r} is not a K-quant we write; supported: "
                         f"{', '.join(BLOCK_BYTES)}")
    w = np.ascontiguousarray(w, dtype=F32)
    if w.shape[-1] % QK_K:
        raise ValueError(f"quantize_k: rows of {w.shape[-1]} values are not whole super-blocks of {QK_K}")
    blocks = w.reshape(-1, QK_K)
    fn = _q6_k if type_name == "Q6_K" else (lambda b: _q45_k(b, 4 if type_name == "Q4_K" else 5))
    out = np.concatenate([fn(blocks[i:i + ROWS_PER_CHUNK]) for i in range(0, len(blocks), ROWS_PER_CHUNK)]
                         or [np.empty((0, BLOCK_BYTES[type_name]), np.uint8)])
    return out.reshape(*w.shape[:-1], w.shape[-1] // QK_K * BLOCK_BYTES[type_name])
