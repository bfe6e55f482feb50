"""GGML IQ3_XXS and IQ3_S (3-bit D4-lattice codebooks): bit-exact, vectorized ports of ggml-quants.c.

Both cut a 256-block into 8 groups of 32 with one scale each, and a group into 8 quads, each one point of the
type's grid (IQ3_XXS 256 points, IQ3_S 512). quantize_row_iq3_xxs_impl and quantize_row_iq3_s_impl share the
search (`_search`): at 31 resp. 19 trial scales every quad is rounded to a word of 4 levels and, off the grid,
replaced by its nearest listed neighbour in weighted distance (iq3_find_best_neighbour, most of ggml's time);
the trial that fits best is kept and refitted once. The types differ in the signs (IQ3_XXS stores 7 and
flips the least important element to make the count of negatives even), thresholds and packing.

All trials run at once. A quad keeps its word over runs of consecutive trials, and along such a run the
distances of two neighbours differ by s*(a*s - b) for the trial scale s: a neighbour that wins at both ends
of a run by more than the float error bound wins at every trial inside it. So only the ends of runs are
searched, and runs whose winner changes are split in two until they are certified (`_snap`). The scoring
loop runs as TorchScript, without the GIL (`_key_blocks`).
Bytes do not depend on the CPU: ggml's C quantizers are scalar code, and ours repeat their float order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List

import numpy as np
import torch

from grokquant.quant.ggml.base import Quantizer, fp16_bytes, fp16_from_bytes
from grokquant.quant.ggml.common import (_scripted, const, elements, f32, imatrix_weights, nearest_int, seqsum,
                                         sqrtf_, sum_squares)
from grokquant.quant.ggml.iq_grids import grid

QK_K = 256
XXS_EPS = f32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
# The float error of a weighted distance as C computes it is below 10 ulp of sum(w*(15s + |x|)^2), plus a few
# subnormal steps: ERR and TINY bound it with room to spare.
ERR = 2.0 ** -20
TINY = 1e-37


def _blocks(most: int):
    """The neighbour ranks _keys scores in one step: few while most quads have more neighbours (about 1.2
    scores per listed neighbour on gaussian data, against 1.45 for blocks 0-4-8-16-most)."""
    return [(0, 4), (4, 8), (8, 12), (12, 17), (17, 22), (22, most)]


@dataclass(frozen=True)
class _Lattice:
    """A grid with the lookup tables of iq3xs_init_impl, laid out for gathers."""
    index: torch.Tensor  # [4096] int32: grid point of a level word, -1 off the grid
    count: torch.Tensor  # [4096] int32: neighbours listed for an off-grid word
    nbr: torch.Tensor  # [4096 * most] int32: neighbour j of word u at u * most + j
    qall: torch.Tensor  # [most * 4, 4096] float: odd value 2l+1 of coordinate i of neighbour j of word u at
    #                     row 4j + i, +inf past the word's list
    qv: tuple  # qall cut into the rank blocks of _blocks
    values: torch.Tensor  # [4, points] float: odd values of each grid point
    dq: torch.Tensor  # [points, 4] float: the dequantizer's magnitudes (gguf-py's grid)
    most: int


@lru_cache(maxsize=None)
def _lattice(name: str) -> _Lattice:
    import gguf.quants

    g = grid(name)
    nb = g.neighbours.long()
    most = nb.shape[1]
    valid = nb >= 0
    pts = nb.clamp(min=0)
    qv = torch.where(valid[..., None], g.values[pts], float("inf"))  # [4096, most, 4]; inf: no neighbour
    cls = getattr(gguf.quants, name)
    cls.init_grid()
    dq = torch.from_numpy(cls.grid.reshape(-1, 4).astype("float32"))
    return _Lattice(index=g.index.int(), count=valid.sum(1).int(), nbr=pts.int().reshape(-1),
                    qall=qv.permute(1, 2, 0).reshape(-1, 4096).contiguous(),
                    qv=tuple(qv[:, a:b].permute(1, 2, 0).reshape(-1, 4096).contiguous() for a, b in _blocks(most)),
                    values=g.values.t().contiguous(), dq=dq, most=most)


# ---- iq3_find_best_neighbour ----------------------------------------------------------------------------

def _flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of a CPU bool tensor's True entries (numpy's is several times faster than torch's)."""
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _sorted(lat: _Lattice, u, batch: int = 16384):
    """Order of quads by descending neighbour count (numpy's radix sort: fast at every size) and batch bounds;
    within a batch the quads scored for neighbour j are a prefix."""
    order = torch.from_numpy(np.argsort((lat.most - lat.count.index_select(0, u)).to(torch.uint8).numpy(),
                                        kind="stable"))
    return order, [(a, min(len(u), a + batch)) for a in range(0, len(u), batch)]


