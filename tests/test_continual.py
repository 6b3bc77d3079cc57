"""Continual learning (Phase III of LANCE): memory, rank rules, bounds, metrics, protocol."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lance_lib.continual import (
    NULL_SPACE_RULES,
    ContinualTask,
    FineTune,
    LanceCL,
    PlateauSchedule,
    SaturationWarning,
    average_accuracy,
    backbone_layers,
    backward_transfer,
    frozen_layers,
    interference,
    null_space_calibration,
    run_continual,
    train_multitask,
    update_memory,
)
from lance_lib.continual.benchmarks import BENCHMARKS
from lance_lib.layers import LanceConv2d, LanceLinear, compress, restore
from lance_lib.models import MultiHead


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small models: one thread is as fast and keeps runs bit-identical."""


def tiny_model(num_tasks: int = 2, seed: int = 0) -> MultiHead:
    """Conv (padding 1) -> conv (stride 2) -> Linear backbone, 2-class heads, 8x8 input."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16, bias=False),
        nn.ReLU(),
    )
    return MultiHead(backbone, 16, num_tasks, 2)


def tiny_task(seed: int, n: int = 96, shift: float = 0.0) -> ContinualTask:
    """Two Gaussian classes of 3x8x8 images whose means differ by task."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    base = torch.randn(2, 1, 8, 8, generator=g).repeat(1, 3, 1, 1)  # correlated RGB
    noise = torch.randn(n, 1, 8, 8, generator=g) + 0.3 * torch.randn(n, 3, 8, 8, generator=g)
    x = base[y] + 0.8 * noise + shift
    ds = TensorDataset(x, y)
    return ContinualTask(
        f"toy{seed}", ds, TensorDataset(x[:32], y[:32]), TensorDataset(x[:32], y[:32])
    )


def batches(task: ContinualTask, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = task.train.tensors
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def fwd(task: int):
    return lambda m, b: m(b[0], task)


# ------------------------------------------------------------------------------- metrics


def test_acc_bwt_from_hand_computed_matrix():
    a = [[80.0, 0.0, 0.0], [70.0, 90.0, 0.0], [60.0, 85.0, 75.0]]
    assert average_accuracy(a) == pytest.approx((60 + 85 + 75) / 3)
    assert backward_transfer(a) == pytest.approx(((60 - 80) + (85 - 90)) / 2)
    assert backward_transfer([[50.0]]) is None
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[1.0, 2.0]])


# ---------------------------------------------------------------------- Phase III memory


def diag_loader(values: list[float]) -> list[tuple[torch.Tensor]]:
    """One batch whose feature covariance (Eq. 2 over the batch mode) is diag(values)."""
    n = len(values)
    x = torch.diag(torch.tensor(values, dtype=torch.float32).mul(n).sqrt())
    return [(x,)]


def test_eq5_selection_on_hand_made_spectrum():
    # B = diag(4, 3, 2, 1), total 10; M = e1 explains 0.4.  Eq. (5): keeping r of the
    # remaining (3, 2, 1) explains (10 - tail(r)) / 10 = 0.4, 0.7, 0.9, 1.0 for r = 0..3.
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    loader = diag_loader([4.0, 3.0, 2.0, 1.0])
    e = torch.eye(4, dtype=torch.float64)
    for eps_cl, expected in [(0.35, 0), (0.7, 1), (0.75, 2), (0.95, 3)]:
        up = update_memory(model, loader, ["0"], {"0": e[:, :1]}, eps_cl, num_batches=1)
        assert up.added["0"] == expected, eps_cl
        m = up.memory["0"]
        assert m.shape == (4, 1 + expected)
        # the old memory is kept as is; new columns are the leading eigenvectors e2, e3, ...
        assert torch.equal(m[:, :1], e[:, :1])
        assert torch.allclose(m[:, 1:].abs(), e[:, 1 : 1 + expected], atol=1e-10)
    # no memory: Eq. (5) reduces to Eq. (3): 0.4 < 0.65 <= 0.7 -> 2 directions
    up = update_memory(model, loader, ["0"], None, 0.65, num_batches=1)
    assert up.added["0"] == 2 and not up.saturated


