"""Lazy image stores: image id -> decoded PIL image, one image read from disk per access.

MIMIC-IT (REFERENCE 1.6) keeps its images base64-encoded, either in a parquet file indexed by image
id with one ``base64`` column, or (legacy) in one flat JSON map ``{image id: base64}``. Loading
either whole costs as much memory as the data set is large; these stores keep only an index of the
ids (a few dozen bytes per image) and read one value when asked for it:

- :class:`ParquetImages` reads the id column once, then decodes an image by reading only the row
  group that holds it (the last row group read is cached, so sequential access reads each group
  once). Row groups larger than ``max_group_bytes`` are streamed in small batches instead of being
  held whole; such files are better rewritten with :func:`rewrite_row_groups`.
- :class:`JsonImages` scans the JSON file once, streaming, for the byte offsets of every value,
  then reads a value by seeking to it.

Base64 may use the URL-safe (``-``, ``_``) or the standard (``+``, ``/``) alphabet; it is detected
per value. Data that does not decode raises :class:`ImageDecodeError` carrying the image id.

The stores can be pickled (DataLoader workers) and reopen their file in each process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import base64
import binascii
import io
import json
import os
import re
import warnings
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.core.errors import VlmkitError

__all__ = [
    "ImageStoreError",
    "ImageDecodeError",
    "MissingImageError",
    "ParquetImages",
    "JsonImages",
    "open_image_store",
    "decode_base64",
    "decode_image",
    "read_image_file",
    "write_parquet_images",
    "rewrite_row_groups",
]


class ImageStoreError(VlmkitError):
    """An image file that cannot be used as a store (missing, not parquet/JSON, no id column)."""


class ImageDecodeError(ImageStoreError):
    """One image's data is not valid base64 of a readable image."""

    def __init__(self, image_id: str, source: str | os.PathLike, reason: str):
        self.image_id = image_id
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: image {image_id!r} does not decode: {reason}")

    def __reduce__(self):  # picklable across DataLoader workers
        return type(self), (self.image_id, self.source, self.reason)


class MissingImageError(ImageStoreError, KeyError):
    """An image id the store does not hold."""

    def __init__(self, image_id: str, source: str | os.PathLike):
        self.image_id = image_id
        self.source = str(source)
        super().__init__(f"{self.source}: no image with id {image_id!r}")

    def __reduce__(self):
        return type(self), (self.image_id, self.source)

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.args[0]


