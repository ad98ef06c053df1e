"""Building blocks shared by the built-in methods; third-party plugins may import them too."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from cemabench.errors import UserError
from cemabench.method import CloudLogic, EdgeDecision, EdgeLogic, Method

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy (natural log) of softmax(logits)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def entropy_threshold(fraction: float | None, num_classes: int) -> float | None:
    """A threshold given as a fraction of ln(C), the entropy of the uniform prediction."""
    return None if fraction is None else fraction * math.log(num_classes)


def entropy_weights(ent: torch.Tensor, margin: float | None) -> torch.Tensor | float:
    """EATA's sample weights exp(-(H - E0)), detached; 1 when no margin is set."""
    return 1.0 if margin is None else torch.exp(-(ent.detach() - margin))


def excludes(pattern: str, module_name: str) -> bool:
    """Whether a module-name pattern of ``exclude`` names the module (a substring; ``"norm."`` also names ``norm``)."""
    return pattern in module_name or module_name == pattern.rstrip(".")


# Why an entropy-minimising method is refused on detection (Method.task_reason): one sentence for all of them
ENTROPY_ON_CLASSES = ("it adapts by minimising the entropy of each sample's class probabilities, which a detector's "
                      "boxes do not give (no detection version of it is built)")

# The module-name patterns of the last stage, whose normalisation layers SAR's and DeYO's released code leave frozen:
# ResNet layer4, ViT-Base blocks 9-11 and the final norm (``"norm."`` also names a module called ``norm``).
LAST_STAGES = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


class FrozenPatternsMethod(Method):
    """A method whose ``Options`` name ``frozen`` module-name patterns: one given beyond :data:`LAST_STAGES` (which
    cover ResNets and ViTs at once) must name a module of the edge model, since one that names none would freeze
    nothing, silently (checked with the table's source models, before any compute)."""

    def check_models(self, edge, foundation):
        names = [name for name, _ in edge.named_modules()]
        idle = [p for p in self.options.frozen if p not in LAST_STAGES and not any(excludes(p, n) for n in names)]
        if idle:
            raise UserError(f"{self.name}: frozen pattern(s) {', '.join(map(repr, idle))} name no module of the edge "
                            f"model; its stages: {', '.join(n for n in names if n and '.' not in n)}")


def last_linear(model: nn.Module, method: str, use: str) -> nn.Linear:
    """The classifier whose input a method takes as the model's features: the model's last ``nn.Linear`` module
    (refused in one line, with what the method ``use``s them for, when there is none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{method} {use}, and {type(model).__name__} has no nn.Linear layer to take them from")
    return linears[-1]


class FeatureTap:
    """A model's forward that also returns the features entering its last linear layer (the released codes' split
    into an encoder and a linear classifier); a model whose output is not that layer's is refused."""

    def __init__(self, model: nn.Module, method: str, use: str):
        self.model, self.method, self.seen = model, method, None
        last_linear(model, method, use).register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.seen = (args[0], output)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        feats, output = self.seen
        self.seen = None
        if output is not logits:
            raise UserError(f"{self.method} needs a model whose output is its last linear layer's; "
                            f"{type(self.model).__name__} computes something after it")
        return feats, logits