def test_rank_rules_on_hand_made_spectrum():
    # Same B = diag(4, 3, 2, 1) and M = e1 (explains 0.4 of the energy).  The memory
    # explains less than eps = 0.3?  No: 0.4 >= 0.3, so Eq. (5) keeps nothing and freezes
    # the layer, while the residual rule keeps Eq. (3) of the remaining (3, 2, 1): 3/6 =
    # 0.5 >= 0.3 -> one direction, e2.
    model = MultiHead(nn.Sequential(nn.Linear(4, 3, bias=False)), 3, 2, 2)
    loader = diag_loader([4.0, 3.0, 2.0, 1.0])
    memory = {"backbone.0": torch.eye(4, dtype=torch.float64)[:, :1]}
    with pytest.warns(SaturationWarning, match="'eq5' rule keeps no new direction"):
        gpm_style = null_space_calibration(
            model, loader, ["backbone.0"], memory, 0.3, 1, memory_rule="eq5", forward=fwd(1)
        )
    assert gpm_style["backbone.0"].ranks[-1] == 0
    assert frozen_layers(model, gpm_style) == ["backbone.0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SaturationWarning)
        default = null_space_calibration(
            model, loader, ["backbone.0"], memory, 0.3, 1, forward=fwd(1)
        )
    u = default["backbone.0"].factors[-1]
    assert u.shape == (4, 1) and torch.allclose(u.abs()[:, 0], torch.eye(4)[1].double())
    assert default.settings["null_space_rule"] == "residual" and not frozen_layers(model, default)
    assert set(NULL_SPACE_RULES) == {"residual", "eq5"}


def test_default_rule_freezes_only_saturated_layers():
    # A memory built from task 1 with eps_CL = 0.95 explains > eps = 0.9 of a task from
    # the same distribution: Eq. (5) freezes layers; the default keeps every layer whose
    # null space is not empty learning, with factors orthogonal to the memory.
    model = tiny_model()
    layers = backbone_layers(model)
    t0, t1 = tiny_task(0), tiny_task(1)
    up = update_memory(model, batches(t0), layers, None, 0.95, num_batches=3, forward=fwd(0))
    assert all(m.shape[1] < m.shape[0] for m in up.memory.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SaturationWarning)
        literal = null_space_calibration(
            model, batches(t1), layers, up.memory, 0.9, 3, forward=fwd(1), memory_rule="eq5"
        )
    assert frozen_layers(model, literal)  # the GPM-style reading freezes some layer here
    default = null_space_calibration(model, batches(t1), layers, up.memory, 0.9, 3, forward=fwd(1))
    assert frozen_layers(model, default) == []
    for name, sub in default.items():
        d = 1 if sub.kind == "conv2d" else -1
        assert sub.factors[d].shape[1] >= 1
        assert (sub.factors[d].T @ up.memory[name]).abs().max() < 1e-6


def test_new_task_factors_are_orthogonal_to_memory():
    model = tiny_model()
    layers = backbone_layers(model)
    t0, t1 = tiny_task(0), tiny_task(1, shift=0.5)
    up = update_memory(model, batches(t0), layers, None, 0.9, num_batches=3, forward=fwd(0))
    assert all(0 < m.shape[1] < m.shape[0] for m in up.memory.values())
    subs = null_space_calibration(
        model, batches(t1), layers, up.memory, eps=0.99, num_batches=3, forward=fwd(1)
    )
    checked = 0
    for name, sub in subs.items():
        d = 1 if sub.kind == "conv2d" else len(sub.input_shape) - 1
        u, m = sub.factors[d], up.memory[name]
        assert u.shape[1] > 0
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-10)
        assert (u.T @ m).abs().max() < 1e-6
        checked += 1
    assert checked == 3


def capture_inputs(model: MultiHead, layers: list[str], data, task: int) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [
        modules[n].register_forward_pre_hook(
            lambda _m, a, n=n: out[n].append(a[0].detach().clone())
        )
        for n in layers
    ]
    with torch.no_grad():
        for b in data:
            model(b[0], task)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in out.items()}