# ------------------------------------------------------------------------------------------ decoding
_URLSAFE = re.compile(r"[-_]")
_STANDARD = re.compile(r"[+/]")
_WHITESPACE = re.compile(r"\s+")
# magic numbers of the image formats stored as raw bytes in a binary column
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def decode_base64(text: str | bytes) -> bytes:
    """Base64 text in the URL-safe or standard alphabet (detected; padding optional; whitespace
    and a ``data:...;base64,`` prefix ignored) -> bytes. Raises ``ValueError`` when it is neither."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("ascii")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = _WHITESPACE.sub("", text)
    urlsafe, standard = bool(_URLSAFE.search(text)), bool(_STANDARD.search(text))
    if urlsafe and standard:
        raise ValueError("mixes the URL-safe (-_) and standard (+/) base64 alphabets")
    text = text.rstrip("=")
    if len(text) % 4 == 1:
        raise ValueError(f"base64 of impossible length {len(text)}")
    text += "=" * (-len(text) % 4)
    if urlsafe:
        text = text.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"not base64: {error}") from None


def decode_image(data: str | bytes, image_id: str, source: str | os.PathLike = "") -> Image.Image:
    """A stored value (base64 text, or raw image bytes from a binary column) -> an RGB PIL image.

    Raises :class:`ImageDecodeError` (with ``image_id``) for anything that is not an image."""
    try:
        if isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:4]).startswith(_IMAGE_MAGIC):
            raw = bytes(data)
        elif isinstance(data, (str, bytes, bytearray, memoryview)):
            raw = decode_base64(data)
        else:
            raise ValueError(f"expected base64 text, got {type(data).__name__}")
        if not raw:
            raise ValueError("empty")
        return _rgb(io.BytesIO(raw))
    except ImageDecodeError:
        raise
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        reason = str(error) or type(error).__name__
        raise ImageDecodeError(image_id, source, reason) from error


def read_image_file(path: str | os.PathLike, image_id: str | None = None) -> Image.Image:
    """An image file -> an RGB PIL image, with the same checks as :func:`decode_image`: anything
    PIL refuses (not an image, truncated, a decompression bomb larger than
    ``PIL.Image.MAX_IMAGE_PIXELS`` allows) raises :class:`ImageDecodeError` (``image_id``: default
    the path). A missing file raises ``FileNotFoundError``."""
    path = Path(path)
    try:
        return _rgb(path)
    except FileNotFoundError:
        raise
    except Exception as error:
        reason = str(error) or type(error).__name__
        raise ImageDecodeError(str(path) if image_id is None else image_id, path, reason) from error


def _rgb(source: Any) -> Image.Image:
    """Open, fully decode and convert to RGB (``Image.open`` refuses decompression bombs)."""
    with Image.open(source) as image:
        image.load()
        return image.convert("RGB")


class _Store(ABC):
    """Common surface of the stores: ``ids()``, ``in``, ``len``, ``get(id)``, ``[id]``."""

    path: Path

    @abstractmethod
    def ids(self) -> list[str]:
        """Every image id, in file order."""

    @abstractmethod
    def get(self, image_id: str) -> Image.Image:
        """The decoded RGB image of ``image_id``."""

    def __getitem__(self, image_id: str) -> Image.Image:
        return self.get(image_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} images)"


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ImageStoreError(f"image file {str(path)!r} {what}")
    return path


# ------------------------------------------------------------------------------------------- parquet
class ParquetImages(_Store):
    """Images in a parquet file: one row per image, a ``base64`` column (text, or raw image bytes)
    and an id column.

    The id column is ``id_column`` if given, else the pandas index saved with the file (Otter's
    files are written from a DataFrame indexed by image id), else a column named ``id``,
    ``image_id`` or ``ids``, else the one column besides ``base64``.

    Memory: the ids, plus at most one row group's ``base64`` column (``cache_groups`` of them)
    when a group's uncompressed column is at most ``max_group_bytes``; a larger group is streamed
    in batches of ``stream_batch`` rows, continuing from the last position for sequential access.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        column: str = "base64",
        id_column: str | None = None,
        cache_groups: int = 1,
        max_group_bytes: int = 64 << 20,
        stream_batch: int = 64,
    ):
        import pyarrow.parquet as pq

        self.path = _require_file(path)
        self.column = column
        self.cache_groups = max(0, int(cache_groups))
        self.max_group_bytes = int(max_group_bytes)
        self.stream_batch = max(1, int(stream_batch))
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as error:
            raise ImageStoreError(f"{self.path}: not a readable parquet file ({error})") from None
        names = pf.schema_arrow.names
        if column not in names:
            raise ImageStoreError(f"{self.path}: no {column!r} column (columns: {', '.join(names)})")
        self.id_column = id_column or _find_id_column(pf, column, self.path)
        if self.id_column not in names:
            raise ImageStoreError(f"{self.path}: no id column {self.id_column!r} (columns: {', '.join(names)})")
        self._column_index = names.index(column)

        meta = pf.metadata
        self._group_starts: list[int] = []  # first row of each group
        self._index: dict[str, int] = {}  # id -> row in the file
        self._streamed: set[int] = set()  # groups too large to hold
        leaf = _leaf_index(pf, column)
        row = 0
        for g in range(meta.num_row_groups):
            self._group_starts.append(row)
            ids = pf.read_row_group(g, columns=[self.id_column], use_threads=False).column(0)
            for offset, image_id in enumerate(ids.to_pylist()):
                if image_id is not None:
                    self._index[str(image_id)] = row + offset
            row += meta.row_group(g).num_rows
            if leaf is not None and meta.row_group(g).column(leaf).total_uncompressed_size > self.max_group_bytes:
                self._streamed.add(g)
        self._num_rows = row
        if self._streamed:
            warnings.warn(
                f"{self.path}: {len(self._streamed)} row group(s) hold more than {self.max_group_bytes >> 20} MiB of "
                "images; they are streamed, and random access to them is slow. Rewrite the file with small row "
                "groups: vlmkit.core.data.images.rewrite_row_groups(src, dst)",
                stacklevel=2,
            )
        self._reset()

    # the open file and caches are per process (DataLoader workers get their own)
    def _reset(self) -> None:
        self._pid: int | None = None
        self._file: Any = None
        self._cache: dict[int, Any] = {}  # group -> base64 column (insertion order = LRU order)
        self._stream: tuple[int, Any, int, Any] | None = None  # group, batch iterator, first row, batch

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_pid", "_file", "_cache", "_stream"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _parquet(self) -> Any:
        if self._pid != os.getpid() or self._file is None:
            import pyarrow.parquet as pq

            self._reset()
            try:
                self._file = pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
            except Exception as error:
                raise ImageStoreError(f"{self.path}: cannot reopen ({error})") from None
            self._pid = os.getpid()
        return self._file

    def ids(self) -> list[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def raw(self, image_id: str) -> Any:
        """The stored value of ``image_id`` (base64 text or bytes), undecoded."""
        try:
            row = self._index[image_id]
        except KeyError:
            raise MissingImageError(image_id, self.path) from None
        group = bisect_right(self._group_starts, row) - 1
        offset = row - self._group_starts[group]
        if group in self._streamed or self.cache_groups == 0:
            return self._streamed_value(group, offset)
        values = self._cache.pop(group, None)
        if values is None:
            values = self._parquet().read_row_group(group, columns=[self.column], use_threads=False).column(0)
            while len(self._cache) >= self.cache_groups:
                self._cache.pop(next(iter(self._cache)))
        self._cache[group] = values
        return values[offset].as_py()

    def _streamed_value(self, group: int, offset: int) -> Any:
        pf = self._parquet()
        state = self._stream
        if state is None or state[0] != group or offset < state[2]:
            batches = pf.iter_batches(batch_size=self.stream_batch, row_groups=[group], columns=[self.column], use_threads=False)
            state = (group, batches, 0, None)
        group, batches, first, batch = state
        while batch is None or offset >= first + batch.num_rows:
            if batch is not None:
                first += batch.num_rows
            try:
                batch = next(batches)
            except StopIteration:
                self._stream = None
                raise ImageStoreError(f"{self.path}: row group {group} ended before row {offset}") from None
        self._stream = (group, batches, first, batch)
        return batch.column(0)[offset - first].as_py()

    def get(self, image_id: str) -> Image.Image:
        """The image ``image_id``, decoded, RGB."""
        return decode_image(self.raw(image_id), image_id, self.path)


def _leaf_index(pf: Any, column: str) -> int | None:
    for i in range(pf.metadata.num_columns):
        if pf.schema.column(i).path == column:
            return i
    return None


def _find_id_column(pf: Any, data_column: str, path: Path) -> str:
    names = pf.schema_arrow.names
    pandas = pf.schema_arrow.pandas_metadata or {}
    stored = [c for c in pandas.get("index_columns", []) if isinstance(c, str)]  # RangeIndex is a dict
    if len(stored) == 1:
        return stored[0]
    for name in ("id", "image_id", "ids"):
        if name in names:
            return name
    others = [n for n in names if n != data_column]
    if len(others) == 1:
        return others[0]
    raise ImageStoreError(
        f"{path}: cannot tell which column holds the image ids (columns: {', '.join(names)}); "
        "store them as the pandas index or in a column named 'id'"
    )


def write_parquet_images(
    items: Iterable[tuple[str, str | bytes]],
    path: str | os.PathLike,
    *,
    row_group_size: int = 256,
    as_pandas_index: bool = True,
) -> Path:
    """Write ``(image id, base64 text or image bytes)`` pairs to a parquet file with a ``base64``
    column (bytes are base64-encoded, URL-safe) and small row groups, streaming.

    With ``as_pandas_index`` the ids are saved as a pandas index (as Otter's files are), else as
    an ``id`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    id_name = "__index_level_0__" if as_pandas_index else "id"
    schema = pa.schema([("base64", pa.string()), (id_name, pa.string())])
    if as_pandas_index:
        pandas = {
            "index_columns": [id_name],
            "column_indexes": [],
            "columns": [
                {"name": "base64", "field_name": "base64", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
                {"name": None, "field_name": id_name, "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
            ],
            "creator": {"library": "vlmkit"},
            "pandas_version": "2.0.0",
        }
        schema = schema.with_metadata({b"pandas": json.dumps(pandas).encode()})
    ids: list[str] = []
    values: list[str] = []
    with pq.ParquetWriter(path, schema) as writer:
        for image_id, value in items:
            if isinstance(value, (bytes, bytearray)):
                value = base64.urlsafe_b64encode(bytes(value)).decode("ascii")
            ids.append(str(image_id))
            values.append(value)
            if len(ids) >= row_group_size:
                writer.write_table(pa.table({"base64": values, id_name: ids}, schema=schema), row_group_size=row_group_size)
                ids, values = [], []
        if ids:
            writer.write_table(pa.table({"base64": values, id_name: ids}, schema=schema), row_group_size=row_group_size)
    return path


def rewrite_row_groups(src: str | os.PathLike, dst: str | os.PathLike, *, row_group_size: int = 256) -> Path:
    """Copy a parquet image file with row groups of ``row_group_size`` rows (streaming, bounded
    memory): random access to one image then reads only its small group."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(_require_file(src), buffer_size=1 << 20)
    with pq.ParquetWriter(dst, pf.schema_arrow) as writer:
        for batch in pf.iter_batches(batch_size=row_group_size, use_threads=False):
            writer.write_batch(batch, row_group_size=row_group_size)
    return Path(dst)


# ---------------------------------------------------------------------------------------------- JSON
_NON_WS = re.compile(rb"[^ \t\r\n]")
_QUOTE_OR_ESCAPE = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb"[,}\s]")


