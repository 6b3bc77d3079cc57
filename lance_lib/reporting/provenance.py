"""What produced a figure or table: the caption line and the ``*.provenance.json`` sidecar.

:class:`Provenance` names the profile, datasets, models and notes a reader sees under a
figure or beside a table, and the seeds, weights and device behind it. Its sidecar
(:meth:`Provenance.as_dict`) is built on :func:`lance_lib.provenance.record`, so every
figure and table also records the git commit, the torch and Python versions, the CPU or
GPU model and the thread count of the process that drew it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lance_lib import provenance as run_provenance
from lance_lib.io import write_json_atomic

__all__ = ["Provenance", "record_sources"]


def _strings(value: str | Iterable[Any]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def record_sources(records: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """The seeds, weight hashes and device behind ``records`` (from their ``provenance``).

    Returns
    -------
    dict
        ``seeds`` (sorted, distinct), ``weights`` (``{model: sha256}`` merged) and
        ``device`` (the one device they ran on, else the distinct devices joined with
        ``", "``, ``None`` when none is recorded): keyword arguments of
        :class:`Provenance`.
    """
    seeds: set[int] = set()
    weights: dict[str, str] = {}
    devices: set[str] = set()
    for record in records:
        prov = (record or {}).get("provenance") or {}
        seeds.update(int(s) for s in prov.get("seeds") or [])
        weights.update(prov.get("weights") or {})
        if prov.get("device"):
            devices.add(str(prov["device"]))
    device = ", ".join(sorted(devices)) or None
    return {"seeds": sorted(seeds), "weights": weights, "device": device}


@dataclass(frozen=True)
class Provenance:
    """What produced a figure or table.

    Parameters
    ----------
    profile
        Name of the ``profiles/<name>.yaml`` profile (``smoke``, ``cpu``, ``paper``).
    datasets, models
        Names as passed to :func:`lance_lib.data.get_dataset` /
        :func:`lance_lib.models.build_model` (a single string is one name).
    notes
        Anything else a reader needs (stand-in models, reduced epochs, ...), written in
        the caption.
    seeds
        The seeds the numbers depend on.
    weights
        ``{name: sha256}`` of every set of weights used (the reference manifest's
        ``sha256``, or :func:`lance_lib.pretrain.state_dict_sha256` of a model pretrained
        on the fly).
    device
        The device the experiments ran on (its GPU model is recorded when CUDA).
    parameters
        The resolved parameters that produced the output (a notebook's ``params``); the
        sidecar keeps their :func:`lance_lib.provenance.parameters_sha256`.

    Raises
    ------
    ValueError
        An empty ``profile``.
    """

    profile: str
    datasets: tuple[str, ...] | str
    models: tuple[str, ...] | str
    notes: tuple[str, ...] | str = ()
    seeds: tuple[int, ...] | int = ()
    weights: Mapping[str, str] = field(default_factory=dict)
    device: str | None = None
    parameters: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.profile:
            raise ValueError("Provenance needs the profile name, e.g. Provenance('smoke', ...)")
        for name in ("datasets", "models", "notes"):
            object.__setattr__(self, name, _strings(getattr(self, name)))
        seeds = (self.seeds,) if isinstance(self.seeds, int) else self.seeds
        object.__setattr__(self, "seeds", tuple(sorted({int(s) for s in seeds})))
        object.__setattr__(self, "weights", {str(k): str(v) for k, v in self.weights.items()})

    def with_records(self, records: Iterable[Mapping[str, Any] | None]) -> Provenance:
        """A copy naming the seeds, weights and device of ``records`` (:func:`record_sources`).

        Seeds and weights are merged with those already named; the device is the
        records' when they record one.
        """
        sources = record_sources(records)
        return replace(
            self,
            seeds=tuple(sorted({*self.seeds, *sources["seeds"]})),
            weights={**self.weights, **sources["weights"]},
            device=sources["device"] or self.device,
        )

    def caption(self) -> str:
        """One line: ``profile: smoke | datasets: ... | models: ...`` (+ notes)."""
        parts = [
            f"profile: {self.profile}",
            f"datasets: {', '.join(self.datasets) or '-'}",
            f"models: {', '.join(self.models) or '-'}",
        ]
        return " | ".join(parts + list(self.notes))

    def as_dict(self) -> dict[str, Any]:
        """The sidecar's content: the fields above plus :func:`lance_lib.provenance.record`.

        Keys ``profile``, ``datasets``, ``models``, ``notes``, ``seeds``, ``weights``,
        ``parameters_sha256`` (``None`` when no parameters were given) and those of
        :func:`lance_lib.provenance.environment` (``commit``, ``dirty``, ``dirty_paths``,
        ``python``, ``versions``, ``cpu``, ``cpu_count``, ``torch_threads``, ``device``,
        ``gpu``, ...).
        """
        params = self.parameters
        return run_provenance.record(
            parameters_sha256=None if params is None else run_provenance.parameters_sha256(params),
            seeds=list(self.seeds),
            weights=self.weights,
            device=self.device,
            profile=self.profile,
            datasets=list(self.datasets),
            models=list(self.models),
            notes=list(self.notes),
        )

    def write_sidecar(self, stem: str | os.PathLike) -> Path:
        """Write :meth:`as_dict` to ``<stem>.provenance.json`` atomically; return the path."""
        stem = Path(stem)
        return write_json_atomic(stem.with_name(f"{stem.name}.provenance.json"), self.as_dict())
