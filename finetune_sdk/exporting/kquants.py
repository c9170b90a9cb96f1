"""ggml's K-quants (Q2_K...Q6_K) and IQ4_NL in numpy: the reference quantizers of llama.cpp's ``ggml-quants.c``.

The ``gguf`` package reads K-quants (``gguf.quants.dequantize``) but can't write them, so this module ports
``quantize_row_q{2,3,4,5,6}_K_ref`` with their helpers ``make_qkx2_quants``, ``make_q3_quants`` and
``make_qx_quants``: the functions ``llama-quantize`` runs when no importance matrix is given. Every step is the C code's, in float32, vectorised over all sub-blocks of a tensor at once: values of a
sub-block are laid out along axis 0 so that numpy's reductions add them one after the other, in the C loop's
order. ``nearest_int`` (the ``+ 12582912.f`` trick) rounds half to even, which is ``np.rint``.

Super-blocks are 256 values (``QK_K``); a row must be a multiple of 256 (``quantization.tensor_types`` falls back to
llama.cpp's block-32 types otherwise). Block layouts (bytes, as ``ggml-common.h`` and ``gguf.quants`` read them):
Q2_K ``scales[16], qs[64], d, dmin (f16)`` = 84; Q3_K ``hmask[32], qs[64], scales[12], d`` = 110;
Q4_K ``d, dmin, scales[12], qs[128]`` = 144; Q5_K ``d, dmin, scales[12], qh[32], qs[128]`` = 176;
Q6_K ``ql[128], qh[64], scales[16] (int8), d`` = 210.

IQ4_NL (:func:`quantize_iq4_nl`, llama.cpp's fallback for Q2_K/Q3_K rows that aren't a multiple of 256) ports
``quantize_iq4_nl`` -> ``quantize_row_iq4_nl_impl`` without an importance matrix (weights ``x**2``, ``ntry = 7``):
blocks of 32, ``d (f16), qs[16]`` = 18 bytes, each value an index into the 16 non-linear levels
``kvalues_iq4nl``, element ``j`` in the low nibble of ``qs[j]`` and element ``j + 16`` in its high nibble.

Example:
    >>> import numpy as np, gguf
    >>> w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    >>> packed = quantize_k(w, "Q4_K")
    >>> packed.shape
    (4, 288)
    >>> err = np.abs(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_K) - w).max()
    >>> bool(err < 0.35)
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np  # this module is imported only when a K-quant is written (quantization.encode)

QK_K = 256
F32 = np.float32
CHUNK_BLOCKS = 8192  # super-blocks quantized at once (2M values): bounds the temporary arrays


def _make_qkx2_quants(x: Any, w: Any, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool = False) -> tuple[Any, Any, Any]:
    """``make_qkx2_quants`` over columns: ``x``, ``w`` of shape ``(n, blocks)``; squared error, or absolute with
    ``use_mad``.

    Returns ``(scale, the_min, L)``: float32 ``(blocks,)``, float32 ``(blocks,)`` and levels ``(n, blocks)`` in
    ``0..nmax`` with ``x ~ scale * L - the_min``.
    """
    mn = np.minimum(x.min(axis=0), F32(0))
    mx = x.max(axis=0)
    sum_w = w.sum(axis=0, dtype=F32)
    sum_x = (w * x).sum(axis=0, dtype=F32)
    flat = mx == mn
    with np.errstate(all="ignore"):
        iscale = F32(nmax) / np.where(flat, F32(1), mx - mn)
        scale = F32(1) / iscale
        levels = np.clip(np.rint(iscale * (x - mn)), 0, nmax).astype(F32)
        diff = scale * levels + mn - x
        best = (w * (np.abs(diff) if use_mad else diff * diff)).sum(axis=0, dtype=F32)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            aux = np.rint(iscale * (x - mn))
            aux = np.clip(np.nan_to_num(aux, nan=0.0, posinf=nmax, neginf=0.0), 0, nmax).astype(F32)
            weighted = w * aux
            sum_l = weighted.sum(axis=0, dtype=F32)
            sum_l2 = (weighted * aux).sum(axis=0, dtype=F32)
            sum_xl = (weighted * x).sum(axis=0, dtype=F32)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale).astype(F32)
            this_min = np.where(positive, F32(0), this_min).astype(F32)
            diff = this_scale * aux + this_min - x
            error = (w * (np.abs(diff) if use_mad else diff * diff)).sum(axis=0, dtype=F32)
            better = (det > 0) & (error < best) & ~flat
            levels = np.where(better, aux, levels)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale).astype(F32)
    levels = np.where(flat, F32(0), levels)
    return scale, (-mn).astype(F32), levels.astype(np.uint8)


def _make_qx_quants(x: Any, nmax: int) -> tuple[Any, Any]:
    """``make_qx_quants`` with ``rmse_type = 1`` and no importance weights, over columns of ``x`` ``(n, blocks)``.

    Returns ``(scale (blocks,), L (n, blocks))`` with levels in ``0..2*nmax-1`` (``l + nmax``).
    """
    columns = np.arange(x.shape[1])
    first_max = np.abs(x).argmax(axis=0)
    mx = x[first_max, columns]
    zero = np.abs(mx) < F32(1e-15)
    mx = np.where(zero, F32(1), mx)
    weights = x * x

    def fit(iscale: Any) -> tuple[Any, Any, Any]:
        levels = np.clip(np.rint(iscale * x), -nmax, nmax - 1).astype(F32)
        sumlx = (weights * x * levels).sum(axis=0, dtype=F32)
        suml2 = (weights * levels * levels).sum(axis=0, dtype=F32)
        return levels, sumlx, suml2

    with np.errstate(all="ignore"):
        levels, sumlx, suml2 = fit(F32(-nmax) / mx)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            candidate, sumlx, suml2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            levels = np.where(better, candidate, levels)
            scale = np.where(better, sumlx / suml2, scale).astype(F32)
            best = np.where(better, scale * sumlx, best).astype(F32)
    scale = np.where(zero, F32(0), scale)
    levels = np.where(zero, F32(-nmax), levels)
    return scale, (levels + nmax).astype(np.uint8)


def _make_q3_quants(x: Any, nmax: int) -> tuple[Any, Any]:
    """``make_q3_quants`` with ``do_rmse`` over columns of ``x`` ``(n, blocks)``: ``(scale, L in 0..2*nmax-1)``.

    The refinement visits the values of a sub-block one after the other, each step seeing the sums the previous
    one left (as the C loop does), for all sub-blocks at once; a pass that changes nothing leaves the next pass
    nothing to change, so running all 5 passes equals the C code's early ``break``.
    """
    columns = np.arange(x.shape[1])
    mx = x[np.abs(x).argmax(axis=0), columns]
    zero = np.abs(mx) < F32(1e-15)
    mx = np.where(zero, F32(1), mx)
    weights = x * x
    with np.errstate(all="ignore"):
        levels = np.clip(np.rint((F32(-nmax) / mx) * x), -nmax, nmax - 1).astype(F32)
        sumlx = (weights * x * levels).sum(axis=0, dtype=F32)
        suml2 = (weights * levels * levels).sum(axis=0, dtype=F32)
        for _ in range(5):
            for i in range(x.shape[0]):
                w, xi, li = weights[i], x[i], levels[i]
                slx = sumlx - w * xi * li
                sl2 = suml2 - w * li * li
                new = np.clip(np.nan_to_num(np.rint(xi * sl2 / slx)), -nmax, nmax - 1).astype(F32)
                slx_new = slx + w * xi * new
                sl2_new = sl2 + w * new * new
                take = ((slx > 0) & (new != li) & (sl2_new > 0)
                        & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
                levels[i] = np.where(take, new, li)
                sumlx = np.where(take, slx_new, sumlx).astype(F32)
                suml2 = np.where(take, sl2_new, suml2).astype(F32)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    scale = np.where(zero, F32(0), scale)
    levels = np.where(zero, F32(-nmax), levels)
    return scale, (levels + nmax).astype(np.uint8)


def _pack_2bit(levels: Any) -> Any:
    """``qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6`` for levels ``(256, blocks)``."""
    groups = levels.reshape(2, 4, 32, -1)
    return (groups[:, 0] | (groups[:, 1] << 2) | (groups[:, 2] << 4) | (groups[:, 3] << 6)).reshape(64, -1)


def _half(values: Any) -> tuple[Any, Any]:
    """GGML_FP32_TO_FP16 (round to nearest even) and the float32 it reads back as."""
    half = values.astype(np.float16)
    return half, half.astype(F32)


def _scales_min_k4(ls: Any, lm: Any) -> Any:
    """The 12 bytes holding 8 six-bit scales and mins (``quantize_row_q4_K_ref``'s packing). Inputs: (8, blocks)."""
    packed = np.zeros((12, ls.shape[1]), dtype=np.uint8)
    packed[0:4] = ls[0:4]
    packed[4:8] = lm[0:4]
    packed[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    packed[0:4] |= (ls[4:8] >> 4) << 6
    packed[4:8] |= (lm[4:8] >> 4) << 6
    return packed


def _q4_q5_blocks(blocks: Any, nmax: int, rmin: float, nstep: int) -> tuple[Any, Any, Any, Any]:
    """Shared part of Q4_K/Q5_K: ``(d f16, dmin f16, 12 scale bytes, levels (256, n))`` for ``blocks`` (n, 256)."""
    count = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(count * 8, 32).T)  # (32, sub-blocks)
    av_x = np.sqrt((x * x).sum(axis=0, dtype=F32) / F32(32))
    weights = av_x + np.abs(x)
    scales, mins, levels = _make_qkx2_quants(x, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(count, 8).T, mins.reshape(count, 8).T  # (8, blocks)
    max_scale = np.maximum(scales.max(axis=0), F32(0))
    max_min = np.maximum(mins.max(axis=0), F32(0))
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(np.rint(inv_scale * scales).astype(np.int32).astype(np.uint8), 63)
    lm = np.minimum(np.rint(inv_min * mins).astype(np.int32).astype(np.uint8), 63)
    d_half, d = _half(max_scale / F32(63))
    dmin_half, dmin = _half(max_min / F32(63))
    sub_d = (d * ls.astype(F32)).T.reshape(-1)  # per sub-block, (sub-blocks,)
    sub_m = (dmin * lm.astype(F32)).T.reshape(-1)
    with np.errstate(all="ignore"):
        fresh = np.clip(np.rint((x + sub_m) / sub_d), 0, nmax)
    levels = np.where(sub_d != 0, np.nan_to_num(fresh), levels).astype(np.uint8)
    levels = levels.T.reshape(count, QK_K).T  # (256, blocks)
    return d_half, dmin_half, _scales_min_k4(ls, lm), levels


def _q4_k(blocks: Any) -> Any:
    d, dmin, scales, levels = _q4_q5_blocks(blocks, 15, -1.0, 20)
    groups = levels.reshape(4, 2, 32, -1)  # (64-value group, low/high half, 32, blocks)
    qs = (groups[:, 0] | (groups[:, 1] << 4)).reshape(128, -1)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2).T, dmin.view(np.uint8).reshape(-1, 2).T,
                           scales, qs]).T


