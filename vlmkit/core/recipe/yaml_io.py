"""YAML reading that refuses duplicate keys (PyYAML silently keeps the last one), knows the
``!replace`` tag of the merge (:mod:`vlmkit.core.recipe.merge`) and reports syntax errors with
their line and column.

It also refuses what is no recipe, with the file and the place: a binary or non-UTF-8 file, YAML
nested deeper than :data:`MAX_DEPTH` levels, aliases that expand to more than :data:`MAX_VALUES`
values (a "billion laughs" bomb, wherever it sits), recursive aliases, and numbers beyond
:data:`NUMBER_LIMIT` (10^15: far beyond any size, count or step of a recipe, while 1e30 or an extra
block of digits overflows or exhausts memory later; a ``seed`` may take any 64-bit value) or not
finite (``.inf``, ``.nan``, ``1.0e+999``). Every later step (merge, placeholders, validation) can then
walk the result without a size or depth check of its own, and every component's options are bounded.
"""

from __future__ import annotations

import codecs
import copy
import hashlib
import math
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from vlmkit.core.errors import RecipeError, suggest
from vlmkit.core.recipe.merge import REPLACE_TAG, ReplaceList, ReplaceMapping

#: mappings and lists nested deeper than this are refused (recipes nest about 6 levels)
MAX_DEPTH = 50
#: values a document may expand to, aliases counted at their full size (recipes hold about 1,000)
MAX_VALUES = 100_000
#: recipe files larger than this are refused before they are read (recipes are a few KiB)
MAX_FILE_BYTES = 10 * 2**20
#: numbers of a recipe lie within +-NUMBER_LIMIT ...
NUMBER_LIMIT = 10**15
#: ... except those under a key named here, which take any 64-bit value (what torch.manual_seed takes)
WIDE_KEYS = frozenset({"seed"})
INT_LIMIT = 2**63 - 1


class YAMLLimitError(yaml.MarkedYAMLError):
    """Valid YAML that is no recipe: too deep, too large once aliases are expanded, recursive, or a
    number out of range. Reported with its line and column but without "invalid YAML"."""