def train_norm_affine_only(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[nn.Parameter]:
    """Freeze everything but the affine parameters of normalisation layers whose module name contains none of
    ``exclude`` (a pattern ``"norm."`` also excludes a module named exactly ``norm``); returns those parameters."""
    model.requires_grad_(False)
    params = []
    for name, module in model.named_modules():
        if any(excludes(pattern, name) for pattern in exclude):
            continue
        if isinstance(module, NORM_TYPES + (BatchRenorm2d,)):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
                params.append(p)
    return params


def norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state entries (affine parameters and statistics) of every normalisation layer, by state-dict name."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES + (BatchRenorm2d,)):
            for key, value in module.state_dict().items():
                state[f"{name}.{key}" if name else key] = value.detach()
    return state


def norm_affine(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the affine parameters of the normalisation layers: what Tent-style methods send down."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in norm_state(model).items() if k in names}


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Tent's normalisation: BatchNorm always normalises with the statistics of the current batch.

    Where a batch has no statistics, because a layer sees one value per channel (BatchNorm1d on a single sample,
    or a 1x1 map), that layer normalises with the source model's statistics instead, as
    mariodoebler/test-time-adaptation does for BatchNorm1d in single-sample adaptation (it puts those layers in eval
    mode); torch would refuse the batch. Nowhere else does this change what the layer computes."""
    model.train()
    for module in model.modules():
        if isinstance(module, BATCH_NORM_TYPES):
            if module.running_mean is not None and module.running_var is not None:
                # kept outside the state dict, so downloads and stored states are what they were
                module.register_buffer("source_running_mean", module.running_mean.detach().clone(), persistent=False)
                module.register_buffer("source_running_var", module.running_var.detach().clone(), persistent=False)
                module.register_forward_pre_hook(_source_statistics_for_one_value)
                module.register_forward_hook(_batch_statistics_again)
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()
    return model


def _source_statistics_for_one_value(module: nn.Module, args) -> None:
    """Before a batch-statistics BatchNorm: with one value per channel, normalise with the source statistics.
    (Hooks take the module as an argument, so that a deep copy of the model keeps hooks acting on itself.)"""
    x = args[0]
    if x.dim() >= 2 and x.numel() == x.shape[1]:
        module.training = False
        module.running_mean, module.running_var = module.source_running_mean, module.source_running_var
        module.source_statistics_used = True


def _batch_statistics_again(module: nn.Module, args, output) -> None:
    if getattr(module, "source_statistics_used", False):
        module.training = True
        module.running_mean = module.running_var = None
        module.source_statistics_used = False


def set_batch_norm_training(model: nn.Module, training: bool) -> None:
    for module in model.modules():
        if isinstance(module, BATCH_NORM_TYPES + (BatchRenorm2d,)):
            module.train(training)


class BatchRenorm2d(nn.Module):
    """Test-time batch renormalisation (TBR), as in CEMA's released code.

    The forward value is normalised with the running statistics; gradients flow through the batch statistics
    (y = (x - mu_b) / sigma_b * r + d, with r and d detached). Running statistics start from the first batch seen,
    not from the source model, and move with ``momentum`` only in training mode. Variances are unbiased, as there.

    A batch with one value per channel (a single sample on a 1x1 map) has no variance, unbiased or not: there the
    layer normalises with its running statistics (the source model's, if none were set yet), without moving them.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.eps = bn.eps
        self.momentum = 0.1 if bn.momentum is None else bn.momentum
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        channels = bn.num_features
        self.register_buffer("running_mean", torch.zeros(channels, device=bn.weight.device))
        self.register_buffer("running_var", torch.ones(channels, device=bn.weight.device))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=bn.weight.device))
        if bn.running_mean is not None and bn.running_var is not None:  # only for batches without statistics
            self.register_buffer("source_running_mean", bn.running_mean.detach().clone(), persistent=False)
            self.register_buffer("source_running_var", bn.running_var.detach().clone(), persistent=False)
        self._known_initialized = False  # host-side copy, so a forward does not sync with the device to read it

    def _is_initialized(self) -> bool:
        """Statistics, once initialised (here or by a loaded state), are never un-initialised."""
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not torch.is_grad_enabled() and self._is_initialized():
            # the renormalised value reduces to (x - mu_run) / sigma_run; without autograd, skip the batch statistics
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if x.numel() == x.shape[1] and (self._is_initialized() or hasattr(self, "source_running_mean")):
            if not self._is_initialized():
                self.running_mean.copy_(self.source_running_mean)
                self.running_var.copy_(self.source_running_var)
                self.initialized.fill_(True)
                self._known_initialized = True
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        # one fused batch-normalisation call instead of ~10 elementwise ops: with the batch's biased variance v_b and
        # n values per channel, (x - mu_b) / sqrt(v_u + eps) = sqrt((n - 1) / n) * (x - mu_b) / sqrt(v_b + eps'), where
        # eps' = eps * (n - 1) / n; the detached r and d fold into the affine weight and bias
        n = x.numel() // x.shape[1]
        with torch.no_grad():  # the statistics as before the fused call (mean, then unbiased variance): same bits
            batch_mean = x.mean(dim=(0, 2, 3))
            batch_var = (x - batch_mean[None, :, None, None]).square_().sum(dim=(0, 2, 3)) / (n - 1)
            if not self._is_initialized():
                self.running_mean.copy_(batch_mean)
                self.running_var.copy_(batch_var)
                self.initialized.fill_(True)
                self._known_initialized = True
            running_std = torch.sqrt(self.running_var + self.eps)
            r = torch.sqrt(batch_var + self.eps) / running_std
            d = (batch_mean - self.running_mean) / running_std
        y = F.batch_norm(x, None, None, self.weight * (r * math.sqrt((n - 1) / n)), self.weight * d + self.bias,
                         True, 0.0, self.eps * (n - 1) / n)
        if self.training:
            with torch.no_grad():
                self.running_mean.add_(self.momentum * (batch_mean - self.running_mean))
                self.running_var.add_(self.momentum * (batch_var - self.running_var))
        return y


def use_batch_renorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by :class:`BatchRenorm2d`; state-dict names stay the same."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, BatchRenorm2d(child))
    return model


class RedundancyFilter:
    """EATA's diversity filter: keep samples whose probabilities are not too similar to a running mean.

    The running mean starts as the mean of the first non-empty set of candidates (all kept), then moves as an EMA
    (0.9 / 0.1) of the mean probabilities of the kept samples.
    """

    def __init__(self, margin: float | None, momentum: float = 0.9):
        self.margin, self.momentum = margin, momentum
        self.mean_probs: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Indices (into ``logits``) of the samples to keep."""
        keep = torch.arange(len(logits), device=logits.device)
        if self.margin is None:
            return keep
        probs = logits.softmax(-1)
        if self.mean_probs is not None:
            cosine = F.cosine_similarity(self.mean_probs[None], probs, dim=1)
            keep = torch.where(cosine.abs() < self.margin)[0]
        if len(keep):
            new = probs[keep].mean(0)
            self.mean_probs = (new if self.mean_probs is None
                               else self.momentum * self.mean_probs + (1 - self.momentum) * new)
        return keep


def sgd(params, lr: float, momentum: float, nesterov: bool = False) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)


class BatchStatisticsEdge(EdgeLogic):
    """Edge half of Tent-style methods: predicts with batch statistics, uploads what ``select`` keeps."""

    def configure(self, model: nn.Module) -> nn.Module:
        return use_batch_statistics(model)

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(logits), device=logits.device)

    def step(self, model, x):
        logits = model(x)
        return EdgeDecision(logits=logits, upload=self.select(logits))


class ReplicaCloud(CloudLogic):
    """Cloud half of Tent-style methods: one SGD step on a batch-statistics replica of the edge per non-empty
    upload, then the replica's normalisation affine parameters go down."""

    def __init__(self, replica: nn.Module, lr: float, momentum: float, nesterov: bool = False,
                 exclude: tuple[str, ...] = ()):
        self.model = use_batch_statistics(replica)
        self.params = train_norm_affine_only(self.model, exclude)
        if not self.params:
            raise UserError(f"the edge model has no trainable normalisation parameters left (excluded module-name "
                            f"patterns: {', '.join(exclude) or 'none'}); adapt another layer set or another model")
        self.optimizer = sgd(self.params, lr, momentum, nesterov)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, upload):
        if len(upload.samples) == 0:
            return None
        loss = self.loss(self.model(upload.samples))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return norm_affine(self.model)