def train_steps(model: MultiHead, data, task: int, steps: int, lr: float = 0.1) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x, task), y).backward()
            opt.step()


def test_lance_bounds_output_drift_on_earlier_tasks():
    eps_cl = 0.95
    model = tiny_model()
    layers = backbone_layers(model)
    t0, t1 = tiny_task(0), tiny_task(1, shift=0.5)
    old = batches(t0)
    train_steps(model, old, 0, steps=5)  # task 1: full BP
    method = LanceCL(layers, eps=0.9, eps_cl=eps_cl, num_batches=3, num_batches_cl=3)
    method.before_task(model, 0, old)  # task 1: full BP, nothing compressed
    method.after_task(model, 0, old)  # Phase III on exactly these batches
    x_old = capture_inputs(model, layers, old, 0)
    modules = dict(model.named_modules())
    before = {n: modules[n].weight.detach().clone() for n in layers}
    plan = method.before_task(model, 1, batches(t1))
    assert plan.frozen_layers == []
    assert all(
        isinstance(dict(model.named_modules())[n], (LanceConv2d, LanceLinear)) for n in layers
    )
    train_steps(model, batches(t1), 1, steps=5)
    restore(model)
    relative = {}
    for name in layers:
        mod, mem = modules[name], method.memory[name]
        dw = mod.weight.detach() - before[name]
        assert dw.abs().max() > 1e-4, name  # the layer did learn task 2
        drift, bound = interference(mod, dw, mem, x_old[name])
        assert torch.all(drift <= bound * (1 + 1e-5) + 1e-7), name
        # Eq. (5) energy form on the memory's own batches:
        # ||dW * X_old||_F <= ||dW||_2 sqrt(kh kw (1 - eps_CL)) ||X_old||_F
        k = math.prod(mod.kernel_size) if isinstance(mod, nn.Conv2d) else 1
        dw_norm = torch.linalg.matrix_norm(dw.reshape(dw.shape[0], -1).double(), ord=2)
        total = drift.pow(2).sum().sqrt()
        assert total <= dw_norm * math.sqrt(k * (1 - eps_cl)) * x_old[name].double().norm() + 1e-9
        relative[name] = total / dw.double().norm()
    # the same steps without the null-space constraint move old outputs far more
    free = tiny_model()
    train_steps(free, old, 0, steps=5)
    w0 = free.backbone[5].weight.detach().clone()
    x_fc = capture_inputs(free, ["backbone.5"], old, 0)["backbone.5"].double()
    train_steps(free, batches(t1), 1, steps=5)
    dw_free = (free.backbone[5].weight.detach() - w0).double()
    assert relative["backbone.5"] < 0.5 * (x_fc @ dw_free.T).norm() / dw_free.norm()


def test_saturated_memory_freezes_the_layer_and_says_so():
    model = MultiHead(nn.Sequential(nn.Linear(3, 4, bias=False)), 4, 2, 2)
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.arange(16) % 2
    data = [(x, y)]
    full = {"backbone.0": torch.eye(3, dtype=torch.float64)}
    for rule in NULL_SPACE_RULES:  # no rule can learn in an empty null space
        with pytest.warns(SaturationWarning, match="saturated"):
            subs = null_space_calibration(
                model, data, ["backbone.0"], full, 0.9, 1, forward=fwd(1), memory_rule=rule
            )
        assert subs["backbone.0"].factors[1].shape == (3, 0)
    w0 = model.backbone[0].weight.detach().clone()
    compress(model, subs)
    train_steps(model, data, 1, steps=2)
    assert model.backbone[0].weight.grad is not None
    assert model.backbone[0].weight.grad.abs().max() == 0
    assert torch.equal(model.backbone[0].weight.detach(), w0)
    assert model.heads[1].weight.grad.abs().max() > 0  # the head still learns
    restore(model)
    up = update_memory(model, data, ["backbone.0"], full, 0.95, num_batches=1, forward=fwd(1))
    assert up.added == {"backbone.0": 0}
    assert up.saturated == ["backbone.0"]
    assert torch.equal(up.memory["backbone.0"], full["backbone.0"])


