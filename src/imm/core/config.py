"""Configs as data: YAML presets (``src/imm/presets/*.yaml``) or files, with dotted ``key=value`` overrides.

A config may start with ``base: NAME`` (a preset or file) to extend it section by section.

Overrides use Hydra's override syntax (hydra.cc), as the official release's configs do
(github.com/lumalabs/imm): ``eval.batch_size=16``, ``network.temb_type=identity``,
``+new.key=1`` to add a key the config does not have yet. Values are parsed as YAML
(``mid_nt=[1.4]``, ``cfg_scale=null``). A key that does not exist (without ``+``) is an error naming
the nearest valid key. Keys of the sections a builder checks (``network.*`` for every caller, and
the trainer's sections for ``imm train``: ``open_sections``) are accepted here and checked against their
declaration when the config is resolved or the piece is built.

A section that chooses among implementations names its choice ``kind`` (``dataset.kind``, ``encoder.kind``,
``network.kind``, ``loss.kind``, ``sampling.NAME.kind``; :func:`check_kind`); the release's spellings of these
choices (``encoder.class_name``, ``network.model_type``, ``sampling.NAME.name`` ...) are translated where a
config enters (:mod:`imm.core.release`).

One rule declares and checks every section: a section's keys and defaults are the fields of a
dataclass or the keyword parameters of the constructor that takes them (:func:`declared_keys`), and
:func:`fill_section` fills the defaults in and refuses any other key, naming the nearest declared one
(:func:`check_keys`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from importlib import resources
from pathlib import Path

import yaml

from imm.core.errors import ConfigError, did_you_mean
from imm.core.release import canonical, canonical_override

OPEN_SECTIONS = ("network",)


# Bounds on a YAML document (configs come from other people too): the nodes it holds once aliases are
# expanded (an alias bomb of a few hundred bytes holds billions), its nesting and the digits of a number.
YAML_MAX_NODES = 100_000
YAML_MAX_DEPTH = 64
YAML_MAX_DIGITS = 30


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with integers of at most YAML_MAX_DIGITS digits (Python refuses to parse 4,300
    digits with a ValueError that would escape as a traceback)."""

    def construct_yaml_int(self, node):
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > YAML_MAX_DIGITS:
            raise yaml.constructor.ConstructorError(None, None, f"an integer of {digits} digits", node.start_mark)
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _check_size(root) -> None:
    """Refuse a composed YAML node graph deeper than YAML_MAX_DEPTH or holding more than YAML_MAX_NODES nodes
    with its aliases expanded (an alias is the node it names, counted again each time). Iterative: a deep
    document cannot exhaust Python's stack here."""
    expanded: dict[int, int] = {}
    stack = [(root, 1, False)]
    while stack:
        node, depth, children_done = stack.pop()
        if depth > YAML_MAX_DEPTH:
            raise yaml.YAMLError(f"nested deeper than {YAML_MAX_DEPTH} levels")
        if isinstance(node, yaml.ScalarNode):
            expanded[id(node)] = 1
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        if not children_done:
            if id(node) in expanded:
                continue
            stack.append((node, depth, True))
            stack.extend((child, depth + 1, False) for child in children if id(child) not in expanded)
            continue
        expanded[id(node)] = 1 + sum(expanded.get(id(child), 0) for child in children)
        if expanded[id(node)] > YAML_MAX_NODES:
            raise yaml.YAMLError(f"more than {YAML_MAX_NODES:,} values once its aliases are expanded")


