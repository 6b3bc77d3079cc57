"""Accounting: Appendix C's FLOPs as read, saved-tensor counters, per-block attribution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lance_lib.accounting import (
    SavedBytesCounter,
    measure_flops,
    measure_saved_tensors,
    paper_flops,
)

# a ResNet18 layer4 conv unfolded as Appendix C's 3-mode activation: batch, pixels, C k^2
SHAPE, OUT = (128, 49, 4608), 512
RANKS = (16, 12, 64)


def test_eq8_as_read_is_cheaper_than_bp_and_the_printed_form_is_not():
    n1, n2, n3 = SHAPE
    r1, r2, r3 = RANKS
    bp = paper_flops(SHAPE, OUT)
    lance = paper_flops(SHAPE, OUT, RANKS)
    printed_first_term = n1 * r1 * n2 * r2 * n3 * r3  # prod_i n_i r_i as printed
    assert printed_first_term > bp["backward"]  # the printed Eq. (8) exceeds BP's backward
    assert lance["backward"] < 0.2 * bp["backward"]
    assert 1.0 < bp["total"] / lance["total"] < 2.0  # the appendix's "~1.5x" regime
    assert bp["forward"] == bp["backward"] == OUT * n1 * n2 * n3


def test_eq8_counts_the_four_operations_of_the_compressed_weight_gradient():
    """FlopCounterMode on the computation Eq. (8) describes (2 FLOPs per MAC)."""
    n, r, n_hat = (12, 7, 10), (3, 4, 5), 6
    g = torch.Generator().manual_seed(0)
    core = torch.randn(*r, generator=g)
    u1, u2, u3 = (torch.randn(ni, ri, generator=g) for ni, ri in zip(n, r, strict=True))
    delta = torch.randn(n[0], n[1], n_hat, generator=g)

    def weight_gradient() -> torch.Tensor:
        delta_1 = torch.einsum("abo,ak->kbo", delta, u1)  # delta x_1 U_1^T: n1 r1 n2 n_hat
        z = torch.einsum("kjl,bj->kbl", core, u2)  # G x_2 U_2: r1 r2 r3 n2
        z = torch.einsum("kbl,cl->kbc", z, u3)  # x_3 U_3: r1 n2 r3 n3
        return torch.einsum("kbc,kbo->co", z, delta_1)  # r1 n2 n3 n_hat

    expected = paper_flops(n, n_hat, r)["backward"]
    assert measure_flops(weight_gradient) == 2 * expected
    dense = torch.einsum("abl,kjl->abkj", torch.ones(2, 2, 5), core)  # sanity: counter works
    assert dense.shape == (2, 2, 3, 4)


def test_saved_bytes_counter_counts_distinct_activations_only():
    layer = nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    with SavedBytesCounter(exclude=layer.parameters()) as counter:
        y = torch.relu(layer(x))
    assert counter.bytes == x.untyped_storage().nbytes() + y.untyped_storage().nbytes()
    del y


def test_distinct_bytes_per_subtree_sum_to_the_total():
    model = nn.Sequential(
        nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.Sequential(nn.Linear(6, 6), nn.ReLU())
    )
    x = torch.randn(4, 6, requires_grad=True)
    report = measure_saved_tensors(model, lambda: model(x).sum())
    parts = report.distinct_bytes_under(["0"]) + report.distinct_bytes_under(["1"])
    assert parts == report.activation_bytes == sum(report.distinct_by_module.values())
    # the first ReLU's output is the second Linear's input: counted once, in block 0
    assert report.bytes_of(["0.1", "1.0"]) > report.distinct_bytes_under(["1"])


@pytest.mark.parametrize("device", ["cpu"])
def test_cuda_peak_is_none_off_gpu(device):
    from lance_lib.accounting import cuda_peak_bytes

    assert cuda_peak_bytes(device, lambda: None) is None
