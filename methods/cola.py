"""CoLA (Chen et al., NeurIPS 2024) on cloud-edge: devices share knowledge vectors, the normalisation layers'
affine parameters each adapted device saved, through the cloud; principal devices adapt by backpropagation (in the
cloud), followers fuse the shared vectors forward-only."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from cemabench.errors import UserError
from cemabench.method import CloudEdgeMapping, CloudLogic, EdgeDecision, EdgeLogic, Method, option
from cemabench_methods.common import (
    ENTROPY_ON_CLASSES,
    BatchStatisticsEdge,
    RedundancyFilter,
    entropy,
    entropy_threshold,
    use_batch_statistics,
)
from cemabench_methods.rdumb import released_weighted_entropy

STATISTICS_BATCH = 64  # the released code neither updates nor tests the domain statistics on a smaller batch
ALPHA_CLIP = 10.0  # Eq. (8)'s new alpha is clipped to [-10, 10]
DISTANCE_FLOOR = 1e-4  # the followers' alpha: 1 / (distance + 1e-4) / temperature
# what a follower's download names, after the edge model's module paths: the vectors' affine parameters per norm
# layer, and their domains' embedding statistics under the module that computes the embedding
WEIGHT, BIAS, MEAN, VAR = "knowledge_weight", "knowledge_bias", "knowledge_mean", "knowledge_var"


def _is_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "norm_pre"))


def fusable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The normalisation layers CoLA fuses: every LayerNorm (the released code's, on a ViT) and, on a CNN, every
    affine BatchNorm2d, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)) and getattr(m, "weight", None) is not None]


def embedding_module(model: nn.Module) -> str:
    """The path of the module whose output is the embedding the domain statistics are taken of: a timm ViT's
    ``patch_embed`` (then its position embedding and ``norm_pre``, as released), or a CNN's first convolution."""
    if _is_vit(model):
        return "patch_embed"
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise UserError(f"cola takes its domain statistics from a timm ViT's patch embedding or a CNN's first "
                    f"convolution, and {type(model).__name__} has neither")


def embedding(model: nn.Module, x: torch.Tensor, path: str) -> torch.Tensor:
    """The embedding of a batch as tokens (n, tokens, channels): on a ViT the patch tokens after the position
    embedding and ``norm_pre``, the class token left out (the released ``forward_embedding``); on a CNN the first
    convolution's output, one token per position. Neither depends on the fused normalisation parameters."""
    if _is_vit(model):
        return model.norm_pre(model._pos_embed(model.patch_embed(x)))[:, 1:]
    features = model.get_submodule(path)(x)
    return features.flatten(2).transpose(1, 2)