def _dist(q, s, x4, w4):
    """iq3_find_best_neighbour's d2 = sum w*(scale*q - x)^2 over the 4 coordinates, in C order; q [..., 4, m]
    (overwritten), s, x4, w4 broadcast against it."""
    diff = q.mul_(s).sub_(x4)
    t = (w4 * diff).mul_(diff)
    d2 = t.select(-2, 0) + t.select(-2, 1)
    d2 += t.select(-2, 2)
    d2 += t.select(-2, 3)
    return d2


def _keys(lat: _Lattice, u, x4, w4, s, buf):
    """The two smallest keys over the neighbours of quads with words u [m] (sorted by count, descending),
    |x|, sqrt(weights) x4, w4 [4, m] at scales s [m]. A key is a distance's bits with the neighbour's rank j
    in the 6 low bits: ordered like the distances, then by j, so the first of equal minima wins (C's strict <)."""
    m = u.shape[0]
    cnt = lat.count.index_select(0, u)
    ends = torch.bincount(cnt, minlength=lat.most + 1).flip(0).cumsum(0).flip(0)[1:].tolist()  # #(count > j)
    top = torch.iinfo(torch.int32).max
    best = torch.full((m,), top, dtype=torch.int32)
    second = torch.full((m,), top, dtype=torch.int32)
    blocks = _blocks(lat.most)
    R = max(b - a for a, b in blocks)
    d2 = buf("d2", R * m)
    _scripted(_key_blocks)(list(lat.qv), [a for a, _ in blocks], ends, u, x4, w4, s.expand(4, m),
                           buf("nq", 4 * R * m), buf("dt", 4 * R * m), d2, d2.view(torch.int32), _RANK, best, second)
    return best, second


def _key_blocks(qv: List[torch.Tensor], j0s: List[int], ends: List[int], u, x4, w4, s4, qbuf, tbuf, dbuf, kbuf,
                rank, best, second):
    """The loop of `_keys` (TorchScript: without the GIL). Rank block b covers ranks j0s[b] onwards, of the
    ends[j0] quads that have more neighbours; dbuf and kbuf are one scratch tensor as float and int32."""
    for b in range(len(qv)):
        j0 = j0s[b]
        R = qv[b].shape[0] // 4
        mb = ends[j0]
        if mb == 0:
            break
        q = torch.index_select(qv[b], 1, u[:mb], out=qbuf[:R * 4 * mb].view(R * 4, mb)).view(R, 4, mb)
        q.mul_(s4[:, :mb]).sub_(x4[:, :mb])  # iq3_find_best_neighbour: d2 = sum w*(scale*q - x)^2 in C order
        t = torch.mul(w4[:, :mb], q, out=tbuf[:R * 4 * mb].view(R, 4, mb)).mul_(q)
        d2 = torch.add(t[:, 0], t[:, 1], out=dbuf[:R * mb].view(R, mb))
        d2 += t[:, 2]
        d2 += t[:, 3]
        k = kbuf[:R * mb].view(R, mb)  # d2 as int32
        k.bitwise_and_(0x7FFFFFC0).bitwise_or_(rank[j0:j0 + R])  # C's d2 = 0 + ... is never -0
        lo1 = k.amin(0)  # the block's two smallest keys, merged into the running two
        k.scatter_(0, ((lo1 & 63) - j0).long().unsqueeze(0), 2147483647)
        lo2 = k.amin(0)
        bm, sm = best[:mb], second[:mb]
        torch.minimum(sm, lo2, out=sm)
        torch.minimum(sm, torch.maximum(bm, lo1), out=sm)
        torch.minimum(bm, lo1, out=bm)


