"""The gather exchange's pieces that need no process group: packing rows, and the CUDA-graph token buckets."""
import pytest
import torch

from grace_ds.decode_graphs import token_bucket
from grace_ds.dispatch_gather import _pack, _unpack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_unpack_to_hidden_slots_and_weights(dtype):
    hidden = torch.randn(3, 6).to(dtype)
    slots = torch.tensor([[0, 5], [7, 1], [2, 3]])
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    packed = _pack(hidden, slots, weights, padded_tokens=5)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6 * hidden.element_size() + 8 * 2)
    rows, got_slots, got_weights = _unpack(packed, dtype, 6, 2)
    assert torch.equal(rows[:3], hidden) and torch.equal(got_slots[:3], slots.int())
    assert torch.equal(got_weights[:3], weights)
    assert (got_slots[3:] == -1).all()  # padding rows: no rank computes them
    assert (got_weights[3:] == 0).all() and (rows[3:] == 0).all()


def test_token_buckets_are_powers_of_two_up_to_the_limit():
    assert [token_bucket(n, 128) for n in (1, 8, 9, 64, 65, 128)] == [8, 8, 16, 64, 128, 128]
    assert token_bucket(100, 96) is None  # larger than the limit: eager
    assert token_bucket(90, 96) == 96  # the limit caps the bucket
