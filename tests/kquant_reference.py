"""A line-by-line scalar port of llama.cpp's ``quantize_row_q{2,3,4,5,6}_K_ref`` (ggml-quants.c), float32 throughout.

A test oracle only: slow (pure Python, one value at a time), so it runs on a few blocks. It follows the C loops
literally (no vectorisation, sequential sums) so that ``finetune_sdk.exporting.kquants`` can be checked against
an independent reading of the same C code, byte for byte.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32


def nearest_int(value: np.float32) -> int:
    return int(np.rint(f32(value)))


def make_qkx2_quants(n, nmax, x, weights, rmin, rdelta, nstep, use_mad=False):
    mn, mx = x[0], x[0]
    sum_w = weights[0]
    sum_x = f32(sum_w * x[0])
    for i in range(1, n):
        mn = min(mn, x[i])
        mx = max(mx, x[i])
        sum_w = f32(sum_w + weights[i])
        sum_x = f32(sum_x + f32(weights[i] * x[i]))
    if mn > 0:
        mn = f32(0)
    if mx == mn:
        return f32(0), f32(-mn), [0] * n
    iscale = f32(f32(nmax) / f32(mx - mn))
    scale = f32(f32(1) / iscale)
    levels, best = [], f32(0)
    for i in range(n):
        level = max(0, min(nmax, nearest_int(f32(iscale * f32(x[i] - mn)))))
        levels.append(level)
        diff = f32(f32(f32(scale * f32(level)) + mn) - x[i])
        best = f32(best + f32(weights[i] * (abs(diff) if use_mad else f32(diff * diff))))
    for step in range(nstep + 1):
        iscale = f32(f32(f32(f32(rmin) + f32(f32(rdelta) * f32(step))) + f32(nmax)) / f32(mx - mn))
        aux, sum_l, sum_l2, sum_xl = [], f32(0), f32(0), f32(0)
        for i in range(n):
            level = max(0, min(nmax, nearest_int(f32(iscale * f32(x[i] - mn)))))
            aux.append(level)
            wl = f32(weights[i] * f32(level))
            sum_l = f32(sum_l + wl)
            sum_l2 = f32(sum_l2 + f32(wl * f32(level)))
            sum_xl = f32(sum_xl + f32(wl * x[i]))
        det = f32(f32(sum_w * sum_l2) - f32(sum_l * sum_l))
        if det > 0:
            this_scale = f32(f32(f32(sum_w * sum_xl) - f32(sum_x * sum_l)) / det)
            this_min = f32(f32(f32(sum_l2 * sum_x) - f32(sum_l * sum_xl)) / det)
            if this_min > 0:
                this_min = f32(0)
                this_scale = f32(sum_xl / sum_l2)
            error = f32(0)
            for i in range(n):
                diff = f32(f32(f32(this_scale * f32(aux[i])) + this_min) - x[i])
                error = f32(error + f32(weights[i] * (abs(diff) if use_mad else f32(diff * diff))))
            if error < best:
                levels, best, scale, mn = aux, error, this_scale, this_min
    return scale, f32(-mn), levels


def quantize_q4_or_q5_k(x: np.ndarray, nmax: int) -> bytes:
    """One super-block of 256 float32 values as Q4_K (nmax 15) or Q5_K (nmax 31) bytes."""
    rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
    scales, mins, levels = [], [], []
    for j in range(8):
        sub = x[32 * j:32 * j + 32]
        sum_x2 = f32(0)
        for value in sub:
            sum_x2 = f32(sum_x2 + f32(value * value))
        av_x = f32(np.sqrt(f32(sum_x2 / f32(32))))
        weights = [f32(av_x + abs(value)) for value in sub]
        scale, the_min, sub_levels = make_qkx2_quants(32, nmax, sub, weights, rmin, 0.1, nstep)
        scales.append(scale)
        mins.append(the_min)
        levels += sub_levels
    max_scale = max([f32(0), *scales])
    max_min = max([f32(0), *mins])
    inv_scale = f32(f32(63) / max_scale) if max_scale > 0 else f32(0)
    inv_min = f32(f32(63) / max_min) if max_min > 0 else f32(0)
    packed = bytearray(12)
    ls_all, lm_all = [], []
    for j in range(8):
        ls = min(63, nearest_int(f32(inv_scale * scales[j])) & 0xFF)
        lm = min(63, nearest_int(f32(inv_min * mins[j])) & 0xFF)
        ls_all.append(ls)
        lm_all.append(lm)
        if j < 4:
            packed[j] = ls
            packed[j + 4] = lm
        else:
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            packed[j - 4] |= (ls >> 4) << 6
            packed[j] |= (lm >> 4) << 6
    d = np.float16(f32(max_scale / f32(63)))
    dmin = np.float16(f32(max_min / f32(63)))
    for j in range(8):
        sub_d = f32(f32(d) * f32(ls_all[j]))
        if not sub_d:
            continue
        sub_m = f32(f32(dmin) * f32(lm_all[j]))
        for i in range(32):
            levels[32 * j + i] = max(0, min(nmax, nearest_int(f32(f32(x[32 * j + i] + sub_m) / sub_d))))
    head = d.tobytes() + dmin.tobytes() + bytes(packed)
    if nmax == 15:
        qs = bytes(levels[g + i] | (levels[g + i + 32] << 4) for g in range(0, 256, 64) for i in range(32))
        return head + qs
    qh = bytearray(32)
    qs = bytearray()
    for group, g in enumerate(range(0, 256, 64)):
        for i in range(32):
            low, high = levels[g + i], levels[g + i + 32]
            if low > 15:
                low -= 16
                qh[i] |= 1 << (2 * group)
            if high > 15:
                high -= 16
                qh[i] |= 2 << (2 * group)
            qs.append(low | (high << 4))
    return head + bytes(qh) + bytes(qs)


def make_qx_quants(n, nmax, x):
    mx, amax = f32(0), f32(0)
    for value in x:
        if abs(value) > amax:
            amax, mx = abs(value), value
    if amax < f32(1e-15):
        return f32(0), [0] * n
    iscale = f32(f32(-nmax) / mx)
    sumlx, suml2, levels = f32(0), f32(0), []
    for value in x:
        level = max(-nmax, min(nmax - 1, nearest_int(f32(iscale * value))))
        levels.append(level + nmax)
        weight = f32(value * value)
        sumlx = f32(sumlx + f32(f32(weight * value) * f32(level)))
        suml2 = f32(suml2 + f32(f32(weight * f32(level)) * f32(level)))
    scale = f32(sumlx / suml2) if suml2 else f32(0)
    best = f32(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = f32(-f32(f32(nmax) + f32(f32(0.1) * f32(step))) / mx)
        sumlx, suml2 = f32(0), f32(0)
        for value in x:
            level = max(-nmax, min(nmax - 1, nearest_int(f32(iscale * value))))
            weight = f32(value * value)
            sumlx = f32(sumlx + f32(f32(weight * value) * f32(level)))
            suml2 = f32(suml2 + f32(f32(weight * f32(level)) * f32(level)))
        if suml2 > 0 and f32(sumlx * sumlx) > f32(best * suml2):
            levels = [nmax + max(-nmax, min(nmax - 1, nearest_int(f32(iscale * value)))) for value in x]
            scale = f32(sumlx / suml2)
            best = f32(scale * sumlx)
    return scale, levels


def quantize_q6_k(x: np.ndarray) -> bytes:
    """One super-block of 256 float32 values as Q6_K bytes."""
    scales, levels = [], []
    max_scale, max_abs = f32(0), f32(0)
    for block in range(16):
        scale, sub_levels = make_qx_quants(16, 32, x[16 * block:16 * block + 16])
        scales.append(scale)
        levels += sub_levels
        if abs(scale) > max_abs:
            max_abs, max_scale = abs(scale), scale
    if max_abs < f32(1e-15):
        return bytes(210)
    iscale = f32(f32(-128) / max_scale)
    d = np.float16(f32(f32(1) / iscale))
    small = [min(127, nearest_int(f32(iscale * s))) for s in scales]
    for j in range(16):
        sub_d = f32(f32(d) * f32(small[j]))
        if not sub_d:
            continue
        for i in range(16):
            levels[16 * j + i] = max(-32, min(31, nearest_int(f32(x[16 * j + i] / sub_d)))) + 32
    ql, qh = bytearray(), bytearray()
    for half in (0, 128):
        ql += bytes((levels[half + i] & 0xF) | ((levels[half + i + 64] & 0xF) << 4) for i in range(32))
        ql += bytes((levels[half + i + 32] & 0xF) | ((levels[half + i + 96] & 0xF) << 4) for i in range(32))
        qh += bytes((levels[half + i] >> 4) | ((levels[half + i + 32] >> 4) << 2) | ((levels[half + i + 64] >> 4) << 4)
                    | ((levels[half + i + 96] >> 4) << 6) for i in range(32))
    return bytes(ql) + bytes(qh) + np.asarray(small, dtype=np.int8).tobytes() + d.tobytes()


def pack_2bit(levels) -> bytes:
    return bytes(levels[j + i] | (levels[j + i + 32] << 2) | (levels[j + i + 64] << 4) | (levels[j + i + 96] << 6)
                 for j in (0, 128) for i in range(32))


def quantize_q2_k(x: np.ndarray) -> bytes:
    """One super-block as Q2_K bytes (``quantize_row_q2_K_ref``)."""
    scales, mins, levels = [], [], []
    for j in range(16):
        sub = x[16 * j:16 * j + 16]
        scale, the_min, sub_levels = make_qkx2_quants(16, 3, sub, [f32(abs(v)) for v in sub], -0.5, 0.1, 15, True)
        scales.append(scale)
        mins.append(the_min)
        levels += sub_levels
    max_scale, max_min = max([f32(0), *scales]), max([f32(0), *mins])
    packed = [0] * 16
    if max_scale > 0:
        iscale = f32(f32(15) / max_scale)
        packed = [nearest_int(f32(iscale * s)) for s in scales]
        d = np.float16(f32(max_scale / f32(15)))
    else:
        d = np.float16(0)
    if max_min > 0:
        iscale = f32(f32(15) / max_min)
        packed = [(p | (nearest_int(f32(iscale * m)) << 4)) & 0xFF for p, m in zip(packed, mins)]
        dmin = np.float16(f32(max_min / f32(15)))
    else:
        dmin = np.float16(0)
    for j in range(16):
        sub_d = f32(f32(d) * f32(packed[j] & 0xF))
        if not sub_d:
            continue
        sub_m = f32(f32(dmin) * f32(packed[j] >> 4))
        for i in range(16):
            levels[16 * j + i] = max(0, min(3, nearest_int(f32(f32(x[16 * j + i] + sub_m) / sub_d))))
    return bytes(packed) + pack_2bit(levels) + d.tobytes() + dmin.tobytes()


def make_q3_quants(n, nmax, x):
    mx, amax = f32(0), f32(0)
    for value in x:
        if abs(value) > amax:
            amax, mx = abs(value), value
    if amax < f32(1e-15):
        return f32(0), [0] * n
    iscale = f32(f32(-nmax) / mx)
    levels, sumlx, suml2 = [], f32(0), f32(0)
    for value in x:
        level = max(-nmax, min(nmax - 1, nearest_int(f32(iscale * value))))
        levels.append(level)
        w = f32(value * value)
        sumlx = f32(sumlx + f32(f32(w * value) * f32(level)))
        suml2 = f32(suml2 + f32(f32(w * f32(level)) * f32(level)))
    for _ in range(5):
        changed = 0
        for i, value in enumerate(x):
            w = f32(value * value)
            slx = f32(sumlx - f32(f32(w * value) * f32(levels[i])))
            if slx > 0:
                sl2 = f32(suml2 - f32(f32(w * f32(levels[i])) * f32(levels[i])))
                new = max(-nmax, min(nmax - 1, nearest_int(f32(f32(value * sl2) / slx))))
                if new != levels[i]:
                    slx = f32(slx + f32(f32(w * value) * f32(new)))
                    sl2 = f32(sl2 + f32(f32(w * f32(new)) * f32(new)))
                    if sl2 > 0 and f32(f32(slx * slx) * suml2) > f32(f32(sumlx * sumlx) * sl2):
                        levels[i], sumlx, suml2 = new, slx, sl2
                        changed += 1
        if not changed:
            break
    return (f32(sumlx / suml2) if suml2 > 0 else f32(0)), [level + nmax for level in levels]


def quantize_q3_k(x: np.ndarray) -> bytes:
    """One super-block as Q3_K bytes (``quantize_row_q3_K_ref``)."""
    scales, levels = [], []
    max_scale, amax = f32(0), f32(0)
    for j in range(16):
        scale, sub_levels = make_q3_quants(16, 4, x[16 * j:16 * j + 16])
        scales.append(scale)
        levels += sub_levels
        if abs(scale) > amax:
            amax, max_scale = abs(scale), scale
    packed = bytearray(12)
    if max_scale:
        iscale = f32(f32(-32) / max_scale)
        for j in range(16):
            level = max(-32, min(31, nearest_int(f32(iscale * scales[j])))) + 32
            if j < 8:
                packed[j] = level & 0xF
            else:
                packed[j - 8] |= (level & 0xF) << 4
            packed[8 + j % 4] |= (level >> 4) << (2 * (j // 4))
        d = np.float16(f32(f32(1) / iscale))
    else:
        d = np.float16(0)
    for j in range(16):
        sc = (packed[j] & 0xF) if j < 8 else (packed[j - 8] >> 4)
        sc = (sc | (((packed[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        sub_d = f32(f32(d) * f32(sc))
        if not sub_d:
            continue
        for i in range(16):
            levels[16 * j + i] = max(-4, min(3, nearest_int(f32(x[16 * j + i] / sub_d)))) + 4
    hmask = bytearray(32)
    for j in range(256):
        if levels[j] > 3:
            hmask[j % 32] |= 1 << (j // 32)
            levels[j] -= 4
    return bytes(hmask) + pack_2bit(levels) + bytes(packed) + d.tobytes()


KVALUES_IQ4NL = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def best_index_int8(values, x):
    """The C binary search, literally (float32 differences)."""
    x = f32(x)
    if x <= values[0]:
        return 0
    if x >= values[-1]:
        return len(values) - 1
    ml, mu = 0, len(values) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < values[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if f32(x - f32(values[mu - 1])) < f32(f32(values[mu]) - x) else mu


def quantize_iq4_nl_block(x: np.ndarray, ntry: int = 7) -> bytes:
    """``quantize_row_iq4_nl_impl(32, 32, x, ..., quant_weights=NULL, ntry)``: one block of 32 -> 18 bytes."""
    x = [f32(v) for v in x]
    values = KVALUES_IQ4NL
    weight = [f32(v * v) for v in x]
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < f32(1e-15):
        scale = f32(0)
    else:
        d = f32(-mx / f32(values[0])) if ntry > 0 else f32(mx / f32(values[0]))
        inverse = f32(f32(1) / d)
        sumqx, sumq2 = f32(0), f32(0)
        for j in range(32):
            q = f32(values[best_index_int8(values, f32(inverse * x[j]))])
            sumqx = f32(sumqx + f32(f32(weight[j] * q) * x[j]))
            sumq2 = f32(sumq2 + f32(f32(weight[j] * q) * q))
        with np.errstate(all="ignore"):
            d = f32(sumqx / sumq2)
        best = f32(d * sumqx)
        for itry in range(-ntry, ntry + 1):
            inverse = f32(f32(itry + values[0]) / mx)
            sumqx, sumq2 = f32(0), f32(0)
            for j in range(32):
                q = f32(values[best_index_int8(values, f32(inverse * x[j]))])
                sumqx = f32(sumqx + f32(f32(weight[j] * q) * x[j]))
                sumq2 = f32(sumq2 + f32(f32(weight[j] * q) * q))
            if sumq2 > 0 and f32(sumqx * sumqx) > f32(best * sumq2):
                d = f32(sumqx / sumq2)
                best = f32(d * sumqx)
        scale = d
    inverse = f32(f32(1) / scale) if scale else f32(0)
    levels = [best_index_int8(values, f32(inverse * v)) for v in x]
    return np.float16(scale).tobytes() + bytes(levels[j] | (levels[j + 16] << 4) for j in range(16))


def quantize_iq4_nl(x: np.ndarray) -> bytes:
    """``quantize_iq4_nl(src, dst, 1, len(x), NULL)``: the blocks of one row, one after the other."""
    return b"".join(quantize_iq4_nl_block(x[start:start + 32]) for start in range(0, len(x), 32))