def statistics(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (unbiased variance, mean) over the batch and its tokens."""
    return tokens.var(dim=(0, 1)), tokens.mean(dim=(0, 1))


def domain_shift(var1: torch.Tensor, mean1: torch.Tensor, var2: torch.Tensor, mean2: torch.Tensor) -> torch.Tensor:
    """Eq. (4): the symmetric KL divergence of two diagonal Gaussians, averaged over channels, as released:
    mean((v1 + d^2) / 2 v2 - 1/2 + (v2 + d^2) / 2 v1 - 1/2), d = m1 - m2."""
    square = (mean1 - mean2) ** 2
    d1 = (var1 + square) / 2. / var2 - 0.5
    d2 = (var2 + square) / 2. / var1 - 0.5
    return torch.mean(d1 + d2)


class DomainStatistics:
    """The running domain statistics of the embedding: the first batch's, then an EMA 0.8 / 0.2; batches below 64
    samples are ignored."""

    def __init__(self):
        self.var = self.mean = None

    def shifted(self, tokens: torch.Tensor, threshold: float) -> bool:
        """Whether this batch's statistics lie further than ``threshold`` from the running ones (Eq. 4)."""
        if tokens.shape[0] < STATISTICS_BATCH or self.var is None:
            return False
        var, mean = statistics(tokens)
        return bool(domain_shift(self.var, self.mean, var, mean) > threshold)

    def update(self, tokens: torch.Tensor) -> None:
        if tokens.shape[0] < STATISTICS_BATCH:
            return
        var, mean = statistics(tokens)
        if self.var is None:
            self.var, self.mean = var, mean
        else:
            self.var, self.mean = 0.8 * self.var + 0.2 * var, 0.8 * self.mean + 0.2 * mean

    def reset(self) -> None:
        self.var = self.mean = None


class FuseNorm(nn.Module):
    """A normalisation layer whose affine parameters are fused from a bank of knowledge vectors: origin +
    sum_i softmax(alpha * alpha_scale)_i * v_i (+ epsilon), each v_i relative to the origin (the first vector).
    ``fusion`` holds ``alpha`` and ``alpha_scale``, shared by every layer of a model. Normalises as the layer it
    replaces: LayerNorm over its shape, BatchNorm2d with the batch's statistics (as the base adaptation does).
    ``offsets``: the trainable epsilon of the principals; a follower has none. A layer with no vector yet is the
    source layer."""

    def __init__(self, norm: nn.Module, fusion, offsets: bool, vectors: bool = True):
        super().__init__()
        self.layer = isinstance(norm, nn.LayerNorm)
        self.normalized_shape, self.eps = (norm.normalized_shape if self.layer else None), norm.eps
        self.fusion = fusion
        self.origin_weight, self.origin_bias = norm.weight.detach().clone(), norm.bias.detach().clone()
        self.weights = self.biases = None  # (vectors, channels), relative to the origin
        if vectors:  # the source is vector 0
            self.weights = torch.zeros_like(self.origin_weight)[None]
            self.biases = torch.zeros_like(self.origin_bias)[None]
        self.epsilon_weight = nn.Parameter(torch.zeros_like(self.origin_weight)) if offsets else None
        self.epsilon_bias = nn.Parameter(torch.zeros_like(self.origin_bias)) if offsets else None
        # a batch with one value per channel has no statistics: the source's, as use_batch_statistics does
        self.source_statistics = (getattr(norm, "source_running_mean", None), getattr(norm, "source_running_var", None))

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weights is None:
            return self.origin_weight, self.origin_bias
        share = F.softmax(self.fusion.alpha * self.fusion.alpha_scale, dim=0).view(-1, 1)
        weight = self.origin_weight + (self.weights * share).sum(0)
        bias = self.origin_bias + (self.biases * share).sum(0)
        if self.epsilon_weight is not None:
            weight, bias = weight + self.epsilon_weight, bias + self.epsilon_bias
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fused()
        if self.layer:
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        mean, var = self.source_statistics
        if x.dim() >= 2 and x.numel() == x.shape[1] and mean is not None and var is not None:
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)

    @torch.no_grad()
    def append(self, weights: torch.Tensor, biases: torch.Tensor) -> None:
        """Add vectors given as absolute affine parameters (rows); the first ever becomes the origin."""
        if self.weights is None:
            self.origin_weight, self.origin_bias = weights[0].clone(), biases[0].clone()
            self.weights, self.biases = weights - self.origin_weight, biases - self.origin_bias
            return
        self.weights = torch.cat([self.weights, weights - self.origin_weight])
        self.biases = torch.cat([self.biases, biases - self.origin_bias])

    @torch.no_grad()
    def remove(self, index: int) -> None:
        keep = [i for i in range(len(self.weights)) if i != index]
        self.weights, self.biases = self.weights[keep], self.biases[keep]

    @torch.no_grad()
    def offset(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Move epsilon so that the fused parameters are again ``weight``, ``bias`` (what they were before the bank
        or alpha changed)."""
        new_weight, new_bias = self.fused()
        self.epsilon_weight += weight - new_weight
        self.epsilon_bias += bias - new_bias


def fuse(model: nn.Module, fusion, offsets: bool, vectors: bool = True) -> list[tuple[str, FuseNorm]]:
    """Replace every fusable normalisation layer of ``model`` by a :class:`FuseNorm`; returns them by path."""
    layers = []
    for name, norm in fusable(model):
        layer = FuseNorm(norm, fusion, offsets, vectors)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        layers.append((name, layer))
    if not layers:
        raise UserError(f"cola fuses the affine parameters of LayerNorm or BatchNorm2d layers, and "
                        f"{type(model).__name__} has none")
    return layers


class CoLAReplica:
    """One backprop-based device as released (``CoLAViT`` wrapping the model, ``eta-cola``): its bank of vectors,
    alpha and alpha_scale (AdamW, its state cleared after every step, no step while the bank holds one vector),
    epsilon (SGD), the shift detector, and ETA's step on each batch. ``saved`` lists every vector it saved, with the
    domain statistics at the time (the released ``save_file``): what followers receive."""

    def __init__(self, model: nn.Module, options, margin: float):
        self.model, self.options, self.margin = model, options, margin
        self.path = embedding_module(model)
        reference = next(m for _, m in fusable(model)).weight
        self.fusion = SimpleNamespace(alpha=nn.Parameter(torch.randn(1, dtype=reference.dtype).to(reference.device)),
                                      alpha_scale=nn.Parameter(torch.ones(1, dtype=reference.dtype,
                                                                          device=reference.device)))
        model.requires_grad_(False)
        self.layers = fuse(model, self.fusion, offsets=True)
        self.count = 1  # vectors in the bank (the released weight_nums)
        self.share_from = 1  # the first vector the next exchange shares (the released share_idx)
        self.domain = DomainStatistics()
        self.domain_infos: list = []
        self.saved: list = []
        self.iteration = 0
        self.redundancy = RedundancyFilter(options.redundancy_margin)
        epsilons = [m.epsilon_weight for _, m in self.layers] + [m.epsilon_bias for _, m in self.layers]
        self.eps_optimizer = torch.optim.SGD(epsilons, lr=options.lr, momentum=options.momentum, weight_decay=0.)
        self.alpha_optimizer = self._alpha_optimizer()

    def _alpha_optimizer(self) -> torch.optim.AdamW:
        o = self.options
        return torch.optim.AdamW([{"params": [self.fusion.alpha], "lr": o.alpha_lr, "weight_decay": o.alpha_decay},
                                  {"params": [self.fusion.alpha_scale], "lr": o.alpha_lr}])

    def fused(self) -> dict[str, torch.Tensor]:
        """Every fused layer's affine parameters, by the edge model's state names."""
        out = {}
        with torch.no_grad():
            for name, m in self.layers:
                weight, bias = m.fused()
                out[f"{name}.weight"], out[f"{name}.bias"] = weight.detach().clone(), bias.detach().clone()
        return out

    def _scale_factor(self) -> float:
        largest = max(max(m.epsilon_weight.abs().mean().item() for _, m in self.layers),
                      max(m.epsilon_bias.abs().mean().item() for _, m in self.layers))
        return largest / self.options.weight_margin

    def _rebank(self, change, alpha: torch.Tensor) -> None:
        """Change every layer's bank (``change(layer)``) and set alpha, epsilon moved so that no fused parameter
        changes."""
        before = [m.fused() for _, m in self.layers]
        for _, m in self.layers:
            change(m)
        self.fusion.alpha = nn.Parameter(alpha)
        for (_, m), (weight, bias) in zip(self.layers, before):
            m.offset(weight, bias)

    @torch.no_grad()
    def save(self) -> None:
        """Save the current fused parameters as a new vector (the released ``save_current_weight``), its alpha from
        Eq. (8), then forget the domain statistics."""
        o, alpha, scale = self.options, self.fusion.alpha, self.fusion.alpha_scale
        if o.auto_remove and self.count > o.max_vectors:
            index = int(torch.argmin(alpha[1:] * scale)) + 1  # never the source
            self.count -= 1
            self._rebank(lambda m: m.remove(index), torch.cat([alpha.data[:index], alpha.data[index + 1:]]))
            alpha = self.fusion.alpha
        self.count += 1
        factor = self._scale_factor()
        candidate = -math.inf
        if factor > 1:
            candidate = torch.log(torch.exp(alpha * scale).sum() * (factor - 1))  # Eq. (8)
        candidate = torch.as_tensor(candidate, dtype=alpha.dtype, device=alpha.device).reshape(1)
        new = (torch.max(torch.max(alpha * scale), candidate) / scale).clip(-ALPHA_CLIP, ALPHA_CLIP)
        fused = [m.fused() for _, m in self.layers]
        self._rebank(lambda m: m.append(*(t[None] for t in fused[self._index(m)])), torch.cat([alpha, new]))
        self.saved.append(([tuple(t.detach().clone() for t in m.fused()) for _, m in self.layers],
                           self.domain.var, self.domain.mean))
        self.domain_infos.append((self.domain.var, self.domain.mean))
        self.domain.reset()
        self.alpha_optimizer = self._alpha_optimizer()

    def _index(self, layer: FuseNorm) -> int:
        return next(i for i, (_, m) in enumerate(self.layers) if m is layer)

    @torch.no_grad()
    def share(self) -> list:
        """The vectors an exchange shares (the released ``get_weights_for_share``): those from ``share_from`` on, as
        absolute parameters, and the current fused ones."""
        vectors = [[(m.origin_weight + m.weights[i], m.origin_bias + m.biases[i]) for _, m in self.layers]
                   for i in range(self.share_from, self.count)]
        vectors.append([tuple(t.detach().clone() for t in m.fused()) for _, m in self.layers])
        self.share_from = self.count + 2
        return vectors

    @torch.no_grad()
    def add(self, vectors: list) -> None:
        """Take the other devices' vectors (the released ``add_weights``): random new alphas, epsilon moved to keep
        the fused parameters, then the current parameters saved as a vector."""
        if not vectors:
            return
        self.count += len(vectors)
        self.share_from += len(vectors)
        alpha = self.fusion.alpha
        new = torch.randn(len(vectors), dtype=alpha.dtype).to(alpha.device)

        def extend(m: FuseNorm) -> None:
            i = self._index(m)
            m.append(torch.stack([v[i][0] for v in vectors]), torch.stack([v[i][1] for v in vectors]))

        self._rebank(extend, torch.cat([alpha, new]))
        self.save()

    def step(self, x: torch.Tensor) -> bool:
        """The released ``eta-cola`` step on one batch: shift test (and save) on the batch's embedding, the forward,
        the statistics update, ETA's filters and loss, then AdamW on alpha (with more than one vector) and SGD on
        epsilon where any sample was kept. Returns whether the parameters moved."""
        o = self.options
        with torch.no_grad():
            tokens = embedding(self.model, x, self.path)
        if o.detect_shifts and self.domain.shifted(tokens, o.shift_threshold):
            self.save()
        logits = self.model(x)
        self.domain.update(tokens)
        if not o.detect_shifts:
            self.iteration += 1
            if self.iteration == o.save_every:
                self.save()
                self.iteration = 0
        ent = entropy(logits)
        reliable = torch.where(ent < self.margin)[0]
        keep = reliable[self.redundancy(logits[reliable].detach())]
        self.logits = logits.detach()
        stepped = len(keep) > 0
        if stepped:
            released_weighted_entropy(ent[keep], self.margin).backward()
            if self.count > 1:
                self.alpha_optimizer.step()
            self.eps_optimizer.step()
        self.alpha_optimizer.zero_grad()
        self.eps_optimizer.zero_grad()
        self.alpha_optimizer.state.clear()
        return stepped


class FollowerState:
    """A forward-only device's fusion (the released ``fp_agent_mode_on``): alpha_i = 1 / (D_i + 1e-4) / T from the
    distance D_i (Eq. 4) of its running domain statistics to vector i's, computed after each batch for the next."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.alpha, self.alpha_scale = None, None
        self.domain = DomainStatistics()
        self.vars: list[torch.Tensor] = []
        self.means: list[torch.Tensor] = []

    def update_alpha(self) -> None:
        if self.domain.mean is None or not self.means:
            return
        close = [1 / (domain_shift(self.domain.var, self.domain.mean, v, m) + DISTANCE_FLOOR)
                 for v, m in zip(self.vars, self.means)]
        self.alpha = torch.stack(close) / self.temperature


class _FollowerEdge(EdgeLogic):
    """A follower edge: predicts with the fused parameters (the source's until vectors arrive), then updates its
    domain statistics and alpha; uploads nothing. Its bank grows only by what the cloud sends down."""

    def __init__(self, temperature: float):
        self.state = FollowerState(temperature)

    def configure(self, model):
        model = use_batch_statistics(model)
        self.path = embedding_module(model)
        self.layers = fuse(model, self.state, offsets=False, vectors=False)
        return model

    def step(self, model, x):
        logits = model(x)
        self.state.domain.update(embedding(model, x, self.path))
        self.state.update_alpha()
        return EdgeDecision(logits=logits)

    def receive(self, model, download):
        known = {f"{name}.{word}" for name, _ in self.layers for word in (WEIGHT, BIAS)}
        known |= {f"{self.path}.{MEAN}", f"{self.path}.{VAR}"}
        unknown = sorted(set(download) - known)
        if unknown:
            raise KeyError(f"the download names what a cola follower does not hold: {', '.join(unknown[:5])}")
        for name, layer in self.layers:
            layer.append(download[f"{name}.{WEIGHT}"], download[f"{name}.{BIAS}"])
        state = self.state
        state.vars += list(download[f"{self.path}.{VAR}"])
        state.means += list(download[f"{self.path}.{MEAN}"])
        reference = download[f"{self.path}.{MEAN}"]
        state.alpha_scale = torch.ones(1, dtype=reference.dtype, device=reference.device)
        if state.domain.mean is None:  # as the released follower starts: random alpha until statistics exist
            state.alpha = torch.randn(len(state.means), dtype=reference.dtype).to(reference.device) / len(state.means)
        else:
            state.update_alpha()


class _CoLACloud(CloudLogic):
    """The shared cloud: one replica per principal device, which adapts it on that device's uploads and sends its
    fused parameters down (whenever they moved: a step, or an exchange's rounding); every ``exchange_every``
    batches, once every principal has taken that batch, the principals exchange their vectors (the released
    Community, in the cloud: nothing crosses the link for it); each follower receives, on its own call, the vectors
    saved since its last download that carry domain statistics, with those statistics."""

    def __init__(self, resources, options, principals: int, margin: float):
        self.options = options
        self.replicas = [CoLAReplica(use_batch_statistics(resources.edge_replica()), options, margin)
                         for _ in range(principals)]
        self.moved = [False] * principals
        self.done = [-1] * principals  # the last batch each principal took
        self.exchanged = -1
        self.pool: list = []  # every vector a principal saved, in the order saved
        self.sent: dict[int, int] = {}  # follower -> how many of the pool it has

    def _collect(self) -> None:
        for replica in self.replicas:
            self.pool += [entry for entry in replica.saved if entry[1] is not None]
            replica.saved = []

    def step(self, upload):
        device = upload.device
        if device < len(self.replicas):
            replica = self.replicas[device]
            if len(upload.samples):
                self.moved[device] = replica.step(upload.samples) or self.moved[device]
            self.done[device] = upload.batch_index
            batch = min(self.done)
            every = self.options.exchange_every
            if len(self.replicas) > 1 and batch > self.exchanged and (batch + 1) % every == 0:
                self.exchanged = batch
                shared = [r.share() for r in self.replicas]
                for i, r in enumerate(self.replicas):
                    r.add([v for j, vectors in enumerate(shared) if j != i for v in vectors])
                self.moved = [True] * len(self.replicas)
            self._collect()
            if not self.moved[device]:
                return None
            self.moved[device] = False
            return replica.fused()
        self._collect()
        have = self.sent.get(device, 0)
        new = self.pool[have:]
        if not new:
            return None
        self.sent[device] = len(self.pool)
        down = {}  # the pool is empty without principals
        for i, (name, _) in enumerate(self.replicas[0].layers):
            down[f"{name}.{WEIGHT}"] = torch.stack([entry[0][i][0] for entry in new])
            down[f"{name}.{BIAS}"] = torch.stack([entry[0][i][1] for entry in new])
        path = self.replicas[0].path
        down[f"{path}.{VAR}"] = torch.stack([entry[1] for entry in new])
        down[f"{path}.{MEAN}"] = torch.stack([entry[2] for entry in new])
        return down


class _ClassOrInstance:
    """A method that receives the class when called on the class and the object when called on an object."""

    def __init__(self, function):
        self.function = function

    def __get__(self, obj, cls):
        return functools.partial(self.function, cls if obj is None else obj)


class CoLA(Method):
    """CoLA, following the released code (Cascol-Chen/COLA at 72f0e40d456082e1c4e9d07e89df00ce7e23a8b0,
    ``tta_library/cola.py``, ``main_bp_collaboration.py`` with ``agents/community.py``, ``main_fp_agents.py``).

    The mechanism (``CoLAViT``, ``FuseLayerNorm``): every normalisation layer's affine parameters are fused from a
    bank of knowledge vectors, origin + sum_i softmax(alpha * alpha_scale)_i v_i + epsilon. A backprop-based
    (principal) device starts from the source (one vector, alpha ~ N(0, 1)), and adapts alpha and alpha_scale with
    AdamW (lr 0.1, weight decay 0.1 on alpha, AdamW's 0.01 on the scale; the state cleared after every step, no step
    while the bank has one vector) and epsilon with SGD (lr 0.001, momentum 0.9) on ETA's loss (entropy below
    0.4 ln C, redundancy |cos| < 0.05, weights 1 / exp(H - E0)): the released ``eta-cola``. Before each batch's
    forward it compares the batch's embedding statistics with its running domain statistics (first batch, then EMA
    0.8 / 0.2; batches under 64 samples ignored) by Eq. (4); beyond 0.1 it saves the current fused parameters as a
    new vector whose alpha comes from Eq. (8) (weight margin 0.01), clipped to [-10, 10], epsilon moved so that the
    fused parameters stay, and forgets the statistics. Principals exchange their vectors as the released
    ``Community`` does: each shares its vectors from its share index on plus its current parameters, takes the
    others' with random alphas, and saves its current ones. A forward-only (follower) device fuses the vectors it
    received with alpha_i = 1 / (D_i + 1e-4) / 5, D_i the Eq. (4) distance of its running statistics to vector
    i's, computed after each batch for the next (the released ``fp_agent_mode_on``).

    The released code is ViT-only: it fuses every LayerNorm, and its embedding is the patch tokens after the
    position embedding and ``norm_pre``, class token left out; on a timm ViT this port does exactly that. On a CNN it
    fuses every affine BatchNorm2d (normalising with the batch's statistics, as ETA does) and takes the statistics of
    the first convolution's output, the patch embedding's counterpart: like it, a layer before any fused parameter,
    so the detector sees the data, not the adaptation.

    Cloud-edge mapping (``cloud_replicas = "shared"``; ``principals`` = the first devices, all of them by default as
    in the released bp collaboration, the rest followers). A principal's edge uploads every sample (the shift test
    and ETA's batch step need the whole batch); the cloud runs the released step on that device's replica and sends
    the fused affine parameters down (after a step; after an exchange, to carry its rounding). Exchanges happen
    every ``exchange_every`` batches, once every principal has taken that batch (the released code exchanges after
    each group of 3 or 4 ImageNet-C corruptions, 782 batches of 64 each; the default is one corruption's batches), in
    the cloud, where the replicas are: nothing crosses for them. A follower uploads nothing; on its own call the
    cloud sends it the vectors saved since its last download (each vector's affine parameters per layer, and its
    domain's variance and mean), charged on its link, and its edge fuses them forward-only. The pool is every vector
    a principal saved (the released bp run writes each to a file; the fp run loads the files), in the order saved;
    a vector saved with no statistics (no batch of 64 since the last save) is not sent: the released follower
    cannot use one.

    Where this port differs: E0 is 0.4 ln C (the released code fixes ln 1000). The released follower loads its bank
    once; here it grows as vectors arrive: alpha is recomputed from the running statistics when they do (random,
    N(0, 1) / K as released at the start, while there are none). Devices step in lockstep, so the principals adapt
    side by side instead of one after the other between exchanges.
    """

    name = "cola"
    task_reason = ENTROPY_ON_CLASSES
    paper = "Chen et al., NeurIPS 2024"
    cloud_replicas = "shared"
    mapping = CloudEdgeMapping(
        selection="none",
        uploads="principals: every sample; followers: nothing",
        cloud="per principal: fused-norm ETA step with shift-triggered knowledge vectors; principals exchange "
              "vectors in the cloud",
        download="principals: fused norm affine; followers: new knowledge vectors + their domain statistics")

    @dataclass
    class Options:
        principals: int | None = option(None, low=0)  # devices 0 .. principals - 1 backprop; None: every device
        exchange_every: int = option(782, low=1)  # batches between the principals' exchanges
        weight_margin: float = option(0.01, low=0, above=True)  # w_m in Eq. (8)
        shift_threshold: float = option(0.1, low=0)
        detect_shifts: bool = True  # False: save a vector every save_every batches instead
        save_every: int = option(100, low=1)
        auto_remove: bool = False  # drop the vector of least alpha beyond max_vectors (single-domain TTA)
        max_vectors: int = option(32, low=1)
        fp_temperature: float = option(5.0, low=0, above=True)
        entropy_margin: float = option(0.4, low=0, high=1)  # E0, a fraction of ln C
        redundancy_margin: float | None = option(0.05, low=0)
        lr: float = option(0.001, low=0, above=True, high=1)  # epsilon's SGD
        momentum: float = option(0.9, low=0, high=1, below=True)
        alpha_lr: float = option(0.1, low=0, above=True, high=10)
        alpha_decay: float = option(0.1, low=0, high=1)

    @_ClassOrInstance
    def check_protocol(self, protocol):  # noqa: N805 - the class, where a table's plan calls it
        """The base checks; on a built method (its options known) also that ``principals`` names devices the
        protocol has. A table's plan calls this on the class, a unit on the method it runs, before any compute."""
        Method.check_protocol.__func__(self, protocol)
        principals = self.options.principals if isinstance(self, Method) else None
        if principals is not None and principals > protocol.devices:
            raise UserError(f"method cola: option 'principals' must be at most the protocol's devices "
                            f"({protocol.devices}), got {principals}")

    def check_models(self, edge, foundation):
        embedding_module(edge)
        if not fusable(edge):
            raise UserError(f"cola fuses the affine parameters of LayerNorm or BatchNorm2d layers, and "
                            f"{type(edge).__name__} has none")

    def _principals(self) -> int:
        devices = self.protocol.devices if self.protocol is not None else 1
        return devices if self.options.principals is None else min(self.options.principals, devices)

    def edge(self, num_classes):
        return self.edge_for(num_classes, 0)

    def edge_for(self, num_classes, device):
        if device < self._principals():
            return BatchStatisticsEdge()
        return _FollowerEdge(self.options.fp_temperature)

    def cloud(self, resources):
        return _CoLACloud(resources, self.options, self._principals(),
                          entropy_threshold(self.options.entropy_margin, resources.num_classes))
