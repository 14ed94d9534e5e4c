"""Nearest-neighbour search over a memory bank, with faiss or plain torch backends."""

from __future__ import annotations

import logging
import math
from types import ModuleType
from typing import Any

import numpy as np
import torch

from hamacho.components.bounded import BoundedNearest, fast_dtype
from hamacho.errors import ArtifactError, ConfigError, DataError, HamachoError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss_flat", "faiss_ivfpq", "faiss_hnsw", "torch")
_APPROXIMATE = ("faiss_ivfpq", "faiss_hnsw")
_OPTIONS = {
    "faiss_flat": (),
    "faiss_ivfpq": ("nlist", "m", "nbits", "nprobe", "k_factor"),
    "faiss_hnsw": ("M", "efSearch", "efConstruction"),
    "torch": ("chunk_mb", "bank_block"),
}
_ROWS = 65536  # rows converted to float32 at a time when feeding faiss
_NORM_ROWS = 4096  # rows converted to float32 at a time for the bank's norms
_BANK_BLOCK = 1024  # bank rows per score tile of the torch backend
_BOUND_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _import_faiss(backend: str) -> ModuleType:
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError(
            f"search backend '{backend}' needs faiss, which is not installed ({exc}). "
            "Run `pip install faiss-cpu` (or faiss-gpu), or use backend 'torch'"
        ) from None
    return faiss


def _faiss_has_gpu(faiss: ModuleType) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown search backend '{backend}'. Valid: {', '.join(BACKENDS)}")
    # "auto" is the fastest exact backend measured by benchmarks/search_backends.py (784
    # queries x 16,386 bank rows, 2 CPU threads, median ms per batch): torch 35.5 vs faiss_flat
    # 72.9 at 152 dims (lite0 patch bank), 144.1 vs 145.9 at 1024 (wide_resnet50_2). torch also
    # runs on any GPU and needs no extra install.
    return "torch" if backend == "auto" else backend


def _float32_chunks(x: torch.Tensor):
    """Yield (start, contiguous float32 CPU numpy chunk) so fp16 input never doubles in memory."""
    for start in range(0, x.shape[0], _ROWS):
        chunk = x[start : start + _ROWS].detach().to("cpu", torch.float32).contiguous()
        yield start, chunk.numpy()


def _float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32: itself when it already is, else a converted copy."""
    return x if x.dtype == torch.float32 else x.float()


def _ivfpq_defaults(n: int, d: int) -> dict[str, int]:
    # faiss wants >= 39 training points per centroid; PQ needs >= 2**nbits points.
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    nbits = max(1, min(8, int(math.log2(max(2, n // 39)))))
    # 8 dims per 1-byte code (32x smaller than float32): m=4 dims trained ~20x slower for
    # +1 % recall@1 in benchmarks/search_backends.py
    dsub = next((s for s in range(8, d + 1) if d % s == 0), d)
    return {"nlist": nlist, "m": d // dsub, "nbits": nbits}


def pca_basis(bank: torch.Tensor, dim: int, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and top-``dim`` principal directions (D, dim) of up to ``rows`` bank rows.

    Any orthonormal basis keeps the search exact; a good one only makes it faster.
    """
    if len(bank) > rows:
        pick = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[:rows]
        bank = bank[pick.to(bank.device)]
    bank = bank.float()
    mean = bank.mean(0)
    centred = bank - mean
    _, vectors = torch.linalg.eigh((centred.T @ centred).double())  # ascending eigenvalues
    return mean, vectors[:, -dim:].flip(1).float().contiguous()


