"""Transformer companion: the ViT, LANCE on 3-D inputs, LoRAct's pre-norm trick."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lance_lib.accounting import measure_saved_tensors
from lance_lib.calibration import calibrate
from lance_lib.data import get_dataset
from lance_lib.experiments.transformer import BlockMeasurement
from lance_lib.layers import compress
from lance_lib.methods import BLOCK_METHODS, apply_method, measure_method, method_label
from lance_lib.methods.loract_prenorm import (
    LoRActPreNormBlock,
    LoRActPreNormLinear,
    layer_norm_backward,
    prenorm_linear,
)
from lance_lib.models import build_model, classifier_name, last_n_layers, replace_classifier
from lance_lib.models.vit import (
    NormLinear,
    VisionTransformer,
    block_linear_names,
    block_names,
    split_blocks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_vit(seed: int = 0, dtype: torch.dtype = torch.float32) -> VisionTransformer:
    """16 px, 4 x 4 patches (16 tokens), 2 blocks of width 32, MLP width 64."""
    torch.manual_seed(seed)
    model = VisionTransformer(3, image_size=16, patch_size=4, dim=32, depth=2, heads=2)
    with torch.no_grad():  # non-trivial LayerNorm affine maps
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.to(dtype)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Eight real embedded CIFAR-10 images at 16 x 16, three classes."""
    ds = get_dataset("cifar10_mini", "train", resolution=16, augment=False)
    idx = [i for i, t in enumerate(ds.targets) if t < 3][:8]
    return torch.stack([ds[i][0] for i in idx]), torch.tensor([ds.targets[i] for i in idx])


def apply_block_method(model: nn.Module, method: str, **options):
    """``method`` on every block Linear of ``model`` (the transformer experiment's call)."""
    return apply_method(model, method, block_linear_names(model), **options)


def measure_block_method(handle, batch, blocks, **options) -> BlockMeasurement:
    """One step measured by the harness, seen block by block (the experiment's record)."""
    return BlockMeasurement.from_measurement(measure_method(handle, batch, **options), blocks)


def grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_vit_registered_and_splits(batch):
    model = build_model("vit_tiny", 5)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 5) and model.embed.num_tokens == 64
    assert classifier_name(model) == "classifier.2"
    assert replace_classifier(model, 7)(x).shape == (2, 7)
    assert [n for n, _ in last_n_layers(model, 2)] == ["blocks.3.fc2", "classifier.2"]
    prefix, tail = split_blocks(model, 2)
    torch.testing.assert_close(tail(prefix(x)), model(x))
    assert block_linear_names(tail) == [
        f"blocks.{i}.{n}"
        for i in (2, 3)
        for n in ("norm_qkv.linear", "proj", "norm_fc1.linear", "fc2")
    ]
    with pytest.raises(ValueError, match="weights"):
        build_model("vit_tiny", 5, weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="position embedding"):
        model(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("method", ["lance", "loract", "loract_prenorm", "loract_prenorm_linear"])
def test_full_rank_reproduces_bp_gradients(method, batch):
    x, y = batch[0].double(), batch[1]
    reference = grads(small_vit(dtype=torch.float64), x, y)
    model = small_vit(dtype=torch.float64)
    bm = apply_block_method(
        model, method, calib_loader=[(x, y)], num_batches=1, eps=1.0, rank_ratio=1.0
    )
    got = grads(model, x, y)
    assert got.keys() == reference.keys()  # the swaps keep every parameter name
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-11, msg=name)
    kinds = {type(model.get_submodule(n)).__name__ for n in bm.treated}
    assert (
        kinds
        == {
            "lance": {"LanceLinear"},
            "loract": {"LoRActLinear"},
            "loract_prenorm": {"LoRActPreNormBlock"},
            "loract_prenorm_linear": {"LoRActPreNormLinear", "LoRActLinear"},
        }[method]
    )
    bm.restore()
    assert all(type(model.get_submodule(n)) is nn.Linear for n in block_linear_names(model))
    assert all(isinstance(model.blocks[i].norm_qkv, NormLinear) for i in range(2))
    assert all(type(model.blocks[i]).__name__ == "Block" for i in range(2))


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_backward_matches_autograd_float64(affine, gen):
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True) if affine else None
    b = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True) if affine else None
    out = F.layer_norm(x, (7,), w, b, 1e-5)
    dy = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    (expected,) = torch.autograd.grad(out, x, dy)
    with torch.no_grad():
        rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        x_hat = (x - x.mean(-1, keepdim=True)) * rstd
    torch.testing.assert_close(layer_norm_backward(dy, x_hat, rstd, w), expected)