class _Scanner:
    """Streaming reader of a flat JSON object ``{"key": value, ...}``: yields each key and the
    byte span of its value, holding at most about two chunks in memory."""

    def __init__(self, file: Any, name: str, chunk: int = 1 << 20):
        self.file, self.name, self.chunk = file, name, chunk
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0

    def _fill(self) -> bool:
        data = self.file.read(self.chunk)
        if not data:
            return False
        self.base += self.pos
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def _fail(self, what: str) -> ImageStoreError:
        return ImageStoreError(f"{self.name}: not a flat JSON map of image id -> base64: {what} at byte {self.base + self.pos}")

    def next_char(self) -> bytes:
        """The next non-whitespace byte, consumed (b'' at the end of the file)."""
        while True:
            match = _NON_WS.search(self.buf, self.pos)
            if match:
                self.pos = match.end()
                return self.buf[match.start() : match.end()]
            self.pos = len(self.buf)
            if not self._fill():
                return b""

    def string(self, keep: bool) -> tuple[int, int, bool, bytes]:
        """After an opening quote: (start offset, end offset, has escapes, the raw bytes if keep)."""
        start = self.base + self.pos
        parts: list[bytes] = []
        escaped = False
        while True:
            match = _QUOTE_OR_ESCAPE.search(self.buf, self.pos)
            if match is None:
                if keep:
                    parts.append(self.buf[self.pos :])
                self.pos = len(self.buf)
                if not self._fill():
                    raise self._fail("unterminated string")
                continue
            if match.group() == b'"':
                if keep:
                    parts.append(self.buf[self.pos : match.start()])
                end = self.base + match.start()
                self.pos = match.end()
                return start, end, escaped, b"".join(parts)
            escaped = True
            if match.end() >= len(self.buf):  # the escaped byte is in the next chunk
                if keep:
                    parts.append(self.buf[self.pos : match.start()])
                self.pos = match.start()
                if not self._fill():
                    raise self._fail("unterminated string")
                # buf now starts at the backslash
                if keep:
                    parts.append(self.buf[:2])
                self.pos = 2
                continue
            if keep:
                parts.append(self.buf[self.pos : match.end() + 1])
            self.pos = match.end() + 1

    def scalar(self) -> None:
        """Skip a number / true / false / null (its first byte already consumed)."""
        while True:
            match = _SCALAR_END.search(self.buf, self.pos)
            if match:
                self.pos = match.start()
                return
            self.pos = len(self.buf)
            if not self._fill():
                return

    def items(self) -> Iterator[tuple[str, int, int, bool]]:
        """(key, value start, value end, escaped); a value that is not a string has start -1."""
        if self.next_char() != b"{":
            raise self._fail("expected '{'")
        c = self.next_char()
        if c == b"}":
            return
        while True:
            if c != b'"':
                raise self._fail("expected a quoted image id")
            _, _, key_escaped, raw_key = self.string(keep=True)
            try:
                key = json.loads(b'"' + raw_key + b'"') if key_escaped else raw_key.decode("utf-8")
            except ValueError as error:
                raise self._fail(f"bad key ({error})") from None
            if self.next_char() != b":":
                raise self._fail("expected ':'")
            c = self.next_char()
            if c == b'"':
                start, end, escaped, _ = self.string(keep=False)
                yield key, start, end, escaped
            elif c in (b"{", b"["):
                raise self._fail(f"the value of {key!r} is a nested {'object' if c == b'{' else 'array'}")
            elif c:
                self.scalar()
                yield key, -1, 0, False
            c = self.next_char()
            if c == b"}":
                return
            if c != b",":
                raise self._fail("expected ',' or '}'")
            c = self.next_char()