def colour_jitter(x: torch.Tensor) -> torch.Tensor:
    """The released ColorJitterPro: brightness [0.6, 1.4], contrast [0.7, 1.3], saturation [0.5, 1.5], hue [-0.06,
    0.06] and gamma [0.7, 1.3], in the order of one torch.randperm(5), each factor drawn when its turn comes, gamma
    after clamping to [1e-8, 1]; torchvision's (v1) functional adjustments, as released (v2's hue differs by ~1e-6)."""
    steps = ((TF.adjust_brightness, 0.6, 1.4), (TF.adjust_contrast, 0.7, 1.3), (TF.adjust_saturation, 0.5, 1.5),
             (TF.adjust_hue, -0.06, 0.06), (TF.adjust_gamma, 0.7, 1.3))
    for index in torch.randperm(5).tolist():
        adjust, low, high = steps[index]
        factor = torch.tensor(1.0).uniform_(low, high).item()
        x = adjust(x.clamp(1e-8, 1.0) if adjust is TF.adjust_gamma else x, factor)
    return x


def tta_augment(x: torch.Tensor, noise_std: float = 0.005) -> torch.Tensor:
    """CoTTA's test-time augmentation (qinenergy/cotta's ``get_tta_transforms``, ImageNet's; RoTTA's student
    augmentation and RMT's are the same): clip to [0, 1], colour jitter, edge
    padding by half the side, a random affine map (rotation up to 15 degrees, translation up to 1/16, scale 0.9 to
    1.1, bilinear), a 5 x 5 Gaussian blur (sigma 0.001 to 0.5), the centre crop back to size, a horizontal flip with
    probability 0.5, Gaussian noise (std 0.005) and a clip; one draw per call, for the whole batch."""
    side = x.shape[-1]
    pipeline = T.Compose([T.Pad(side // 2, padding_mode="edge"),
                          T.RandomAffine(degrees=(-15, 15), translate=(1 / 16, 1 / 16), scale=(0.9, 1.1),
                                         interpolation=T.InterpolationMode.BILINEAR),
                          T.GaussianBlur(kernel_size=5, sigma=(0.001, 0.5)), T.CenterCrop(side),
                          T.RandomHorizontalFlip(0.5)])
    x = pipeline(colour_jitter(x.clamp(0.0, 1.0)))
    return (x + torch.randn(x.shape).to(x.device) * noise_std).clamp(0.0, 1.0)
