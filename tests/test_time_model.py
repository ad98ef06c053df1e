"""The time model (issue 19): counted FLOPs and bytes become modelled seconds, deterministically. Each expected value
below is worked out by hand from the rule in cemabench.protocol.link.Link's docstring."""
import pytest
import torch
from test_guards import _run, plugin

from cemabench.config import Protocol
from cemabench.errors import UserError
from cemabench.method import CloudReply, EdgeDecision
from cemabench.protocol.link import CloudClock, Link

# 1,000 B/s with 10 ms per transfer; the edge does 100 FLOP/s and the cloud 1,000; one batch a second
TIMED = Protocol(batch_size=4, bandwidth=1000.0, latency=0.01, edge_flops_per_s=100.0, cloud_flops_per_s=1000.0,
                 answer_deadline=1.0)


def _upload(link: Link, batch_index: int, samples: int, edge_flops: int):
    link.edge_step(batch_index, edge_flops)
    x = torch.zeros(4, 3, 2, 2)
    return link.send_up(x, EdgeDecision(logits=None, upload=torch.arange(samples)), 100, batch_index)


def test_latency_and_delay_follow_the_hand_computation():
    link = Link(None, 0, protocol=TIMED)
    # batch 0 arrives at 0 s; edge 20 FLOP: 0.2 s; 200 B up: 0.21 s; cloud free: 500 FLOP from 0.41 to 0.91 s;
    # 40 B of answers back: 0.05 s, so at 0.96 s, within the 1 s deadline
    _upload(link, 0, 2, 20)
    link.cloud_step(500)
    assert link.answer(2, 40) is True
    link.finish_batch(4, True)
    # batch 1 arrives at 1 s; upload in at 1.41 s; 1,500 FLOP until 2.91 s; a 40 B download is back at 2.96 s,
    # 1.96 s after arrival: ceil(1.96 / 1) - 1 = 1 batch late, so it is applied before batch 1 + 1 + 1 = 3
    _upload(link, 1, 2, 20)
    link.cloud_step(1500)
    link.send_down({"w": torch.zeros(10)}, 1)
    link.finish_batch(4, True)
    assert link.arrived(2) == [] and len(link.arrived(3)) == 1 and link.counters.download_delay_batches == 1
    # batch 2 arrives at 2 s; upload in at 2.41 s, but the cloud is busy until 2.91 s (first in, first out);
    # 500 FLOP until 3.41 s; 20 B back at 3.44 s: 1.44 s after arrival, past the deadline
    _upload(link, 2, 2, 20)
    link.cloud_step(500)
    assert link.answer(1, 20) is False and link.counters.late_answers == 1
    link.finish_batch(4, True)
    _, _, latencies = link.next_domain()
    assert latencies == pytest.approx([0.96, 0.96, 0.2, 0.2] + [0.2] * 8, abs=1e-12)


def test_edges_that_share_a_cloud_queue_for_it():
    clock = CloudClock()
    first, second = Link(None, 0, protocol=TIMED, clock=clock), Link(None, 0, protocol=TIMED, clock=clock)
    _upload(first, 0, 2, 20)
    first.cloud_step(2000)  # from 0.41 s to 2.41 s
    _upload(second, 0, 2, 20)
    second.cloud_step(100)  # in at 0.41 s, waits for the first edge's step: from 2.41 s to 2.51 s
    assert second.answer(2, 40) is False  # back at 2.56 s, past the deadline
    alone = Link(None, 0, protocol=TIMED)
    _upload(alone, 0, 2, 20)
    alone.cloud_step(100)
    assert alone.answer(2, 40) is True  # back at 0.56 s


def test_without_throughputs_the_link_is_the_untimed_model():
    untimed = Protocol(batch_size=4, bandwidth=1000.0, latency=0.01)
    link = Link(None, 0, protocol=untimed)
    _upload(link, 0, 2, 10**9)  # FLOPs take no time: only the transfers count, 0.21 s up and 0.05 s back
    link.cloud_step(10**9)
    assert link._round_trip(40) == pytest.approx(0.26) and link.next_domain()[2] is None


