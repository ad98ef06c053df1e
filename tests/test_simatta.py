"""SimATTA (Gui et al., ICLR 2024) against values derived by hand from the released algorithm (divelab/ATTA), float64:
the entropy selections, the incremental clustering's weight accumulation and new-cluster mask, alpha of the mixed
loss, the stop rule, the training batches' sampling, and the cloud's selection within the label budget."""
import pytest
import torch
from torch import nn

from cemabench.errors import UserError
from cemabench.method import Upload
from cemabench.protocol import Protocol
from cemabench.registry import build_method
from cemabench_methods.simatta import (
    FeatureTap,
    StopRule,
    high_entropy,
    highest_entropy,
    incremental_clusters,
    lowest_entropy,
    mixed_alpha,
    replacement_batches,
    skip_loader_seeds,
)
from conftest import cloud_resources

pytestmark = pytest.mark.usefixtures("float64")


def test_entropy_selections():
    ent = torch.tensor([0.05, 0.3, 0.1, 0.02, 0.5, 0.09])
    assert high_entropy(ent, 0.1).tolist() == [1, 2, 4]  # at least the bound
    # the 3 lowest (0.02, 0.05, 0.09), those below 0.06
    assert lowest_entropy(ent, 3, 0.06).tolist() == [3, 0]
    assert lowest_entropy(ent, 100, 0.1).tolist() == [3, 0, 5]  # a count beyond the batch: all below the bound
    assert highest_entropy(ent, 2, 0.1).tolist() == [1, 4]  # of the 2 highest (0.3, 0.5), those at least 0.1
    assert highest_entropy(ent, 10, 0.31).tolist() == [4]


def _f(*values):
    return torch.tensor([[v] for v in values])


def test_incremental_clustering_accumulates_anchor_weights_and_anchors_only_new_clusters():
    # anchors at 0 (weight 2) and 10 (weight 1); new samples near each and a new group at 20
    found = incremental_clusters(_f(0.0, 10.0), torch.tensor([2.0, 1.0], dtype=torch.float32),
                                 _f(0.1, 0.2, 10.1, 20.0, 20.3, 20.4), n_clusters=3, random_state=0)
    # clusters {0, 0.1, 0.2} (size 3, one anchor), {10, 10.1} (size 2, one anchor), {20, 20.3, 20.4} (new)
    assert torch.allclose(found.anchor_weight.double(), torch.tensor([2.0 + 3 / 1, 1.0 + 2 / 1]))
    assert found.anchor_weight.dtype == torch.float32
    # the new cluster's centre is 20.2333...: its nearest point is 20.3, the new samples' position 4; weight 3
    assert found.closest.tolist() == [4]
    assert found.sizes.tolist() == [3]


def test_anchors_sharing_a_cluster_share_its_size_and_the_first_clustering_anchors_every_cluster():
    found = incremental_clusters(_f(0.0, 0.2), torch.tensor([1.0, 1.0]), _f(0.1, 5.0, 5.2, 5.3), n_clusters=2,
                                 random_state=0)
    assert torch.allclose(found.anchor_weight, torch.tensor([1.0 + 3 / 2, 1.0 + 3 / 2]))  # {0, 0.2, 0.1}: size 3
    assert found.closest.tolist() == [2] and found.sizes.tolist() == [3]  # centre 5.1667: nearest 5.2
    no_weights = incremental_clusters(_f(0.0, 0.2), torch.tensor([1.0, 1.0]), _f(0.1, 5.0, 5.2, 5.3), n_clusters=2,
                                      random_state=0, accumulate_weight=False)
    assert no_weights.anchor_weight.tolist() == [1.0, 1.0]
    first = incremental_clusters(torch.zeros(0, 1), torch.zeros(0), _f(0.0, 1.0, 1.5, 9.0, 10.2, 12.0), n_clusters=2,
                                 random_state=0)
    # no anchor yet: every cluster is new; {0, 1, 1.5} (centre 0.8333: nearest 1) and {9, 10.2, 12} (10.4: 10.2)
    assert sorted(zip(first.closest.tolist(), first.sizes.tolist())) == [(1, 3), (4, 3)]
    # more clusters than points: one per point
    assert sorted(incremental_clusters(torch.zeros(0, 1), torch.zeros(0), _f(0.0, 3.0), 10, 0).closest) == [0, 1]


