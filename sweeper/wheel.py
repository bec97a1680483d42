"""This install's own code as a wheel, so that a rendered notebook installs exactly the sweeper that rendered it.

Built from the files of the imported `sweeper` and `runner` packages (a source checkout, an editable install or a
wheel's site-packages alike) and this distribution's installed metadata. Its version gets a local label that is a
hash of the code (`0.1.0+c1a2b3c4d5e6`), so pip tells two builds apart and a fork works unpublished. The same code
gives the same bytes (fixed timestamps), so a re-rendered notebook changes only where the code did.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import zipfile
from importlib import metadata
from pathlib import Path

from sweeper.errors import UserError

DISTRIBUTION = "sweeper-qlora"  # on PyPI, `sweeper` is an unrelated project (docs/design.md)
PACKAGES = ("sweeper", "sweeper.templates", "runner")  # sweeper.templates is the checkout's templates/ folder
ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def package_files() -> list[tuple[str, bytes]]:
    """(path in the wheel, contents) of every file of the import packages, in a fixed order; no bytecode."""
    import importlib

    files: dict[str, bytes] = {}
    for name in PACKAGES:
        root = Path(importlib.import_module(name).__file__).parent
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                files["/".join([*name.split("."), *path.relative_to(root).parts])] = path.read_bytes()
    return sorted(files.items())  # installed from a wheel, sweeper's walk already held sweeper/templates/


def build(stored: bool = False) -> tuple[str, bytes]:
    """(wheel file name, wheel bytes) of this install; stored: its files uncompressed (for the notebook, which
    compresses the whole wheel at once: xz over every file together is a third smaller than each file deflated)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise UserError(f"this sweeper is not installed as the distribution {DISTRIBUTION!r} (pip install -e . in "
                        "its checkout), so its code cannot go into the notebook; or pass --install REQUIREMENT") from None
    files = package_files()
    code_hash = hashlib.sha256(b"".join(name.encode() + b"\0" + data for name, data in files)).hexdigest()[:12]
    version = f"{dist.version.split('+')[0]}+c{code_hash}"
    stem = f"{DISTRIBUTION.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    # METADATA in a dist-info; PKG-INFO in the egg-info an editable install leaves in a checkout (found first when
    # the checkout is on sys.path): the same core metadata either way.
    meta = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    meta = re.sub(r"(?m)^Version: .*$", f"Version: {version}", meta, count=1)
    meta = re.sub(r"(?m)^Description-Content-Type: .*\n", "", meta.split("\n\n", 1)[0]) + "\n"  # no README inside
    files += [(f"{info}/METADATA", meta.encode()),
              (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: sweeper\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
              (f"{info}/entry_points.txt", (dist.read_text("entry_points.txt") or "").encode())]
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files] + [f"{info}/RECORD,,"]
    files.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files:
            entry = zipfile.ZipInfo(name, ZIP_TIME)
            entry.external_attr = 0o644 << 16
            if stored:
                wheel.writestr(entry, data, compress_type=zipfile.ZIP_STORED)
            else:
                wheel.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return f"{stem}-py3-none-any.whl", buffer.getvalue()


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
