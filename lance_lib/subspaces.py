"""The result of Phase I: calibrated subspaces per layer, and the file that holds them.

:func:`lance_lib.calibration.calibrate` returns a :class:`Subspaces` mapping from layer
name to :class:`LayerSubspace` (the orthonormal factors ``U_i`` of Eq. (3), their ranks
and captured energy); :func:`lance_lib.layers.compress` consumes it (Phase II).

Mode order
----------
Factors are listed in the order of the layer input's modes: ``(B, C, H, W)`` for
Conv2d and ``(B, ..., features)`` for Linear.  A mode left uncompressed is given as
``None`` in ``factors`` (the list always has one entry per mode) and its rank is the
mode's full size.

Files
-----
:meth:`Subspaces.save` writes one ``torch.save`` file atomically
(:func:`lance_lib.io.atomic_write`, with the umask's mode); :meth:`Subspaces.load`
reads it with ``weights_only=True`` and names the file and what it holds when it is
not one ``save`` wrote.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write

__all__ = ["SUBSPACES_FORMAT", "LayerSubspace", "Subspaces"]

#: The ``format`` tag of the files :meth:`Subspaces.save` writes.
SUBSPACES_FORMAT = "lance-subspaces/1"


@dataclass
class LayerSubspace:
    """Calibrated subspaces of one layer's input.

    Attributes
    ----------
    factors
        One entry per input mode: an ``(n_i, r_i)`` orthonormal factor ``U_i``
        (float64; cast to the layer's dtype by :func:`compress`) or ``None`` for an
        uncompressed mode.
    ranks
        ``r_i`` per mode (``n_i`` for uncompressed modes).
    energy
        Fraction of the mode covariance's energy captured per mode (1.0 when
        uncompressed).
    input_shape
        The input shape ``(n_1, ..., n_d)`` seen during calibration.
    kind
        ``"conv2d"`` or ``"linear"``.
    """

    factors: list[torch.Tensor | None]
    ranks: list[int]
    energy: list[float]
    input_shape: tuple[int, ...]
    kind: str

    @property
    def modes(self) -> list[int]:
        """Indices of the compressed modes."""
        return [i for i, u in enumerate(self.factors) if u is not None]

    def core_shape(self) -> tuple[int, ...]:
        """Shape of the core tensor ``G`` kept for backward, Eq. (1)."""
        return tuple(self.ranks)


@dataclass
class Subspaces(Mapping[str, LayerSubspace]):
    """Calibrated subspaces of several layers, keyed by module name.

    Save with :meth:`save`, load with :meth:`load`.  ``settings`` records how the
    subspaces were calibrated: ``eps``, ``modes``, ``memory_rule``,
    ``num_batches`` (the batches actually folded into Eq. (2)) and
    ``num_batches_requested`` (the ``num_batches`` asked for; larger when the loader
    ran out first).
    """

    layers: dict[str, LayerSubspace]
    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerSubspace:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def save(self, path: str | os.PathLike) -> None:
        """Write all subspaces to one file, atomically (:func:`lance_lib.io.atomic_write`)."""
        payload = {
            "format": SUBSPACES_FORMAT,
            "settings": self.settings,
            "layers": {
                name: {
                    "factors": s.factors,
                    "ranks": s.ranks,
                    "energy": s.energy,
                    "input_shape": list(s.input_shape),
                    "kind": s.kind,
                }
                for name, s in self.layers.items()
            },
        }
        atomic_write(path, lambda handle: torch.save(payload, handle), binary=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Subspaces:
        """Read subspaces written by :meth:`save`.

        Only tensors and plain containers are unpickled (``torch.load`` with
        ``weights_only=True``): a subspaces file never needs more.

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ValueError
            The file is not one :meth:`save` wrote: not a PyTorch file (e.g. JSON
            text), a bare tensor or another object, another ``format``, or a
            mapping without ``layers`` / ``settings`` or with malformed layer
            entries; the message names the file, what it holds and the fix.
        """
        path = Path(path)
        fix = "give the path of a file written by Subspaces.save, or calibrate again"
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(
                f"{str(path)!r} is not a LANCE subspaces file: it holds {_describe_file(path)} "
                f"({type(error).__name__}); {fix}"
            ) from None
        if not isinstance(payload, Mapping):
            raise ValueError(
                f"{str(path)!r} is not a LANCE subspaces file: it holds a "
                f"{type(payload).__name__}, not the mapping Subspaces.save writes; {fix}"
            )
        if payload.get("format") != SUBSPACES_FORMAT:
            raise ValueError(
                f"{str(path)!r} is not a LANCE subspaces file: its format is "
                f"{payload.get('format')!r}, expected {SUBSPACES_FORMAT!r} (keys: "
                f"{sorted(map(str, payload))}); {fix}"
            )
        missing = [key for key in ("layers", "settings") if key not in payload]
        if missing or not isinstance(payload["layers"], Mapping):
            raise ValueError(
                f"{str(path)!r} is a truncated or edited LANCE subspaces file: it lacks "
                f"{missing or ['a layers mapping']}; {fix}"
            )
        layers = {}
        for name, d in payload["layers"].items():
            try:
                layers[name] = LayerSubspace(
                    factors=list(d["factors"]),
                    ranks=[int(r) for r in d["ranks"]],
                    energy=[float(e) for e in d["energy"]],
                    input_shape=tuple(int(n) for n in d["input_shape"]),
                    kind=d["kind"],
                )
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"{str(path)!r}: the entry of layer {name!r} is malformed "
                    f"({type(error).__name__}: {error}); {fix}"
                ) from None
        return cls(layers, dict(payload["settings"]))


def _describe_file(path: Path) -> str:
    """A few words on what a file that ``torch.load`` refused holds (for messages)."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        return "nothing (an empty file)"
    if head.startswith(b"PK"):
        return "a PyTorch archive with objects other than tensors and plain containers"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "text"
    return "binary data that is not a PyTorch file"