def test_alpha_of_the_mixed_loss():
    assert mixed_alpha(3, 7, cold_start=0) == 3 / 10
    assert mixed_alpha(3, 1, cold_start=5) == 0.2  # fewer source anchors than cold_start: at most 0.2
    assert mixed_alpha(1, 9, cold_start=50) == 1 / 10
    assert mixed_alpha(4, 4, cold_start=0) == 0.5  # the target anchors twice, when no source anchor is held


def test_stop_rule():
    rule = StopRule(window=2)
    # every third step compares a full window's mean with the lowest so far: a constant loss finds a new lowest once
    # (step 2) and then none; the sixth comparison in a row without one (steps 5, 8, ..., 20) stops training
    stops = [rule.update(1.0) for _ in range(21)]
    assert stops == [False] * 20 + [True]
    rule = StopRule(window=2)
    losses = [3.0, 3.0, 9.0, 2.0, 2.0, 9.0]  # windows of means 3, then 2: both new lowest, no stop
    assert not any(rule.update(v) for v in losses) and rule.lowest == 2.0 and rule.misses == 0


def test_training_batches_are_those_of_the_released_loaders():
    """Two InfiniteDataLoaders (RandomSampler with replacement, BatchSampler without drop_last) and a third loader
    started after them, as the released cluster_train builds them: the same batches under the same seed."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    def endless(dataset, size):
        sampler = BatchSampler(RandomSampler(dataset, replacement=True), size, drop_last=False)
        return iter(DataLoader(dataset, batch_sampler=_Forever(sampler)))

    for n, size in ((7, 32), (70, 32), (5, 2)):
        data = TensorDataset(torch.arange(n))
        torch.manual_seed(3)
        a, b = endless(data, size), endless(data, size)
        iter(DataLoader(data, batch_size=size, shuffle=True))
        released = [(next(a)[0].tolist(), next(b)[0].tolist()) for _ in range(6)]
        torch.manual_seed(3)
        skip_loader_seeds(3)
        s, t = replacement_batches(n, size), replacement_batches(n, size)
        assert [(next(s).tolist(), next(t).tolist()) for _ in range(6)] == released


class _Forever:
    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        while True:
            yield from self.sampler


def _cloud(budget=None, total=None, **options):
    method = build_method("simatta", {"n_clusters": 3, "eh": 0.0, "steps": 0, **options})
    method.protocol = Protocol(label_budget=budget, label_budget_total=total)
    return method.cloud(cloud_resources(classes=4))


def _upload(x, t):
    return Upload(x, {}, t, index=torch.arange(len(x)))


def _deliver(cloud, upload, labels):
    asked = cloud.labels_wanted(upload)
    asked = torch.zeros(0, dtype=torch.long) if asked is None else asked
    upload.labels, upload.labelled = labels[asked], asked
    return asked, cloud.step(upload)


def test_the_cloud_asks_for_distinct_increasing_positions_within_the_budget_and_trains_on_them():
    torch.manual_seed(0)
    x, y = torch.rand(12, 3, 6, 6), torch.randint(0, 4, (12,))
    cloud = _cloud(budget=2, total=3)
    asked, down = _deliver(cloud, _upload(x, 0), y)
    assert asked.dtype == torch.int64 and len(asked) == 2 and bool((asked[1:] > asked[:-1]).all())
    assert torch.equal(cloud.anchors.target.sort().values, y[asked].sort().values)
    assert set(down) == {n for n, _ in cloud.student.named_parameters()}  # every parameter comes down
    assert cloud.labels_used == 2
    asked, _ = _deliver(cloud, _upload(torch.rand(12, 3, 6, 6), 1), y)
    assert len(asked) <= 1 and cloud.labels_used <= 3  # what is left of the unit's total
    assert cloud.n_clusters == 3 + 2  # one more cluster after every batch


def test_without_a_budget_nothing_is_asked_and_nothing_trains():
    cloud = _cloud()
    asked, down = _deliver(cloud, _upload(torch.rand(8, 3, 6, 6), 0), torch.zeros(8, dtype=torch.long))
    assert len(asked) == 0 and down is None and cloud.anchors is None


def test_selection_is_deterministic_from_the_seed_and_the_random_baseline_asks_as_many():
    x = torch.rand(16, 3, 6, 6)

    def asked(seed, **options):
        torch.manual_seed(seed)
        return _cloud(budget=16, **options).labels_wanted(_upload(x, 0)).tolist()

    assert asked(5) == asked(5)
    clusters = asked(5)
    random = asked(5, select="random")
    assert len(random) == len(clusters) and random == asked(5, select="random")
    assert len(asked(5, select="random", random_count="budget")) == 16


def test_a_model_computing_after_its_last_linear_layer_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Softmax(1))
    with pytest.raises(UserError, match="after it"):
        FeatureTap(model)(torch.rand(2, 4))
    feats, logits = FeatureTap(model[:2])(torch.rand(2, 2, 2))
    assert feats.shape == (2, 4) and logits.shape == (2, 3)
    with pytest.raises(UserError, match="no nn.Linear"):
        build_method("simatta").check_models(nn.Conv2d(3, 3, 1), None)


def test_labels_the_harness_did_not_deliver_for_the_asked_positions_are_refused():
    cloud = _cloud(budget=4)
    upload = _upload(torch.rand(8, 3, 6, 6), 0)
    asked = cloud.labels_wanted(upload)
    upload.labelled = asked[:-1]
    upload.labels = torch.zeros(len(asked) - 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="other samples"):
        cloud.step(upload)


def test_on_the_miniature_the_cloud_gets_the_labels_of_what_it_asked_for_within_the_budget_and_nothing_else():
    from cemabench.data import ArrayDomain
    from cemabench.datasets import miniature
    from cemabench.models.mini import load_model
    from cemabench.protocol import Models, run_unit
    from cemabench.protocol.stream import domain_order

    full = miniature.dataset(domains=["fog"]).domains[0]
    n = 96
    domain = ArrayDomain("fog", full.pixels[:n], lambda: full.labels()[:n])
    method, seen = build_method("simatta", {"steps": 0}), []
    building = method.cloud

    def spied(resources):
        cloud = building(resources)
        asking, stepping = cloud.labels_wanted, cloud.step

        def labels_wanted(upload):
            asked = asking(upload)
            seen.append([asked.tolist()])
            return asked

        def step(upload):
            seen[-1] += [upload.labelled.tolist(), upload.sample_ids[upload.labelled].tolist(), upload.labels.tolist()]
            return stepping(upload)

        cloud.labels_wanted, cloud.step = labels_wanted, step
        return cloud

    method.cloud = spied
    torch.set_default_dtype(torch.float32)
    models = Models(edge=lambda: load_model("edge"), foundation=lambda: load_model("foundation"))
    (result,) = run_unit(method, [domain], models, 10, None, Protocol(batch_size=32, label_budget=3,
                                                                      label_budget_total=7), seed=0)
    assert result.status == "ok", result.message
    assert len(seen) == 3 and all(len(asked) <= 3 for asked, *_ in seen)
    assert result.labels_used == sum(len(asked) for asked, *_ in seen) <= 7 and result.labels_used > 0
    stream = domain.labels()[domain_order(0, "fog", n)]  # read only now, after the run
    for asked, labelled, ids, labels in seen:
        assert labelled == asked and labels == stream[ids].tolist()