_RANK = torch.arange(64, dtype=torch.int32)[:, None]
_scripted(_key_blocks)  # compiled at import, while the source file is fresh (see common._scripted)


def _nearest(lat: _Lattice, u, qi, si, Xq, Wq, Sf, buf, gaps: bool = False):
    """iq3_find_best_neighbour for off-grid quads: words u [n] int32, quad columns qi [n] of Xq, Wq [4, NQ]
    (|x| and sqrt(weights) per coordinate), scales Sf[si] -> grid points [n] int32 and, with gaps, a lower
    bound of the distance margin between the winner and every other neighbour. Near ties of the keys are
    scored again with float comparisons."""
    order, batches = _sorted(lat, u)
    u, qi, si = u.index_select(0, order), qi.index_select(0, order), si.index_select(0, order)
    point, gap = torch.empty_like(u), torch.empty(len(u))
    for a, b in batches:
        x4, w4 = buf("nx", 4, b - a), buf("nw", 4, b - a)
        for i in range(4):
            torch.index_select(Xq[i], 0, qi[a:b], out=x4[i])
            torch.index_select(Wq[i], 0, qi[a:b], out=w4[i])
        s = Sf.index_select(0, si[a:b])
        best, second = _keys(lat, u[a:b], x4, w4, s, buf)
        j = best & 63
        # the keys lost < 2^-17 of a distance
        gap[a:b] = (second & ~63).view(torch.float32) - (best & ~63).view(torch.float32) * (1 + 2.0 ** -16)
        tie = ((best >> 6) == (second >> 6)).nonzero().squeeze(1)
        if len(tie):
            j[tie], gap[a:b][tie] = _nearest_exact(lat, u[a:b][tie], x4[:, tie], w4[:, tie], s[tie])
        point[a:b] = lat.nbr.index_select(0, u[a:b] * lat.most + j)
    unsort = torch.empty_like(order).index_copy_(0, order, torch.arange(len(u)))
    return (point.index_select(0, unsort), gap.index_select(0, unsort)) if gaps else point.index_select(0, unsort)


def _nearest_exact(lat: _Lattice, u, x4, w4, s):
    """(rank of the first minimum distance, margin to the second) with explicit float comparisons."""
    W = lat.most
    d2 = _dist(lat.qall.index_select(1, u).view(W, 4, -1), s, x4, w4)  # [most, n]
    d2 += 0.0  # C starts from 0: no -0
    d2[torch.arange(W)[:, None] >= lat.count.index_select(0, u)[None]] = float("inf")
    j = d2.argmin(0)  # the first minimum
    best = d2.gather(0, j[None])[0]
    d2.scatter_(0, j[None], float("inf"))
    return j.int(), d2.amin(0) - best


def _err_bound(x4, w4, s):
    """Bound on the float error of any weighted distance of these quads at scale s."""
    a = torch.abs(x4).add_(s * 15)
    return (w4 * a * a).sum(0).mul_(ERR).add_(TINY)


