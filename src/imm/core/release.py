"""One key chooses what a config section builds, ``kind``; the other spellings of that choice translated to it.

Every section that chooses among implementations names its choice ``kind``: ``dataset.kind`` (folder, zip,
npz, mnist, toy2d), ``encoder.kind`` (rgb, sd_vae, identity), ``network.kind`` (the backbone: SongUNet,
DiT_XL_2, MLP, ...), ``loss.kind`` (imm, flow_matching, consistency) and ``sampling.NAME.kind`` (pushforward,
restart). The official release's configs (github.com/lumalabs/imm, ``configs/*.yaml``) and EDM's
(github.com/NVlabs/edm) spell these choices otherwise, and put the data's shape at the top level:

==============================  ==========================================================================
given                           canonical
==============================  ==========================================================================
``encoder.class_name``          ``encoder.kind`` (``training.encoders.StabilityVAEEncoder`` -> ``sd_vae``,
                                any module prefix)
``dataset.class_name``          ``dataset.kind`` (EDM's ``training.dataset.ImageFolderDataset``: folder or
                                zip, told from the path)
``network.model_type``          ``network.kind``
``network.class_name``          checked (the release's ``training.preconds.IMMPrecond`` or ``IMMNetwork``),
                                then left out: it names the one wrapper there is
``loss.method``                 ``loss.kind``
``sampling.NAME.name``          ``sampling.NAME.kind`` (``pushforward_generator_fn`` -> ``pushforward``)
``sampling.NAME.sampler``       ``sampling.NAME.kind`` (``imm.sample``'s argument name)
top-level ``resolution``,       ``network.img_resolution``, ``network.img_channels``, ``network.label_dim``
``channels``, ``label_dim``
==============================  ==========================================================================

:func:`canonical` translates a whole config and :func:`canonical_override` one dotted override; both are
applied once where a config enters (a preset or file read by ``imm.core.config.load_config``, a dict handed
to ``imm train``'s resolver, the settings a checkpoint records, the config a training state stores, the
command line's overrides), so every builder reads the canonical key only. A choice given both ways with
different values is one ConfigError naming both keys; translating a canonical config changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from imm.core.errors import ConfigError, did_you_mean

# The release's and EDM's class names (after any module prefix) -> the kinds they choose; a tuple allows
# several, the builder telling which from the data.
ENCODER_CLASSES = {"StandardRGBEncoder": "rgb", "StabilityVAEEncoder": "sd_vae", "IdentityEncoder": "identity"}
DATASET_CLASSES = {"ImageFolderDataset": ("folder", "zip"), "NpzDataset": "npz", "MNISTDataset": "mnist",
                   "Toy2DDataset": "toy2d"}
DATASET_KIND_SPELLINGS = {"dir": "folder", "directory": "folder", "image_folder": "folder", "imagefolder": "folder",
                          "toy": "toy2d", "2d": "toy2d"}
SAMPLER_NAMES = {"pushforward_generator_fn": "pushforward", "restart_generator_fn": "restart"}  # generate_images.py
# The class names a network section may give: the release's wrapper (training.preconds.IMMPrecond) and ours.
NETWORK_CLASSES = ("IMMPrecond", "IMMNetwork")


def plain(value):
    """OmegaConf containers (or any mapping / sequence) as plain dicts and lists, copied."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return copy.deepcopy(value)


def _short(value) -> str:
    return str(value).rsplit(".", 1)[-1]


def _class_kind(table: Mapping, what: str) -> Callable:
    def translate(value):
        if _short(value) not in table:
            raise ConfigError(f"unknown {what} {value!r}{did_you_mean(_short(value), table)} (one of "
                              f"{', '.join(table)}, with any module prefix)")
        return table[_short(value)]
    return translate


def _dataset_kind(value):
    return DATASET_KIND_SPELLINGS.get(str(value).lower(), str(value).lower()) if value is not None else None


def _sampler_kind(value):
    return SAMPLER_NAMES.get(value, value)