def _q5_k(blocks: Any) -> Any:
    d, dmin, scales, levels = _q4_q5_blocks(blocks, 31, -0.5, 15)
    groups = levels.reshape(4, 2, 32, -1)
    low = groups & 0xF
    qs = (low[:, 0] | (low[:, 1] << 4)).reshape(128, -1)
    high = (groups >> 4).astype(np.uint8)  # (4, 2, 32, blocks): bit 2*group + half of qh[j]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (high << shifts[:, :, None, None]).sum(axis=(0, 1), dtype=np.uint8)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2).T, dmin.view(np.uint8).reshape(-1, 2).T,
                           scales, qh, qs]).T


def _q6_k(blocks: Any) -> Any:
    count = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(count * 16, 16).T)  # (16, sub-blocks)
    scales, levels = _make_qx_quants(x, 32)
    scales = scales.reshape(count, 16).T  # (16, blocks)
    first_max = np.abs(scales).argmax(axis=0)
    max_scale = scales[first_max, np.arange(count)]
    zero = np.abs(max_scale) < F32(1e-15)
    with np.errstate(all="ignore"):
        iscale = np.where(zero, F32(0), F32(-128) / np.where(zero, F32(1), max_scale)).astype(F32)
        d_half, d = _half(np.where(zero, F32(0), F32(1) / iscale).astype(F32))
    small = np.minimum(np.rint(iscale * scales), 127).astype(np.int8)  # (16, blocks)
    sub_d = (d * small.astype(F32)).T.reshape(-1)
    with np.errstate(all="ignore"):
        fresh = np.clip(np.rint(x / sub_d), -32, 31) + 32
    levels = np.where(sub_d != 0, np.nan_to_num(fresh), levels).astype(np.uint8)
    levels = levels.T.reshape(count, QK_K).T.reshape(2, 4, 32, count)  # (128-half, quarter, 32, blocks)
    ql = np.concatenate([levels[:, 0] & 0xF | ((levels[:, 2] & 0xF) << 4),
                         levels[:, 1] & 0xF | ((levels[:, 3] & 0xF) << 4)], axis=1).reshape(128, count)
    qh = ((levels[:, 0] >> 4) | ((levels[:, 1] >> 4) << 2) | ((levels[:, 2] >> 4) << 4)
          | ((levels[:, 3] >> 4) << 6)).reshape(64, count)
    out = np.concatenate([ql, qh, small.view(np.uint8), d_half.view(np.uint8).reshape(-1, 2).T]).T
    out[zero] = 0
    return out