def _snap(lat: _Lattice, u, Xq, Wq, S, buf):
    """The grid point of every quad at every trial as ggml's trial loop chooses it: words u [NQ, T] (quad
    q = k*G + g; trials contiguous), Xq, Wq [4, NQ] |x| and sqrt(weights) per coordinate, scales S [NQ, T]
    -> points [NQ, T] int32 (in buf)."""
    NQ, T = u.shape
    uf, Sf = u.view(-1), S.view(-1)
    P = torch.index_select(lat.index, 0, uf, out=buf("P", NQ * T, dtype=torch.int32))
    off = torch.lt(P, 0, out=buf("off", NQ * T, dtype=torch.bool)).view(NQ, T)
    start = buf("start", NQ, T, dtype=torch.bool)
    start[:, 0] = True
    torch.ne(u[:, 1:], u[:, :-1], out=start[:, 1:])
    end = buf("end", NQ, T, dtype=torch.bool)
    end[:, -1] = True
    end[:, :-1] = start[:, 1:]

    def search(f, q):  # exact searches at flat (quad, trial) positions f: fills P
        pt, gap = _nearest(lat, uf.index_select(0, f), q, f, Xq, Wq, Sf, buf, gaps=True)
        P.index_copy_(0, f, pt)
        return pt, gap, Sf.index_select(0, f)

    # exact searches at both ends of every run of equal off-grid words; in flat order a run with trials
    # inside is an entry whose next entry (its end, same quad) is >= 2 trials later
    f = _flatnonzero(torch.bitwise_or(start, end, out=buf("ev", NQ, T, dtype=torch.bool)).logical_and_(off))
    q = f.double().div_(T).floor_().long()
    pt, gap, ts = search(f, q)
    inner = (start.view(-1).index_select(0, f[:-1]) & ~end.view(-1).index_select(0, f[:-1])
             & (f[1:] - f[:-1] >= 2)).nonzero().squeeze(1)
    lo = [x.index_select(0, inner) for x in (f, pt, gap, ts)]
    hi = [x.index_select(0, inner + 1) for x in (f, pt, gap, ts)]
    q = q.index_select(0, inner)
    # certify each run: between two trials with the same word the distances of two neighbours differ by
    # s*(a*s - b) (exact arithmetic), so a point winning at both ends by more than the float error bound
    # wins inside too. Else split it at its middle trial and certify both halves.
    D = torch.zeros(NQ * T + 1, dtype=torch.int32)  # trials inside certified runs: a difference array
    while len(q):
        (fa, pa, ga, sa), (fb, pb, gb, sb) = lo, hi
        x4, w4 = Xq.index_select(1, q), Wq.index_select(1, q)
        e = _err_bound(x4, w4, sa)
        margin = torch.minimum((ga - 2 * e) / sa, (gb - 2 * e) / sb).mul_(sb)
        done = (pa == pb) & (margin > 4 * e)
        D.index_add_(0, fa + 1, torch.where(done, pa + 1, 0))
        D.index_add_(0, fb, torch.where(done, -pa - 1, 0))
        k = (~done).nonzero().squeeze(1)
        lo, hi, q = [x.index_select(0, k) for x in lo], [x.index_select(0, k) for x in hi], q.index_select(0, k)
        fm = (lo[0] + hi[0]) // 2
        mid = [fm, *search(fm, q)]
        left = (fm - lo[0] >= 2).nonzero().squeeze(1)
        right = (hi[0] - fm >= 2).nonzero().squeeze(1)
        lo = [torch.cat([a.index_select(0, left), m.index_select(0, right)]) for a, m in zip(lo, mid)]
        hi = [torch.cat([m.index_select(0, left), b.index_select(0, right)]) for m, b in zip(mid, hi)]
        q = torch.cat([q.index_select(0, left), q.index_select(0, right)])
    P += torch.cumsum(D, 0, dtype=torch.int32)[:-1]  # P = -1 inside runs
    return P.view(NQ, T)


# ---- the shared search (quantize_row_iq3_xxs_impl / quantize_row_iq3_s_impl) ----------------------------------

def _words(L: torch.Tensor, buf, name: str) -> torch.Tensor:
    """Levels [8, 4, ...] (float) -> level words [8, ...] int32 (in buf), u = l0 | l1 << 3 | l2 << 6 | l3 << 9."""
    u = torch.add(L[:, 2], L[:, 3], alpha=8, out=buf(name + "f", *L[:, 0].shape))
    torch.add(L[:, 1], u, alpha=8, out=u)
    torch.add(L[:, 0], u, alpha=8, out=u)
    return buf(name, *u.shape, dtype=torch.int32).copy_(u)


def _fit(lat: _Lattice, P: torch.Tensor, WX: torch.Tensor, W: torch.Tensor, buf):
    """sumqx, sumq2 [R, G] over the 32 elements in C order for points P [8, R, G]; WX = w*xval, W = w [32, G]."""
    _, R, G = P.shape
    Q = buf("Q", 8, 4, R, G)
    for k in range(8):
        for i in range(4):
            torch.index_select(lat.values[i], 0, P[k].reshape(-1), out=Q[k, i].view(-1))
    A = torch.mul(WX.view(8, 4, 1, G), Q, out=buf("A", 8, 4, R, G))
    B = torch.mul(W.view(8, 4, 1, G), Q, out=buf("B", 8, 4, R, G)).mul_(Q)
    return seqsum(A.view(32, R, G)), seqsum(B.view(32, R, G))


