"""Strict YAML reading: YAML 1.2 scalars, no duplicate keys, no tags or aliases, line numbers kept."""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from ..errors import UserError

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of text; anything larger is a mistake or an attack

_YAML11_BOOL = re.compile(r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF)$")


class LocDict(dict):
    """A mapping that remembers the source line of each key (1-based), or, for a value set on the command line,
    the `--set` argument it came from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines: dict[str, int] = {}
        self.line: int | None = None
        self.origins: dict[str, str] = {}


class _Resolver(BaseResolver):
    """YAML 1.2 core schema: `3e-4` is a float, only true/false are booleans."""


_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Resolver.add_implicit_resolver(
    "tag:peftcli:yaml11-bool", _YAML11_BOOL, list("yYnNoO"))
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_Resolver.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])


class _Constructor(SafeConstructor):
    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):
            raise ConstructorError(None, None, "expected a mapping", node.start_mark)
        out = LocDict()
        out.line = node.start_mark.line + 1
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ConstructorError(None, None, f"keys must be strings, got {key!r}", key_node.start_mark)
            if key in out:
                raise ConstructorError(None, None, f"duplicate key '{key}' (first on line {out.lines[key]})",
                                       key_node.start_mark)
            out[key] = self.construct_object(value_node, deep=True)
            out.lines[key] = key_node.start_mark.line + 1
        return out

    def construct_yaml_map(self, node):
        yield self.construct_mapping(node, deep=True)

    def construct_float12(self, node):
        return float(self.construct_scalar(node).replace(".inf", "inf").replace(".Inf", "inf").replace(".INF", "inf")
                     .replace(".nan", "nan").replace(".NaN", "nan").replace(".NAN", "nan"))

    def construct_int12(self, node):
        return int(self.construct_scalar(node), 0)

    def reject_yaml11_bool(self, node):
        value = self.construct_scalar(node)
        raise ConstructorError(None, None, f"'{value}' is ambiguous (a boolean in YAML 1.1, a string in YAML 1.2): "
                               f"write true/false, or quote it if you mean the text", node.start_mark)

    def reject_tag(self, node):
        raise ConstructorError(None, None, f"tag {node.tag} is not allowed in recipes (nothing is executed or "
                               f"constructed from tags); remove it", node.start_mark)


_Constructor.add_constructor("tag:yaml.org,2002:map", _Constructor.construct_yaml_map)
_Constructor.add_constructor("tag:yaml.org,2002:float", _Constructor.construct_float12)
_Constructor.add_constructor("tag:yaml.org,2002:int", _Constructor.construct_int12)
_Constructor.add_constructor("tag:peftcli:yaml11-bool", _Constructor.reject_yaml11_bool)
_Constructor.add_constructor(None, _Constructor.reject_tag)


class _NoAliasComposer(Composer):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "anchors/aliases are not supported in recipes: write the "
                                              "value out", event.start_mark)
        return super().compose_node(parent, index)


class StrictLoader(Reader, Scanner, Parser, _NoAliasComposer, _Constructor, _Resolver):
    def __init__(self, stream):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        _NoAliasComposer.__init__(self)
        _Constructor.__init__(self)
        _Resolver.__init__(self)


def parse_yaml_text(text: str, source: str):
    """Parse one YAML document strictly; errors become one-line UserErrors naming source:line:col."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise UserError(f"{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path):
    """Read a recipe file: size-bounded, UTF-8 only, strict YAML."""
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass the recipe's .yaml file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: {path.stat().st_size} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: the recipe is empty; start from recipes/quickstart.yaml")
    return parse_yaml_text(text, str(path))


def parse_scalar(text: str, source: str):
    """Parse a --set value with the same rules as the recipe (so `--set train.learning_rate=3e-4` is a float)."""
    return parse_yaml_text(text, source)
