"""Lean companions: exact gradients, bit-packed masks, and the bytes they keep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lance_lib import calibrate, compress, restore
from lance_lib.accounting import region_memory_table
from lance_lib.lean import (
    LeanBatchNorm2d,
    LeanReLU,
    calibrate_batchnorm,
    is_lean,
    make_lean,
    pack_mask,
    packed_dropout,
    packed_relu,
    packed_relu6,
    undo_lean,
    unpack_mask,
)
from lance_lib.models import (
    build_model,
    freeze_batchnorm,
    freeze_for_finetuning,
    last_n_convs,
    split_at,
)


def _saved_bytes(fn, *args) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    del out
    return total


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_pack_mask_round_trip(numel: int, gen: torch.Generator) -> None:
    mask = torch.rand(numel, generator=gen) > 0.5
    packed = pack_mask(mask.view(1, -1))
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    assert torch.equal(unpack_mask(packed, (1, numel)), mask.view(1, -1))


def test_pack_mask_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="bool"):
        pack_mask(torch.ones(3))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_mask(torch.zeros(2, dtype=torch.uint8), (3, 8))


@pytest.mark.parametrize(
    ("lean", "plain"), [(packed_relu, F.relu), (packed_relu6, F.relu6)], ids=["relu", "relu6"]
)
@pytest.mark.parametrize("inplace", [False, True])
def test_packed_relu_backward_equals_autograd(lean, plain, inplace, gen) -> None:
    x = torch.randn(3, 5, 7, 11, generator=gen) * 5
    x.view(-1)[:10] = torch.tensor([0.0, -0.0, 6.0, -6.0, 1e-30] * 2)
    if plain is F.relu:  # PyTorch's relu6 treats NaN differently in vectorised and tail code
        x.view(-1)[-20:] = float("nan")
    grad = torch.randn(x.shape, generator=gen)
    outs, grads = [], []
    for fn in (lean, plain):
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf * 1.0, inplace=inplace)
        y.backward(grad)
        outs.append(y.detach())
        grads.append(leaf.grad)
    assert torch.equal(outs[0].nan_to_num(), outs[1].nan_to_num())
    assert torch.equal(grads[0], grads[1])


def test_packed_relu_keeps_one_bit_per_element(gen) -> None:
    x = torch.randn(4, 16, 9, 9, generator=gen, requires_grad=True)
    assert _saved_bytes(F.relu, x) == x.numel() * 4
    assert _saved_bytes(packed_relu, x) == (x.numel() + 7) // 8
    assert _saved_bytes(packed_relu6, x) == (x.numel() + 7) // 8


def test_packed_dropout_matches_cpu_dropout(gen) -> None:
    x = torch.randn(6, 40, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    results = []
    for fn in (packed_dropout, F.dropout):
        leaf = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        y = fn(leaf, 0.3, True)
        y.backward(grad)
        results.append((y.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert _saved_bytes(lambda t: packed_dropout(t, 0.3), x.requires_grad_(True)) == 240 // 8
    with pytest.raises(ValueError, match="probability"):
        packed_dropout(x, 1.5)


def _bn(gen: torch.Generator, channels: int = 6) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=gen))
        bn.bias.copy_(torch.randn(channels, generator=gen))
        bn.running_mean.copy_(torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    return bn.eval()


def _bn_grads(bn: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    leaf = x.clone().requires_grad_(True)
    for p in bn.parameters():
        p.grad = None
    bn(leaf).backward(grad)
    return [leaf.grad] + [p.grad for p in bn.parameters() if p.requires_grad]


@pytest.mark.parametrize("trainable", ["none", "bias"])
def test_lean_batchnorm_exact_and_keeps_only_scale(trainable, gen) -> None:
    bn = _bn(gen)
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(trainable == "bias")
    lean = LeanBatchNorm2d(bn)
    assert lean.weight is bn.weight and lean.running_var is bn.running_var
    x = torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(lean(x), bn(x), rtol=0, atol=0)
    for a, b in zip(_bn_grads(lean, x, grad), _bn_grads(bn, x, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    assert _saved_bytes(bn, xg) >= x.numel() * 8
    assert _saved_bytes(lean, xg) == 6 * 8


def test_lean_batchnorm_falls_back_where_lean_is_not_exact(gen) -> None:
    bn = _bn(gen)  # trainable weight, no subspace: PyTorch's BatchNorm, keeps its input
    lean = LeanBatchNorm2d(bn)
    x = torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert _saved_bytes(lean, x) == _saved_bytes(bn, x)
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    lean.train()  # batch statistics: PyTorch's BatchNorm as well
    bn.train()
    torch.testing.assert_close(lean(x), bn(x))
    assert _saved_bytes(lean, x) == _saved_bytes(bn, x)


def test_lean_batchnorm_compressed_weight_gradient(gen) -> None:
    bn = _bn(gen)
    batches = [torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    holder = nn.Sequential(bn)
    x, grad = batches[0], torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64)
    exact = _bn_grads(bn, x, grad)
    full = calibrate_batchnorm(holder, batches, ["0"], eps=1.0, num_batches=3)
    low = calibrate_batchnorm(holder, batches, ["0"], eps=0.5, num_batches=3)
    assert full["0"].kind == "batchnorm2d" and low["0"].ranks < full["0"].ranks
    for subs, same_weight in ((full, True), (low, False)):
        lean = LeanBatchNorm2d(bn, subs["0"])
        grads = _bn_grads(lean, x, grad)
        torch.testing.assert_close(grads[0], exact[0])  # input gradient: exact
        torch.testing.assert_close(grads[2], exact[2])  # bias gradient: exact
        assert torch.allclose(grads[1], exact[1]) == same_weight
        core = 8 * torch.tensor(subs["0"].ranks).prod().item()
        factors = 8 * sum(u.numel() for u in subs["0"].factors)  # buffers, saved by reference
        assert _saved_bytes(lean, x.clone().requires_grad_(True)) == 6 * 8 + core + factors
    with pytest.raises(KeyError, match="BatchNorm2d"):
        calibrate_batchnorm(nn.Sequential(nn.ReLU()), batches, ["0"])


_TAILS = {"resnet18": ("layer4.0.conv2", (256, 8, 8)), "mobilenet_v2": ("features.17", (160, 4, 4))}


def _tail_model(name: str, gen: torch.Generator) -> tuple[nn.Module, list[str], list[torch.Tensor]]:
    """The trainable tail of ``name`` (last 4 convs and classifier), float64, and 3 inputs."""
    torch.manual_seed(0)
    first, shape = _TAILS[name]
    _, tail = split_at(build_model(name, 5).double(), first)
    layers = [n for n, _ in last_n_convs(tail, 4)]
    freeze_for_finetuning(tail, layers)
    tail.train()  # BatchNorm stays in eval (freeze_batchnorm), dropout trains
    with torch.no_grad():  # non-trivial running statistics
        for m in tail.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    xs = [torch.randn(4, *shape, generator=gen, dtype=torch.float64).relu() for _ in range(3)]
    return tail, layers, xs


@pytest.fixture(scope="module")
def calibrated_tails() -> dict[str, tuple[nn.Module, list[str], list[torch.Tensor], object]]:
    """Tails with subspaces; MobileNetV2's channel modes are left uncompressed only to keep
    the eigen-decompositions of its 960-channel inputs out of the test's run time."""
    out = {}
    for name, modes in (("resnet18", None), ("mobilenet_v2", (0, 2, 3))):
        tail, layers, xs = _tail_model(name, torch.Generator().manual_seed(0))
        subs = calibrate(tail, xs[1:], layers, eps=0.9, num_batches=2, modes=modes)
        out[name] = (tail, layers, xs, subs)
    return out


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_lean_lance_gradients_equal_plain_lance(name, calibrated_tails) -> None:
    model, layers, xs, subs = calibrated_tails[name]
    y = torch.tensor([0, 1, 2, 3])
    grads = {}
    for lean in (False, True):
        compress(model, subs, lean=lean)
        assert any(is_lean(m) for m in model.modules()) == lean
        model.zero_grad()
        torch.manual_seed(1)
        F.cross_entropy(model(xs[0]), y).backward()
        grads[lean] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    restore(model)
    assert not any(is_lean(m) for m in model.modules())
    assert len(grads[True]) == 6  # 4 conv weights, the classifier weight and bias
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_region_table_bytes_fall_as_predicted(calibrated_tails) -> None:
    model, layers, xs, subs = calibrated_tails["resnet18"]
    y = torch.tensor([0, 1, 2, 3])
    table = region_memory_table(model, lambda: F.cross_entropy(model(xs[0]), y), subs)
    rows = table.set_index("module")
    item, b = 8, 4  # float64, batch 4; layer4 maps are 512 x 4 x 4 for a 256 x 8 x 8 input
    numel = b * 512 * 4 * 4
    core = {n: item * torch.tensor(subs[n].ranks).prod().item() for n in layers}
    for n in layers:  # conv inputs: full under BP, the core under LANCE and lean
        assert rows.loc[n, "lance_bytes"] == rows.loc[n, "lean_bytes"] == core[n]
    assert rows.loc["layer4_0.downsample.0", "bp_bytes"] == b * 256 * 8 * 8 * item
    for bn in ("layer4_0.bn2", "layer4_0.downsample.1", "layer4_1.bn1", "layer4_1.bn2"):
        assert rows.loc[bn, "bp_bytes"] >= numel * item  # its input
        assert rows.loc[bn, "lean_bytes"] == 512 * item  # its scale
    # layer4.1's ReLU runs twice in the region, layer4.0's once (its first call is frozen)
    assert rows.loc["layer4_1.relu", "bp_bytes"] == 2 * numel * item
    assert rows.loc["layer4_1.relu", "lean_bytes"] == 2 * numel // 8
    assert rows.loc["layer4_0.relu", "lean_bytes"] == numel // 8
    assert rows.loc["fc", "lean_bytes"] == rows.loc["fc", "bp_bytes"] == b * 512 * item
    acts = rows.loc["activations (distinct storages)"]
    # lean keeps cores, 3 ReLU masks, 4 BatchNorm scales, the fc input and the loss's tensors
    top = rows.loc["(top level)", "lean_bytes"]
    predicted = sum(core.values()) + 3 * numel // 8 + 4 * 512 * item + b * 512 * item + top
    assert acts["lean_bytes"] == predicted
    # LANCE also keeps the 4 BatchNorm inputs and 3 ReLU outputs instead
    removed = 4 * (numel * item - 512 * item) + 3 * (numel * item - numel // 8)
    assert acts["lance_bytes"] - acts["lean_bytes"] == removed
    assert acts["bp_bytes"] > acts["lance_bytes"]
    total = rows.loc["region total"]  # at batch 4 the factors U_i outweigh the activations
    running_stats = 4 * 2 * 512 * item  # buffers PyTorch's BatchNorm saves, lean does not
    assert total["lance_bytes"] - total["lean_bytes"] == removed + running_stats
    assert not any(is_lean(m) for m in model.modules())


def test_make_lean_swaps_and_undoes(gen) -> None:
    model = build_model("resnet18", 5)
    freeze_batchnorm(model)
    keys = list(model.state_dict())
    make_lean(model, "layer4")
    assert isinstance(model.layer4[0].relu, LeanReLU) and not is_lean(model.relu)
    assert isinstance(model.layer4[1].bn2, LeanBatchNorm2d)
    model.train()
    assert not model.layer4[1].bn2.training  # freeze_batchnorm still holds
    model.layer4.train()
    model(torch.randn(2, 3, 32, 32))
    assert not model.layer4[1].bn2.training  # its eval pre-hook was carried over
    assert list(model.state_dict()) == keys
    undo_lean(model)
    assert not any(is_lean(m) for m in model.modules())
    assert type(model.layer4[0].relu) is nn.ReLU
    with pytest.raises(KeyError, match="no such modules"):
        make_lean(model, "layer9")
    with pytest.raises(KeyError, match="not a BatchNorm2d"):
        make_lean(model, batchnorm_subspaces={"fc": None})