class RecipeLoader(yaml.SafeLoader):
    """A safe loader: no duplicate keys, ``!replace`` on a mapping or a list, and the limits above."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._init_limits()

    def _init_limits(self) -> None:
        self._depth = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height), aliases expanded
        self._nodes: list[yaml.Node] = []  # keeps the ids in _sizes alive
        self._wide: set[int] = set()  # id(node) of the values under a WIDE_KEYS key

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:  # the alias sits inside the node its anchor names
                raise YAMLLimitError(
                    None, None,
                    f"the alias *{event.anchor} refers to a mapping or list that contains it; a recipe cannot hold "
                    "recursive structures: write the value out",
                    event.start_mark,
                )
            return node
        if self._depth >= MAX_DEPTH:
            raise YAMLLimitError(
                None, None,
                f"mappings and lists nest deeper than {MAX_DEPTH} levels here; a recipe nests at most {MAX_DEPTH} levels",
                self.peek_event().start_mark,
            )
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(index, yaml.ScalarNode) and index.value in WIDE_KEYS:  # a mapping value: index is its key
            self._wide.add(id(node))
        values, height = 1, 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            child_values, child_height = self._sizes[id(child)]
            values += child_values
            height = max(height, child_height + 1)
        if values > MAX_VALUES:
            raise YAMLLimitError(
                None, None,
                f"this value expands to more than {MAX_VALUES:,} values once its aliases (*name) are expanded (a YAML "
                f"'billion laughs' bomb?); a recipe expands to at most {MAX_VALUES:,} values",
                node.start_mark,
            )
        if height > MAX_DEPTH:
            raise YAMLLimitError(
                None, None,
                f"once its aliases (*name) are expanded, this value nests {height} levels deep; a recipe nests at most "
                f"{MAX_DEPTH} levels",
                node.start_mark,
            )
        self._sizes[id(node)] = (values, height)
        self._nodes.append(node)
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(node.value)
        value: int | None = None
        if len(text) <= 100:
            try:
                value = super().construct_yaml_int(node)
            except ValueError:
                value = None
        limit = INT_LIMIT if id(node) in self._wide else NUMBER_LIMIT
        if value is None or abs(value) > limit:
            shown = text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"
            raise YAMLLimitError(None, None, f"the number {shown} is out of range; {_range(limit)}", node.start_mark)
        return value

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        value = super().construct_yaml_float(node)
        limit = INT_LIMIT if id(node) in self._wide else NUMBER_LIMIT
        if not math.isfinite(value):
            raise YAMLLimitError(
                None, None,
                f"'{node.value}' is {'not a number' if math.isnan(value) else 'infinite'}; {_range(limit)}; leave the "
                "field out or set it to null where it is optional",
                node.start_mark,
            )
        if abs(value) > limit:
            raise YAMLLimitError(None, None, f"the number {node.value} is out of range; {_range(limit)}", node.start_mark)
        return value

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"'{node.value}' looks like a date but is not one ({exc}); quote it to make it a string",
                node.start_mark,
            ) from None


def _range(limit: int) -> str:
    if limit == NUMBER_LIMIT:
        return (f"recipe numbers lie between -10^{len(str(limit)) - 1} and 10^{len(str(limit)) - 1} (a seed: any "
                "64-bit integer)")
    return f"a seed is a 64-bit integer, between -{limit} and {limit}"


def _construct_mapping(loader: RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark,
                f"a key is a {type(key).__name__}; keys are plain values such as names", key_node.start_mark,
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"duplicate key '{key}'", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


def _construct_replace(loader: RecipeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return ReplaceMapping(_construct_mapping(loader, node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return ReplaceList(loader.construct_sequence(node, deep=True))
    raise yaml.constructor.ConstructorError(
        None, None,
        f"{REPLACE_TAG} marks a mapping or a list that replaces the layer below instead of merging with it "
        f"(e.g. {REPLACE_TAG} {{}} clears a mapping); a plain value is always replaced, so it needs no tag",
        node.start_mark,
    )


RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
RecipeLoader.add_constructor(REPLACE_TAG, _construct_replace)
RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)
RecipeLoader.add_constructor("tag:yaml.org,2002:float", RecipeLoader.construct_yaml_float)
RecipeLoader.add_constructor("tag:yaml.org,2002:timestamp", RecipeLoader.construct_yaml_timestamp)


def _merge_key(loader: RecipeLoader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, "'<<' (a YAML merge key) is not supported in recipes; reuse a recipe with extends: or write the fields out",
        node.start_mark,
    )


RecipeLoader.add_constructor("tag:yaml.org,2002:merge", _merge_key)


def _unknown_tag(loader: RecipeLoader, suffix: str, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"unknown tag '{node.tag}'{suggest(node.tag, [REPLACE_TAG])} the only tag recipes know is {REPLACE_TAG}",
        node.start_mark,
    )


RecipeLoader.add_multi_constructor("!", _unknown_tag)


if getattr(yaml, "__with_libyaml__", False):
    from yaml.composer import Composer
    from yaml.cyaml import CParser

    class _CRecipeLoader(CParser, RecipeLoader):
        """:class:`RecipeLoader` on libyaml's scanner and parser (about 6x faster), with the Python
        composer that applies the limits."""

        def __init__(self, stream: Any) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            self._init_limits()

        get_single_node = Composer.get_single_node
        compose_document = Composer.compose_document

    _FILE_LOADER: type = _CRecipeLoader
else:  # pragma: no cover - PyYAML without libyaml
    _FILE_LOADER = RecipeLoader


_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # before UTF-16: they share its first bytes
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)
_SAVE_AS_UTF8 = "a recipe is a YAML text file in UTF-8: save it as UTF-8"


def decode_recipe_bytes(raw: bytes, source: str) -> str:
    """The text of a recipe file, or a :class:`RecipeError` for a binary file or one that is not UTF-8."""
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            raise RecipeError(source, [f"the file is {encoding} text (it starts with a {encoding} byte-order mark); "
                                       f"{_SAVE_AS_UTF8}"])
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise RecipeError(source, [f"the file is binary, not text: it holds a NUL byte at {_where(raw, nul)}, as binary "
                                   f"files and UTF-16/32 text without a byte-order mark do; {_SAVE_AS_UTF8}"])
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # a UTF-8 byte-order mark is fine
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        raise RecipeError(source, [f"the file is not UTF-8 text (byte 0x{raw[offset]:02x} at {_where(raw, offset)} is not "
                                   f"valid UTF-8; a binary file?); {_SAVE_AS_UTF8}"]) from None


def _where(raw: bytes, offset: int) -> str:
    line_start = raw.rfind(b"\n", 0, offset) + 1
    line = raw.count(b"\n", 0, offset) + 1
    return f"line {line}, column {offset - line_start + 1} (byte {offset})"


#: parsed files by (path, content hash): a recipe is read once per profile and once per child
_CACHE: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
_CACHE_SIZE = 64


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RecipeError(source, [f"the file is {size / 2**20:,.1f} MiB; a recipe is a YAML file of at most "
                                       f"{MAX_FILE_BYTES // 2**20} MiB (is this the recipe, or a data file?)"])
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    key = (source, hashlib.sha1(raw).hexdigest())
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return copy.deepcopy(_CACHE[key])
    data = parse_yaml_mapping(decode_recipe_bytes(raw, source), source)
    _CACHE[key] = copy.deepcopy(data)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return data


def parse_yaml_mapping(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_FILE_LOADER)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError) as exc:
        raise RecipeError(source, [yaml_problem(exc, text)]) from None
    if data is None:
        raise RecipeError(source, ["the file is empty; a recipe is a mapping with name, model, data and stages"])
    if not isinstance(data, dict):
        raise RecipeError(source, [f"a recipe must be a mapping of fields, got a {type(data).__name__}"])
    return data


def load_yaml_value(text: str) -> Any:
    """One YAML value (a ``--set`` value) read like a recipe file, with the same limits."""
    return yaml.load(text, Loader=_FILE_LOADER)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(exc: BaseException, text: str) -> str:
    """One line for an error of the loader above: where (line, column) and what."""
    if isinstance(exc, YAMLLimitError):
        return f"{_mark(exc)}{exc.problem}"
    if isinstance(exc, yaml.MarkedYAMLError):
        if "maximum nesting depth" in str(exc.problem):  # libyaml's own limit (1,000), met before ours
            return (f"{_mark(exc)}mappings and lists nest too deep here (libyaml stops at 1,000 levels); a recipe "
                    f"nests at most {MAX_DEPTH} levels")
        if exc.context == "expected a single document in the stream":
            return f"{_mark(exc)}a second YAML document starts here ('---'); a recipe file holds one document"
        return f"{_mark(exc)}invalid YAML: {exc.problem}"
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return (f"line {line}, column {column}: invalid YAML: the control character #x{code:04x} is not allowed in a "
                "YAML file; write it as an escape inside double quotes (\"\\x07\")")
    if isinstance(exc, RecursionError):  # the depth limit keeps the loader well below Python's; a safety net
        return f"the YAML nests too deep; a recipe nests at most {MAX_DEPTH} levels"
    return f"invalid YAML: {exc}"


def _mark(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