# ----------------------------------------------------------------------------- training


def test_plateau_schedule_divides_lr_and_stops():
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    model = nn.Linear(1, 1)
    s = PlateauSchedule(opt, lr=1.0, factor=2, patience=2, min_lr=0.3)
    assert not s.step(1.0, model)
    model.weight.data.fill_(7.0)
    assert not s.step(0.9, model)  # best
    model.weight.data.fill_(-1.0)
    assert not s.step(0.95, model) and s.lr == 1.0
    assert not s.step(0.95, model) and s.lr == 0.5 and opt.param_groups[0]["lr"] == 0.5
    assert not s.step(0.95, model)
    assert s.step(0.95, model)  # 0.25 < min_lr
    s.restore(model)
    assert model.weight.item() == 7.0
    with pytest.raises(ValueError, match="factor"):
        PlateauSchedule(opt, lr=1.0, factor=0.5, patience=2, min_lr=0.0)


def small_spec(**kw):
    settings = dict(batch_size=32, epochs=2, num_batches=3, num_batches_cl=3, lr=0.05)
    return BENCHMARKS["cifar10_mini"].replace(**{**settings, **kw})


class Recorded(LanceCL):
    """LANCE that also keeps every layer's weights before and after each task."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weights: list[tuple[dict, dict]] = []

    def _snapshot(self, model):
        modules = dict(model.named_modules())
        return {n: modules[n].weight.detach().clone() for n in self.layers}

    def before_task(self, model, task, loader):
        plan = super().before_task(model, task, loader)
        self.weights.append((self._snapshot(model), {}))
        return plan

    def after_task(self, model, task, loader):
        self.weights[-1][1].update(self._snapshot(model))
        super().after_task(model, task, loader)


@pytest.mark.parametrize("rule", ["residual", "eq5"])
def test_records_layer_ranks_and_frozen_layers_per_task(rule):
    tasks = [tiny_task(0), tiny_task(1), tiny_task(2, shift=0.2)]
    model = tiny_model(3)
    layers = backbone_layers(model)
    strategy = Recorded(layers, 0.9, 0.95, 3, 3, memory_rule=rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SaturationWarning)
        out = run_continual(model, tasks, strategy, small_spec(), progress=False)
    ranks, frozen = out["layer_ranks"], out["frozen_layers"]
    assert len(ranks) == len(frozen) == 3
    # task 1 trains with full BP: every layer keeps its whole input
    assert ranks[0] == {
        "backbone.0": [32, 3, 8, 8],
        "backbone.2": [32, 8, 8, 8],
        "backbone.5": [32, 128],
    }
    assert frozen[0] == []
    for j in (1, 2):
        assert set(ranks[j]) == set(layers)
        for name in layers:
            r_d = ranks[j][name][1 if name != "backbone.5" else -1]
            assert (r_d == 0) == (name in frozen[j])  # frozen <=> mode-d rank 0
            before, after = strategy.weights[j]
            moved = not torch.equal(before[name], after[name])
            assert moved == (name not in frozen[j]), (j, name)  # consistent with training
    if rule == "residual":
        assert frozen == [[], [], []]  # no null space is empty here
    else:
        assert any(frozen[1:])  # the GPM-style reading freezes layers on these tasks


def test_run_continual_lance_and_finetune_records():
    tasks = [tiny_task(0), tiny_task(1, shift=0.5), tiny_task(2, shift=-0.5)]
    spec = small_spec()
    model = tiny_model(3)
    lance = run_continual(
        model, tasks, LanceCL(backbone_layers(model), 0.9, 0.95, 3, 3), spec, progress=False
    )
    a = lance["acc_matrix"]
    assert len(a) == 3 and all(len(r) == 3 for r in a)
    assert a[0][1] == a[0][2] == a[1][2] == 0.0
    assert lance["ACC"] == pytest.approx(sum(a[2]) / 3)
    assert lance["tasks"][0]["full_bp"] and not lance["tasks"][1]["full_bp"]
    mem = lance["memory"]
    assert mem["mb"] == pytest.approx(mem["memory_matrices_mb"] + mem["activation_cores_mb"])
    ranks = [lance["tasks"][j]["memory_rank"]["backbone.5"] for j in range(3)]
    assert ranks == sorted(ranks) and mem["memory_shapes"]["backbone.5"] == [128, ranks[-1]]
    # BatchNorm-free model: backbone biases absent; no layer stays compressed afterwards
    assert not any(isinstance(m, (LanceConv2d, LanceLinear)) for m in model.modules())
    ft = run_continual(tiny_model(3), tasks, FineTune(backbone_layers(model)), spec, progress=False)
    assert ft["memory"]["mb"] == 0.0 and len(ft["training"]) == 3
    assert ft["frozen_layers"] == [[], [], []]
    assert ft["layer_ranks"][2]["backbone.5"] == [32, 128]
    mt = train_multitask(tiny_model(3), tasks, spec, layers=backbone_layers(model), progress=False)
    assert len(mt["acc_matrix"]) == 1 and mt["BWT"] is None
    assert mt["frozen_layers"] == [[]] and mt["layer_ranks"][0]["backbone.0"] == [32, 3, 8, 8]
    assert all(0 <= v <= 100 for v in mt["acc_matrix"][0])


def test_multitask_loss_is_each_samples_own_head():
    # One epoch of joint training with lr ~ 0, one batch of each task: its training
    # loss is the mean over samples of the cross-entropy under each sample's own head,
    # and the schedule's validation loss the sum of the tasks' own-head losses.
    tasks = [tiny_task(0, n=32), tiny_task(1, n=32, shift=0.5)]
    model = tiny_model(2)
    with torch.no_grad():
        own = [
            nn.functional.cross_entropy(model(*t.train.tensors[:1], i), t.train.tensors[1])
            for i, t in enumerate(tasks)
        ]
    spec = small_spec(epochs=1, batch_size=64, lr=1e-12)
    out = train_multitask(model, tasks, spec, layers=backbone_layers(model), progress=False)
    assert out["training"][0]["last_train_loss"] == pytest.approx(sum(own).item() / 2, rel=1e-5)
    assert out["training"][0]["best_val_loss"] == pytest.approx(sum(own).item(), rel=1e-5)


def test_multitask_batches_hold_one_task_each_at_the_sequential_budget(monkeypatch):
    # batch-statistics networks: a mixed batch would be normalised unlike any test batch;
    # with max_steps, joint training gets max_steps steps per task, as each sequential task
    import lance_lib.continual.training as training

    seen = []
    real = training.train_epoch

    def spy(model, batches, optimizer, **kwargs):
        steps = kwargs["max_steps"]
        for _, labels in itertools.islice(batches, steps):
            seen.append(sorted(set((torch.as_tensor(labels) // 2).tolist())))
        return real(model, batches, optimizer, **kwargs)

    monkeypatch.setattr(training, "train_epoch", spy)
    tasks = [tiny_task(i, n=64, shift=0.3 * i) for i in range(3)]
    spec = small_spec(epochs=1, batch_size=16, max_steps=2)
    train_multitask(tiny_model(3), tasks, spec, layers=["backbone.0"], progress=False)
    assert seen == [[0], [1], [2], [0], [1], [2]]


def test_modes_all_trains_with_full_batches_and_evaluates_any_size():
    tasks = [tiny_task(0, n=80), tiny_task(1, n=80, shift=0.5)]  # 80 = 2 x 32 + 16
    spec = small_spec(modes="all")
    model = tiny_model(2)
    out = run_continual(
        model,
        tasks,
        LanceCL(backbone_layers(model), 0.9, 0.95, 3, 3, modes="all"),
        spec,
        progress=False,
    )
    assert out["layer_ranks"][1]["backbone.5"][0] <= 32
