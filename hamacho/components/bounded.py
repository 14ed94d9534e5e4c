"""Exact nearest neighbour through a cheap, provable lower bound on every bank row's distance.

For a bank row b and a query q, centred on the bank's mean and split by an orthonormal PCA basis
P into p coordinates and a residual r, ``||q - b||^2 >= ||Pq - Pb||^2 + (|rq| - |rb|)^2``: a
squared distance between (p + 1)-vectors, so one matrix product bounds the query against the
whole bank. The product runs in bfloat16 where the CPU (or GPU) has it, ~4x faster than float32,
and its worst-case rounding error is subtracted from the bound, so the bound stays a bound.
Every row whose bound is below the exact distance of the row with the smallest bound is a
candidate; the nearest is among them and is found by exact float32 distances. Queries whose
candidates would be too many are handed back for a plain exact search.
"""

from __future__ import annotations

import math
import threading

import torch

_WIDTH = 64  # bank rows per block whose smallest bound is taken first
_TILE_BYTES = 2**27  # the (queries x bank) bound matrix of one query block: more queries per
# product amortise packing the bank tile (b32 on a 16k bank: 19 ms/image at 2**27, 25 at 2**25)
_PAIR_CHUNK = 2048  # candidate rows gathered at a time for the exact distances
_MAX_CANDIDATES = 256  # per query; beyond it the plain exact search is cheaper
# Slack for the bound's rounding: a multiple of |q| |b| (both centred) and of |b|^2 (see
# BoundedNearest).
_SLACK = {torch.bfloat16: (0.04, 2**-7), torch.float32: (2e-3, 1e-6)}


