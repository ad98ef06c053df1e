"""RMT (Döbler et al., CVPR 2023) against values derived by hand from the released algorithm
(mariodoebler/test-time-adaptation), float64: the symmetric cross-entropy, the contrastive loss on the three views,
the nearest source prototype, the EMA update, the source prototypes and the warm-up of the training stage, one cloud
step (self-training + contrastive + source replay, Nesterov SGD, then the EMA teacher), the edge's ensemble and its
download, the options' refusals and determinism."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cemabench.data import ArrayDomain
from cemabench.datasets import miniature
from cemabench.errors import UserError
from cemabench.method import TrainingResources, Upload, check_clean
from cemabench.models.mini import load_model
from cemabench.protocol import Models, Protocol, run_unit
from cemabench.registry import build_method, build_model
from cemabench_methods.common import FeatureTap, tta_augment
from cemabench_methods.cotta import symmetric_cross_entropy
from cemabench_methods.rmt import contrastive_loss, ema_update, nearest_prototypes, teacher_name
from cemabench_methods.roid import roid_normalisation
from conftest import TinyNet, cloud_resources, tiny_dataset

pytestmark = pytest.mark.usefixtures("float64")

LR, MOMENTUM = 0.01, 0.9


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _sce(a, b):
    """0.5 CE(softmax b -> a) + 0.5 CE(softmax a -> b), per row, as the released SymmetricCrossEntropy(alpha=0.5)."""
    out = []
    for ra, rb in zip(a, b):
        pa, pb = _softmax(ra), _softmax(rb)
        la, lb = [math.log(v) for v in pa], [math.log(v) for v in pb]
        out.append(-0.5 * sum(q * g for q, g in zip(pb, la)) - 0.5 * sum(q * g for q, g in zip(pa, lb)))
    return out


def _contrastive_by_hand(views, temperature):
    """SupContrast without labels, written out: rows are the views in view-major order (view 0 of every sample, then
    view 1, ...), L2-normalised; each row's positives are the other views of its sample; the denominator runs over
    every row but itself; the loss is minus the mean log-probability of the positives, averaged over all rows."""
    b, v = len(views), len(views[0])
    rows = []
    for j in range(v):
        for i in range(b):
            r = views[i][j]
            n = math.sqrt(sum(t * t for t in r))
            rows.append((i, [t / n for t in r]))
    total = 0.0
    for a, (ia, ra) in enumerate(rows):
        sims = [sum(x * y for x, y in zip(ra, rc)) / temperature for _, rc in rows]
        top = max(sims)
        logits = [s - top for s in sims]
        log_denominator = math.log(sum(math.exp(z) for k, z in enumerate(logits) if k != a))
        positives = [logits[k] - log_denominator for k, (ic, _) in enumerate(rows) if ic == ia and k != a]
        total += -sum(positives) / len(positives)
    return total / len(rows)


def test_the_symmetric_cross_entropy_is_half_each_direction():
    a, b = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], [[0.0, 1.0, 0.0], [3.0, -2.0, 0.5]]
    assert torch.allclose(symmetric_cross_entropy(torch.tensor(a), torch.tensor(b)), torch.tensor(_sce(a, b)),
                          rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("temperature", [0.1, 0.7])
def test_the_contrastive_loss_on_three_views_matches_supcontrast_written_out(temperature):
    views = [[[1.0, 0.2, -0.3], [0.9, 0.1, 0.0], [0.5, 0.5, 0.1]],
             [[-0.2, 1.0, 0.4], [0.0, 0.8, 0.6], [0.3, 0.9, -0.1]],
             [[0.1, -0.4, 1.0], [0.2, 0.1, 0.9], [-0.6, 0.2, 0.3]]]
    got = contrastive_loss(torch.tensor(views), nn.Identity(), temperature)
    assert math.isclose(float(got), _contrastive_by_hand(views, temperature), rel_tol=1e-13, abs_tol=1e-14)


def test_the_contrastive_loss_projects_before_it_normalises():
    torch.manual_seed(0)
    projector = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
    views = torch.randn(2, 3, 3)
    with torch.no_grad():
        projected = projector(views.reshape(6, 3)).reshape(2, 3, 4)
    got = contrastive_loss(views, projector, 0.1)
    assert math.isclose(float(got.detach()), _contrastive_by_hand(projected.tolist(), 0.1), rel_tol=1e-13)


def test_the_nearest_prototype_is_the_one_of_highest_cosine_similarity():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    features = torch.tensor([[5.0, 0.1], [0.2, 0.3], [-0.1, -3.0], [-2.0, 0.5]])
    expected = []
    for f in features.tolist():
        cos = [sum(a * b for a, b in zip(p, f)) / (math.hypot(*p) * math.hypot(*f)) for p in prototypes.tolist()]
        expected.append(cos.index(max(cos)))
    assert nearest_prototypes(prototypes, features).tolist() == expected == [0, 1, 2, 2]


def test_the_ema_update_moves_every_teacher_parameter_and_stops_at_momentum_one():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.999)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.999 * t0 + (1 - 0.999) * s, rtol=0, atol=1e-16)
    frozen = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))


def _clean(n=40, classes=4, size=6, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % classes
    return ArrayDomain("clean", pixels, lambda: labels)


def _trained(options, clean=None, seed=5):
    """A method with its training stage run on TinyNet and a small labelled clean split."""
    torch.manual_seed(1)
    edge = TinyNet()
    clean = clean or _clean()
    method = build_method("rmt", options)
    torch.manual_seed(seed)
    method.artefacts = method.train(TrainingResources(4, lambda: copy.deepcopy(edge), lambda: copy.deepcopy(edge),
                                                      clean))
    return method, edge, clean


def test_the_prototypes_are_each_class_mean_feature_under_the_source_model_with_batch_statistics():
    """One shuffled pass in batches of source_batch_size: the features entering fc, normalised with each batch's
    statistics, averaged per class (40 samples in batches of 16, 16 and 8)."""
    method, edge, clean = _trained({"warm_up_samples": 0, "source_batch_size": 16})
    torch.manual_seed(5)
    order = torch.randperm(40)
    model = roid_normalisation(copy.deepcopy(edge))
    images, labels = clean.images(np.arange(40)).double(), torch.as_tensor(clean.labels())
    feats = torch.cat([torch.relu(model.bn(model.conv(images[order[i:i + 16]]))).mean(dim=(2, 3))
                       for i in range(0, 40, 16)])
    seen = labels[order]
    expected = torch.stack([feats[seen == c].mean(0) for c in range(4)])
    assert torch.allclose(method.artefacts["prototypes"], expected, rtol=0, atol=1e-15)
    assert method.artefacts["source.labels"].tolist() == labels.tolist()


def test_the_warm_up_raises_the_learning_rate_linearly_and_updates_the_teacher_after_each_step():
    """Two steps (warm_up_samples 32, batch 16): the symmetric cross-entropy between student and teacher on a source
    batch, Nesterov SGD at lr/2 then lr (the second step with the first's momentum), the EMA after each."""
    method, edge, clean = _trained({"warm_up_samples": 32, "source_batch_size": 16, "lr": LR})
    torch.manual_seed(5)
    torch.randperm(40)  # the prototypes' pass
    order = torch.randperm(40)
    images = clean.images(np.arange(40)).double()
    student = roid_normalisation(copy.deepcopy(edge))
    teacher = copy.deepcopy(student)
    names = [n for n, _ in student.named_parameters()]
    buf = {}
    for step, lr in enumerate((LR / 2, LR)):
        x = images[order[16 * step:16 * step + 16]]
        s, t = student(x), teacher(x).detach()
        loss = (-0.5 * (t.softmax(1) * s.log_softmax(1)).sum(1) - 0.5 * (s.softmax(1) * t.log_softmax(1)).sum(1))
        grads = torch.autograd.grad(loss.mean(0), list(student.parameters()))
        with torch.no_grad():
            for (n, p), g in zip(student.named_parameters(), grads):
                buf[n] = g if step == 0 else MOMENTUM * buf[n] + g
                p -= lr * (g + MOMENTUM * buf[n])
            for tp, sp in zip(teacher.parameters(), student.parameters()):
                tp.copy_(0.999 * tp + 0.001 * sp)
    a = method.artefacts
    for n, p, tp in zip(names, student.parameters(), teacher.parameters()):
        assert torch.allclose(a[f"student.{n}"], p, rtol=0, atol=1e-15)
        assert torch.allclose(a[f"teacher.{n}"], tp, rtol=0, atol=1e-15)
    assert (a["student.fc.weight"] - edge.fc.weight).abs().max() > 1e-5  # the warm-up moved it
    momentum = [a[f"optimizer.{i}.momentum_buffer"] for i in range(len(names))]
    assert all(torch.allclose(m, buf[n], rtol=0, atol=1e-15) for m, n in zip(momentum, names))
    assert int(a["source.position"]) == 32 and torch.equal(a["source.order"], order)


def test_one_cloud_step_is_the_released_loss_then_nesterov_sgd_then_the_ema():
    """Self-training (0.5 SCE(x) + 0.5 SCE(augmented x), to the teacher) + contrastive (nearest prototype, features,
    augmented features, through the projector) + cross-entropy on the next source batch; one Nesterov step of the
    student and the projector (lr (1 + momentum) g from zero momentum); teacher <- 0.999 teacher + 0.001 student."""
    method, edge, clean = _trained({"warm_up_samples": 0, "source_batch_size": 8, "lr": LR})
    a = method.artefacts
    torch.manual_seed(11)
    resources_edge = copy.deepcopy(edge)
    resources = cloud_resources()
    resources.edge_replica = lambda: copy.deepcopy(resources_edge)
    torch.manual_seed(3)
    cloud = method.cloud(resources)
    projector = copy.deepcopy(cloud.projector)
    x = torch.rand(6, 3, 6, 6)

    student = roid_normalisation(copy.deepcopy(edge))
    teacher = copy.deepcopy(student)
    tap = FeatureTap(student, "rmt", "test")
    torch.manual_seed(21)
    augmented = tta_augment(x)
    assert len(a["source.order"]) == 0  # no warm-up: the replay's first epoch is drawn after the augmentation
    chosen = torch.randperm(40)[:8]
    x_src, y_src = a["source.images"][chosen], a["source.labels"][chosen]
    f, s = tap(x)
    f_aug, s_aug = tap(augmented)
    t = teacher(x).detach()
    protos = a["prototypes"]
    cos = F.normalize(f.detach(), dim=1) @ F.normalize(protos, dim=1).T
    views = torch.stack([protos[cos.argmax(1)], f, f_aug], dim=1)
    self_training = (0.5 * symmetric_cross_entropy(s, t) + 0.5 * symmetric_cross_entropy(s_aug, t)).mean()
    loss = self_training + contrastive_loss(views, projector, 0.1) + F.cross_entropy(student(x_src), y_src)
    params = list(student.parameters()) + list(projector.parameters())
    grads = torch.autograd.grad(loss, params)

    torch.manual_seed(21)
    down = cloud.step(Upload(x, {}, 0, index=torch.arange(6)))
    names = [n for n, _ in student.named_parameters()]
    assert set(down) == set(names) | {teacher_name(n) for n in names} and "fc.teacher.weight" in down
    for n, p, g, tp in zip(names, student.parameters(), grads, teacher.parameters()):
        stepped = p.detach() - LR * (1 + MOMENTUM) * g
        assert torch.allclose(down[n], stepped, rtol=0, atol=1e-15)
        assert torch.allclose(down[teacher_name(n)], 0.999 * tp + 0.001 * stepped, rtol=0, atol=1e-15)
    for p, q, g in zip(cloud.projector.parameters(), projector.parameters(), grads[len(names):]):
        assert torch.allclose(p, q - LR * (1 + MOMENTUM) * g, rtol=0, atol=1e-15)
    assert cloud.source.position == 8


def test_the_edge_predicts_the_sum_of_student_and_teacher_logits_and_takes_both_from_the_download():
    method, edge, _ = _trained({"warm_up_samples": 32, "source_batch_size": 16})
    a = method.artefacts
    logic = method.edge(4)
    model = logic.configure(copy.deepcopy(edge))
    x = torch.rand(5, 3, 6, 6)
    student = roid_normalisation(copy.deepcopy(edge))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for n, p in student.named_parameters():
            p.copy_(a[f"student.{n}"])
        for n, p in teacher.named_parameters():
            p.copy_(a[f"teacher.{n}"])
    with torch.inference_mode():
        decision = logic.step(model, x)
        assert torch.equal(decision.upload, torch.arange(5))
        assert torch.allclose(decision.logits, student(x) + teacher(x), rtol=0, atol=1e-15)
    assert not model.training and model.bn.running_mean is None
    down = {n: torch.full_like(p, 0.1) for n, p in student.named_parameters()}
    down.update({teacher_name(n): torch.full_like(p, -0.2) for n, p in student.named_parameters()})
    logic.receive(model, down)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(0.1)
        for p in teacher.parameters():
            p.fill_(-0.2)
    with torch.inference_mode():
        assert torch.allclose(logic.step(model, x).logits, student(x) + teacher(x), rtol=0, atol=1e-15)


@pytest.mark.parametrize("options, message", [
    ({"lr": 0}, "option 'lr' must be"),
    ({"temperature": 0.0}, "option 'temperature' must be"),
    ({"teacher_momentum": 1.5}, "option 'teacher_momentum' must be"),
    ({"optimizer": "rmsprop"}, "option 'optimizer' must be"),
    ({"source_samples": 0}, "option 'source_samples' must be"),
    ({"lambda_ce_src": -1.0}, "option 'lambda_ce_src' must be"),
    ({"contrast_mode": "one"}, "has no option 'contrast_mode'"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(UserError, match=message) as refused:
        build_method("rmt", options)
    assert "\n" not in str(refused.value)


def test_what_rmt_cannot_run_on_is_refused_in_one_line():
    method = build_method("rmt")
    with pytest.raises(UserError, match="rmt contrasts the features .* no nn.Linear"):
        method.check_models(nn.Conv2d(3, 3, 1), None)
    with pytest.raises(UserError, match=r"^method rmt needs the dataset's labelled clean split \(its prototypes, "
                                        r"warm-up and replay set come from it\), and the dataset has none$"):
        check_clean(method, "the dataset has none")
    labels = np.zeros(12, dtype=np.int64)
    one_class = ArrayDomain("clean", np.zeros((12, 6, 6, 3), dtype=np.uint8), lambda: labels)
    with pytest.raises(UserError, match=r"no sample of class\(es\) 1, 2, 3"):
        build_method("rmt", {"warm_up_samples": 0}).train(TrainingResources(4, TinyNet, TinyNet, one_class))
    tail = nn.Sequential(nn.Flatten(), nn.Linear(108, 4), nn.Softmax(1))
    with pytest.raises(UserError, match="rmt needs a model whose output is its last linear layer's"):
        build_method("rmt", {"warm_up_samples": 0}).train(TrainingResources(4, lambda: tail, lambda: tail,
                                                                            _clean()))


def _run(seed=0):
    torch.set_default_dtype(torch.float32)
    dataset = tiny_dataset(domains=("a", "b"), n=48, size=8)
    torch.manual_seed(0)
    models = Models.copies_of(build_model("tiny:edge@4").eval(), build_model("tiny:edge@4").eval())
    method = build_method("rmt", {"warm_up_samples": 64, "source_batch_size": 16})
    return run_unit(method, dataset.domains, models, 4, dataset.clean, Protocol(batch_size=16, setting="continual"),
                    seed=seed)


NUMBERS = ("accuracy", "upload_ratio", "bytes_up_per_sample", "bytes_down_per_sample")


def test_the_same_seed_gives_the_same_numbers_and_both_models_come_down():
    first, second = _run(), _run()
    assert [r.status for r in first] == ["ok", "ok"], first[0].message
    cells = [{k: r.to_dict()[k] for k in NUMBERS} for r in first]
    assert cells == [{k: r.to_dict()[k] for k in NUMBERS} for r in second]
    model = build_model("tiny:edge@4")
    parameters = sum(p.numel() for p in model.parameters())
    assert cells[0]["upload_ratio"] == 100.0
    assert first[0].link.bytes_down == 3 * 2 * parameters * 4  # three batches of 16, student and teacher, float32


@pytest.mark.slow  # 6 s here (machine shared); the tiny run above checks the same in the default tier
def test_the_same_seed_gives_the_same_numbers_on_the_miniature():
    """mini:edge and mini:foundation, the first 192 images of fog (three batches of 64), a warm-up of 640 samples on
    the clean training split: two runs, the same numbers."""
    torch.set_default_dtype(torch.float32)
    source = miniature.dataset(domains=["fog"])
    fog = source.domains[0]
    first = ArrayDomain("fog", fog.pixels[:192], lambda: fog.labels()[:192])
    models = Models(edge=lambda: load_model("edge"), foundation=lambda: load_model("foundation"))

    def run(name, options):
        (result,) = run_unit(build_method(name, options), [first], models, 10, source.clean,
                             Protocol(batch_size=64), seed=0)
        assert result.status == "ok", result.message
        return result

    runs = [run("rmt", {"warm_up_samples": 640}) for _ in range(2)]
    assert [{k: r.to_dict()[k] for k in NUMBERS + ("correct",)} for r in runs[:1]] == \
        [{k: r.to_dict()[k] for k in NUMBERS + ("correct",)} for r in runs[1:]]


def test_prototypes_refuse_a_clean_split_without_every_class():
    """The source prototypes need a clean sample of each class: a split that lacks some (a small generated ImageNet
    tree) is refused in one line naming them, not averaged over nothing."""
    from cemabench_methods.rmt import SourceBatches, source_prototypes

    torch.manual_seed(0)
    student = TinyNet()
    tap = FeatureTap(student, "rmt", "test")
    batches = SourceBatches(torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 0, 1, 0, 1]), 4)
    with pytest.raises(UserError, match=r"^rmt: the clean split holds no sample of class\(es\) 2, 3; its source "):
        source_prototypes(tap, batches, 4)
