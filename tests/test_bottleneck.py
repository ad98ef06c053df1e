"""The ``entropy`` payload encoding (issue 19): a learned bottleneck's int32 symbols, coded by the harness with the
method's tables into a real bitstream (constriction's range coder), charged at that bitstream's length, and decoded
to exactly what the cloud gets; and the factorized prior whose tables they are."""
import math

import constriction
import numpy as np
import pytest
import torch

from cemabench.method import EntropyTables
from cemabench.protocol.bottleneck import EntropyCoder, check_tables
from cemabench.protocol.link import Link
from cemabench.protocol.plain import NotPlain, plain_decision
from cemabench_methods.entropy_bottleneck import FactorizedPrior, bits

FREQ = torch.tensor([[1, 6, 20, 6, 1], [4, 4, 4, 4, 0]])
TABLES = EntropyTables(frequencies=FREQ, offsets=torch.tensor([-2, 0]), escape=torch.tensor([2, 1]))


def _decision(rows: torch.Tensor, **fields):
    from cemabench.method import EdgeDecision
    return EdgeDecision(logits=None, upload=torch.arange(len(rows)), payload={"latent": rows}, send_input=False,
                        payload_dtype="entropy", await_answers=True, **fields)


def _by_hand(row: np.ndarray) -> bytes:
    """The documented format, written with constriction directly (no escapes in ``row``): channel c's symbols with
    the categorical model of (frequencies[c], escape[c]) / their sum, in C order, one range coder."""
    coder = constriction.stream.queue.RangeEncoder()
    for c in range(2):
        p = np.append(FREQ[c].numpy(), TABLES.escape[c].item()).astype(np.float64)
        model = constriction.stream.model.Categorical(p / p.sum(), perfect=False)
        coder.encode((row[c].reshape(-1) - TABLES.offsets[c].item()).astype(np.int32), model)
    return coder.get_compressed().tobytes()


def test_the_link_charges_each_rows_bitstream_and_the_cloud_gets_what_it_decodes_to():
    torch.manual_seed(0)
    rows = torch.stack([torch.randint(-2, 3, (3, 4)), torch.randint(0, 4, (3, 4))], 1).to(torch.int32)  # in range
    link = Link(None, 0, coder=EntropyCoder(TABLES))
    upload = link.send_up(torch.zeros(3, 3, 2, 2), _decision(rows), 12, 0)
    streams = [_by_hand(r.numpy()) for r in rows]
    assert link.counters.upload_payload_bytes == sum(len(s) for s in streams) == link.total_bytes
    assert link.counters.upload_bytes == 0 and len(upload.samples) == 0
    assert upload.payload["latent"].dtype == torch.int32 and torch.equal(upload.payload["latent"], rows)
    for s, row in zip(streams, rows):  # the bytes decode, with constriction alone, to the row
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(s, dtype=np.uint32).copy())
        for c in range(2):
            p = np.append(FREQ[c].numpy(), TABLES.escape[c].item()).astype(np.float64)
            model = constriction.stream.model.Categorical(p / p.sum(), perfect=False)
            assert (decoder.decode(model, 4) + TABLES.offsets[c].item()).tolist() == row[c].tolist()


def test_a_long_row_costs_its_ideal_code_length_to_within_a_few_words():
    rng = np.random.default_rng(0)
    p0 = FREQ[0].numpy() / (FREQ[0].sum().item() + 2)
    row = np.stack([rng.choice(5, 4000, p=p0 / p0.sum()) - 2, rng.integers(0, 4, 4000)])
    ideal = -(np.log2(np.append(FREQ[0].numpy(), 2)[row[0] + 2] / 36).sum() + np.log2(np.full(4000, 4 / 17)).sum())
    (stream,) = EntropyCoder(TABLES).encode_rows(torch.from_numpy(row[None]).to(torch.int32))
    assert ideal / 8 <= len(stream) <= ideal / 8 + 12 and len(stream) % 4 == 0  # 32-bit words


