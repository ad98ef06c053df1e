"""Conformance of SAR, CoTTA, LAME, pseudo-label, distill-tent and cloud-only, derived by hand (float64)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cemabench.errors import UserError
from cemabench.method import CloudLogic, Upload
from cemabench.protocol import Models, Protocol, SampleCounter, run_unit
from cemabench.registry import available, build_method, build_model
from cemabench.tables.spec import available_tables, load_table
from cemabench_methods.common import entropy, tta_augment, use_batch_statistics
from cemabench_methods.cotta import symmetric_cross_entropy
from cemabench_methods.lame import knn_affinity, laplacian_refinement
from cemabench_methods.tent import Tent
from conftest import TinyNet, builtin_methods, cloud_resources, granted_labels, small_options, tiny_dataset

pytestmark = pytest.mark.usefixtures("float64")

ROSTER = builtin_methods()


def test_every_method_is_registered_with_its_mapping_and_paper():
    found = available("methods")
    assert ROSTER and set(ROSTER) <= set(found)
    assert {m.name for t in available_tables() for m in load_table(t).methods} <= set(ROSTER)  # what the specs name
    for name in ROSTER:
        cls = found[name].load()
        assert cls.paper and cls.mapping.selection and cls.mapping.download


@pytest.mark.parametrize("name", ROSTER)
def test_every_method_runs_under_the_forward_only_edge(name):
    torch.set_default_dtype(torch.float32)
    dataset = tiny_dataset(domains=("a", "b"), n=70)
    torch.manual_seed(0)
    # random 4-class miniature nets: they split at named stages, as the feature-offloading methods need
    models = Models.copies_of(build_model("tiny:edge@4").eval(), build_model("tiny:edge@4").eval())
    results = run_unit(build_method(name, small_options(name)), dataset.domains, models, 4, dataset.clean,
                       Protocol(batch_size=16, setting="continual", **granted_labels(name)), seed=0)
    assert [r.status for r in results] == ["ok", "ok"], results[0].message


def _batch_stat_model(resources):
    model = use_batch_statistics(resources.edge_replica())
    return model


class TestSAR:
    def test_one_step_is_a_sharpness_aware_sgd_step(self):
        resources = cloud_resources()
        cloud = build_method("sar", {"entropy_margin": 1.0}).cloud(resources)
        ref = _batch_stat_model(resources)
        params = [ref.bn.weight, ref.bn.bias]
        x = torch.rand(8, 3, 6, 6)
        margin = math.log(4)
        ent = entropy(ref(x))
        keep = ent < margin
        g = torch.autograd.grad(ent[keep].mean(), params)
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(0.05 * gi / (norm + 1e-12))
        ent2 = entropy(ref(x))[keep]
        g2 = torch.autograd.grad(ent2[ent2 < margin].mean(), params)
        down = cloud.step(Upload(x, {}, 0))
        original = _batch_stat_model(resources)
        assert torch.allclose(down["bn.weight"], original.bn.weight - 0.00025 * g2[0])
        assert torch.allclose(down["bn.bias"], original.bn.bias - 0.00025 * g2[1])
        assert cloud.ema == pytest.approx(ent2[ent2 < margin].mean().item())

    def test_last_stage_is_frozen_by_name(self):
        assert len(build_method("sar").cloud(cloud_resources()).params) == 2
        with pytest.raises(UserError, match="no trainable normalisation parameters left.*bn"):
            build_method("sar", {"frozen": ["bn"]}).cloud(cloud_resources())

    @pytest.mark.parametrize("clears", [False, True])
    def test_recovery_restores_the_source_and_keeps_or_clears_the_ema(self, clears):
        resources = cloud_resources()
        cloud = build_method("sar", {"reset_threshold": 100.0, "reset_clears_ema": clears,
                                     "reset_clears_momentum": True, "entropy_margin": 1.0}).cloud(resources)
        down = cloud.step(Upload(torch.rand(8, 3, 6, 6), {}, 0))
        source = resources.edge_replica()
        assert torch.equal(down["bn.weight"], source.bn.weight) and cloud.resets == 1
        assert (cloud.ema is None) == clears
        assert not cloud.optimizer.state  # the optimiser is back to its initial, empty state


class TestCoTTA:
    def test_symmetric_cross_entropy(self):
        s, t = torch.randn(4, 5), torch.randn(4, 5)
        expected = -0.5 * (t.softmax(1) * s.log_softmax(1)).sum(1) - 0.5 * (s.softmax(1) * t.log_softmax(1)).sum(1)
        assert torch.allclose(symmetric_cross_entropy(s, t), expected)

    @pytest.mark.parametrize("restore", [0.0, 1.0])
    def test_student_step_ema_teacher_and_stochastic_restore(self, restore):
        resources = cloud_resources()
        cloud = build_method("cotta", {"restore_probability": restore}).cloud(resources)
        ref = _batch_stat_model(resources).requires_grad_(True)
        x, target = torch.rand(8, 3, 6, 6), torch.randn(8, 4)
        symmetric_cross_entropy(ref(x), target).mean().backward()
        stepped = {n: p - 0.01 * (p.grad + 0.9 * p.grad) for n, p in ref.named_parameters()}  # Nesterov, 1st step
        source = dict(resources.edge_replica().named_parameters())
        down = cloud.step(Upload(x, {}, 0, payload={"teacher_logits": target}))
        for name, p in cloud.student.named_parameters():
            assert torch.allclose(down[name], 0.999 * source[name] + 0.001 * stepped[name])
            assert torch.allclose(p, source[name] if restore == 1.0 else stepped[name])

    @pytest.mark.parametrize("threshold, forwards", [(0.0, 2), (1.0, 2 + 32)])
    def test_teacher_averages_augmented_passes_only_when_the_anchor_is_unsure(self, threshold, forwards):
        torch.set_default_dtype(torch.float32)
        edge = build_method("cotta", {"augment_below": threshold}).edge(4)
        model = edge.configure(TinyNet())
        counter = SampleCounter()
        counter.attach(model)
        counter.attach(edge.anchor)
        with torch.no_grad():
            decision = edge.step(model, torch.rand(8, 3, 6, 6))
        assert counter.without_grad == forwards * 8
        assert torch.equal(decision.payload["teacher_logits"], decision.logits) and len(decision.upload) == 8

    def test_teacher_averages_the_released_augmentation(self):
        """The augmented passes take CoTTA's released transform (torchvision's v1 colour adjustments, as RoTTA's and
        RMT's side-by-side runs matched): v2's adjust_hue, used before, differed by about 6e-7 per pixel."""
        torch.set_default_dtype(torch.float64)
        try:
            edge = build_method("cotta", {"augment_below": 1.0, "augmentations": 3}).edge(4)
            model = edge.configure(TinyNet())
            x = torch.rand(8, 3, 6, 6)
            torch.manual_seed(5)
            with torch.no_grad():
                got = edge.step(model, x).logits
                torch.manual_seed(5)
                expected = torch.stack([model(tta_augment(x)) for _ in range(3)]).mean(0)
            assert torch.equal(got, expected)
        finally:
            torch.set_default_dtype(torch.float32)

    def test_augmentation_keeps_shape_and_range(self):
        torch.set_default_dtype(torch.float32)
        x = torch.rand(4, 3, 32, 32)
        out = tta_augment(x)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)


class TestLAME:
    def test_knn_affinity_excludes_self(self):
        points = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
        assert knn_affinity(points, 1).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]

    def test_no_affinity_keeps_the_source_prediction(self):
        probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
        assert torch.allclose(laplacian_refinement(-torch.log(probs), torch.zeros(2, 2)), probs)

    def test_refinement_reaches_the_fixed_point_and_neighbours_agree(self):
        probs = torch.tensor([[0.9, 0.1], [0.45, 0.55], [0.2, 0.8]])
        unary = -torch.log(probs)
        kernel = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 0]])
        y = laplacian_refinement(unary, kernel, max_steps=1000)
        assert torch.allclose(y, (-unary + kernel @ y).softmax(-1), atol=1e-6)
        assert y[1].argmax() == 0 and y[2].argmax() == 1  # sample 1 follows its confident neighbour

    def test_edge_uses_penultimate_features(self):
        torch.set_default_dtype(torch.float32)
        edge = build_method("lame").edge(4)
        model = edge.configure(TinyNet())
        x = torch.rand(10, 3, 6, 6)
        with torch.no_grad():
            decision = edge.step(model, x)
            features = torch.relu(model.bn(model.conv(x))).mean(dim=(2, 3))
            logits = model.fc(features)
        kernel = knn_affinity(F.normalize(features, dim=-1), 5)
        assert torch.allclose(decision.logits, laplacian_refinement(-torch.log(logits.softmax(1) + 1e-10), kernel))


def test_pseudo_label_loss_is_cross_entropy_to_its_own_argmax():
    resources = cloud_resources()
    cloud = build_method("pseudo-label").cloud(resources)
    ref = _batch_stat_model(resources)
    x = torch.rand(8, 3, 6, 6)
    logits = ref(x)
    F.cross_entropy(logits, logits.argmax(1)).backward()
    down = cloud.step(Upload(x, {}, 0))
    assert torch.allclose(down["bn.weight"], ref.bn.weight - 0.001 * ref.bn.weight.grad)


def test_distill_tent_uploads_everything_and_weights_nothing():
    edge = build_method("distill-tent").edge(4)
    assert len(edge.select(torch.randn(16, 4))) == 16
    assert build_method("distill-tent").options.entropy_max is None


def test_cloud_only_scores_the_foundation_answers():
    torch.set_default_dtype(torch.float32)
    dataset = tiny_dataset(domains=("a",), n=50)
    torch.manual_seed(0)
    edge, foundation = TinyNet().eval(), TinyNet().eval()
    (result,) = run_unit(build_method("cloud-only"), dataset.domains, Models.copies_of(edge, foundation), 4,
                         dataset.clean, Protocol(batch_size=16), seed=0)
    x, y = dataset.domains[0].images(np.arange(50)), torch.from_numpy(dataset.domains[0].labels())
    with torch.no_grad():
        expected = (foundation(x).argmax(1) == y).sum().item()
    assert result.correct == expected and result.link.answers == 50 and result.link.answer_bytes == 50 * 4 * 4
    assert result.edge_forward_samples == 0 and result.upload_ratio == 100


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_confidence_offload_answers_unsure_samples_from_the_cloud(threshold):
    torch.set_default_dtype(torch.float32)
    dataset = tiny_dataset(domains=("a",), n=50)
    torch.manual_seed(0)
    edge, foundation = TinyNet().eval(), TinyNet().eval()
    (result,) = run_unit(build_method("confidence-offload", {"threshold": threshold}), dataset.domains,
                         Models.copies_of(edge, foundation), 4, dataset.clean, Protocol(batch_size=16), seed=0)
    x, y = dataset.domains[0].images(np.arange(50)), torch.from_numpy(dataset.domains[0].labels())
    with torch.no_grad():
        edge_logits, cloud_logits = edge(x), foundation(x)
    unsure = edge_logits.softmax(1).max(1).values < threshold
    expected = torch.where(unsure, cloud_logits.argmax(1), edge_logits.argmax(1))
    assert result.correct == (expected == y).sum().item() and result.link.uploaded == unsure.sum().item()


def test_empty_selection_is_noted_and_nonfinite_downloads_are_divergence():
    torch.set_default_dtype(torch.float32)
    dataset = tiny_dataset(domains=("a",), n=50)
    torch.manual_seed(0)
    models = Models.copies_of(TinyNet().eval(), TinyNet().eval())
    (strict,) = run_unit(build_method("eta", {"entropy_margin": 0.0}), dataset.domains, models, 4, dataset.clean,
                         Protocol(batch_size=16), seed=0)
    assert strict.status == "ok" and "empty selection" in strict.note

    class NaNCloud(Tent):
        def cloud(self, resources):
            step = lambda self, upload: {"bn.weight": torch.full((4,), math.nan)}  # noqa: E731
            return type("Cloud", (CloudLogic,), {"step": step})()

    (exploding,) = run_unit(NaNCloud(), dataset.domains, models, 4, dataset.clean, Protocol(batch_size=16), seed=0)
    assert exploding.status == "diverged" and "non-finite parameters at batch 0" in exploding.message