def test_prenorm_function_gradcheck_float64(gen):
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()

    x, gamma, beta, w, b = rand(2, 4, 6), rand(6), rand(6), rand(5, 6), rand(5)
    sampler = torch.Generator().manual_seed(0)

    def f(*args: torch.Tensor) -> torch.Tensor:
        return prenorm_linear(*args, 6, sampler)  # k = D: the sketch is exact

    assert torch.autograd.gradcheck(f, (x, gamma, beta, w, b))
    ref = F.linear(F.layer_norm(x, (6,), gamma, beta), w, b)
    torch.testing.assert_close(f(x, gamma, beta, w, b), ref)


def test_prenorm_keeps_one_sketch_and_the_inverse_std(gen):
    unit = NormLinear(16, 48)
    x = torch.randn(4, 10, 16, generator=gen)
    bp = measure_saved_tensors(unit, lambda: unit(x).sum())
    trick = LoRActPreNormLinear(unit.norm, unit.linear, "unit", rank_ratio=0.25)
    saved = measure_saved_tensors(trick, lambda: trick(x).sum())
    rows, k = 40, 4
    assert trick.rank == k and trick.stored_elements() == rows * k + 16 * k + rows
    assert saved.activation_bytes == 4 * trick.stored_elements()
    assert bp.activation_bytes >= 4 * 2 * rows * 16  # LayerNorm input and output
    with torch.no_grad():  # no gradient needed: the plain modules run
        torch.testing.assert_close(trick(x), unit(x))


@pytest.mark.parametrize(
    ("modes", "shapes"),
    [("no_batch", [(3, 9), (11, 9), (1, 9)]), ((2,), [(3, 9), (11, 4), (1, 17)])],
)
def test_lance_linear_on_tokens(modes, shapes, gen):
    """Any batch size; the calibrated token count, or any when the token mode is left out."""
    layer = nn.Sequential(nn.Linear(12, 5))
    model = nn.Sequential(nn.Linear(12, 5))
    model.load_state_dict(layer.state_dict())
    calib = [torch.randn(6, 9, 12, generator=gen) for _ in range(2)]
    subspaces = calibrate(model, calib, ["0"], eps=1.0, num_batches=2, modes=modes)
    compress(model, subspaces, keep_unprofitable=True)  # full ranks: compressed only if asked
    for b, t in shapes:
        x = torch.randn(b, t, 12, generator=gen)
        for m in (model, layer):
            m.zero_grad()
            m(x).square().sum().backward()
        torch.testing.assert_close(model[0].weight.grad, layer[0].weight.grad)
    if modes == "no_batch":
        with pytest.raises(
            ValueError, match="mode 1 has size 4, but it was calibrated with size 9"
        ):
            model(torch.randn(3, 4, 12))


