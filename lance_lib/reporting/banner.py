"""The banner a notebook shows under the smoke profile: what its numbers are, where to look.

Every notebook calls :func:`show_banner` once, after its imports. Under ``smoke`` it
says that the run is a pipeline check and links the notebook's executed copy under the
committed reference profile (``figures/reference/notebooks/<name>.ipynb``, written by
``make figures PROFILE=reference``), which shows every figure and table without a
kernel. Under any other profile it shows nothing.
"""

from __future__ import annotations

from pathlib import Path

from lance_lib.paths import repo_root

__all__ = ["REFERENCE_NOTEBOOKS", "banner_text", "show_banner"]

#: The executed reference notebooks, relative to the repository root.
REFERENCE_NOTEBOOKS = Path("figures") / "reference" / "notebooks"


def banner_text(profile: str, notebook: str) -> str | None:
    """The Markdown banner of ``notebook`` under ``profile``; ``None`` when it has none.

    Parameters
    ----------
    profile
        The profile the notebook runs (only ``"smoke"`` has a banner).
    notebook
        The notebook's file name or stem (``"fig2_angle"``): its executed reference
        copy is linked, relative to ``notebooks/`` (the link works in JupyterLab served
        from the repository root and on a code-hosting site).

    Returns
    -------
    str or None
        A Markdown block quote, or ``None``.
    """
    if profile != "smoke":
        return None
    name = Path(notebook).stem
    copy = REFERENCE_NOTEBOOKS / f"{name}.ipynb"
    link = (Path("..") / copy).as_posix()
    executed = (
        f"this notebook executed with it: [{name} (reference)]({link})."
        if (repo_root() / copy).is_file()
        else f"this notebook's executed reference copy (`{copy.as_posix()}`) is committed "
        "when the reference profile is next rebuilt."
    )
    return (
        "> **Pipeline check.** The smoke profile runs the reference profile's networks "
        "(the reference ResNet18 and MCU stand-in of `data/weights/`) for a few training "
        "steps on the small embedded dataset `cifar10_mini`: it shows that every step "
        "works; its numbers are not results. The reference profile's figures and tables "
        f"are committed in `figures/reference/`; {executed}"
    )


def show_banner(profile: str, notebook: str) -> None:
    """Display :func:`banner_text` in the cell output (nothing for other profiles)."""
    text = banner_text(profile, notebook)
    if text is not None:
        from IPython.display import Markdown, display

        display(Markdown(text))
