"""The exchange's byte accounting, without processes: Traffic reads a hop's split sizes alone."""
from types import SimpleNamespace

from grace_ds.dispatch import Traffic

ROW_BYTES = 4096  # one bf16 row of hidden size 2048


def test_traffic_counts_rows_their_pair_records_and_results_back_by_node():
    # Rank 0 of 2 nodes x 2: rank 1 is its node-mate, ranks 2 and 3 are on the other node.
    hop = SimpleNamespace(send_row_splits=[9, 3, 2, 0], recv_row_splits=[9, 1, 4, 5], send_pair_splits=[20, 7, 5, 0])
    traffic = Traffic()
    traffic.add_hop(hop, 0, [0, 0, 1, 1], ROW_BYTES)
    record_bytes = 16  # four int32 columns a pair
    assert traffic.intra_node_bytes == (3 + 1) * ROW_BYTES + 7 * record_bytes
    assert traffic.cross_node_bytes == (2 + 4) * ROW_BYTES + 5 * record_bytes + (0 + 5) * ROW_BYTES