def _q2_k(blocks: Any) -> Any:
    """``quantize_row_q2_K_ref``: 16 sub-blocks of 16, 4-bit scales and mins, 2-bit levels (84 bytes)."""
    count = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(count * 16, 16).T)
    scales, mins, levels = _make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(count, 16).T, mins.reshape(count, 16).T
    max_scale = np.maximum(scales.max(axis=0), F32(0))
    max_min = np.maximum(mins.max(axis=0), F32(0))
    with np.errstate(all="ignore"):
        ls = np.where(max_scale > 0, np.rint((F32(15) / max_scale) * scales), 0).astype(np.int32)
        lm = np.where(max_min > 0, np.rint((F32(15) / max_min) * mins), 0).astype(np.int32)
    packed = (ls.astype(np.uint8) | (lm << 4).astype(np.uint8))
    d_half, d = _half(np.where(max_scale > 0, max_scale / F32(15), F32(0)).astype(F32))
    dmin_half, dmin = _half(np.where(max_min > 0, max_min / F32(15), F32(0)).astype(F32))
    sub_d = (d * (packed & 0xF).astype(F32)).T.reshape(-1)
    sub_m = (dmin * (packed >> 4).astype(F32)).T.reshape(-1)
    with np.errstate(all="ignore"):
        fresh = np.clip(np.rint((x + sub_m) / sub_d), 0, 3)
    levels = np.where(sub_d != 0, np.nan_to_num(fresh), levels).astype(np.uint8)
    levels = levels.T.reshape(count, QK_K).T
    return np.concatenate([packed, _pack_2bit(levels), d_half.view(np.uint8).reshape(-1, 2).T,
                           dmin_half.view(np.uint8).reshape(-1, 2).T]).T


