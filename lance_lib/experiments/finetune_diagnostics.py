"""Why LANCE's gap to BP widens with training: how stale its subspaces go, measured.

LANCE calibrates its subspaces once, before fine-tuning (Phase I, Algorithm 1), from
the inputs the compressed layers see then. Training moves the layers before them (the
earlier of the ``N`` trained convolutions), so those inputs drift away from the
subspaces. Two diagnostics separate a *stale* subspace from a *too small* one:

* :func:`captured_energy` - the share of each compressed layer's **current** input
  energy that its subspace captures, ``||X x_i U_i^T||^2 / ||X||^2`` over the
  compressed modes (Eq. 1: the squared norm of the core ``G`` over that of ``X``;
  the ``U_i`` are orthonormal), on a fixed set of training batches;
* :func:`recalibrate` - Phase I again on the current weights (a diagnostic beyond the
  paper, which calibrates once): if recalibrated LANCE closes the gap, staleness was
  the cause; if not, the rank at ``eps`` was.

:func:`lance_lib.experiments.finetune.finetune` calls both when its config asks
(``energy_batches``, ``recalibrate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lance_lib.calibration import calibrate
from lance_lib.hosvd import project
from lance_lib.layers import compress
from lance_lib.methods import MethodHandle

__all__ = ["SubspaceDiagnostics", "captured_energy", "recalibrate"]


def captured_energy(handle: MethodHandle, inputs: Sequence[torch.Tensor]) -> dict[str, float]:
    """Share of each compressed layer's current input energy its subspace captures.

    Parameters
    ----------
    handle
        LANCE applied to a model (:func:`lance_lib.methods.apply_method`).
    inputs
        Fixed model inputs (the same every time, so that values are comparable).

    Returns
    -------
    dict
        Layer name -> ``sum ||G||^2 / sum ||X||^2`` over ``inputs``, with
        ``G = X x_1 U_1^T ... x_d U_d^T`` (Eq. 1) over the compressed modes: 1.0 when
        the subspace holds all of the input, the calibration energy (about ``eps``
        per mode) right after Phase I.

    Notes
    -----
    The model runs with the original layers (:meth:`MethodHandle.bypassed`) in eval
    mode without gradients; its training flags are restored afterwards.
    """
    subspaces = handle.subspaces
    if subspaces is None:
        raise ValueError(f"method {handle.name!r} has no calibrated subspaces to measure")
    kept = dict.fromkeys(handle.layers, 0.0)
    total = dict.fromkeys(handle.layers, 0.0)

    def hook_for(name: str) -> Any:
        factors = subspaces[name].factors

        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            on_x = [None if u is None else u.to(x.device, torch.float64) for u in factors]
            kept[name] += float(project(x, on_x).square().sum())
            total[name] += float(x.square().sum())

        return hook

    with handle.bypassed() as model:
        flags = {m: m.training for m in model.modules()}
        hooks = [
            handle.root.get_submodule(name).register_forward_pre_hook(hook_for(name))
            for name in handle.layers
        ]
        try:
            model.eval()
            with torch.no_grad():
                for x in inputs:
                    model(x)
        finally:
            for h in hooks:
                h.remove()
            for m, flag in flags.items():
                m.train(flag)
    return {name: kept[name] / total[name] if total[name] > 0 else 1.0 for name in kept}


def recalibrate(handle: MethodHandle, calib_loader: Iterable[Any]) -> None:
    """Phase I again on the current weights; the handle then trains with the new subspaces.

    A diagnostic beyond the paper (LANCE calibrates once). Uses the handle's own
    ``eps``, ``num_batches`` and ``modes``; the trained weights are shared, so the
    optimizer and its state carry on unchanged.

    Parameters
    ----------
    handle
        LANCE applied to a model; updated in place (its subspaces and replacements).
    calib_loader
        Calibration batches (e.g. the same ones Phase I used, so that only the weights
        differ).
    """
    settings = handle.settings
    with handle.bypassed():
        fresh = calibrate(
            handle.root,
            calib_loader,
            handle.layers,
            eps=settings.eps,
            num_batches=settings.num_batches,
            modes=settings.modes,
        )
    compress(handle.root, fresh)  # swaps the old LANCE layers for new ones
    handle.applied.subspaces = fresh
    handle.applied.replacements.update(
        {name: handle.root.get_submodule(name) for name in handle.layers}
    )


class SubspaceDiagnostics:
    """LANCE's subspace diagnostics over one fine-tuning run.

    Parameters
    ----------
    handle
        LANCE applied to the model, right after Phase I (measured at once).
    inputs
        Fixed training inputs for :func:`captured_energy`; empty: not measured.
    recalibrate_with
        Returns calibration batches for :func:`recalibrate` after every epoch but the
        last; ``None``: the subspaces stay as calibrated (the paper).
    """

    def __init__(
        self,
        handle: MethodHandle,
        inputs: Sequence[torch.Tensor],
        recalibrate_with: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        self.inputs = list(inputs)
        self.recalibrate_with = recalibrate_with
        self.energy: dict[str, list[float]] = {name: [] for name in handle.layers}
        self.ranks: list[dict[str, Any]] = [handle.ranks()]
        self._measure(handle)

    def _measure(self, handle: MethodHandle) -> None:
        if self.inputs:
            for name, share in captured_energy(handle, self.inputs).items():
                self.energy[name].append(share)

    def after_epoch(self, handle: MethodHandle, *, last: bool) -> None:
        """Measure the subspace that trained this epoch; recalibrate for the next one."""
        self._measure(handle)
        if self.recalibrate_with is not None and not last:
            with torch.random.fork_rng(devices=_cuda_devices(handle)):
                recalibrate(handle, self.recalibrate_with())
            self.ranks.append(handle.ranks())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``energy_batches``, ``subspace_energy`` (``{layer: [epochs + 1]}``
        or ``None``), ``recalibrated`` and ``ranks_per_epoch`` (the ranks in use during
        each epoch)."""
        return {
            "energy_batches": len(self.inputs),
            "subspace_energy": self.energy if self.inputs else None,
            "recalibrated": self.recalibrate_with is not None,
            "ranks_per_epoch": self.ranks,
        }


def _cuda_devices(handle: MethodHandle) -> list[torch.device]:
    """The CUDA device of the handle's model, if any (for ``fork_rng``)."""
    devices = {p.device for p in handle.model.parameters() if p.device.type == "cuda"}
    return sorted(devices, key=str)
