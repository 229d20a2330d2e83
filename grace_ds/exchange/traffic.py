"""What one rank sent over each kind of link, and the pairs it computed: the measured side of the cost model."""
from __future__ import annotations

from dataclasses import dataclass

from grace_ds import cost
from grace_ds.exchange.hop import Hop


@dataclass
class Traffic:
    """Bytes this rank sent (dispatch and combine) and pairs it computed; filled by the exchanges, by the
    cost model's own byte rules (grace_ds.cost), so measured and modeled bytes agree (tests/test_cost.py)."""

    cross_node_bytes: int = 0
    intra_node_bytes: int = 0
    pairs_computed: int = 0

    def add_hop(self, hop: Hop, rank: int, node_of_gpu: list[int], row_bytes: int) -> None:
        # Rows and their pair records out (under autograd, the float weights beside them), and results
        # back for the rows received.
        pair_bytes = cost.bytes_per_pair(hop.pair_weights is not None)
        self.add_sent([cost.link_bytes(sent, returned, records, row_bytes, pair_bytes)
                       for sent, returned, records in zip(hop.send_row_splits, hop.recv_row_splits,
                                                          hop.send_pair_splits)],
                      rank, node_of_gpu)

    def add_sent(self, bytes_to: list[int], rank: int, node_of_gpu: list[int]) -> None:
        """bytes_to[g]: what this rank sent to rank g; counted as intra- or cross-node, itself left out."""
        intra, cross = cost.split_by_node(bytes_to, rank, node_of_gpu)
        self.intra_node_bytes += intra
        self.cross_node_bytes += cross