def _network_class(value):
    if _short(value) not in NETWORK_CLASSES:
        raise ConfigError(f"network.class_name {value!r} is not an IMM network; expected one of "
                          f"{', '.join(NETWORK_CLASSES)} (optionally with a module prefix such as training.preconds.)")


@dataclass(frozen=True)
class Alias:
    """``old`` (a dotted key; ``*`` stands for any sampling entry) is spelled ``new`` in the canonical form,
    its value through ``translate`` (None: as it is). ``new`` None: the key is checked, then left out."""

    old: str
    new: str | None
    translate: Callable | None = None


ALIASES = (
    Alias("resolution", "network.img_resolution"),
    Alias("channels", "network.img_channels"),
    Alias("label_dim", "network.label_dim"),
    Alias("dataset.kind", "dataset.kind", _dataset_kind),  # first: a class_name is compared with the kind's spelling
    Alias("dataset.class_name", "dataset.kind", _class_kind(DATASET_CLASSES, "dataset.class_name")),
    Alias("encoder.class_name", "encoder.kind", _class_kind(ENCODER_CLASSES, "encoder.class_name")),
    Alias("network.class_name", None, _network_class),
    Alias("network.model_type", "network.kind"),
    Alias("loss.method", "loss.kind"),
    Alias("sampling.*.name", "sampling.*.kind", _sampler_kind),
    Alias("sampling.*.sampler", "sampling.*.kind", _sampler_kind),
)


def _matches(cfg: dict, parts: list[str], prefix: tuple = ()):
    """``(keys, section)`` for each section of ``cfg`` holding the dotted key ``parts`` (``*``: any key)."""
    if len(parts) == 1:
        if parts[0] in cfg:
            yield prefix, cfg
        return
    keys = list(cfg) if parts[0] == "*" else [parts[0]]
    for key in keys:
        if isinstance(cfg.get(key), dict):
            yield from _matches(cfg[key], parts[1:], (*prefix, key))


def _new_key(alias: Alias, old: list[str]) -> list[str]:
    """The parts of ``alias.new`` for the key ``old`` (its parts), ``*`` bound to the entry ``old`` names."""
    new = alias.new.split(".")
    return [o if n == "*" else n for n, o in zip(new, old)] if "*" in new else new


def _choices(alias: Alias, value) -> tuple:
    """The canonical values ``value`` of ``alias.old`` allows."""
    choice = alias.translate(value) if alias.translate else value
    return choice if isinstance(choice, tuple) else (choice,)


def canonical(cfg: Mapping) -> dict:
    """A copy of ``cfg`` with every alias key of :data:`ALIASES` given its canonical key and value; a canonical
    key already there with another value is a ConfigError naming both keys (OmegaConf's containers are read
    as plain dicts and lists)."""
    cfg = plain(cfg)
    for alias in ALIASES:
        old = alias.old.split(".")
        for keys, section in list(_matches(cfg, old)):
            value = section.pop(old[-1])
            choices = _choices(alias, value)
            if alias.new is None:
                continue
            new = _new_key(alias, [*keys, old[-1]])
            target = cfg
            for part in new[:-1]:
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            if new[-1] in target and target[new[-1]] not in choices:
                given = ".".join([*keys, old[-1]])
                raise ConfigError(f"{given} {value!r} and {'.'.join(new)} {target[new[-1]]!r} disagree: give one of "
                                  "them")
            if new[-1] not in target and len(choices) == 1:
                target[new[-1]] = choices[0]
    return cfg


def canonical_override(key: str, value) -> tuple[str, object] | None:
    """A dotted override ``key=value`` in the canonical form (None: nothing to set, as for a checked
    ``network.class_name``); a key without alias comes back as it is."""
    parts = key.split(".")
    for alias in ALIASES:
        old = alias.old.split(".")
        if len(old) != len(parts) or any(o not in ("*", p) for o, p in zip(old, parts)):
            continue
        choices = _choices(alias, value)
        if alias.new is None:
            return None
        return ".".join(_new_key(alias, parts)), (choices[0] if len(choices) == 1 else None)
    return key, value
