from __future__ import annotations

import sys

import pytest
import torch

from hamacho.components.search import NearestNeighbourSearch
from hamacho.errors import ArtifactError, ConfigError, DataError, HamachoError

BACKENDS = ("torch", "faiss_flat", "faiss_hnsw", "faiss_ivfpq")
# Gaussian data is the worst case for PQ; finer codes + deeper re-ranking make 0.9 safe.
OPTIONS = {"faiss_ivfpq": {"m": 16, "nprobe": 64, "k_factor": 8}}


@pytest.fixture(autouse=True)
def _one_thread():
    """faiss follows torch's thread count; one thread keeps OpenMP from spinning on busy CI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n: int = 600, m: int = 50, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)


def _brute_force(bank, queries, k):
    dist, idx = torch.cdist(queries.double(), bank.double()).topk(k, dim=1, largest=False)
    return dist.float(), idx


@pytest.mark.parametrize("backend", ["torch", "faiss_flat"])
@pytest.mark.parametrize("k", [1, 5])
def test_search_exact_matches_brute_force(backend, k):
    bank, queries = _data()
    nn = NearestNeighbourSearch(backend).fit(bank)
    dist, idx = nn.search(queries, k=k)
    ref_dist, ref_idx = _brute_force(bank, queries, k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    assert dist.shape == idx.shape == (len(queries), k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "faiss_flat"])
def test_search_squared_returns_squared_distances(backend):
    bank, queries = _data()
    nn = NearestNeighbourSearch(backend).fit(bank)
    dist, _ = nn.search(queries, k=3)
    sq, _ = nn.search(queries, k=3, squared=True)
    torch.testing.assert_close(sq, dist.square(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 4])
def test_search_torch_tiles_merge_to_exact_topk(k):
    bank, queries = _data(n=1000, m=300)
    # 64 bank rows x 40 queries per tile: 16 bank blocks and 8 query blocks to merge
    nn = NearestNeighbourSearch("torch", chunk_mb=0.01, bank_block=64).fit(bank)
    dist, idx = nn.search(queries, k=k)
    ref_dist, ref_idx = _brute_force(bank, queries, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)


def test_search_distances_never_negative_for_bank_points():
    bank, _ = _data()
    dist, idx = NearestNeighbourSearch("torch").fit(bank * 100).search(bank * 100)
    assert (dist >= 0).all()
    assert torch.equal(idx[:, 0], torch.arange(len(bank)))


@pytest.mark.parametrize("backend", ["faiss_hnsw", "faiss_ivfpq"])
def test_search_approximate_recall_at_1(backend):
    bank, queries = _data(n=2000, m=200)
    _, idx = NearestNeighbourSearch(backend, **OPTIONS.get(backend, {})).fit(bank).search(queries)
    _, ref_idx = _brute_force(bank, queries, 1)
    assert (idx == ref_idx).float().mean() >= 0.9


def test_search_ivfpq_distances_are_exact_for_found_neighbours():
    bank, queries = _data(n=2000, m=100)
    dist, idx = NearestNeighbourSearch("faiss_ivfpq").fit(bank).search(queries, k=3)
    exact = (bank[idx] - queries[:, None]).norm(dim=-1)
    torch.testing.assert_close(dist, exact, rtol=1e-4, atol=1e-4)
    assert (dist[:, 1:] >= dist[:, :-1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_state_dict_round_trip_is_identical(backend):
    bank, queries = _data(n=1000)
    nn = NearestNeighbourSearch(backend).fit(bank)
    state = nn.state_dict()
    torch.testing.assert_close(state["bank"], bank)
    assert ("index" in state) == (backend in ("faiss_hnsw", "faiss_ivfpq"))
    reloaded = NearestNeighbourSearch(backend)
    reloaded.load_state_dict({k: v.clone() for k, v in state.items()})
    for a, b in zip(nn.search(queries, k=3), reloaded.search(queries, k=3), strict=True):
        assert torch.equal(a, b)


def test_search_load_state_dict_rejects_other_index_type():
    bank, _ = _data()
    state = NearestNeighbourSearch("faiss_hnsw").fit(bank).state_dict()
    with pytest.raises(ArtifactError, match="IndexHNSWFlat"):
        NearestNeighbourSearch("faiss_ivfpq").load_state_dict(state)
    with pytest.raises(ArtifactError, match="bank"):
        NearestNeighbourSearch("torch").load_state_dict({})


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_accepts_float16(backend):
    bank, queries = _data(n=1000)
    bank16, queries16 = bank.half(), queries.half()
    nn = NearestNeighbourSearch(backend, **OPTIONS.get(backend, {}))
    dist, idx = nn.fit(bank16).search(queries16, k=2)
    ref_dist, ref_idx = _brute_force(bank16.float(), queries16.float(), 2)
    assert dist.dtype == torch.float32
    assert (idx[:, 0] == ref_idx[:, 0]).float().mean() >= 0.9
    if backend in ("torch", "faiss_flat"):
        torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)


def test_search_faiss_threads_follow_torch():
    import faiss

    bank, queries = _data()
    nn = NearestNeighbourSearch("faiss_flat").fit(bank)
    torch.set_num_threads(2)
    nn.search(queries)
    assert faiss.omp_get_max_threads() == 2


def test_search_auto_picks_an_exact_backend(monkeypatch):
    assert NearestNeighbourSearch(device="cpu").backend == "torch"
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    bank, queries = _data()
    _, idx = NearestNeighbourSearch().fit(bank).search(queries)
    assert torch.equal(idx, _brute_force(bank, queries, 1)[1])


def test_search_faiss_missing_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ConfigError, match="pip install faiss-cpu.*backend 'torch'"):
        NearestNeighbourSearch("faiss_hnsw")


def test_search_errors():
    bank, queries = _data(n=10)
    valid = "Valid: auto, faiss_flat, faiss_ivfpq, faiss_hnsw, torch"
    with pytest.raises(ConfigError, match=valid):
        NearestNeighbourSearch("annoy")
    with pytest.raises(ConfigError, match="efSearch"):
        NearestNeighbourSearch("faiss_flat", efSearch=10)
    with pytest.raises(HamachoError, match="fit"):
        NearestNeighbourSearch("torch").search(queries)
    nn = NearestNeighbourSearch("torch").fit(bank)
    with pytest.raises(ConfigError, match="k=11.*10 vectors"):
        nn.search(queries, k=11)
    with pytest.raises(DataError, match=r"\(M, 32\)"):
        nn.search(queries[:, :5])
    with pytest.raises(DataError, match="non-empty"):
        nn.fit(bank[:0])


def _manifold(n: int, m: int, d: int = 256, seed: int = 0):
    """Non-negative features on a 16-d manifold, like CNN patches (most energy in few axes)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(16, d, generator=g) / 4

    def draw(k: int) -> torch.Tensor:
        latent = torch.randn(k, 16, generator=g)
        return (latent @ mixing).relu_() + 0.05 * torch.randn(k, d, generator=g).abs_()

    return draw(n), draw(m)