class NearestNeighbourSearch:
    """k-nearest-neighbour search in Euclidean distance over a fitted bank of vectors."""

    def __init__(
        self,
        backend: str = "auto",
        device: str | torch.device | None = None,
        candidates_dim: int = 0,
        rerank: int = 32,
        bound_dtype: str = "auto",
        **options: Any,
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.backend = _resolve_backend(backend)
        unknown = sorted(set(options) - set(_OPTIONS[self.backend]))
        if unknown:
            valid = ", ".join(_OPTIONS[self.backend]) or "none"
            raise ConfigError(
                f"unknown option(s) {unknown} for search backend '{self.backend}'. Valid: {valid}"
            )
        self.options = dict(options)
        if candidates_dim < 0 or rerank < 1:
            raise ConfigError(
                f"candidates_dim must be >= 0 (0 = off) and rerank >= 1, got {candidates_dim} "
                f"and {rerank}"
            )
        if candidates_dim and self.backend in _APPROXIMATE:
            raise ConfigError(
                f"candidates_dim needs an exact backend (torch, faiss_flat) to stay exact, got "
                f"'{self.backend}'"
            )
        if bound_dtype != "auto" and bound_dtype not in _BOUND_DTYPES:
            raise ConfigError(f"bound_dtype must be auto, bfloat16 or float32, got {bound_dtype!r}")
        # exact search through candidates from a PCA of the bank: the nearest neighbour through
        # lower bounds (BoundedNearest), k > 1 through re-ranked PCA neighbours
        self.candidates_dim, self.rerank = int(candidates_dim), int(rerank)
        self.bound_dtype = (
            fast_dtype(self.device) if bound_dtype == "auto" else _BOUND_DTYPES[bound_dtype]
        )
        self._bounded: BoundedNearest | None = None
        self._candidates: NearestNeighbourSearch | None = None  # search in the PCA space
        self._pca: tuple[torch.Tensor, torch.Tensor] | None = None  # mean (D,), basis (D, p)
        self._low_max_sq = 0.0  # largest squared norm of the bank's PCA coordinates
        self.last_uncertain = 0  # queries of the last search that needed the full search
        self._faiss = None if self.backend == "torch" else _import_faiss(self.backend)
        self._index: Any = None
        self._gpu_res: Any = None
        # kept where the index cannot give it back; torch: the fitted tensor itself (float16 or
        # float32, not copied when already on the device), read in float32 blocks
        self._bank: torch.Tensor | None = None
        self._bank_sq: torch.Tensor | None = None
        self._shape: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"NearestNeighbourSearch(backend={self.backend!r}, bank={self._shape})"

    @property
    def _faiss_module(self) -> ModuleType:
        """The faiss module of a faiss backend (the torch backend never imports it)."""
        if self._faiss is None:
            raise HamachoError(f"search backend '{self.backend}' does not use faiss")
        return self._faiss

    def _fitted_bank(self) -> torch.Tensor:
        """The bank kept by the torch (its dtype) and faiss_ivfpq (float32) backends."""
        if self._bank is None:
            raise HamachoError(
                f"search backend '{self.backend}' holds no bank: call fit(bank) or "
                "load_state_dict() first"
            )
        return self._bank

    def _fitted_bank_sq(self) -> torch.Tensor:
        """Squared row norms of the bank, kept by the torch backend once fitted."""
        if self._bank_sq is None:
            raise HamachoError(
                f"search backend '{self.backend}' holds no bank norms: call fit(bank) first"
            )
        return self._bank_sq

    def _fitted_shape(self) -> tuple[int, int]:
        """(N, D) of the fitted bank."""
        if self._shape is None:
            raise HamachoError("search index is empty: call fit(bank) or load_state_dict() first")
        return self._shape

    # ---------------------------------------------------------------- fit
    def fit(self, bank: torch.Tensor) -> NearestNeighbourSearch:
        """Index `bank` (N, D) float32/float16; approximate backends train on it."""
        if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
            raise DataError(
                f"search bank must be a non-empty (N, D) tensor, got {tuple(bank.shape)}"
            )
        self._shape = (bank.shape[0], bank.shape[1])
        self._index = self._bank = self._bank_sq = None
        self._candidates = self._pca = self._bounded = None
        if self.candidates_dim and bank.shape[1] >= 2 * self.candidates_dim:
            self._fit_torch(bank)  # the full bank, for the exact re-ranking
            self._fit_projected(pca_basis(self._fitted_bank(), self.candidates_dim))
        elif self.backend == "torch":
            self._fit_torch(bank)
        else:
            if self.backend == "faiss_ivfpq":  # PQ codes are lossy: keep vectors for exact refine
                self._bank = bank.detach().to("cpu", torch.float32).contiguous()
            self._index = self._build_faiss(bank)
        return self

    def _fit_torch(self, bank: torch.Tensor) -> None:
        """Keep ``bank`` itself (one copy in memory: no float32 twin) and its squared norms."""
        dtype = bank.dtype if bank.dtype in (torch.float16, torch.float32) else torch.float32
        self._bank = bank.detach().to(self.device, dtype).contiguous()
        self._bank_sq = torch.empty(len(bank), dtype=torch.float32, device=self.device)
        for start in range(0, len(bank), _NORM_ROWS):
            rows = _float32(self._bank[start : start + _NORM_ROWS])
            torch.linalg.vector_norm(rows, dim=1, out=self._bank_sq[start : start + _NORM_ROWS])
        self._bank_sq.square_()

    def _fit_projected(self, pca: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Bound the bank in its PCA basis; the k > 1 candidate index waits for a k > 1 search."""
        self._pca = (pca[0].to(self.device), pca[1].to(self.device))
        self._bounded = BoundedNearest(self._fitted_bank(), *self._pca, self.bound_dtype)

    def _candidate_index(self) -> NearestNeighbourSearch:
        """The bank's PCA coordinates indexed with this object's backend, built on first use:
        only k > 1 searches (the paper's re-weighting) read it, so k = 1 runs never hold it."""
        if self._candidates is None:
            bank = self._fitted_bank()
            low = torch.cat(
                [self._project(bank[s : s + _ROWS]) for s in range(0, len(bank), _ROWS)]
            )
            self._low_max_sq = float(low.square().sum(1).max())
            self._candidates = NearestNeighbourSearch(self.backend, self.device, **self.options)
            self._candidates.fit(low)
        return self._candidates

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """(M, D) -> (M, p) coordinates in the bank's PCA basis (orthonormal, so contracting)."""
        if self._pca is None:
            raise HamachoError("no PCA basis: call fit(bank) first")
        mean, basis = self._pca
        return (x.to(self.device, torch.float32) - mean) @ basis

    def _build_faiss(self, bank: torch.Tensor) -> Any:
        faiss = self._faiss_module
        faiss.omp_set_num_threads(torch.get_num_threads())
        n, d = bank.shape
        if self.backend == "faiss_flat":
            index = faiss.IndexFlatL2(d)
        elif self.backend == "faiss_hnsw":
            index = faiss.IndexHNSWFlat(d, int(self.options.get("M", 32)))
            index.hnsw.efConstruction = int(self.options.get("efConstruction", 80))
        else:
            opts = {**_ivfpq_defaults(n, d), **self.options}  # nprobe/k_factor: search time
            if d % opts["m"]:
                raise ConfigError(f"faiss_ivfpq option m={opts['m']} must divide D={d}")
            index = faiss.IndexIVFPQ(
                faiss.IndexFlatL2(d), d, int(opts["nlist"]), int(opts["m"]), int(opts["nbits"])
            )
            index.train(self._fitted_bank().numpy())
        self._configure(index)
        index = self._to_gpu(index)
        for _, chunk in _float32_chunks(bank):
            index.add(chunk)
        return index

    def _configure(self, index: Any) -> None:
        """Set search-time parameters, which come from this object's options, not the index."""
        if self.backend == "faiss_hnsw":
            index.hnsw.efSearch = int(self.options.get("efSearch", 64))
        elif self.backend == "faiss_ivfpq":
            index.nprobe = min(index.nlist, int(self.options.get("nprobe", 16)))

    def _to_gpu(self, index: Any) -> Any:
        # HNSW has no GPU implementation in faiss; it stays on the CPU.
        if self.device.type != "cuda" or self.backend == "faiss_hnsw":
            return index
        faiss = self._faiss_module
        if not _faiss_has_gpu(faiss):
            logger.info("faiss has no GPU support here; %s index runs on the CPU", self.backend)
            return index
        self._gpu_res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_res, self.device.index or 0, index)

    # ------------------------------------------------------------- search
    def search(
        self, queries: torch.Tensor, k: int = 1, squared: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (distances (M, k) float32, indices (M, k) int64) on the CPU, nearest first."""
        n, d = self._fitted_shape()
        if queries.ndim != 2 or queries.shape[1] != d:
            raise DataError(f"queries must be (M, {d}) like the bank, got {tuple(queries.shape)}")
        if not 1 <= k <= n:
            raise ConfigError(f"k={k} neighbours requested but the bank holds {n} vectors")
        if self._bounded is not None and k == 1:
            dist, idx = self._search_bounded(queries)
        elif self._pca is not None:
            dist, idx = self._search_projected(queries, k)
        elif self.backend == "torch":
            dist, idx = self._search_torch(queries, k)
        else:
            dist, idx = self._search_faiss(queries, k)
        dist = dist.clamp_min_(0)
        return (dist if squared else dist.sqrt_()), idx

    def _search_bounded(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact nearest row: lower bounds prune the bank (see BoundedNearest)."""
        if self._bounded is None:
            raise HamachoError("no bounds: call fit(bank) first")
        dist, idx, redo = self._bounded.nearest(queries)
        self.last_uncertain = len(redo)
        if len(redo):
            dist[redo], idx[redo] = (t[:, 0] for t in self._search_torch(queries[redo], 1))
        return dist[:, None], idx[:, None]

    def _search_projected(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k from the ``rerank`` nearest in the PCA space, re-ranked in full dimension.

        The basis is orthonormal, so a row's PCA distance never exceeds its true distance: when
        the k-th exact distance among the candidates is at most the last candidate's PCA
        distance, no other row can be nearer and the answer is exact. The few queries without
        that certificate get the exact full search.
        """
        candidates = self._candidate_index()
        bank = self._fitted_bank()
        kk = min(len(bank), max(k, self.rerank))
        low = self._project(queries)
        low_sq, cand = candidates.search(low, k=kk, squared=True)  # (M, kk), nearest first
        dist = torch.empty((len(queries), k), dtype=torch.float32)
        idx = torch.empty((len(queries), k), dtype=torch.int64)
        step = max(1, 2**22 // (kk * bank.shape[1]))  # bounds the (m, kk, D) gather
        for s in range(0, len(queries), step):
            q = queries[s : s + step].to(self.device, torch.float32)
            c = cand[s : s + step].to(self.device)
            exact = (_float32(bank[c]) - q[:, None]).square_().sum(-1)  # (m, kk) squared
            d_, order = exact.topk(k, dim=1, largest=False, sorted=True)
            dist[s : s + step], idx[s : s + step] = d_.cpu(), c.gather(1, order).cpu()
        # float32 rounding of the PCA distances is ~1e-6 of the squared norms: keep a margin
        norms = low.square().sum(1).cpu() + self._low_max_sq
        uncertain = (dist[:, -1] > low_sq[:, -1] - 1e-5 * norms).nonzero()[:, 0]
        self.last_uncertain = len(uncertain)
        if len(uncertain):
            dist[uncertain], idx[uncertain] = self._search_torch(queries[uncertain], k)
        return dist, idx

    def _search_torch(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search in (query block x bank block) score tiles small enough to stay in cache.

        A tile of 2,048 queries x 1,024 bank rows (8 MB) is ~2x faster on a CPU than one
        784 x 16k tile (51 MB) that spills to memory: the GEMM is then compute bound.
        """
        bank, bank_sq = self._fitted_bank(), self._fitted_bank_sq()
        n = bank.shape[0]
        budget = max(1, int(float(self.options.get("chunk_mb", 8)) * 2**18))  # floats per tile
        nb = min(n, max(k, int(self.options.get("bank_block", _BANK_BLOCK))))  # bank rows
        mq = max(1, budget // nb)  # query rows per tile
        dist = torch.empty((queries.shape[0], k), dtype=torch.float32)
        idx = torch.empty((queries.shape[0], k), dtype=torch.int64)

        def block_top(q: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Top-k of bank rows [bs, bs + nb) for query rows q, as (scores, bank indices)."""
            # ||b||^2 - 2 q.b : (mq, nb); ||q||^2 is constant per row, added after top-k
            block = _float32(bank[bs : bs + nb])  # a float16 bank is widened block by block
            scores = torch.addmm(bank_sq[bs : bs + nb], q, block.T, alpha=-2)
            kk = min(k, scores.shape[1])
            if kk == 1:
                d_, i_ = scores.min(dim=1, keepdim=True)
            else:
                d_, i_ = scores.topk(kk, dim=1, largest=False)
            i_ += bs
            return d_, i_

        for qs in range(0, queries.shape[0], mq):
            q = queries[qs : qs + mq].to(self.device, torch.float32)
            best_d, best_i = block_top(q, 0)  # the bank holds >= 1 row, so block 0 exists
            for bs in range(nb, n, nb):
                d_, i_ = block_top(q, bs)
                if k == 1:  # running minimum; ties keep the earlier (lower) bank index
                    better = d_ < best_d
                    best_d = torch.where(better, d_, best_d)
                    best_i = torch.where(better, i_, best_i)
                else:  # merge with the best of the previous bank blocks
                    best_d, order = torch.cat([best_d, d_], 1).topk(k, dim=1, largest=False)
                    best_i = torch.cat([best_i, i_], 1).gather(1, order)
            best_d += q.square().sum(1, keepdim=True)
            dist[qs : qs + mq] = best_d.cpu()
            idx[qs : qs + mq] = best_i.cpu()
        return dist, idx

    def _search_faiss(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._faiss_module.omp_set_num_threads(torch.get_num_threads())
        kk = k
        if self.backend == "faiss_ivfpq":
            kk = min(self._fitted_shape()[0], k * int(self.options.get("k_factor", 4)))
        dist = np.empty((queries.shape[0], kk), dtype=np.float32)
        idx = np.empty((queries.shape[0], kk), dtype=np.int64)
        for start, chunk in _float32_chunks(queries):
            dist[start : start + len(chunk)], idx[start : start + len(chunk)] = self._index.search(
                chunk, kk
            )
        dist_t, idx_t = torch.from_numpy(dist), torch.from_numpy(idx)
        if self.backend == "faiss_ivfpq":
            dist_t, idx_t = self._refine(queries, idx_t, k)
        return dist_t, idx_t

    def _refine(
        self, queries: torch.Tensor, cand: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-rank IVF-PQ candidates (M, kk) by exact distance, since PQ distances are lossy."""
        exact = torch.empty(cand.shape, dtype=torch.float32)
        bank = self._fitted_bank()
        for start in range(0, len(cand), 4096):  # bounds the (m, kk, D) gather
            q = queries[start : start + 4096].detach().to("cpu", torch.float32)
            vecs = _float32(bank[cand[start : start + 4096].clamp_min(0)])  # (m, kk, D)
            exact[start : start + 4096] = (vecs - q[:, None, :]).square_().sum(-1)
        exact.masked_fill_(cand < 0, math.inf)  # faiss pads with -1 when lists hold < kk vectors
        dist, order = exact.topk(k, dim=1, largest=False)
        return dist, cand.gather(1, order)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return {"bank": (N, D)} plus, for approximate backends, the serialized faiss index."""
        if self._shape is None:
            raise HamachoError("search index is empty: call fit(bank) before state_dict()")
        state = {"bank": self._bank_cpu()}
        if self._pca is not None:
            state["pca_mean"], state["pca_basis"] = (t.cpu() for t in self._pca)
        if self.backend in _APPROXIMATE:
            index = self._index
            if self._gpu_res is not None:
                index = self._faiss_module.index_gpu_to_cpu(index)
            state["index"] = torch.from_numpy(self._faiss_module.serialize_index(index))
        return state

    def _bank_cpu(self) -> torch.Tensor:
        if self._bank is not None:
            return self._bank.cpu()
        index = self._index
        if self._gpu_res is not None:
            index = self._faiss_module.index_gpu_to_cpu(index)
        return torch.from_numpy(index.reconstruct_n(0, index.ntotal))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Rebuild from state_dict(); a stored approximate index is reused, not retrained."""
        bank = state.get("bank")
        if bank is None or bank.ndim != 2:
            raise ArtifactError("search state has no (N, D) 'bank' tensor; re-train the model")
        basis = state.get("pca_basis")
        if basis is not None and basis.shape == (bank.shape[1], self.candidates_dim):
            self._shape = (bank.shape[0], bank.shape[1])
            self._fit_torch(bank)
            self._fit_projected((state["pca_mean"], basis))
            return
        if self.backend not in _APPROXIMATE or "index" not in state:
            self.fit(bank)
            return
        index = self._faiss_module.deserialize_index(state["index"].numpy())
        expected = "IndexHNSWFlat" if self.backend == "faiss_hnsw" else "IndexIVFPQ"
        if type(index).__name__ != expected:
            raise ArtifactError(
                f"stored faiss index is a {type(index).__name__}, not the {expected} that "
                f"backend '{self.backend}' needs; load it with the backend it was saved with"
            )
        if (index.ntotal, index.d) != tuple(bank.shape):
            raise ArtifactError(
                f"stored faiss index holds {index.ntotal}x{index.d} vectors but bank is "
                f"{tuple(bank.shape)}; the artifact is inconsistent, re-train the model"
            )
        self._shape = (bank.shape[0], bank.shape[1])
        self._bank = (
            bank.to("cpu", torch.float32).contiguous() if self.backend == "faiss_ivfpq" else None
        )
        self._configure(index)
        self._index = self._to_gpu(index)