@pytest.mark.parametrize("method", ["lance", "loract", "loract_prenorm", "loract_prenorm_linear"])
def test_training_steps_lower_the_loss(method, batch):
    x, y = batch
    model = small_vit()
    bm = apply_block_method(
        model, method, calib_loader=[batch], num_batches=1, eps=0.7, rank_ratio=0.25
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    bm.restore()


def test_measured_memory_orders_the_methods(batch):
    x, y = batch
    model = small_vit()
    model.requires_grad_(False)
    prefix, tail = split_blocks(model, 1)
    tail.requires_grad_(True)
    h = prefix(x)
    out = {}
    blocks = block_names(tail)
    for method in BLOCK_METHODS:
        bm = apply_block_method(tail, method, calib_loader=[(h, y)], num_batches=1, rank_ratio=0.25)
        out[method] = measure_block_method(bm, (h, y), blocks, repeats=1, warmup=0)
        bm.restore()
    bp = out["bp"]
    assert bp.factor_bytes == 0 and out["lance"].factor_bytes > 0
    for method in BLOCK_METHODS[1:]:
        assert out[method].layer_bytes < bp.layer_bytes
        assert out[method].block_bytes < bp.block_bytes
        assert out[method].region_bytes < bp.region_bytes
    # one shared sketch instead of the LayerNorm's input and a sketch of its output
    assert out["loract_prenorm_linear"].block_bytes < out["loract"].block_bytes
    # the pre-norm mode keeps only the two sketched norm outputs between the passes,
    # and recomputes one sub-layer at a time during backward
    assert out["loract_prenorm"].block_bytes < out["loract_prenorm_linear"].block_bytes
    assert out["loract_prenorm"].recompute_bytes > 0
    assert all(out[m].recompute_bytes == 0 for m in BLOCK_METHODS if m != "loract_prenorm")
    assert out["loract_prenorm"].peak_bytes < bp.peak_bytes
    assert method_label("loract_prenorm", 0.125) == "LoRAct pre-norm r=1/8"


def test_prenorm_mode_keeps_two_sketches_per_block_and_measures_the_recompute(batch):
    """Between the passes the block keeps 2 (L k + k D + L) elements, nothing else."""
    x, y = batch
    model = small_vit()
    model.requires_grad_(False)
    prefix, tail = split_blocks(model, 1)
    tail.requires_grad_(True)
    h = prefix(x)  # (8, 16, 32): L = 128 rows, D = 32
    blocks = block_names(tail)
    bm = apply_block_method(tail, "loract_prenorm", rank_ratio=0.25)
    m = measure_block_method(bm, (h, y), blocks, repeats=1, warmup=0)
    (block,) = bm.replacements.values()
    assert isinstance(block, LoRActPreNormBlock) and block.rank == 8
    assert block.stored_elements() == 2 * (128 * 8 + 8 * 32 + 128)
    assert m.block_bytes == 4 * block.stored_elements()
    # the recomputation saves at least the qkv input, q, k, v and the projection input
    assert m.recompute_bytes >= 4 * 5 * 128 * 32
    assert block.recompute_bytes is None  # measuring left no hook behind
    bm.restore()


def test_transformer_config_is_validated_once_registered_and_swept():
    from lance_lib.experiments.base import experiment_kinds
    from lance_lib.experiments.sweeps import sweep
    from lance_lib.experiments.transformer import TransformerConfig

    cfg = TransformerConfig(rank_ratios=[0.5, 0.25], methods=["bp", "loract_prenorm"])
    assert cfg.rank_ratios == (0.5, 0.25) and cfg.modes == "channel"
    assert cfg.variants() == [("bp", None), ("loract_prenorm", 0.5), ("loract_prenorm", 0.25)]
    assert experiment_kinds()["transformer"] is TransformerConfig
    with pytest.raises(ValueError, match="include 'bp'"):
        TransformerConfig(methods=["lance"])
    with pytest.raises(ValueError, match="max_steps_per_epoch must be >= 1"):
        TransformerConfig(max_steps_per_epoch=0)
    with pytest.raises(TypeError, match="unknown transformer settings"):
        TransformerConfig.from_dict({"blockz": 2})
    (swept,) = sweep("transformer_finetune", {"model_name": "vit_tiny", "blocks": 1, "seed": 3})
    assert swept == TransformerConfig(blocks=1, seed=3)