def test_values_outside_the_table_are_escaped_and_cross_exactly():
    """Out of range (either side, up to int32's extremes) and in range at frequency 0: escaped, never clamped."""
    rows = torch.zeros(4, 2, 3, dtype=torch.int32)
    rows[0, 0, 0], rows[1, 0, 1], rows[2, 1, 2], rows[3, 1, 0] = 2 ** 31 - 1, -(2 ** 31), 4, -3
    rows[3, 0, 2] = 3  # one past the top of channel 0's range
    coder = EntropyCoder(TABLES)
    streams = coder.encode_rows(rows)
    assert torch.equal(coder.decode_rows(streams, (2, 3)), rows)
    plain_row = coder.encode_rows(torch.zeros(1, 2, 3, dtype=torch.int32))[0]
    assert all(len(s) > len(plain_row) for s in streams[:2])  # a 31-bit escape costs at least its bits


def test_an_escaped_value_is_the_documented_elias_gamma_of_its_zigzag_code():
    coder = EntropyCoder(TABLES)
    (stream,) = coder.encode_rows(torch.tensor([[[-2], [-5]]], dtype=torch.int32))  # channel 1: -5 is escaped
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(stream, dtype=np.uint32).copy())
    for c in range(2):
        p = np.append(FREQ[c].numpy(), TABLES.escape[c].item()).astype(np.float64)
        decoder.decode(constriction.stream.model.Categorical(p / p.sum(), perfect=False), 1)
    n = int(decoder.decode(constriction.stream.model.Uniform(33), 1)[0])
    low = int(decoder.decode(constriction.stream.model.Uniform(2 ** n), 1)[0])
    assert (n, (1 << n) | low) == (3, 2 * 5 - 1 + 1)  # z = 9 for -5, coded as z + 1 = 0b1010: n = 3, low bits 010


def test_the_coding_is_deterministic_and_the_harness_keeps_its_own_copy_of_the_tables():
    class Declares:
        def __init__(self):
            self.tables = EntropyTables(FREQ.clone(), torch.tensor([-2, 0]), torch.tensor([2, 1]))

        def entropy_tables(self):
            return self.tables

    method = Declares()
    coder = EntropyCoder(method.entropy_tables())  # read once, as the loop does
    rows = torch.tensor([[[0, 1, -1], [1, 2, 3]]], dtype=torch.int32)
    first = coder.encode_rows(rows)
    method.tables.frequencies[0] = torch.tensor([1000, 1, 1, 1, 1])  # changed after the harness read them
    assert coder.encode_rows(rows) == first == EntropyCoder(TABLES).encode_rows(rows)


@pytest.mark.parametrize("tables, message", [
    (EntropyTables(FREQ.float(), torch.tensor([-2, 0]), torch.tensor([2, 1])), "frequencies must be int64"),
    (EntropyTables(-FREQ, torch.tensor([-2, 0]), torch.tensor([2, 1])), r"frequencies must be in \[0"),
    (EntropyTables(FREQ, torch.tensor([-2, 0]), torch.tensor([0, 1])), r"escape must be in \[1"),
    (EntropyTables(FREQ, torch.tensor([-2]), torch.tensor([2, 1])), "one per channel"),
    (EntropyTables(FREQ, torch.tensor([2 ** 31 - 2, 0]), torch.tensor([2, 1])), "must be int32 values"),
    (EntropyTables(FREQ[0], torch.tensor([-2]), torch.tensor([1])), r"must be \(C, K\)"),
    ({"frequencies": FREQ}, "must return an EntropyTables"),
])
def test_bad_tables_are_refused_in_one_line(tables, message):
    with pytest.raises(ValueError, match=message) as error:
        check_tables(tables)
    assert "\n" not in str(error.value)


def test_tables_of_a_tensor_subclass_are_refused():
    class Lying(torch.Tensor):
        pass

    with pytest.raises(ValueError, match="plain dense torch.Tensor"):
        check_tables(EntropyTables(FREQ.as_subclass(Lying), torch.tensor([-2, 0]), torch.tensor([2, 1])))


