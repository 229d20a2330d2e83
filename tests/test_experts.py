"""SlotExperts: the grouped GEMM over a rank's slots, per row (forward) and fused per pair (weighted_sum)."""
import pytest
import torch
import torch.nn.functional as F

from grace_ds import experts
from grace_ds.experts import SlotExperts

HIDDEN, INTER = 16, 8  # grouped GEMM wants 16-byte row strides
SLOT_EXPERT = torch.tensor([3, -1, 0, 5])  # slot 1 is empty
NUM_ROWS = 6


@pytest.fixture(autouse=True)
def _sparse_sum_at_any_size(monkeypatch):
    """The sparse per-row sum pays off from thousands of pairs; these tests' few pairs take it too."""
    monkeypatch.setattr(experts, "SPARSE_SUM_MIN_PAIRS", 0)


def _experts(dtype: torch.dtype, cls=SlotExperts) -> SlotExperts:
    torch.manual_seed(0)
    gate_up = torch.randn(6, 2 * INTER, HIDDEN).to(dtype)
    down = torch.randn(6, HIDDEN, INTER).to(dtype)
    return cls.from_fused(gate_up, down, SLOT_EXPERT, F.silu)


def _one_expert(module: SlotExperts, slot: int, rows: torch.Tensor) -> torch.Tensor:
    gate_up, down = module.slot_weights(slot)
    gate, up = F.linear(rows.float(), gate_up.float()).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down.float())


def _pairs(by_row: bool):
    """23 pairs over rows 0-4 (row 5 has none), some of them another rank's (slot -1)."""
    torch.manual_seed(1)
    pair_row = torch.randint(0, NUM_ROWS - 1, (23,))
    if by_row:
        pair_row = pair_row.sort().values
    pair_slot = torch.tensor([0, 2, 3, -1])[torch.randint(0, 4, (23,))]
    return pair_row, pair_slot, torch.rand(23)


@pytest.mark.parametrize("inference", [True, False])  # by row: the sparse product (float32 here), the gather
@pytest.mark.parametrize("by_row", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_weighted_sum_is_the_weighted_expert_outputs_summed_per_row(dtype, tolerance, by_row, inference):
    module = _experts(dtype)
    rows = torch.randn(NUM_ROWS, HIDDEN).to(dtype)
    pair_row, pair_slot, pair_weight = _pairs(by_row)
    expected = torch.zeros(NUM_ROWS, HIDDEN)
    for row, slot, weight in zip(pair_row.tolist(), pair_slot.tolist(), pair_weight.tolist()):
        if slot >= 0:
            expected[row] += weight * _one_expert(module, slot, rows[row:row + 1])[0]
    with torch.inference_mode(inference):
        got = module.weighted_sum(rows, pair_row, pair_slot, pair_weight, pairs_by_row=by_row)
    assert got.dtype == dtype and got.shape == (NUM_ROWS, HIDDEN)
    assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max()
    assert (got[NUM_ROWS - 1] == 0).all()  # a row without pairs


def test_forward_computes_each_row_with_its_slot():
    module = _experts(torch.float32)
    rows = torch.randn(7, HIDDEN)
    slot = torch.tensor([3, 0, 2, 0, -1, 3, 2])
    got = module(rows, slot)
    for i, s in enumerate(slot.tolist()):
        if s >= 0:
            assert torch.allclose(got[i], _one_expert(module, s, rows[i:i + 1])[0], atol=1e-5)


class _GarbageForSkipped(SlotExperts):
    """Unspecified outputs of skipped pairs made non-finite, as uninitialised memory may be."""

    def grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = super().grouped(x, counts)
        out[int(counts.sum()):] = float("nan")
        return out


@pytest.mark.parametrize("every_pair_skipped", [False, True])
@pytest.mark.parametrize("inference", [True, False])
@pytest.mark.parametrize("by_row", [True, False])
def test_skipped_pairs_never_reach_the_sums(by_row, inference, every_pair_skipped):
    module = _experts(torch.float32, _GarbageForSkipped)
    rows = torch.randn(NUM_ROWS, HIDDEN)
    pair_row, pair_slot, pair_weight = _pairs(by_row)
    if every_pair_skipped:  # no output row computed at all: the sparse product's row 0 is garbage too
        pair_slot = torch.full_like(pair_slot, -1)
    assert (pair_slot < 0).any()
    with torch.inference_mode(inference):
        got = module.weighted_sum(rows, pair_row, pair_slot, pair_weight, pairs_by_row=by_row)
        reference = _experts(torch.float32).weighted_sum(rows, pair_row, pair_slot, pair_weight, pairs_by_row=by_row)
    assert torch.isfinite(got).all() and torch.allclose(got, reference)
    if every_pair_skipped:
        assert (got == 0).all()


def test_sparse_product_is_taken_where_its_kernels_and_autograd_allow(monkeypatch):
    applies = experts._sparse_sum_applies
    weight = torch.rand(4)
    with torch.inference_mode():
        assert applies(torch.zeros(4, HIDDEN), weight)
        assert not applies(torch.zeros(4, HIDDEN, dtype=torch.bfloat16), weight)  # no CPU kernel
    assert not applies(torch.zeros(4, HIDDEN, requires_grad=True), weight)  # autograd: the gather path
    assert applies(torch.zeros(4, HIDDEN), weight)  # grad mode on, but nothing needs one
    monkeypatch.setattr(experts, "SPARSE_SUM_MIN_PAIRS", 5)
    assert not applies(torch.zeros(4, HIDDEN), weight)  # too few pairs to pay for the set-up