@pytest.mark.parametrize("k", [1, 4])
def test_search_candidates_are_exact(k):
    bank, queries = _manifold(3000, 400)
    nn = NearestNeighbourSearch("torch", candidates_dim=32, rerank=8).fit(bank)
    dist, idx = nn.search(queries, k=k)
    ref_dist, ref_idx = _brute_force(bank, queries, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-4)
    assert nn._pca is not None and nn._pca[1].shape == (256, 32)


def test_search_candidates_fall_back_when_uncertified():
    # structureless data: 4 candidates from an 8-d PCA of 64 dims certify almost nothing, so
    # nearly every query takes the exact full search, and the answers stay exact
    bank, queries = _data(n=800, m=100, d=64)
    nn = NearestNeighbourSearch("torch", candidates_dim=8, rerank=4).fit(bank)
    _, idx = nn.search(queries, k=1)
    assert nn.last_uncertain > 50
    assert torch.equal(idx, _brute_force(bank, queries, 1)[1])


def test_search_candidates_state_round_trip_keeps_basis():
    bank, queries = _manifold(1000, 50)
    nn = NearestNeighbourSearch("torch", candidates_dim=32).fit(bank)
    state = nn.state_dict()
    assert state["pca_basis"].shape == (256, 32)
    again = NearestNeighbourSearch("torch", candidates_dim=32)
    again.load_state_dict(state)
    assert torch.equal(again._pca[1], nn._pca[1])
    assert torch.equal(again.search(queries)[1], nn.search(queries)[1])


def test_search_candidates_skipped_for_narrow_banks_and_need_exact_backend():
    bank, queries = _data(d=32)
    nn = NearestNeighbourSearch("torch", candidates_dim=32).fit(bank)  # 32 < 2 * 32: plain
    assert nn._pca is None and "pca_basis" not in nn.state_dict()
    with pytest.raises(ConfigError, match="exact backend"):
        NearestNeighbourSearch("faiss_hnsw", candidates_dim=32)
    with pytest.raises(ConfigError, match="candidates_dim must be >= 0"):
        NearestNeighbourSearch("torch", candidates_dim=-1)


@pytest.mark.parametrize("candidates_dim", [0, 8])
def test_search_torch_keeps_a_float16_bank_itself_and_answers_as_float32(candidates_dim):
    """One copy of the bank in memory: the fitted tensor, read in float32 blocks."""
    bank, queries = _data(n=1000)
    bank16 = bank.half()
    half = NearestNeighbourSearch("torch", candidates_dim=candidates_dim, bank_block=64)
    wide = NearestNeighbourSearch("torch", candidates_dim=candidates_dim, bank_block=64)
    half.fit(bank16)
    wide.fit(bank16.float())
    assert half._fitted_bank().data_ptr() == bank16.data_ptr()  # referenced, not copied
    got, want = half.search(queries, k=3), wide.search(queries, k=3)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    loaded = NearestNeighbourSearch("torch", candidates_dim=candidates_dim)
    loaded.load_state_dict({**half.state_dict(), "bank": bank16})
    assert loaded._fitted_bank().data_ptr() == bank16.data_ptr()
