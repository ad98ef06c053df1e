"""CMF (Lee et al., ICLR 2024) on cloud-edge: ROID's edge and loss; the cloud replaces ROID's weight ensembling by
continual momentum filtering, a Kalman filter over the parameters whose hidden state is pulled to the source."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cemabench.method import option
from cemabench_methods.roid import ROID, WeightedLossMethod, WeightedLossOptions, _ROIDCloud

REFERENCE_PARAMETERS = 38400  # the released q is Q x (trainable parameters / 38,400)
BETA_FLOOR, BETA_ONE = 0.89, 0.9999  # the released clipping of the Kalman gain's complement


def kalman_beta(variance: float, q: float, alpha: float) -> tuple[float, float]:
    """One released step of the filter's variance: the predicted variance alpha^2 v + q, the complement of the gain
    beta = r / (v' + r) with r = 1 - q, clipped below at 0.89 and set to 1 from 0.9999 up; returns beta and the
    updated variance beta v'."""
    predicted = alpha ** 2 * variance + q
    r = 1 - q
    beta = r / (predicted + r)
    beta = beta if beta > BETA_FLOOR else BETA_FLOOR
    beta = beta if beta < BETA_ONE else 1.0
    return beta, beta * predicted


class _CMFCloud(_ROIDCloud):
    """ROID's step on the replica, then the filter: the hidden parameters (the source's at first) are predicted
    towards the source (alpha), updated towards the trained parameters (beta, from the filter's variance), and the
    trained parameters move towards the hidden ones (gamma)."""

    def __init__(self, options, resources, loss_batch_size):
        super().__init__(options, resources, loss_batch_size)
        self.hidden = {name: value.clone() for name, value in self.source.items()}
        self.q = options.q * (sum(p.numel() for p in self.params) / REFERENCE_PARAMETERS)  # as released: Q x ratio
        self.variance, self.beta = 0.0, None

    def merge(self):
        o = self.options
        for name in self.hidden:  # 1. predict: the hidden parameters drift back to the source
            self.blend(self.hidden[name], self.source[name], o.alpha)
        predicted = {name: value.clone() for name, value in self.hidden.items()} if o.ensemble_with == "prior" else None
        self.beta, self.variance = kalman_beta(self.variance, self.q, o.alpha)
        for name, p in self.trained:  # 2. update: towards the observed (trained) parameters
            self.blend(self.hidden[name], p, self.beta)
        target = predicted or self.hidden
        for name, p in self.trained:  # 3. ensemble the trained parameters with the filter's estimate
            self.blend(p, target[name], o.gamma)


class CMF(WeightedLossMethod):
    """CMF, following the official code (j-pong/CMF at 7edc1d73ef33e5d3053debe5b51031a2b3ef0814: ``methods/cmf.py``,
    ``methods/base.py``, ``augmentations/transforms_cotta.py``, the defaults of ``conf.py`` and
    ``cfgs/imagenet_c/cmf.yaml``).

    The loss, the optimiser, the prior correction and the model's configuration are ROID's (:class:`ROID`, with the
    same defaults: SGD lr 0.00025, momentum 0.9, Nesterov on ImageNet-C). ROID's weight ensembling with the source
    is replaced by the filter, after every step, on the trained (normalisation affine) parameters theta: the hidden
    parameters h (the source's at first) are predicted h <- alpha h + (1 - alpha) theta_source (alpha 0.99), the
    variance v <- alpha^2 v + q with q = Q x (trainable parameters / 38,400), Q = 0.005 (v starts at 0); the gain's
    complement beta = (1 - q) / (v + 1 - q), clipped below at 0.89 and set to 1 from 0.9999 up; the update
    h <- beta h + (1 - beta) theta, v <- beta v; then theta <- gamma theta + (1 - gamma) h (gamma 0.99).

    Where the official code and this port differ: j-pong/CMF runs the model in float16 (``model.half()``, the inputs
    too), the filter's sums in float32 rounded back to float16; here everything runs at the harness's precision. Its
    augmentation hard-codes a side of 224 pixels (padding 112, crop 224), here the input's side, which is the same on
    ImageNet-C. Its filter also moves the hidden copies of the frozen parameters (``update_all``), where source,
    hidden and trained copies are equal and only their last bits move; only the trained parameters' hidden copies
    are kept here, and the frozen ones never reach the trained model there either. As for ROID, BatchNorm3d is
    adapted too and a batch of one sample is refused.
    ``ensemble_with``: the official ``TYPE`` is ``"lp"`` (ensemble with the updated hidden parameters, the default
    here ``"posterior"``) or ``"op"`` (meant to ensemble with the predicted ones, before the update); in the
    official code both name the same model object, which the update step has already changed, so ``"op"`` computes
    what ``"lp"`` does; ``ensemble_with = "prior"`` is the predicted hidden parameters, as "op" is described there.
    mariodoebler/test-time-adaptation (at 8b2ed63, ``classification/methods/cmf.py``) ports it in the model's own
    precision, with the augmentation's side from the model's preprocessing and the loss options read from its ROID
    section. Side by side in float64 (the miniature, mini:edge, batch 64, 12 batches on each of three corruptions, the
    official code with its float16/float32 casts and its 224-pixel side patched out): 0 difference from either in
    the scored output, the trained and hidden parameters, the momentum buffers, the running class probabilities and
    the filter's variance and gain.

    Cloud-edge mapping: as ROID's. The filter's state (hidden parameters, variance) lives in the cloud with the
    replica; the filtered normalisation affine parameters come down after every batch.
    """

    name = "cmf"
    paper = "Lee et al., ICLR 2024"
    mapping = dataclasses.replace(ROID.mapping, cloud="ROID's weighted step on an edge replica; Kalman filter of the "
                                                      "parameters towards the source",
                                  download="filtered norm affine parameters (edge: prior correction of the output)")
    cloud_logic = _CMFCloud

    @dataclass
    class Options(WeightedLossOptions):
        alpha: float = option(0.99, low=0, high=1)  # CMF.ALPHA: the hidden parameters' pull to the source
        gamma: float = option(0.99, low=0, high=1)  # CMF.GAMMA: the trained parameters' pull to the hidden ones
        q: float = option(0.005, low=0, below=True, high=1)  # CMF.Q: process noise per 38,400 trainable parameters
        ensemble_with: str = option("posterior", choices=("posterior", "prior"))  # CMF.TYPE lp (released) / op