def _search(lat: _Lattice, X, W, Wa, mx, nums, on_grid_init: bool, buf):
    """Scale search of one group per column: X = xval, W = weights, Wa = sqrt(weights), all [32, G]; mx [G] the
    max xval; nums [T, 1] the trial numerators (2*kMaxQ-1 + is*0.2f) -> points [8, G] int32, scale [G].

    on_grid_init: IQ3_XXS starts with every quad on the grid and refits only quads off it; IQ3_S starts with
    none and refits all."""
    G = X.shape[1]
    T = nums.shape[0]
    idv = torch.div(nums, mx, out=buf("id", T, G))
    # nearest_int(0.5f*(id*x - 1)) == round(x*(id/2) - 0.5) here: x*id <= ~18 keeps every step exact
    V = torch.mul(X.view(8, 4, 1, G), (idv * 0.5).view(1, 1, T, G), out=buf("V", 8, 4, T, G))
    if not bool(torch.isfinite(idv).all()):
        V.nan_to_num_(0.0, 0.0, 0.0)  # id = inf (a max below 1/FLT_MAX): C's nearest_int gives 0
    u = _words(V.sub_(0.5).round_().clamp_(0, 7), buf, "u")  # [8, T, G]
    # the neighbour search runs quad by quad over the trials: [8, G, T]
    ut = buf("ut", 8, G, T, dtype=torch.int32).copy_(u.transpose(1, 2))
    St = buf("St", 8, G, T).copy_(torch.div(const(1, X), idv).t())  # this_scale = 1/id, per quad
    Xq = X.view(8, 4, G).transpose(0, 1).reshape(4, 8 * G)
    Wq = Wa.view(8, 4, G).transpose(0, 1).reshape(4, 8 * G)
    Pt = _snap(lat, ut.view(8 * G, T), Xq, Wq, St.view(8 * G, T), buf)
    P = buf("Pk", 8, T, G, dtype=torch.int32).copy_(Pt.view(8, G, T).transpose(1, 2))
    WX = W * X
    sqx, sq2 = _fit(lat, P, WX, W, buf)  # [T, G]

    # the running best over trials, replayed in C order
    best = torch.zeros(G)
    scale = mx / const(15, mx)
    pick = torch.full((G,), -1, dtype=torch.long)
    ok, sqx2, cand = sq2 > 0, sqx * sqx, sqx / sq2
    for i in range(T):
        acc = ok[i] & (sqx2[i] > best * sq2[i])
        scale = torch.where(acc, cand[i], scale)
        best = torch.where(acc, scale * sqx[i], best)
        pick = torch.where(acc, i, pick)
    chosen = pick >= 0
    at = pick.clamp(min=0).view(1, 1, G).expand(8, 1, G)
    points = torch.where(chosen, P.gather(1, at)[:, 0], lat.index[0])  # nothing accepted: all levels 0
    on_grid = torch.where(chosen, lat.index.index_select(0, u.gather(1, at).reshape(-1)).view(8, G) >= 0,
                          on_grid_init)

    # refit: requantize with the best scale (only off-grid quads for IQ3_XXS), then one least-squares scale
    refine = (~on_grid).any(0) & (scale > 0)
    idr = const(1, scale) / scale
    L = nearest_int(0.5 * (idr * X - 1)).clamp_(0, 7).float()  # exact C rounding: id*x is unbounded here
    ur = _words(L.view(8, 4, G), buf, "ur")
    pr = lat.index.index_select(0, ur.view(-1)).view(8, G)
    redo = refine & (~on_grid if on_grid_init else True)
    kg = (redo & (pr < 0)).nonzero()
    if len(kg):
        k = kg[:, 0] * G + kg[:, 1]
        pt = _nearest(lat, ur.view(-1).index_select(0, k), k, kg[:, 1], Xq, Wq, scale, buf)
        pr.view(-1).index_copy_(0, k, pt)
    pr = torch.where(redo, pr, points)
    rqx, rq2 = _fit(lat, pr.view(8, 1, G), WX, W, buf)
    points = torch.where(refine, pr, points)
    scale = torch.where(refine & (rq2[0] > 0), rqx[0] / rq2[0], scale)
    return points, scale


