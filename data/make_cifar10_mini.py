"""Rebuild the embedded CIFAR-10 subset ``data/cifar10-mini/{train,test}.zip``.

Usage::

    python data/make_cifar10_mini.py PATH/TO/cifar10-jpeg.tar.gz [--out data/cifar10-mini]

The tarball holds the ImageFolder tree ``cifar10/{train,test}/<class>/NNNN.jpg`` (CIFAR-10
re-encoded as JPEG by a public mirror). For every class the first 500 training and the
first 100 test files in sorted file-name order are kept. The JPEG bytes are copied
unchanged into one uncompressed ("stored") zip per split whose members are
``<class>/<file>.jpg``; member order, timestamps and permissions are fixed, so two runs
on the same tarball give byte-identical zips. ``unzip train.zip`` restores the
ImageFolder tree.
"""

from __future__ import annotations

import argparse
import hashlib
import tarfile
import zipfile
from collections import defaultdict
from pathlib import Path

PER_CLASS = {"train": 500, "test": 100}
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def read_tarball(path: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """Return ``{split: {class: {file name: JPEG bytes}}}`` for every image in the tarball."""
    tree: dict[str, dict[str, dict[str, bytes]]] = defaultdict(lambda: defaultdict(dict))
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 4 or parts[0] != "cifar10":
                continue
            _, split, cls, name = parts
            if split in PER_CLASS and name.endswith(".jpg"):
                tree[split][cls][name] = tar.extractfile(member).read()
    return tree


def write_split(files: dict[str, dict[str, bytes]], per_class: int, out: Path) -> int:
    """Write the first ``per_class`` files of each class into the zip ``out``; return count."""
    count = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for cls in sorted(files):
            names = sorted(files[cls])
            if len(names) < per_class:
                raise ValueError(f"class {cls!r} has {len(names)} files, need {per_class}")
            for name in names[:per_class]:
                info = zipfile.ZipInfo(f"{cls}/{name}", date_time=ZIP_DATE)
                info.external_attr = 0o644 << 16
                zf.writestr(info, files[cls][name])
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tarball", type=Path, help="path to cifar10-jpeg.tar.gz")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "cifar10-mini"
    )
    args = parser.parse_args()

    tree = read_tarball(args.tarball)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, per_class in PER_CLASS.items():
        if len(tree[split]) != 10:
            raise ValueError(f"expected 10 classes in {split}, found {sorted(tree[split])}")
        out = args.out / f"{split}.zip"
        count = write_split(tree[split], per_class, out)
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        print(f"{out}: {count} images, {out.stat().st_size} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