def load_yaml(text: str):
    """A YAML document as Python data, with PyYAML's safe loader, within the bounds above; an error is a
    ``yaml.YAMLError`` whose message gives the position, never the document's text."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise yaml.YAMLError(f"{e.problem or e.context}{where}") from None
    except RecursionError:
        raise yaml.YAMLError(f"nested deeper than {YAML_MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def preset_names() -> list[str]:
    folder = resources.files("imm") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str, _extending: tuple[str, ...] = ()) -> dict:
    """A preset by name (``cifar10``) or a YAML file by path (``_extending``: the configs whose ``base:`` led
    here), in the canonical form (:func:`imm.core.release.canonical`: the release's keys are read too)."""
    path = Path(name_or_path)
    if _extending and not path.is_absolute() and _extending[-1].startswith("/"):
        path = Path(_extending[-1]).parent / path  # a base: relative to the folder of the file that names it
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text, identity = path.read_text(), str(path.resolve())
    elif name_or_path in preset_names():
        text = (resources.files("imm") / "presets" / f"{name_or_path}.yaml").read_text()
        identity = f"preset {name_or_path}"
    else:
        raise ConfigError(f"unknown config {name_or_path!r}: not a file, and presets are {', '.join(preset_names())}")
    try:
        cfg = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {name_or_path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {name_or_path}: top level must be a mapping")
    base = cfg.pop("base", None)  # a preset may extend another one: `base: imagenet256`
    cfg = canonical(cfg)  # each file in the canonical form before a base and its extension are merged
    if not base:
        return cfg
    if not isinstance(base, str):
        raise ConfigError(f"config {name_or_path}: base must name a preset or a file, got {base!r:.60}")
    if identity in _extending:
        chain = " -> ".join([*_extending[_extending.index(identity):], identity])
        raise ConfigError(f"config {name_or_path}: its base: chain comes back to itself ({chain})")
    return merge(load_config(base, (*_extending, identity)), cfg)


def merge(base: dict, update: dict) -> dict:
    """``update`` laid over ``base``, section by section (a copy)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dotted_items(cfg: dict, prefix: str = ""):
    """``(dotted key, value)`` for every key of a nested dict, sections included, depth first:
    ``{"a": {"b": 1}}`` gives ``("a", {"b": 1})`` then ``("a.b", 1)``."""
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        yield name, value
        if isinstance(value, dict):
            yield from dotted_items(value, f"{name}.")


def flatten(cfg: dict) -> dict:
    """The values of a nested dict that are not dicts, under dotted keys: ``{"a": {"b": 1}, "c": 2}`` ->
    ``{"a.b": 1, "c": 2}`` (an empty section has no key)."""
    return {key: value for key, value in dotted_items(cfg) if not isinstance(value, dict)}


def apply_overrides(cfg: dict, overrides: list[str], open_sections=OPEN_SECTIONS) -> dict:
    """Return a copy of ``cfg`` with ``key.sub=value`` overrides applied (see module docstring), each on its
    canonical key (:func:`imm.core.release.canonical_override`: ``loss.method=x`` sets ``loss.kind``); keys under
    ``open_sections`` need not exist yet (their builder checks them)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        add = key.startswith("+")
        key = key.lstrip("+").strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        translated = canonical_override(key, parse_value(text))
        if translated is None:
            continue
        key, value = translated
        parts = key.split(".")
        node = cfg
        open_section = parts[0] in open_sections
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if part in node and node[part] is not None and not add:
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
                if part not in node and not (add or open_section):
                    raise ConfigError(_unknown(key, cfg))
                node[part] = {}
            node = node[part]
        if parts[-1] not in node and not (add or open_section):
            raise ConfigError(_unknown(key, cfg))
        node[parts[-1]] = value
    return cfg


def parse_value(text: str):
    """A YAML value; numbers in exponent notation without a dot (``3e-4``, which YAML 1.1 reads as a
    string) are floats."""
    try:
        value = load_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _unknown(key: str, cfg: dict) -> str:
    return f"unknown config key {key!r}{did_you_mean(key, (k for k, _ in dotted_items(cfg)))} (prefix it with + to add a new key)"


REQUIRED = inspect.Parameter.empty  # the default of a declared key that has none


def declared_keys(source) -> dict:
    """The keys a config section may hold and their defaults (:data:`REQUIRED` when there is none): the
    fields of a dataclass, or the keyword parameters of a class's constructor or of a function."""
    if dataclasses.is_dataclass(source):
        return {f.name: f.default if f.default is not dataclasses.MISSING else
                f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED
                for f in dataclasses.fields(source)}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p.default for n, p in inspect.signature(source).parameters.items() if p.kind in kinds}


def check_keys(section: str, given, allowed, context: str = "") -> None:
    """A ConfigError naming the first key of ``given`` that is not in ``allowed`` (``section.key``; a
    top-level key when ``section`` is empty), what ``context`` says (``" for kind 'npz'"``) and the
    nearest allowed key."""
    allowed = list(allowed)
    prefix = f"{section}." if section else ""
    for key in given:
        if key not in allowed:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{context}{did_you_mean(str(key), allowed, prefix)}")


def check_kind(section: str, kind, kinds) -> str:
    """``kind`` when it is one of ``kinds`` (the implementations ``section.kind`` chooses among), else a
    ConfigError naming the nearest."""
    if kind not in kinds:
        raise ConfigError(f"unknown {section}.kind {kind!r}{did_you_mean(str(kind), kinds)} "
                          f"(one of {', '.join(kinds)})")
    return kind


def fill_section(section: str, given, source, context: str = "") -> dict:
    """``given`` (a mapping or None) checked against what ``source`` declares, with its defaults filled in."""
    given = dict(given or {})
    declared = declared_keys(source)
    check_keys(section, given, declared, context)
    return {**{k: copy.deepcopy(v) for k, v in declared.items() if v is not REQUIRED}, **given}