def _weights(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Element-major [32, G] importance: x^2 without imatrix, else qw * sqrtf(sigma2 + x^2), sigma2 = 2*sumx2/256."""
    if qw is None:
        xe = elements(x, 32)
        return xe * xe
    return imatrix_weights(x, qw, 32, sum_squares(x) * f32(2 / QK_K))


BIT = 1 << torch.arange(8, dtype=torch.int32)


def _sign_bits(neg: torch.Tensor) -> torch.Tensor:
    """Bool [4, 8, G] (byte, bit, group) -> sign bytes [4, G] (int32)."""
    return (neg.int() * BIT.view(1, 8, 1)).sum(1, dtype=torch.int32)


def _trials(lo: int, hi: int) -> torch.Tensor:
    """C's trial numerators 2*kMaxQ-1 + is*0.2f, is = lo..hi, as float32 [T, 1]."""
    return torch.tensor([f32(15 + f32(i * f32(0.2))) for i in range(lo, hi + 1)])[:, None]


class _IQ3(Quantizer):
    """The shared frame: importance, search, sub-scales; the types supply signs and packing."""

    fp16_scales = slice(0, 2)
    chunk = 128  # 128 blocks: each trial tensor of a chunk is a few MB
    trials: torch.Tensor
    on_grid_init: bool  # the quads' on-grid flags before the first trial (IQ3_XXS: true, IQ3_S: false)
    sign_mask: int
    fudge: float  # the fp16 super-scale is (max_scale/31) * fudge

    def quantize_blocks(self, x, qw=None):
        if x.device.type != "cpu":  # the search sorts and compacts with numpy
            return super().quantize_blocks(x.cpu(), None if qw is None else qw.cpu()).to(x.device)
        return super().quantize_blocks(x, qw)

    def quantize_chunk(self, out, x, qw, buf):
        nb = x.shape[0]
        X = elements(x, 32)
        W = _weights(x, qw)
        neg = ~(X >= 0)  # C: xval = x >= 0 ? x : -x
        xval, signs = self.signs(X, W, neg, torch.where(neg, -X, X))
        mx = xval.amax(0)
        skip = self.skip(mx)
        points, scale = _search(_lattice(self.name), xval, W, sqrtf_(W.clone()), mx, self.trials,
                                self.on_grid_init, buf)
        # C flips a negative scale ("should never happen") and the signs with it
        signs = torch.where(scale < 0, ~signs & self.sign_mask, signs)
        scale = torch.where(skip, 0.0, scale.abs())
        signs = torch.where(skip, 0, signs)
        points = torch.where(skip, 0, points)
        sc = scale.view(nb, 8)
        max_scale = sc.amax(1)
        d = max_scale / const(31, sc)
        l = nearest_int(0.5 * ((const(1, d) / d)[:, None] * sc - 1)).clamp_(0, 15)
        self.pack(out, points.t().reshape(nb, 8, 8), signs.t().reshape(nb, 8, 4), l, skip.view(nb, 8),
                  fp16_bytes((d * const(self.fudge, d))[:, None]), max_scale == 0)


class IQ3_XXS(_IQ3, name="IQ3_XXS"):
    """fp16 d, 64 grid indices (256-point grid), per group a u32 of four 7-bit sign fields and a 4-bit scale
    on top; y = d * (0.5 + s) * 0.5 * grid * sign."""

    trials = _trials(-15, 15)
    on_grid_init = True
    sign_mask = 127
    fudge = 1.0125

    @staticmethod
    def skip(mx):
        return mx < XXS_EPS  # GROUP_MAX_EPS_IQ3_XXS

    @staticmethod
    def signs(X, W, neg, xval):
        """An odd count of negatives in 8 elements: the first one of least w*x*x keeps its sign (then stored
        as the parity of the other 7)."""
        G = X.shape[1]
        neg8 = neg.view(4, 8, G)
        odd = neg8.sum(1) % 2 == 1
        ax = (W * X * X).view(4, 8, G)
        first = 8 - ((ax == ax.amin(1, keepdim=True)).int() * torch.arange(8, 0, -1).view(1, 8, 1)).amax(1)
        flip = (torch.arange(8).view(1, 8, 1) == first.clamp(0, 7)[:, None]) & odd[:, None]
        return torch.where(flip.view(32, G), -xval, xval), _sign_bits(neg8 ^ flip) & 127

    @staticmethod
    def pack(out, points, signs, l, skip, dh, zero):
        word = signs[..., 0] | (signs[..., 1] << 7) | (signs[..., 2] << 14) | (signs[..., 3] << 21) | (l << 28)
        out[:, 0:2] = dh
        out[:, 2:66] = points.reshape(-1, 64)
        out[:, 66:98] = word.contiguous().view(torch.uint8)
        out[zero] = 0

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        word = torch.empty(nb, 32, dtype=torch.uint8, device=b.device).copy_(b[:, 66:98]).view(torch.int32)
        db = fp16_from_bytes(b[:, 0:2]) * (0.5 + ((word >> 28) & 15).float()) * 0.5  # [nb, 8]
        s7 = (word[..., None] >> torch.tensor([0, 7, 14, 21], dtype=torch.int32, device=b.device)) & 127
        parity = s7.clone()
        for i in (4, 2, 1):
            parity ^= parity >> i
        s8 = s7 | ((parity & 1) << 7)  # ksigns_iq2xs: the 8th sign makes the count even
        return _magnitudes(self.name, b[:, 2:66].long(), db, s8)


class IQ3_S(_IQ3, name="IQ3_S"):
    """fp16 d, 64 low index bytes, 8 bytes of 9th index bits (512-point grid), 32 sign bytes, 4 bytes of
    4-bit scales; y = d * (1 + 2 s) * grid * sign."""

    trials = _trials(-9, 9)
    on_grid_init = False
    sign_mask = 255
    fudge = 1.033

    @staticmethod
    def skip(mx):
        return mx == 0

    @staticmethod
    def signs(X, W, neg, xval):
        return xval, _sign_bits(neg.view(4, 8, X.shape[1]))

    @staticmethod
    def pack(out, points, signs, l, skip, dh, zero):
        # C advances its qs and signs pointers only past groups it did not skip: later groups move up
        order = torch.sort(skip.int(), dim=1, stable=True).indices[..., None]
        qs = points.gather(1, order.expand(-1, 8, 8)) & 255
        out[:, 0:2] = torch.where(zero[:, None], 0, dh)
        out[:, 2:66] = qs.reshape(-1, 64)
        out[:, 66:74] = ((points >> 8) * BIT).sum(2)
        out[:, 74:106] = signs.gather(1, order.expand(-1, 8, 4)).reshape(-1, 32)
        out[:, 106:110] = torch.where(zero[:, None], 0, l[:, 0::2] | (l[:, 1::2] << 4))

    def dequantize_blocks(self, b):
        nb = b.shape[0]
        bits = torch.arange(8, dtype=torch.int32, device=b.device)
        sc = b[:, 106:110].int()
        db = fp16_from_bytes(b[:, 0:2]) * (1 + 2 * torch.stack([sc & 15, sc >> 4], 2).view(nb, 8)).float()
        hi = ((b[:, 66:74, None].int() >> bits) & 1).view(nb, 64)
        return _magnitudes(self.name, (b[:, 2:66].int() | (hi << 8)).long(), db, b[:, 74:106].int().view(nb, 8, 4))


def _magnitudes(name: str, idx, db, s8):
    """dequantize_row_iq3_*: grid indices [nb, 64], group scales db [nb, 8], sign bytes [nb, 8, 4] -> y."""
    nb = idx.shape[0]
    grid_v = _lattice(name).dq.to(idx.device)[idx].view(nb, 8, 4, 8)
    neg = (s8[..., None] >> torch.arange(8, dtype=torch.int32, device=idx.device)) & 1  # [nb, 8, 4, 8]
    return (db[..., None, None] * grid_v * (1 - 2 * neg.float())).view(nb, QK_K)
