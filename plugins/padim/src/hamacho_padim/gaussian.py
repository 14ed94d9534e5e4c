"""Per-position Gaussians: streaming fit, SPD inverses, Mahalanobis and leave-one-out distances."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from hamacho.errors import ConfigError, DataError

_BLOCK_BYTES = 64 << 20  # temporaries of one Mahalanobis / inverse block
_LOO_TOL = 1e-12  # relative size of the last series term kept in leave-one-out distances
_REFINE_STEPS = 3  # each gains ~cond(S) x float32 precision: 3 reach float64


class GaussianAccumulator:
    """Per-position mean and scatter of (P, B, d) batches with fixed-size float32 state.

    Batches merge by Chan et al.'s parallel update: each batch is centred on its own mean, so
    float32 keeps ~1e-6 relative accuracy however many images stream through.
    """

    def __init__(self, positions: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.mean = torch.zeros(positions, dim, device=device)
        self.scatter = torch.zeros(positions, dim, dim, device=device)
        self._shared = False  # mean and scatter are another's: the first change makes new ones

    def update(self, x: torch.Tensor) -> None:
        """Add a batch x (P, B, d) of B samples at each of the P positions."""
        n = x.shape[1]
        batch_mean = x.mean(dim=1)  # (P, d)
        rows = x - batch_mean[:, None]  # (P, B, d), centred on the batch mean
        delta = batch_mean - self.mean
        total = self.count + n
        if self.count:
            # scatter += delta delta^T * count * n / total enters as one extra scaled row, so a
            # single bmm updates all positions without a (P, d, d) temporary.
            scale = math.sqrt(self.count * n / total)
            rows = torch.cat([rows, delta[:, None] * scale], dim=1)  # (P, B+1, d)
        if self._shared:  # out of place, once: the saved statistics stay as they were
            self.scatter = torch.baddbmm(self.scatter, rows.transpose(1, 2), rows)
            self.mean = self.mean.add(delta, alpha=n / total)
            self._shared = False
        else:
            self.scatter.baddbmm_(rows.transpose(1, 2), rows)
            self.mean.add_(delta, alpha=n / total)
        self.count = total

    @classmethod
    def restore(
        cls, count: int, mean: torch.Tensor, scatter: torch.Tensor, copy: bool = True
    ) -> GaussianAccumulator:
        """An accumulator holding saved statistics.

        With ``copy`` False it shares ``mean`` and ``scatter`` without copying them: ``update``
        and ``merge_`` then write their results to new tensors, leaving these unchanged.
        """
        stats = cls(0, 0, mean.device)
        stats.count, stats.mean, stats.scatter = count, mean.float(), scatter.float()
        if copy:
            stats.mean, stats.scatter = stats.mean.clone(), stats.scatter.clone()
        else:
            stats._shared = True
        return stats

    def merge_(self, other: GaussianAccumulator) -> None:
        """Add another accumulator's samples (Chan et al.'s pairwise update, float64 per block)."""
        n = self.count + other.count
        scale, weight = self.count * other.count / n, other.count / n
        positions, d = self.mean.shape
        block = max(1, _BLOCK_BYTES // (3 * 8 * d * d))
        means, scatters = self.mean, self.scatter
        if self._shared:  # write to new tensors, once: the saved statistics stay as they were
            means, scatters = torch.empty_like(self.mean), torch.empty_like(self.scatter)
        for start in range(0, positions, block):
            part = slice(start, start + block)
            mean = self.mean[part].double()
            delta = other.mean[part].to(mean) - mean  # (p, d)
            scatter = self.scatter[part].double() + other.scatter[part].to(mean)
            scatter.baddbmm_(delta[:, :, None], delta[:, None, :], alpha=scale)
            scatters[part] = scatter
            means[part] = mean + delta * weight
        self.mean, self.scatter, self._shared = means, scatters, False
        self.count = n

    def keep_(self, channels: torch.Tensor) -> None:
        """Restrict the state to a subset of its dimensions (the statistics of those alone)."""
        idx = channels.to(self.mean.device)
        self.mean = self.mean.index_select(1, idx)
        self.scatter = self.scatter.index_select(1, idx).index_select(2, idx)

    def precision(self, regularization: float = 0.0) -> torch.Tensor:
        """(unbiased covariance + regularization * I)^-1 per position, a new (P, d, d) tensor.

        Computed block by block from the scatter (float64 Cholesky), which stays unchanged: no
        full-size copy of it is made.
        """
        if self.count < 2:
            raise DataError(f"PaDiM needs at least 2 training images, got {self.count}")
        out = torch.empty_like(self.scatter)
        d = out.shape[-1]
        block = max(1, _BLOCK_BYTES // (3 * 8 * d * d))

        def invert(start: int) -> None:
            part = out[start : start + block]
            torch.div(self.scatter[start : start + block], self.count - 1, out=part)
            part.diagonal(dim1=1, dim2=2).add_(regularization)
            _invert_blocks(part, block, start)

        starts = range(0, out.shape[0], block)
        if out.device.type != "cpu":
            for start in starts:
                invert(start)
            return out
        # one LAPACK thread per call and the blocks shared among torch's threads: MKL threads
        # each small call, which thrashes when cores are shared (3136 inverses of 100 x 100
        # took 0.7 s with 1 thread but 5.5 s with 2 on a busy 2-core CPU)
        workers = torch.get_num_threads()
        with _one_cpu_thread(), ThreadPoolExecutor(workers) as pool:
            list(pool.map(invert, starts))  # in order: the first singular block raises
        return out


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Run torch CPU ops single-threaded inside the block, then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _invert_blocks(matrices: torch.Tensor, block: int, offset: int = 0) -> None:
    """Invert ``matrices`` in place, ``block`` at a time; ``offset`` numbers them in errors."""
    for start in range(0, matrices.shape[0], block):
        part = matrices[start : start + block]
        chol, info = torch.linalg.cholesky_ex(part.double())
        if info.any():
            bad = offset + start + int(info.nonzero()[0, 0])
            raise ConfigError(
                f"PaDiM covariance at position {bad} is singular. Set model.regularization > 0 "
                "(the paper uses 0.01) or train on more images"
            )
        part.copy_(torch.cholesky_inverse(chol))


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances (P, B) of x (P, B, d): one bmm per block of positions."""
    positions, batch, d = x.shape
    block = max(1, _BLOCK_BYTES // (2 * 4 * batch * d))
    out = torch.empty(positions, batch, device=x.device)
    for start in range(0, positions, block):
        part = slice(start, start + block)
        delta = x[part] - mean[part, None]  # (p, B, d)
        out[part] = torch.bmm(delta, precision[part]).mul_(delta).sum(-1)
    return out


def loo_mahalanobis(
    x: torch.Tensor,
    mean: torch.Tensor,
    precision: torch.Tensor,
    n: int,
    regularization: float,
    covariance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared distances (P, B) of fitted samples x (P, B, d), each under the fit without it.

    The fit is mean m and S = C / (n-1) + eps I (C the scatter), ``precision`` = S^-1. Dropping a
    sample x (delta = x - m) moves the mean to m' = m - delta / (n-1), so x - m' = k delta with
    k = n / (n-1), and downdates the scatter to C' = C - k delta delta^T. The leave-one-out
    covariance is then S' = C' / (n-2) + eps I = A - c delta delta^T with A = C / (n-2) + eps I
    and c = k / (n-2). Sherman-Morrison gives delta^T S'^-1 delta = q / (1 - c q) with
    q = delta^T A^-1 delta, so the distance is k^2 q / (1 - c q).

    A = a (S - g I) with a = (n-1)/(n-2), g = eps/(n-1), so A^-1 = (1/a) sum_j g^j P^(j+1)
    (P = S^-1); P <= I / eps makes g P <= I / (n-1), so the series shrinks (n-1)-fold per term.
    With fewer samples than dimensions, 1 - c q is as small as eps / S in the sample's own
    direction, which the float32 precision cannot resolve; given ``covariance`` (S, float32),
    A^-1 delta is refined against A itself. Everything runs in float64 per block of positions.
    """
    if n < 3:
        raise DataError(f"leave-one-out needs at least 3 fitted samples, got {n}")
    positions, batch, d = x.shape
    k, a, g = n / (n - 1), (n - 1) / (n - 2), regularization / (n - 1)
    c = k / (n - 2)
    block = max(1, _BLOCK_BYTES // (8 * (5 * batch * d + 2 * d * d)))
    out = torch.empty(positions, batch, dtype=torch.float64, device=x.device)
    for start in range(0, positions, block):
        part = slice(start, start + block)
        prec = precision[part].double()  # (p, d, d)
        delta = x[part].double() - mean[part, None].double()  # (p, B, d)
        w = _series_solve(prec, delta, a, g)  # ~ A^-1 delta
        if covariance is not None:
            cov = covariance[part].double()
            for _ in range(_REFINE_STEPS):  # iterative refinement: w += M (delta - A w)
                residual = delta - a * (torch.bmm(w, cov) - g * w)
                w += _series_solve(prec, residual, a, g)
        q = (delta * w).sum(-1)
        # 1 - c q > 0 whenever S' is positive definite (eps > 0); clamp guards eps = 0
        out[part] = q * k * k / (1 - c * q).clamp(min=torch.finfo(torch.float64).tiny)
    return out


def _series_solve(prec: torch.Tensor, v: torch.Tensor, a: float, g: float) -> torch.Tensor:
    """A^-1 v (p, B, d) = (1/a) sum_j g^j P^(j+1) v, summed until a term is ~1e-12 of the sum."""
    term = torch.bmm(v, prec)  # P symmetric: rows times P
    total = term.clone()
    while g:
        term = torch.bmm(term, prec).mul_(g)
        total += term
        if bool((term.norm(dim=-1) <= _LOO_TOL * total.norm(dim=-1)).all()):
            break
    return total.div_(a)