def _q3_k(blocks: Any) -> Any:
    """``quantize_row_q3_K_ref``: 16 sub-blocks of 16, signed 6-bit scales, 3-bit levels (110 bytes)."""
    count = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(count * 16, 16).T)
    scales, levels = _make_q3_quants(x, 4)
    scales = scales.reshape(count, 16).T
    max_scale = scales[np.abs(scales).argmax(axis=0), np.arange(count)]
    some = max_scale != 0
    with np.errstate(all="ignore"):
        iscale = np.where(some, F32(-32) / np.where(some, max_scale, F32(1)), F32(0)).astype(F32)
        small = np.clip(np.rint(iscale * scales), -32, 31).astype(np.int32) + 32  # (16, blocks), 0..63
        d_half, d = _half(np.where(some, F32(1) / iscale, F32(0)).astype(F32))
    small = np.where(some, small, 0).astype(np.uint8)
    packed = np.zeros((12, count), dtype=np.uint8)
    packed[0:8] = (small[0:8] & 0xF) | ((small[8:16] & 0xF) << 4)
    high = small >> 4  # (16, blocks): 2 bits each, byte 8 + j % 4, shift 2 * (j // 4)
    for j in range(16):
        packed[8 + j % 4] |= (high[j] << (2 * (j // 4))).astype(np.uint8)
    sub_d = (d * (small.astype(np.int32) - 32).astype(F32)).T.reshape(-1)
    with np.errstate(all="ignore"):
        fresh = np.clip(np.rint(x / sub_d), -4, 3) + 4
    levels = np.where(sub_d != 0, np.nan_to_num(fresh), levels).astype(np.uint8)
    levels = levels.T.reshape(count, QK_K).T  # (256, blocks)
    upper = levels > 3
    hmask = (upper.reshape(8, 32, count).astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None, None]).sum(
        axis=0, dtype=np.uint8)
    levels = np.where(upper, levels - 4, levels).astype(np.uint8)
    return np.concatenate([hmask, _pack_2bit(levels), packed, d_half.view(np.uint8).reshape(-1, 2).T]).T


#: ggml's ``kvalues_iq4nl``: the 16 levels of IQ4_NL, ascending
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32)
QK4_NL = 32
GROUP_MAX_EPS = F32(1e-15)


def _best_index_iq4_nl(x: Any) -> Any:
    """``best_index_int8(16, kvalues_iq4nl, x)``: the nearest level's index (a tie goes to the upper level), 0 at or
    below -127, 15 at or above 113 (and for NaN, as the C binary search ends)."""
    values = IQ4_NL_VALUES
    upper = np.clip(np.searchsorted(values, x, side="right"), 1, 15)
    lower = upper - 1
    index = np.where(x - values[lower] < values[upper] - x, lower, upper)
    return np.where(x <= values[0], 0, np.where(x >= values[15], 15, index)).astype(np.uint8)


def _iq4_nl_sums(x: Any, weight: Any, inverse_scale: Any) -> tuple[Any, Any]:
    """``sumqx``, ``sumq2`` of the levels nearest to ``inverse_scale * x`` (values along axis 0, summed in order)."""
    q = IQ4_NL_VALUES[_best_index_iq4_nl(inverse_scale * x)]
    wq = weight * q
    return (wq * x).sum(axis=0, dtype=F32), (wq * q).sum(axis=0, dtype=F32)


def _iq4_nl(blocks: Any) -> Any:
    """``quantize_row_iq4_nl_impl(QK4_NL, 32, ..., quant_weights=NULL, ntry=7)`` for ``blocks`` (n, 32)."""
    x = np.ascontiguousarray(blocks.T)
    weight = x * x
    columns = np.arange(x.shape[1])
    amax = np.abs(x).max(axis=0)
    largest = x[np.abs(x).argmax(axis=0), columns]  # the first value of the largest magnitude, as the C loop's ">"
    empty = amax < GROUP_MAX_EPS
    largest = np.where(empty, F32(1), largest).astype(F32)
    with np.errstate(all="ignore"):
        d = -largest / IQ4_NL_VALUES[0]
        sumqx, sumq2 = _iq4_nl_sums(x, weight, F32(1) / d)
        d = sumqx / sumq2
        best = d * sumqx
        for itry in range(-7, 8):
            sumqx, sumq2 = _iq4_nl_sums(x, weight, (F32(itry) + IQ4_NL_VALUES[0]) / largest)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
        d = np.where(empty, F32(0), d).astype(F32)
        levels = _best_index_iq4_nl(np.where(d != 0, F32(1) / d, F32(0)).astype(F32) * x)
    d_half, _ = _half(d)
    return np.concatenate([d_half.view(np.uint8).reshape(-1, 2).T, levels[:16] | (levels[16:] << 4)]).T


def quantize_iq4_nl(data: Any) -> Any:
    """``data`` (float32, last dimension a multiple of 32) as packed ``IQ4_NL`` bytes, as ``llama-quantize`` writes
    them without an importance matrix.

    Returns a uint8 array of shape ``(*data.shape[:-1], data.shape[-1] // 32 * 18)`` for
    ``gguf.GGUFWriter.add_tensor(..., raw_dtype=IQ4_NL)``. Raises ``ValueError`` for another row size.

    Example:
        >>> import numpy as np, gguf
        >>> w = np.random.default_rng(0).standard_normal((4, 96)).astype(np.float32)
        >>> packed = quantize_iq4_nl(w)
        >>> packed.shape
        (4, 54)
        >>> back = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.IQ4_NL)
        >>> bool(np.abs(back - w).max() < 0.5)
        True
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.shape[-1] % QK4_NL:
        raise ValueError(f"IQ4_NL needs rows of a multiple of {QK4_NL} values, not {data.shape[-1]}")
    blocks = data.reshape(-1, QK4_NL)
    out = np.empty((blocks.shape[0], 18), dtype=np.uint8)
    step = CHUNK_BLOCKS * 8  # 2M values at once, as for the K-quants
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = _iq4_nl(blocks[start:start + step])
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK4_NL * 18)


QUANTIZERS = {"Q2_K": (_q2_k, 84), "Q3_K": (_q3_k, 110), "Q4_K": (_q4_k, 144), "Q5_K": (_q5_k, 176),
              "Q6_K": (_q6_k, 210)}


def quantize_k(data: Any, type_name: str) -> Any:
    """``data`` (float32, last dimension a multiple of 256) as packed ``Q2_K``...``Q6_K`` bytes.

    Returns a uint8 array of shape ``(*data.shape[:-1], data.shape[-1] // 256 * type_size)``, what
    ``gguf.GGUFWriter.add_tensor(..., raw_dtype=...)`` takes. Raises ``ValueError`` for another row size.
    """
    quantize, type_size = QUANTIZERS[type_name]
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.shape[-1] % QK_K:
        raise ValueError(f"{type_name} needs rows of a multiple of {QK_K} values, not {data.shape[-1]}")
    blocks = data.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        out[start:start + CHUNK_BLOCKS] = quantize(blocks[start:start + CHUNK_BLOCKS])
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * type_size)