class JsonImages(_Store):
    """Images in a flat JSON map ``{image id: base64}`` (MIMIC-IT's legacy ``XX.json``).

    The file is scanned once, streaming, for the byte offset and length of each value (never
    parsed whole); :meth:`get` seeks to the value and decodes only it. A repeated id keeps its last
    value, as ``json.load`` would."""

    def __init__(self, path: str | os.PathLike, *, chunk_size: int = 1 << 20):
        self.path = _require_file(path)
        self._rows: dict[str, int] = {}
        self._starts = array("q")
        self._lengths = array("q")  # negative: the value has escapes (decode it as a JSON string)
        with open(self.path, "rb") as file:
            for key, start, end, escaped in _Scanner(file, str(self.path), chunk_size).items():
                row = self._rows.get(key)
                if row is None:
                    self._rows[key] = row = len(self._starts)
                    self._starts.append(0)
                    self._lengths.append(0)
                self._starts[row] = start
                self._lengths[row] = -(end - start) - 1 if escaped else end - start
        self._reset()

    def _reset(self) -> None:
        self._pid: int | None = None
        self._file: Any = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_pid", None)
        state.pop("_file", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None and getattr(self, "_pid", None) == os.getpid():
            file.close()

    def _handle(self) -> Any:
        if self._pid != os.getpid() or self._file is None:
            self._file = open(self.path, "rb")
            self._pid = os.getpid()
        return self._file

    def ids(self) -> list[str]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._rows

    def raw(self, image_id: str) -> Any:
        """The stored value of ``image_id`` (base64 text), undecoded; ``None`` for a non-string."""
        try:
            row = self._rows[image_id]
        except KeyError:
            raise MissingImageError(image_id, self.path) from None
        start, length = self._starts[row], self._lengths[row]
        if start < 0:
            return None
        escaped = length < 0
        if escaped:
            length = -length - 1
        file = self._handle()
        file.seek(start)
        data = file.read(length)
        if len(data) != length:
            raise ImageDecodeError(image_id, self.path, "the file changed since it was indexed")
        if escaped:
            try:
                return json.loads(b'"' + data + b'"')
            except ValueError as error:
                raise ImageDecodeError(image_id, self.path, f"bad JSON string ({error})") from None
        return data

    def get(self, image_id: str) -> Image.Image:
        """The image ``image_id``, decoded, RGB."""
        return decode_image(self.raw(image_id), image_id, self.path)


# ---------------------------------------------------------------------------------------------------
def open_image_store(path: str | os.PathLike, **kwargs: Any) -> ParquetImages | JsonImages:
    """A store for ``path``: parquet by its ``.parquet`` suffix or its magic bytes, else JSON."""
    path = _require_file(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        return ParquetImages(path, **kwargs)
    if path.suffix.lower() == ".json":
        return JsonImages(path, **kwargs)
    with open(path, "rb") as file:
        head = file.read(4)
    if head == b"PAR1":
        return ParquetImages(path, **kwargs)
    return JsonImages(path, **kwargs)
