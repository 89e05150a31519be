"""Writing the MIMIC-IT on-disk format (REFERENCE 1.6): ``<P>_instructions.json`` (``meta`` and
``data``), ``<P>.parquet`` (pandas index ``id``, column ``base64``: URL-safe base64 PNGs) and
``<P>_train.json`` (instruction id -> in-context ids). Every file is written to a temporary name
and renamed into place."""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

__all__ = ["atomic_write_text", "write_json", "write_images_parquet", "encode_image", "BadMedia"]


class BadMedia(ValueError):
    """A media file that is not a readable image."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def encode_image(path: Path, size: int) -> bytes:
    """The image at ``path`` as a ``size`` x ``size`` RGB PNG (MIMIC-IT stores 224 x 224)."""
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise BadMedia(f"{path}: not a readable image ({exc})") from None
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_images_parquet(path: Path, images: list[tuple[str, bytes]]) -> None:
    """Rows ``(id, base64 of the PNG, URL-safe alphabet)`` with pandas metadata naming ``id`` the index,
    as MIMIC-IT's parquet files and the demo's are laid out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas = {
        "index_columns": ["id"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "base64", "field_name": "base64", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
            {"name": "id", "field_name": "id", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "vlmkit-syphus", "version": "1"},
        "pandas_version": "2.0.0",
    }
    schema = pa.schema([("base64", pa.string()), ("id", pa.string())]).with_metadata(
        {b"pandas": json.dumps(pandas).encode("utf-8")})
    table = pa.table({"base64": [base64.urlsafe_b64encode(png).decode("ascii") for _, png in images],
                      "id": [image_id for image_id, _ in images]}, schema=schema)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=256, compression="snappy")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
