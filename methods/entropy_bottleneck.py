"""A learned entropy bottleneck: Ballé et al.'s factorized prior, and GDN, in torch.

The density is the one of "Variational image compression with a scale hyperprior" (Ballé, Minnen, Singh, Hwang,
Johnston, ICLR 2018; its appendix's non-parametric density, the entropy bottleneck of CompressAI, whose
``EntropyBottleneck`` we read to match): per channel c, a cumulative c(x) = sigmoid(f_K(... f_1(x))), each f_k a
1-D-to-filters affine map with softplus'd (non-negative) matrices and, between layers, a ``tanh`` gate with a learned
factor, so that c is monotone. A latent value's probability is the mass of its quantisation bin,
p(y) = c(y + 1/2) - c(y - 1/2) (bounded below by 1e-9), and its rate is -log2 p(y) bits. Training adds uniform
noise U(-1/2, 1/2) to the latents; at test time they are rounded around each channel's median m: y_hat =
round(y - m) + m, and the integer symbols round(y - m) are what cross the link.

Where CompressAI learns the tail quantiles with an auxiliary loss, we find them after training by bisection (its own
``_update_quantiles``): q_lo, m, q_hi with logit c = -t, 0, t, t = ln(2 / tail_mass - 1). The tables the harness codes
with (:class:`cemabench.method.EntropyTables`) are, per channel, the bins round(y - m) = -ceil(m - q_lo) ..
ceil(q_hi - m), each bin's mass as an integer frequency at 16-bit precision (CompressAI's default; at least 1), and
the escape symbol's frequency from the two tails' mass (at least 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cemabench.method import EntropyTables

LIKELIHOOD_BOUND = 1e-9
PRECISION = 16  # bits of the integer frequencies
MAX_WIDTH = 4096  # table columns per channel (cemabench.protocol.bottleneck.MAX_SYMBOLS)


class FactorizedPrior(nn.Module):
    """The per-channel non-parametric density of a (N, C, H, W) latent."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3, 3), init_scale: float = 10.0,
                 tail_mass: float = 1e-9):
        super().__init__()
        self.channels, self.tail_mass = channels, tail_mass
        widths = (1, *filters, 1)
        scale = init_scale ** (1 / (len(widths) - 1))
        self.matrices, self.biases, self.factors = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for i in range(len(widths) - 1):
            start = math.log(math.expm1(1 / scale / widths[i + 1]))  # softplus(start) * width = 1 / scale
            self.matrices.append(nn.Parameter(torch.full((channels, widths[i + 1], widths[i]), start)))
            self.biases.append(nn.Parameter(torch.empty(channels, widths[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(widths) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, widths[i + 1], 1)))
        self.register_buffer("quantiles", torch.tensor([-init_scale, 0.0, init_scale]).repeat(channels, 1))

    def logits_cumulative(self, x: torch.Tensor) -> torch.Tensor:
        """The logit of c(x), per channel: ``x`` is (C, 1, n)."""
        for i, matrix in enumerate(self.matrices):
            x = torch.matmul(F.softplus(matrix), x) + self.biases[i]
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """p(y) = c(y + 1/2) - c(y - 1/2) of a (N, C, ...) tensor, bounded below by 1e-9."""
        values = y.transpose(0, 1).reshape(self.channels, 1, -1)
        lower, upper = self.logits_cumulative(values - 0.5), self.logits_cumulative(values + 0.5)
        sign = -torch.sign(lower + upper).detach()  # the difference where the sigmoids are far from 1 (precision)
        p = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).clamp_min(LIKELIHOOD_BOUND)
        return p.reshape(self.channels, y.shape[0], *y.shape[2:]).transpose(0, 1)

    def medians(self) -> torch.Tensor:
        return self.quantiles[:, 1]

    def _around(self, y: torch.Tensor) -> torch.Tensor:
        return self.medians().reshape(1, -1, *([1] * (y.dim() - 2))).to(y)

    def symbols(self, y: torch.Tensor) -> torch.Tensor:
        """The integer symbols that cross: round(y - m), int32."""
        return torch.round(y - self._around(y)).to(torch.int32)

    def dequantize(self, symbols: torch.Tensor) -> torch.Tensor:
        """What the decoder gets from the symbols: symbols + m."""
        return symbols.float() + self._around(symbols.float())

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_hat, p(y_hat)): y plus uniform noise in training, rounded around the medians otherwise."""
        noisy = self.training
        y_hat = y + torch.empty_like(y).uniform_(-0.5, 0.5) if noisy else self.dequantize(self.symbols(y))
        return y_hat, self.likelihood(y_hat)

    @torch.no_grad()
    def update_quantiles(self, radius: float = 1e5, rtol: float = 1e-4, atol: float = 1e-3) -> None:
        """The tail quantiles and the median of each channel, by bisection on the cumulative's logit."""
        target = math.log(2 / self.tail_mass - 1)
        shape = (self.channels, 1, 1)
        for i, goal in enumerate((-target, 0.0, target)):
            device = self.quantiles.device
            low, high = torch.full(shape, -radius, device=device), torch.full(shape, radius, device=device)
            while not torch.isclose(low, high, rtol=rtol, atol=atol).all():
                mid = (low + high) / 2
                below = self.logits_cumulative(mid) <= goal
                low, high = torch.where(below, mid, low), torch.where(below, high, mid)
            self.quantiles[:, i] = ((low + high) / 2).reshape(-1)

    @torch.no_grad()
    def tables(self) -> EntropyTables:
        """The integer tables of the symbols round(y - m), for the harness's coder."""
        m = self.medians()
        below = torch.ceil(m - self.quantiles[:, 0]).clamp(0, MAX_WIDTH // 2 - 1).long()
        above = torch.ceil(self.quantiles[:, 2] - m).clamp(0, MAX_WIDTH // 2 - 1).long()
        width = int((below + above).max()) + 1
        k = torch.arange(width, device=m.device)
        bins = (k[None, :] - below[:, None]).float() + m[:, None]  # the bin centres y = symbol + m
        valid = k[None, :] <= (below + above)[:, None]
        lower = self.logits_cumulative(bins[:, None, :] - 0.5)[:, 0]
        upper = self.logits_cumulative(bins[:, None, :] + 0.5)[:, 0]
        pmf = (torch.sigmoid(upper) - torch.sigmoid(lower)).double()
        first = torch.zeros(self.channels, dtype=torch.long, device=m.device)
        last = below + above
        tails = (torch.sigmoid(lower.gather(1, first[:, None])) + torch.sigmoid(-upper.gather(1, last[:, None])))[:, 0]
        scale = 2 ** PRECISION
        frequencies = torch.where(valid, (pmf * scale).round().clamp_min(1).long(), 0)
        escape = (tails.double() * scale).round().clamp_min(1).long()
        return EntropyTables(frequencies=frequencies.cpu(), offsets=-below.cpu(), escape=escape.cpu())


class GDN(nn.Module):
    """Simplified (inverse) generalized divisive normalization (CompressAI's GDN1): y = x / (beta + gamma |x|), or
    x * (beta + gamma |x|) when ``inverse``; beta > 0 and gamma >= 0 through softplus."""

    def __init__(self, channels: int, inverse: bool = False):
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.full((channels,), math.log(math.expm1(1.0))))
        gamma = torch.full((channels, channels), -10.0)
        gamma.fill_diagonal_(math.log(math.expm1(0.1)))
        self.gamma = nn.Parameter(gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = F.softplus(self.gamma)[:, :, None, None]
        norm = F.conv2d(torch.abs(x), gamma, F.softplus(self.beta) + 1e-6)
        return x * norm if self.inverse else x / norm


def bits(likelihoods: torch.Tensor) -> torch.Tensor:
    """The rate, -sum log2 p, in bits."""
    return -torch.log2(likelihoods).sum()

