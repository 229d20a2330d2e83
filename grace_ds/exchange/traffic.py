"""What one rank sent over each kind of link, and the pairs it computed: the measured side of the cost model."""
from __future__ import annotations

from dataclasses import dataclass

from grace_ds.exchange.hop import RECORD_BYTES, WEIGHT_BYTES, Hop


@dataclass
class Traffic:
    """Bytes this rank sent (dispatch and combine) and pairs it computed; filled by the exchanges."""

    cross_node_bytes: int = 0
    intra_node_bytes: int = 0
    pairs_computed: int = 0

    def add_hop(self, hop: Hop, rank: int, node_of_gpu: list[int], row_bytes: int) -> None:
        # Rows and their pair records out (under autograd, the float weights beside them), and results
        # back for the rows received.
        pair_bytes = RECORD_BYTES + (WEIGHT_BYTES if hop.pair_weights is not None else 0)
        self.add_sent([(sent + returned) * row_bytes + records * pair_bytes
                       for sent, returned, records in zip(hop.send_row_splits, hop.recv_row_splits,
                                                          hop.send_pair_splits)],
                      rank, node_of_gpu)

    def add_sent(self, bytes_to: list[int], rank: int, node_of_gpu: list[int]) -> None:
        """bytes_to[g]: what this rank sent to rank g; counted as intra- or cross-node, itself left out."""
        for other, moved in enumerate(bytes_to):
            if other == rank:
                continue
            if node_of_gpu[other] == node_of_gpu[rank]:
                self.intra_node_bytes += moved
            else:
                self.cross_node_bytes += moved