@pytest.mark.parametrize("field", ["edge_flops_per_s", "cloud_flops_per_s"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_a_throughput_must_be_positive(field, value):
    with pytest.raises(UserError, match=f"protocol {field} must be a number > 0"):
        Protocol(**{field: value})


def _adapting():
    """An edge that uploads its batch; a cloud that does a matrix product (counted FLOPs) and sends a bias down."""

    def edge(self, model, x):
        return EdgeDecision(model(x), upload=torch.arange(len(x)))

    def cloud(upload):
        work = upload.samples.flatten(1) @ torch.ones(upload.samples[0].numel(), 64)
        return CloudReply(download={"fc.bias": work.mean().expand(4).clone() * 0})

    return plugin(edge, cloud)


def test_a_slow_cloud_delays_downloads_and_the_numbers_do_not_depend_on_the_machine(tiny):
    (off,) = _run(tiny, _adapting(), Protocol(batch_size=16))
    (fast,) = _run(tiny, _adapting(), Protocol(batch_size=16, cloud_flops_per_s=1e15, edge_flops_per_s=1e15))
    assert fast.correct == off.correct and off.latencies is None and len(fast.latencies) == fast.seen
    assert fast.link.download_delay_batches == off.link.download_delay_batches == 0
    # a cloud step on 16 samples is 16 x 192 x 64 x 2 = 393,216 FLOP: 3.93216 s at 100 kFLOP/s, with a batch every
    # second. Step k (k = 0..5) ends at 3.93216 (k + 1) s, 2.93216 k + 3.93216 s after its batch arrived, so its
    # download is ceil(that) - 1 = 3, 6, 9, 12, 15, 18 batches late; the last batch (4 samples, 0.98304 s) ends at
    # 24.576 s, 18.576 s after its arrival at 6 s: 18 batches late
    (slow,) = _run(tiny, _adapting(), Protocol(batch_size=16, cloud_flops_per_s=1e5))
    assert slow.link.downloads == 7 and slow.cloud_flops == off.cloud_flops
    assert slow.link.download_delay_batches == 3 + 6 + 9 + 12 + 15 + 18 + 18
    again = _run(tiny, _adapting(), Protocol(batch_size=16, cloud_flops_per_s=1e5))[0]
    assert again.link == slow.link and again.latencies == slow.latencies  # counts, not a clock


def test_the_edge_and_each_direction_of_the_link_queue_too():
    """A batch waits for the edge's step on the one before, and an upload for the uplink's last transfer (issue 19
    review: a 4 s edge step on a 1 s stream was reported as 4 s for every batch)."""
    slow = Protocol(batch_size=4, bandwidth=1000.0, latency=0.01, edge_flops_per_s=100.0, cloud_flops_per_s=1000.0)
    link = Link(None, 0, protocol=slow)
    for batch in range(3):  # 300 FLOP: 3 s of edge per batch, one batch a second, nothing uploaded
        link.edge_step(batch, 300)
        link.finish_batch(4, True)
    # batch 0: 0 to 3 s; batch 1 arrives at 1 s, runs 3 to 6 s (5 s after arrival); batch 2: 6 to 9 s (7 s)
    assert link.next_domain()[2] == pytest.approx([3.0] * 4 + [5.0] * 4 + [7.0] * 4)
    link = Link(None, 0, protocol=slow)
    for batch in range(2):  # 2,000 B up: 2.01 s on the link, one batch a second; 10 FLOP of edge, none of cloud
        link.edge_step(batch, 10)
        link.send_up(torch.zeros(20, 3, 2, 2), EdgeDecision(logits=None, upload=torch.arange(20)), 100, batch)
        link.cloud_step(0)
        assert link.answer(20, 0) is True  # 20 answers of no bytes: 10 ms back
        link.finish_batch(20, False)
    # batch 0: edge 0 to 0.1 s, up 0.1 to 2.11 s, answers back at 2.12 s; batch 1: edge 1.0 to 1.1 s, but the uplink
    # is busy until 2.11 s, so up 2.11 to 4.12 s, answers back at 4.13 s: 3.13 s after its arrival
    assert link.next_domain()[2] == pytest.approx([2.12] * 20 + [3.13] * 20)


def test_samples_without_a_prediction_have_no_latency():
    link = Link(None, 0, protocol=TIMED)
    _upload(link, 0, 2, 20)
    link.cloud_step(500)
    assert link.answer(2, 4000) is False  # 4 s back: past the 1 s deadline
    link.finish_batch(4, False)  # an edge without a prediction of its own: nothing was predicted for these samples
    assert link.next_domain()[2] == []


def test_each_direction_at_its_own_bandwidth():
    """``bandwidth_down`` is the downlink's rate (answers, downloads); ``bandwidth`` stays the uplink's."""
    both = Protocol(batch_size=4, bandwidth=1000.0, bandwidth_down=10000.0, latency=0.01, edge_flops_per_s=100.0,
                    cloud_flops_per_s=1000.0, answer_deadline=1.0)
    link = Link(None, 0, protocol=both)
    # as in the hand computation above, to the cloud step's end at 0.91 s; 400 B of answers back at 10,000 B/s take
    # 0.01 + 0.04 s: at 0.96 s (at the uplink's 1,000 B/s they would take 0.41 s and miss the deadline)
    _upload(link, 0, 2, 20)
    link.cloud_step(500)
    assert link.answer(2, 400) is True
    link.finish_batch(4, True)
    assert link.next_domain()[2] == pytest.approx([0.96, 0.96, 0.2, 0.2], abs=1e-12)
    assert both.transfer_seconds(1000) == pytest.approx(1.01) and both.transfer_seconds(1000, down=True) == 0.11
    untimed = Protocol(batch_size=4, bandwidth_down=100.0)  # no uplink rate: uploads take no time, 40 B back 0.4 s
    link = Link(None, 0, protocol=untimed)
    _upload(link, 0, 2, 10**9)
    assert link._round_trip(40) == pytest.approx(0.4)
    with pytest.raises(UserError, match="bandwidth_down"):
        Protocol(bandwidth_down=0.0)
    assert Protocol(bandwidth_down=5.0, answer_deadline=1.0).answer_deadline == 1.0  # a downlink rate is a link model
