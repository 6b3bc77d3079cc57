"""The datasets a profile needs, and which of them torchvision can download.

``make figures PROFILE=paper DOWNLOAD=1`` runs ``python -m lance_lib.experiments.data_plan
--profile paper --download`` before any notebook: every dataset the profile's notebooks
name that is not under the data root (:func:`lance_lib.data.data_root`) is downloaded by
torchvision when it can be, and the others (miniImageNet, notMNIST, CUB-200, ...) are
named with the files expected and where to get them; the command then fails, so the
notebooks do not start on missing data. Without ``--download`` it only prints the plan
(:func:`download_plan`), which is what the tests check, without a network.

The datasets of a profile are read from its sections: the keys in :data:`DATASET_KEYS`
name datasets, ``benchmarks`` names continual benchmarks whose datasets are used.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lance_lib.continual import BENCHMARKS
from lance_lib.data import DATASETS, DatasetNotFoundError, data_root, get_dataset
from lance_lib.profiles import load_profile

__all__ = ["DATASET_KEYS", "PlanItem", "download", "download_plan", "main", "profile_datasets"]

#: Profile keys whose value is a dataset name or a list of them.
DATASET_KEYS = ("dataset", "datasets", "eps_dataset", "n_dataset")
SPLITS = ("train", "test")

Action = Literal["present", "download", "manual"]


@dataclass(frozen=True)
class PlanItem:
    """What to do for one dataset of a profile.

    Attributes
    ----------
    name
        Registry name (:data:`lance_lib.data.DATASETS`).
    action
        ``"present"`` (under the data root), ``"download"`` (missing, torchvision
        fetches it) or ``"manual"`` (missing, no automatic download).
    layout, source
        The files expected under the data root, and where they come from.
    """

    name: str
    action: Action
    layout: str
    source: str

    def describe(self) -> str:
        """One line for the ``present`` and ``download`` items, three for ``manual``."""
        if self.action != "manual":
            return f"{self.name}: {self.action}"
        return f"{self.name}: get it yourself\n  files: {self.layout}\n  from: {self.source}"


def _names(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def profile_datasets(profile: str | Mapping[str, Any]) -> list[str]:
    """The registered datasets the notebooks of ``profile`` (a name or its loaded data) use.

    Raises
    ------
    ValueError
        A section names a dataset or benchmark that is not registered.
    """
    data = load_profile(profile) if isinstance(profile, str) else profile
    found: list[str] = []
    for section_name, section in data.items():
        for key, value in (section or {}).items():
            if key in DATASET_KEYS:
                names = _names(value)
            elif key == "benchmarks":
                unknown = [b for b in _names(value) if b not in BENCHMARKS]
                if unknown:
                    raise ValueError(
                        f"section {section_name!r}: benchmarks {unknown} are not registered; "
                        f"known: {sorted(BENCHMARKS)}"
                    )
                names = [d for b in _names(value) for d in BENCHMARKS[b].datasets]
            else:
                continue
            unknown = [n for n in names if n not in DATASETS]
            if unknown:
                raise ValueError(
                    f"section {section_name!r}, key {key!r}: datasets {unknown} are not "
                    f"registered; known: {sorted(DATASETS)}"
                )
            found += names
    return list(dict.fromkeys(found))


def _present(name: str, root: os.PathLike | str) -> bool:
    try:
        for split in SPLITS:
            get_dataset(name, split, root=root)
    except DatasetNotFoundError:
        return False
    except RuntimeError:  # torchvision's "Dataset not found": its folder holds too little
        return False
    return True


def download_plan(
    profile: str | Mapping[str, Any], root: str | os.PathLike | None = None
) -> list[PlanItem]:
    """What :func:`download` would do for each dataset of ``profile``; downloads nothing.

    Parameters
    ----------
    profile
        A profile name (``profiles/<profile>.yaml``) or its loaded data.
    root
        The data root (default :func:`lance_lib.data.data_root`).
    """
    root = data_root(root)
    plan = []
    for name in profile_datasets(profile):
        spec = DATASETS[name]
        if _present(name, root):
            action: Action = "present"
        else:
            action = "download" if spec.downloadable else "manual"
        plan.append(PlanItem(name, action, spec.layout, spec.source))
    return plan


def download(plan: Iterable[PlanItem], root: str | os.PathLike | None = None) -> list[PlanItem]:
    """Let torchvision download every ``"download"`` item; return the ``"manual"`` ones."""
    root = data_root(root)
    for item in plan:
        if item.action == "download":
            sys.stderr.write(f"{item.name}: downloading into {root / item.name}\n")
            for split in SPLITS:
                get_dataset(item.name, split, root=root, download=True)
    return [item for item in plan if item.action == "manual"]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the plan; with ``--download`` carry it out (module notes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--root", default=None, help="data root (default: $LANCE_DATA or data/)")
    parser.add_argument("--download", action="store_true", help="download what torchvision can")
    args = parser.parse_args(argv)
    plan = download_plan(args.profile, args.root)
    for item in plan:
        print(item.describe())
    if not args.download:
        return 0
    manual = download(plan, args.root)
    if manual:
        names = ", ".join(item.name for item in manual)
        print(
            f"profile {args.profile!r}: downloaded what torchvision can; still missing under "
            f"{data_root(args.root)}: {names} (files and sources above)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