def test_a_hostile_edge_cannot_set_what_it_is_charged():
    """The edge hands symbols only: floats, another integer width, the wrong channels, or no tables are refused; a
    tensor subclass that claims a short length is refused before the link; the length is the harness's bitstream's."""
    link = Link(None, 0, coder=EntropyCoder(TABLES))
    x = torch.zeros(2, 3, 2, 2)
    for rows, message in [(torch.zeros(2, 2, 3), "must hold int32 symbols"),
                          (torch.zeros(2, 2, 3, dtype=torch.int64), "must hold int32 symbols"),
                          (torch.zeros(2, 3, 3, dtype=torch.int32), "with C = 2")]:
        with pytest.raises(ValueError, match=message):
            link.send_up(x, _decision(rows), 12, 0)
    with pytest.raises(ValueError, match="this method declares none"):
        Link(None, 0).send_up(x, _decision(torch.zeros(2, 2, 3, dtype=torch.int32)), 12, 0)

    class Short(torch.Tensor):
        def numel(self):
            return 1

        def __len__(self):
            return 2

    forged = torch.zeros(2, 2, 3, dtype=torch.int32).as_subclass(Short)
    with pytest.raises(NotPlain, match="plain torch.Tensor"):
        plain_decision(_decision(forged))
    rows = torch.full((2, 2, 300), 3, dtype=torch.int32)  # channel 1's least likely value... but in its table
    link.send_up(x, _decision(rows), 12, 0)
    assert link.counters.upload_payload_bytes == sum(len(s) for s in EntropyCoder(TABLES).encode_rows(rows))


# ---- the factorized prior ---------------------------------------------------------------------------------------


def _tiny_prior() -> FactorizedPrior:
    """One channel, one layer of one filter: c(x) = sigmoid(softplus(a) x + b), a logistic density."""
    prior = FactorizedPrior(1, filters=())
    with torch.no_grad():
        prior.matrices[0].fill_(math.log(math.expm1(0.5)))  # softplus(.) = 0.5
        prior.biases[0].fill_(0.25)
    return prior


def test_the_likelihood_and_rate_of_a_tiny_density_by_hand():
    prior = _tiny_prior().eval()
    y = torch.tensor([[[0.0, 1.0, -3.0]]]).reshape(1, 1, 3, 1)

    def cdf(v):
        return 1 / (1 + math.exp(-(0.5 * v + 0.25)))

    expected = [cdf(v + 0.5) - cdf(v - 0.5) for v in (0.0, 1.0, -3.0)]
    p = prior.likelihood(y).reshape(-1)
    assert torch.allclose(p.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-7)
    assert bits(prior.likelihood(y)).item() == pytest.approx(-sum(math.log2(e) for e in expected), rel=1e-6)


def test_the_tiny_densitys_quantiles_and_tables_by_hand():
    """Median of the logistic: 0.5 x + 0.25 = 0, x = -0.5; its tails at logit +-ln(2 / tail_mass - 1)."""
    prior = _tiny_prior()
    prior.update_quantiles()
    t = math.log(2 / 1e-9 - 1)
    expected = [(-t - 0.25) / 0.5, -0.5, (t - 0.25) / 0.5]
    assert prior.quantiles[0].tolist() == pytest.approx(expected, abs=2e-3)
    tables = prior.tables()
    below, above = math.ceil(-0.5 - expected[0]), math.ceil(expected[2] + 0.5)
    assert tables.offsets.tolist() == [-below] and tables.frequencies.shape == (1, below + above + 1)

    def cdf(v):
        return 1 / (1 + math.exp(-(0.5 * v + 0.25)))

    k = 3  # symbol 3: the bin around y = 3 + m = 2.5
    # the median is bisected to 1e-3, in float32: the bin mass to within a unit at 16 bits
    assert tables.frequencies[0, below + k].item() == pytest.approx((cdf(3.0) - cdf(2.0)) * 2 ** 16, abs=1.5)
    assert tables.frequencies.min() >= 0 and tables.escape.item() >= 1
    symbols = prior.symbols(torch.tensor([[[[2.4]], ]]))  # round(2.4 + 0.5) = 3
    assert symbols.dtype == torch.int32 and symbols.item() == 3
    assert prior.dequantize(symbols).item() == pytest.approx(2.5, abs=1e-3)


def test_training_adds_uniform_noise_and_evaluation_rounds_around_the_median():
    prior = _tiny_prior()
    prior.update_quantiles()
    y = torch.full((1, 1, 500, 1), 0.3)
    noisy, _ = prior.train()(y)
    assert (noisy - y).abs().max() <= 0.5 and (noisy - y).std() > 0.2  # U(-1/2, 1/2): std 0.289
    rounded, p = prior.eval()(y)
    assert torch.allclose(rounded, torch.full_like(y, 0.5), atol=1e-3)  # round(0.3 + 0.5) - 0.5
    assert torch.allclose(p, prior.likelihood(rounded))
