"""``class_folders``: pictures in one folder per class, as (picture, "What is in the image?", class name).

For classification evaluations (``fewshot`` with ``task: classification``) and any template that
renders single exchanges. Classes are the sub-folders of ``root`` in name order (``_`` reads as a
space in the class name); records are every picture of every class, class by class.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.core.data.images import ImageDecodeError, read_image_file
from vlmkit.core.data.records import Exchange, Media, Record, Turn
from vlmkit.core.errors import VlmkitError
from vlmkit.core.interfaces import Dataset, DatasetConfig

#: the picture files a class folder's images are read from
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: the question every picture is asked with
QUESTION = "What is in the image?"


def display_name(folder: str) -> str:
    """A class folder's name as the class is said (``_`` reads as a space)."""
    return folder.replace("_", " ")


class ClassFoldersConfig(DatasetConfig):
    root: str
    """A folder of class folders."""
    classes: list[str] | None = None
    """Only these class folders (default: all)."""


class ClassFolders(Dataset):
    """Labelled pictures from class folders."""

    Config = ClassFoldersConfig

    def __init__(self, config: ClassFoldersConfig):
        from vlmkit.core.data.build import current_where

        super().__init__(config)
        self.where = where = current_where() or "class_folders"
        root = Path(config.root).expanduser()
        if not root.is_dir():
            raise VlmkitError(f"{where}.root: '{root}' is not a folder of class folders")
        names = config.classes or sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        missing = [c for c in names if not (root / c).is_dir()]
        if missing:
            raise VlmkitError(f"{where}.classes: no folder {', '.join(repr(m) for m in missing)} in '{root}'")
        self.root = root
        self.classes = [display_name(c) for c in names]
        self.items = [(f, display_name(c)) for c in names
                      for f in sorted((root / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.items:
            raise VlmkitError(f"{where}.root: no pictures ({', '.join(IMAGE_SUFFIXES)}) in the class folders of '{root}'")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Record:
        file, name = self.items[index]
        try:
            image = read_image_file(file)
        except (OSError, ImageDecodeError) as exc:
            raise VlmkitError(f"{self.where}: picture '{file}' cannot be read: {getattr(exc, 'reason', exc)}") from None
        rid = str(file.relative_to(self.root))
        return Record(id=rid, query=Exchange([Turn("user", QUESTION), Turn("assistant", name)], media=[Media(rid, [image])]))
