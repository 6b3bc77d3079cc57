"""Phase I: calibrate() on small models, its contract, errors and determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lance_lib import Subspaces, calibrate
from lance_lib.hosvd import ModeCovariance


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def loader(
    n_batches: int = 4, batch: int = 6, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 8, 8, generator=g), torch.zeros(batch)) for _ in range(n_batches)
    ]


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_factors_follow_input_mode_order_and_are_orthonormal(net):
    subs = calibrate(net, loader(), ["conv2", "fc"], eps=0.8, num_batches=4)
    conv = subs["conv2"]
    assert conv.input_shape == (6, 8, 8, 8) and conv.kind == "conv2d"
    assert len(conv.factors) == 4 and len(conv.ranks) == 4
    for u, n, r in zip(conv.factors, conv.input_shape, conv.ranks, strict=True):
        assert u.shape == (n, r)
        torch.testing.assert_close(u.T @ u, torch.eye(r, dtype=u.dtype), atol=1e-10, rtol=0)
    fc = subs["fc"]
    assert fc.input_shape == (6, 96) and [u.shape[0] for u in fc.factors] == [6, 96]
    assert all(0.8 - 1e-9 <= e <= 1 + 1e-9 for e in conv.energy + fc.energy)


def test_factors_are_leading_eigenvectors_of_eq2_covariance(net):
    batches = loader()
    acts = []
    handle = net.conv2.register_forward_pre_hook(lambda m, i: acts.append(i[0].detach()))
    net.eval()
    with torch.no_grad():
        for x, _ in batches:
            net(x)
    handle.remove()
    cov = ModeCovariance(8)
    for a in acts:
        cov.update(a, 1)
    vals, vecs = torch.linalg.eigh(cov.cov)
    subs = calibrate(net, batches, ["conv2"], eps=0.9, num_batches=4)
    u = subs["conv2"].factors[1].double()
    r = u.shape[1]
    top = vecs[:, -r:]
    # same subspace: projector difference vanishes
    torch.testing.assert_close(u @ u.T, top @ top.T, atol=1e-5, rtol=0)
    cum = torch.cumsum(vals.flip(0), 0) / vals.sum()
    assert cum[r - 1] >= 0.9 and (r == 1 or cum[r - 2] < 0.9)


def test_calibration_leaves_model_untouched(net):
    net.train()
    net.bn.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {n: m.training for n, m in net.named_modules()}
    calibrate(net, loader(), ["conv2"], num_batches=2)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: m.training for n, m in net.named_modules()}


def test_calibration_is_deterministic(net):
    a = calibrate(net, loader(), ["conv2", "fc"], num_batches=3)
    b = calibrate(net, loader(), ["conv2", "fc"], num_batches=3)
    for name in a:
        assert a[name].ranks == b[name].ranks
        for u, v in zip(a[name].factors, b[name].factors, strict=True):
            assert torch.equal(u, v)


def test_modes_selects_compressed_modes(net):
    subs = calibrate(net, loader(), ["conv2"], num_batches=2, modes=(1, -1))
    s = subs["conv2"]
    assert s.factors[0] is None and s.factors[2] is None
    assert s.factors[1] is not None and s.factors[3] is not None
    assert s.ranks[0] == 6 and s.ranks[2] == 8
    assert s.modes == [1, 3]


def test_channel_mode_compresses_only_the_mode_the_weights_act_on(net):
    subs = calibrate(net, loader(), ["conv2", "fc"], num_batches=2, modes="channel")
    assert subs["conv2"].modes == [1] and subs["fc"].modes == [1]
    assert subs["conv2"].ranks[0] == 6 and subs["conv2"].ranks[2:] == [8, 8]
    assert subs.settings["modes"] == "channel"


def test_modes_mapping_that_leaves_out_a_layer_raises_before_any_batch(net):
    """A layer missing from the mapping used to be compressed in every mode, silently."""
    ran = []

    def forward(model: nn.Module, batch: tuple) -> torch.Tensor:
        ran.append(1)
        return model(batch[0])

    with pytest.raises(ValueError, match=r"no entry for layers \['fc'\].*'fc': 'channel'"):
        calibrate(
            net, loader(), ["conv2", "fc"], num_batches=2, modes={"conv2": (1,)}, forward=forward
        )
    assert ran == []
    with pytest.raises(ValueError, match="not a mode selection"):
        calibrate(net, loader(), ["conv2"], num_batches=2, modes="channels")


def test_save_and_load_round_trip(net, tmp_path):
    modes = {"conv2": (1, 2, 3), "fc": "all"}
    subs = calibrate(net, loader(), ["conv2", "fc"], num_batches=2, modes=modes)
    path = tmp_path / "sub" / "subspaces.pt"
    subs.save(path)
    back = Subspaces.load(path)
    assert list(back) == list(subs) and back.settings == subs.settings
    for name in subs:
        assert back[name].ranks == subs[name].ranks
        assert back[name].input_shape == subs[name].input_shape
        for u, v in zip(back[name].factors, subs[name].factors, strict=True):
            assert (u is None and v is None) or torch.equal(u, v)
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("eps", [0, 1.5, -1])
def test_eps_outside_unit_interval_is_rejected(net, eps):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        calibrate(net, loader(), ["conv2"], eps=eps)


def test_num_batches_below_one_is_rejected(net):
    with pytest.raises(ValueError, match="num_batches"):
        calibrate(net, loader(), ["conv2"], num_batches=0)


def test_empty_loader_is_rejected(net):
    with pytest.raises(ValueError, match="no batches"):
        calibrate(net, [], ["conv2"])


def test_unknown_layer_names_the_candidates(net):
    with pytest.raises(KeyError, match="conv3.*Conv2d/Linear layers are: conv, conv2, fc"):
        calibrate(net, loader(), ["conv3"])
    with pytest.raises(KeyError, match="BatchNorm2d"):
        calibrate(net, loader(), ["bn"])


def test_ragged_batch_names_drop_last(net):
    batches = loader(2) + [(torch.randn(3, 3, 8, 8), torch.zeros(3))]
    with pytest.raises(ValueError, match="drop_last=True"):
        calibrate(net, batches, ["conv2"], num_batches=3)
    # without the batch mode any batch size is fine
    calibrate(net, batches, ["conv2"], num_batches=3, modes="no_batch")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_activations_are_rejected(net, bad):
    batches = loader(2)
    batches[1][0][0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*batch 1"):
        calibrate(net, batches, ["conv"], num_batches=2)


def test_dead_channels_get_rank_without_them():
    # channels 2..7 are always zero ("dead"): eps < 1 ignores them, eps = 1 keeps all
    conv = nn.Conv2d(8, 4, 1)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(3):
        x = torch.zeros(4, 8, 5, 5)
        x[:, :2] = torch.randn(4, 2, 5, 5, generator=g)
        data.append(x)
    subs = calibrate(_wrap(conv), data, ["conv"], eps=0.99, num_batches=3, modes=(1,))
    assert subs["conv"].ranks[1] <= 2
    full = calibrate(_wrap(conv), data, ["conv"], eps=1.0, num_batches=3, modes=(1,))
    assert full["conv"].ranks[1] == 8


def _wrap(conv: nn.Module) -> nn.Module:
    wrapper = nn.Sequential()
    wrapper.conv = conv
    return wrapper


def test_all_zero_activations_get_a_clear_error():
    model = nn.Sequential()
    model.conv = nn.Conv2d(3, 2, 1)
    data = [torch.zeros(2, 3, 4, 4) for _ in range(2)]
    with pytest.raises(ValueError, match="all-zero|zero total energy"):
        calibrate(model, data, ["conv"], num_batches=2)


def test_memory_constrains_feature_mode_only(net):
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    memory = {"fc": q[:, :10]}
    subs = calibrate(
        net, loader(), ["fc"], eps=0.9, num_batches=3, memory=memory, memory_rule="eq3"
    )
    u = subs["fc"].factors[-1].double()
    assert (memory["fc"].T @ u).abs().max() < 1e-6
    assert math.isclose(subs["fc"].factors[0].shape[0], 6)
