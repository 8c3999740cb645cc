"""RACK orders transmissions by when they left (RFC 8985 §6.2), also within
one instant: when one ACK sends new data and the next, processed at the
same time, retransmits a hole below it, the new data reaches the peer first.
Its SACK must not make the retransmission look sent earlier and overdue
(before, about half the retransmissions of a lossy bulk transfer went a
second time, each answered by a D-SACK: the lossy bench's 50 ms download).
Nor may a retransmission still on its way be resent because the ACKs that
ended its recovery episode started the next one (seed 6;
tcp_recovery.tcp_rack_keep_in_flight)."""

from __future__ import annotations

import pytest
from core_helpers import B, Bulk, connect_over, make_shard
from shardstack.netio.simlink import LinkParams, SimLink


@pytest.mark.parametrize("seed", [1, 2, 6, 7])
def test_no_retransmission_is_marked_lost_again_on_a_link_that_never_reorders(seed):
    a, b = make_shard(), make_shard(B)
    link = SimLink(a, b, seed=seed, params=LinkParams(delay=0.050, loss=0.005))
    c, s = connect_over(link, a, b)
    bulk = Bulk(link, a, c, b, s, 64 << 20)

    def pump() -> bool:
        bulk.step()
        return False

    link.run_until(pump, link.now + 6.0)
    st = a.stats
    lost = link.stats_ab.lost + link.stats_ba.lost
    assert lost >= 5 and st.fast_retrans >= 5  # the losses were met and repaired
    # Nothing is reordered and no retransmission is lost here (the seeds'
    # losses fall on first transmissions): none is sent twice.
    assert st.lost_retransmits == 0, st
    assert st.dsacks_recv == 0, st