def _tiling(blocks: int) -> tuple[int, int]:
    """(blocks per tile, tiles): tiles of 12-16 blocks that pad ``blocks`` the least."""
    if blocks <= 16:
        return blocks, 1
    per = min(range(16, 11, -1), key=lambda k: -(-blocks // k) * k)
    return per, -(-blocks // per)


def fast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where matrix products in it are fast (CUDA, CPUs with AVX-512 BF16/AMX)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    mkldnn = getattr(torch.ops, "mkldnn", None)
    check = getattr(mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.bfloat16 if check is not None and bool(check()) else torch.float32


class BoundedNearest:
    """Exact nearest row of ``bank`` (N, D), kept by reference, through PCA lower bounds.

    The slack enters the product as one more column, t |q| against (s / 2t) |b| for a slack of
    s |q| |b|; t = sqrt(s / 2) makes both vectors only 1 + s / 2 longer than |q| and |b|. In
    bfloat16, inputs round with relative error 2^-8 each, so the product (doubled) is off by at
    most 0.016 |q| |b|; |b|^2 enters as one more column (rounded down into bfloat16 first) and
    the float32 accumulation rounds once into the output, by 2^-8 of the magnitude
    (<= 2.1 |q| |b| + |b|^2); counting that twice, the total, < 0.033 |q| |b| + 2^-8 |b|^2,
    is below the slack of 0.04 |q| |b| + 2^-7 |b|^2. float32 keeps a slack for the residual
    norm's cancellation.
    """

    def __init__(
        self, bank: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, dtype: torch.dtype
    ) -> None:
        self.bank, self.dtype = bank, dtype
        self.mean, self.basis = mean.to(bank.device), basis.to(bank.device)
        n, p = len(bank), basis.shape[1]
        per_q, per_b = _SLACK[dtype]
        self.pad = (-(p + 3)) % 16  # a product dimension that is a multiple of 16 runs faster
        self.per_tile, self.tiles = _tiling(-(-n // _WIDTH))
        rows = self.tiles * self.per_tile * _WIDTH
        # per row: PCA coordinates, residual norm, slack entry, |b|^2 (the query's entry is 1)
        coords = torch.zeros((rows, p + 3 + self.pad), device=bank.device)
        sq = torch.empty(n, device=bank.device)
        for s in range(0, n, 4096):
            centred = bank[s : s + 4096].float() - self.mean
            low = centred @ self.basis
            sq[s : s + 4096] = centred.square().sum(1)
            residual = (centred - low @ self.basis.T).square().sum(1).sqrt()
            coords[s : s + len(low), :p], coords[s : s + len(low), p] = low, residual
        self.norms_sq_max = float(sq.max())
        self.scale = (per_q / 2) ** 0.5  # t: the query's slack entry is t |q|
        coords[:n, p + 1] = (per_q / (2 * self.scale)) * sq.sqrt()
        # |b|^2 less its slack, rounded down into dtype (round-to-nearest moves it by < 2^-8);
        # padding rows get a bound no query reaches
        coords[:, p + 2] = 1e30
        coords[:n, p + 2] = sq * (1 - per_b) * (1 - 2**-8)
        self.coords = coords.to(dtype).view(self.tiles, -1, coords.shape[1])
        self._kept = threading.local()

    def nearest(
        self, queries: torch.Tensor, exclude: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(squared distance (M,), index (M,), uncertain (U,)): rows ``uncertain`` are unset.

        ``exclude`` = (owner (M,), source (N,)) leaves out the bank rows whose source equals
        the query's owner (leave-one-out: the rows of the query's own image).
        """
        device = self.bank.device
        rows = self.tiles * self.coords.shape[1]
        mask_by = None  # (owner (M,), source (rows,)) on the device
        if exclude is not None:
            source = torch.full((rows,), -1, dtype=torch.int64, device=device)  # padding: none
            source[: len(self.bank)] = exclude[1].to(device)
            mask_by = (exclude[0].to(device), source)
        step = max(1, _TILE_BYTES // (2 * rows))
        dist = torch.full((len(queries),), torch.inf)
        idx = torch.zeros(len(queries), dtype=torch.int64)
        uncertain = []
        for s in range(0, len(queries), step):
            q = queries[s : s + step].to(device, torch.float32)
            own = None if mask_by is None else mask_by[1][None] == mask_by[0][s : s + step, None]
            d_, i_, lost = self._block(q, own)
            dist[s : s + len(q)], idx[s : s + len(q)] = d_.cpu(), i_.cpu()
            uncertain.append(lost.cpu() + s)
        redo = torch.cat(uncertain) if uncertain else torch.zeros(0, dtype=torch.int64)
        return dist, idx, redo

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Scratch memory kept per thread between calls: a fresh one costs a page fault per
        4 KiB on every call (the bound matrix is ~25 MB per image on a 16k-row bank)."""
        kept = getattr(self._kept, name, None)
        size = math.prod(shape)
        if kept is None or kept.numel() < size or kept.dtype != dtype:
            kept = torch.empty(size, dtype=dtype, device=self.bank.device)
            setattr(self._kept, name, kept)
        return kept[:size].view(shape)

    def _bounds(
        self, q: torch.Tensor, own: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lower bounds of ||q - b||^2 - ||q - mean||^2 as (tiles, m, rows per tile), rows
        ``own`` (m, rows) True set to inf; ||q - mean||^2 (m,); each block's smallest bound
        (m, blocks) in float32."""
        centred = q - self.mean
        low = centred @ self.basis
        sq = centred.square().sum(1)
        residual = (sq - low.square().sum(1)).clamp_min(0).sqrt()
        pad = torch.zeros((len(q), self.pad), device=q.device)
        slack = self.scale * sq.sqrt()[:, None]
        ones = torch.full((len(q), 1), -0.5, device=q.device)  # x -2 below: |b|^2 enters once
        vec = torch.cat([low, residual[:, None], slack, ones, pad], 1).mul_(-2).to(self.dtype)
        width = self.coords.shape[1]
        m, k = len(q), self.per_tile
        bounds = self._buffer("bounds", (self.tiles, m, width), self.dtype)
        wide = self._buffer("wide", (m, width), torch.float32)  # (bfloat16 reduces ~4x slower)
        smallest = torch.empty((self.tiles, m, k), device=q.device)
        for t in range(self.tiles):  # a tile's product stays in cache for its block minima
            torch.mm(vec, self.coords[t].T, out=bounds[t])  # |b|^2 - 2 q.b, bf16 rounded once
            if own is not None:
                bounds[t].masked_fill_(own[:, t * width : (t + 1) * width], torch.inf)
            torch.amin(wide.copy_(bounds[t]).view(m, k, _WIDTH), 2, out=smallest[t])
        return bounds, sq, smallest.permute(1, 0, 2).reshape(m, -1)

    def _block(
        self, q: torch.Tensor, own: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, k = len(q), self.per_tile
        bounds, sq, smallest = self._bounds(q, own)
        blocks = bounds.view(self.tiles, m, k, _WIDTH)  # block b is blocks[b // k, :, b % k]
        first = smallest.argmin(1)
        here = torch.arange(m, device=q.device)
        j0 = first * _WIDTH + blocks[first // k, here, first % k].float().argmin(1)
        # every row whose bound is below the exact distance of j0 is a candidate; the margin
        # covers float32 rounding of the exact distances and of |q - mean|^2
        upper = (self.bank[j0].float() - q).square().sum(1)
        limit = upper - sq + 1e-5 * (sq + self.norms_sq_max)
        qi, bi = (smallest <= limit[:, None]).nonzero(as_tuple=True)
        pi, wi = (blocks[bi // k, qi, bi % k].float() <= limit[qi, None]).nonzero(as_tuple=True)
        row, col = qi[pi], bi[pi] * _WIDTH + wi  # candidate pairs, sorted by query
        counts = torch.bincount(row, minlength=m)
        keep = (counts[row] <= _MAX_CANDIDATES) & (col != j0[row])  # j0's distance is known
        row, col = row[keep], col[keep]
        exact = torch.empty(len(row), device=q.device)
        for s in range(0, len(row), _PAIR_CHUNK):
            vecs = self.bank.index_select(0, col[s : s + _PAIR_CHUNK]).float()
            exact[s : s + _PAIR_CHUNK] = vecs.sub_(q[row[s : s + _PAIR_CHUNK]]).square_().sum(1)
        row, col, exact = torch.cat([row, here]), torch.cat([col, j0]), torch.cat([exact, upper])
        best = torch.full((m,), torch.inf, device=q.device).scatter_reduce(0, row, exact, "amin")
        # the lowest bank index among equally near rows, as the plain search answers
        tied = exact == best[row]
        index = torch.full((m,), len(self.bank), device=q.device).scatter_reduce(
            0, row[tied], col[tied], "amin"
        )
        lost = ((counts > _MAX_CANDIDATES) | (counts == 0)).nonzero()[:, 0]
        return best, index, lost
