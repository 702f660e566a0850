"""Typed, validated settings: one mechanism for every settings class (RunConfig, TrainConfig, SearchConfig,
TuneConfig).

A settings class is a dataclass deriving from `Settings`. Each field may carry a `Rule` (`setting(default,
rule=at_least(1))`), checked by `validate()` with a message that names the setting as the user wrote it (a
dotted key such as `base.steps`; the CLI turns it into the flag it came from). Checks that tie several fields
together go in the class's `checks()`. `from_dict` reads a (partial, nested) mapping as a config file gives it,
checking every value against its field's declared type; `apply_overrides` sets dotted keys
({"base.steps": 500}); `load_config_file` reads YAML, TOML or JSON. Config files are untrusted input: their size,
the number of keys, nesting and YAML aliases are bounded before anything is built from them, and a value shown in
an error is cut short.

Imports nothing of tdcdiff.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import operator
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

MAX_CONFIG_BYTES = 1 << 20  # a settings file is a few hundred bytes; a megabyte is far beyond any real one
MAX_KEYS = 1000  # keys in one config file, all mappings together
MAX_DEPTH = 8  # nesting of mappings and lists in a config file
SHOWN_CHARS = 80  # a value shown in an error message is cut to this many characters
SEED_LIMIT = 2**32  # the range every seeded library here accepts (numpy's legacy seeding is the narrowest)
CONFIG_SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}


def shown(value) -> str:
    """A value as a config file spells it (None -> null), cut to SHOWN_CHARS characters."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


# -- rules: what a field's value must be ---------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A check of one setting's value. ok(value) says whether it passes; message(name, value) says why not, with
    `name` the setting's dotted key (or flag) and `field` its bare name (for "unknown X" messages)."""

    ok: Callable[[object], bool]
    expectation: str  # "must be >= 1", "must be in (0, 1)"
    about: str = ""  # what the setting is, shown after its name: "the peak learning rate"
    note: str = ""  # shown after the expectation: "N, the number of timestep groups"
    typical: str = ""  # a typical value, shown after the value: "typical: 1e-4 to 2e-3"
    choices: tuple = ()  # for one_of: the valid values
    what: str = ""  # for one_of: how the message names the setting ("difficulty ordering")

    def message(self, name: str, value, field_name: str) -> str:
        if self.choices:
            return f"unknown {self.what or field_name} {value!r}; choose one of {self.choices}"
        about = f" ({self.about})" if self.about else ""
        note = f" ({self.note})" if self.note else ""
        typical = f" ({self.typical})" if self.typical else ""
        return f"{name}{about} {self.expectation}{note}, got {value}{typical}"


def _is_number(value) -> bool:
    return is_real(value)


# A range rule judges numbers only: a value of another type is the type check's to name (Settings.validate).
def at_least(minimum: float, *, about: str = "", note: str = "", typical: str = "") -> Rule:
    """value >= minimum."""
    return Rule(lambda v: not _is_number(v) or (math.isfinite(v) and v >= minimum), f"must be >= {minimum}", about,
                note, typical)


def at_most(maximum: float, *, about: str = "", typical: str = "") -> Rule:
    """value <= maximum (and finite)."""
    return Rule(lambda v: not _is_number(v) or (math.isfinite(v) and v <= maximum), f"must be at most {maximum}", about,
                typical=typical)


def between(interval: str, *, about: str = "", typical: str = "", optional: bool = False) -> Rule:
    """value inside an interval written as in mathematics: "(0, 1)", "[0, 1]", "(0, 1]"; optional: the message
    says None is allowed too. Raises ValueError for a malformed interval (a programming error)."""
    low_bracket, high_bracket = interval[0], interval[-1]
    low, high = (float(part) for part in interval[1:-1].split(","))
    if low_bracket not in "([" or high_bracket not in ")]":
        raise ValueError(f"malformed interval {interval!r}")

    def ok(v) -> bool:
        if not _is_number(v):
            return True
        if isinstance(v, float) and not math.isfinite(v):  # an int is finite, however large (no float for it)
            return False
        above = v >= low if low_bracket == "[" else v > low
        below = v <= high if high_bracket == "]" else v < high
        return above and below

    return Rule(ok, f"must be in {interval}" + (" or None" if optional else ""), about, typical=typical)


def one_of(choices: Iterable, *, what: str = "") -> Rule:
    """value is one of choices; the message reads "unknown {what} 'x'; choose one of (...)" (what: the field's
    name by default)."""
    choices = tuple(choices)
    return Rule(lambda v: v in choices, "", choices=choices, what=what)


def setting(default=MISSING, *, factory=MISSING, rule: Rule | None = None):
    """A dataclass field with a Rule checked by Settings.validate()."""
    metadata = {"rule": rule} if rule is not None else {}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def require(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise ValueError with the message of the first (ok, message) pair whose ok is false."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def plain_number(value):
    """A numpy scalar, or a 0-d numpy array or torch tensor of a number, as its Python int or float; anything else
    unchanged. The public API's rule for numbers: wherever a Python number is taken, these are too (as torch and
    diffusers take them), and they are stored as Python numbers (so that settings and records save as JSON)."""
    if isinstance(value, (bool, int, float)) or not callable(getattr(value, "item", None)):
        return value
    if getattr(value, "ndim", None) != 0 and not isinstance(value, numbers.Number):
        return value  # a list-like of several numbers, or something else with an item()
    plain = value.item()
    return plain if isinstance(plain, (int, float)) and not isinstance(plain, bool) else value


def is_integer(value) -> bool:
    """Whether value is an integer (a Python or numpy int: what operator.index takes; never a bool or a float).
    as_integer converts one (0-d tensors too) with a message; files.is_count checks a count read from a file."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def is_real(value) -> bool:
    """Whether value is a real number: a Python or numpy int or float (numbers.Real); never a bool, a tensor or
    text. The public API takes numpy scalars wherever it takes a Python number, as torch and diffusers do."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_integer(name: str, value, minimum: int | None = None, *, note: str = "") -> int:
    """value as a Python int, for an argument `name` of the public API (note: what it is, shown in the message).
    Takes what is_integer takes (Python and numpy ints) and 0-d integer tensors (plain_number); raises ValueError
    for anything else (a bool, a float, 2.0) or a value below `minimum`."""
    about = f" ({note})" if note else ""
    value = plain_number(value)
    if not is_integer(value):
        raise ValueError(f"{name}{about} must be an integer, got {value!r}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}{about} must be >= {minimum}, got {value}")
    return value


def as_real(name: str, value, *, note: str = "") -> float:
    """value as a finite Python float, for an argument `name` of the public API (note: what it is). Takes what
    is_real takes, and 0-d tensors (plain_number); raises ValueError for anything else (a bool, text) or NaN/inf."""
    value = plain_number(value)
    if not is_real(value) or not math.isfinite(value):
        about = f" ({note})" if note else ""
        raise ValueError(f"{name}{about} must be a finite number (a Python or numpy int or float), got {value!r}")
    return float(value)


SEED = Rule(lambda v: is_integer(v) and 0 <= v < SEED_LIMIT, f"must be between 0 and {SEED_LIMIT - 1} (2**32 - 1)")


def check_seed(name: str, seed: int) -> None:
    """Raise ValueError unless seed is an integer (a numpy one too) with 0 <= seed < 2**32 (`name`: the option or
    setting, for the message)."""
    if not is_integer(seed):
        raise ValueError(f"{name} must be an integer, got {seed!r}")
    if not SEED.ok(seed):
        raise ValueError(SEED.message(name, seed, name))


# -- settings classes ------------------------------------------------------------------------------------------
class Settings:
    """Base of the settings dataclasses: typed reading (from_dict), validation (validate), dotted overrides.
    Numbers given in code as numpy scalars or 0-d tensors are stored as Python numbers (plain_number)."""

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, plain_values(getattr(self, f.name)))

    def to_dict(self) -> dict:
        """The settings as plain values (a numpy scalar given in code becomes its Python int or float)."""
        return asdict(self, dict_factory=lambda pairs: {k: plain_values(v) for k, v in pairs})

    @classmethod
    def from_dict(cls, data: dict):
        """Build from a (possibly partial, possibly nested) mapping, as read from a YAML/TOML/JSON file, over the
        defaults. Every value is checked against its field's declared type (see `typed`); raises ValueError
        naming the setting otherwise."""
        return typed("", data, cls, cls())

    def checks(self) -> Iterable[tuple[bool, str]]:
        """(ok, message) pairs for what ties several fields together; the fields' own rules are checked first."""
        return ()

    def machine_checks(self) -> None:
        """Raise ValueError for what this machine lacks (a device, an endpoint). validate runs it; check_values does
        not: a saved file's values are judged apart from the machine that reads them."""

    def validate(self, prefix: str = "") -> None:
        """Check every field's Rule (nested settings with their dotted prefix), every value's type (as from_dict
        does, for settings built in code), machine_checks(), then checks(). Raises ValueError with the first
        failure's message."""
        self._check_rules(prefix)
        if not prefix:
            self._check_types()
        self.machine_checks()
        self._check_pairs()

    def check_values(self) -> None:
        """Each field's own Rule (nested settings too) and checks(), not machine_checks(): what a saved file's values
        are judged by. Raises ValueError with the first failure's message."""
        self._check_rules("")
        self._check_pairs()

    def _check_pairs(self) -> None:
        for ok, message in self.checks():
            if not ok:
                raise ValueError(message)

    def _check_types(self) -> None:
        """Raise ValueError for a value of the wrong type: what from_dict refuses, and what it would only take
        after converting it (a number written as text, in settings built in code)."""
        given = flatten(self.to_dict())
        for key, read in flatten(type(self).from_dict(self.to_dict()).to_dict()).items():
            same_number = _is_number(given[key]) and _is_number(read) and given[key] == read  # 2 for 2.0: as from_dict
            if type(given[key]) is not type(read) and not same_number:
                raise ValueError(f"setting '{key}' must be {_DESCRIBE.get(type(read), 'a ' + type(read).__name__)}, "
                                 f"got {shown(given[key])}")

    def _check_rules(self, prefix: str) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            rule = f.metadata.get("rule")
            if rule is not None and not rule.ok(value):
                raise ValueError(rule.message(prefix + f.name, value, f.name))
            if isinstance(value, Settings):
                value._check_rules(f"{prefix}{f.name}.")


def plain_values(value):
    """value with plain_number applied to it and, in a list or tuple, to each item (nested); a 1-d or deeper numpy
    array or tensor becomes a list of Python numbers."""
    if getattr(value, "ndim", 0) and callable(getattr(value, "tolist", None)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value)(plain_values(v) for v in value)
    return plain_number(value)


_DESCRIBE = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _number(value) -> int | float | None:
    """A number, or a number written as text (YAML reads 1e-3 as a string); None for anything else."""
    if is_real(value):  # numpy scalars too
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    for parse in (int, float) if isinstance(value, str) else ():
        try:
            return parse(value)
        except ValueError:
            pass
    return None


def typed(key: str, value, hint, default):
    """`value` checked against the declared type `hint` of setting `key` ("" for the whole config).

    Numbers written as strings (YAML reads 1e-3 as a string) become numbers, integers are fine where a float
    is declared and integral floats where an int is; bools are not numbers, and None is taken only where the
    type allows it. A dataclass type takes a mapping of its fields, merged over `default` (an instance).
    Raises ValueError naming the setting.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # only `X | None` is declared
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if is_dataclass(hint):
        return _typed_section(key, value, hint, default)
    if hint is dict:  # a free-form mapping (tune's RunConfig overrides per variant), checked where it is used
        if isinstance(value, dict):
            return value
        raise ValueError(f"setting '{key}' must be a mapping, got {shown(value)}")
    origin, items = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        values = [typed(f"{key}[{i}]", v, items[0], None) for i, v in enumerate(value)]
        return values if origin is list else tuple(values)
    if origin is dict and isinstance(value, dict):
        return {typed(f"{key} key", k, items[0], None): typed(f"{key}.{k}", v, items[1], None)
                for k, v in value.items()}
    if origin in (list, tuple, dict):
        wanted = "a mapping" if origin is dict else "a list"
        wanted += " or null" if type(None) in args else ""
        raise ValueError(f"setting '{key}' must be {wanted}, got {shown(value)}")
    if hint in (bool, str):
        if isinstance(value, hint):
            return value
    elif not isinstance(value, bool):  # int or float: bools are not numbers
        number = _number(value)
        if number is not None and hint is float:  # an int past a float's range is +-inf: each range check says so
            return (math.inf if number > 0 else -math.inf) if isinstance(number, int) and abs(number) >= 2**1024 \
                else float(number)
        if isinstance(number, int) or isinstance(number, float) and number.is_integer():
            return int(number)
    wanted = _DESCRIBE[hint] + (" or null" if type(None) in args else "")
    raise ValueError(f"setting '{key}' must be {wanted}, got {shown(value)}")


def _typed_section(key: str, value, cls: type, default):
    if isinstance(value, cls):
        return value
    valid = sorted(f.name for f in fields(cls))
    if not isinstance(value, dict):
        what = f"config section '{key}'" if key else "a config"
        raise ValueError(f"{what} must be a mapping of settings ({', '.join(valid)}), got {shown(value)}")
    unknown = sorted((shown(k) if not isinstance(k, str) else k) for k in set(value) - set(valid))
    if unknown:
        listed = f"{unknown[:10]}{f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''}"
        if not key:
            raise ValueError(f"unknown config keys {listed}; valid keys: {valid}")
        raise ValueError(f"unknown keys {listed} in config section '{key}'; valid: {valid}")
    hints = typing.get_type_hints(cls)
    prefix = f"{key}." if key else ""
    return replace(default, **{k: typed(prefix + k, v, hints[k], getattr(default, k)) for k, v in value.items()})


def apply_overrides(config: Settings, overrides: dict):
    """A copy of config with dotted-key overrides applied, e.g. {"k": 0.3, "base.steps": 500}.

    Raises ValueError naming an unknown key, or a value of the wrong type (see `typed`)."""
    cls = type(config)
    data = config.to_dict()
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ValueError(f"setting names are text, got {shown(key)}")
        section, _, name = key.partition(".")
        if not name:
            data[section] = value
        elif isinstance(data.get(section), dict):
            data[section][name] = value
        elif section in data:  # `base: 5` given too: its own error names it; else `k.x` where k has no keys
            cls.from_dict(data)
            raise ValueError(f"unknown setting '{key}': '{section}' is a single setting, not a section")
        else:
            cls.from_dict({section: {}})  # names the unknown key and the valid ones
    return cls.from_dict(data)


def flatten(settings: dict, prefix: str = "") -> dict:
    """{"base": {"steps": 3}, "k": 0.5} -> {"base.steps": 3, "k": 0.5}: a nested mapping as dotted keys."""
    out = {}
    for key, value in settings.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# -- reading settings from text ------------------------------------------------------------------------------
def parse_settings(items: Sequence[str], option: str = "--set", *, form: str = "KEY=VALUE",
                   example: str = "") -> dict:
    """["base.steps=500", "k=0.3"] -> {"base.steps": 500, "k": 0.3}, for apply_overrides: values are read as YAML
    scalars or flow collections ("[0.5, 1]"), as a config file reads them; a later KEY wins.
    Raises ValueError naming `option` (what it takes: `form`, e.g. `example`) for an item without "=", without a
    key, or with a value YAML cannot read.
    """
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key.strip() or not sep:
            raise ValueError(f"{option} takes {form}, got {shown(item)}" + (f"; e.g. {example}" if example else ""))
        pairs[key.strip()] = _yaml_value(value, f"{option} {key.strip()}")
    return pairs


def _yaml_value(text: str, where: str):
    import yaml

    try:
        return yaml.load(text, Loader=_loader())
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{where}: cannot read {shown(text)} as a value ({reason}); quote text, close brackets") \
            from None


@functools.cache
def _loader():
    """The YAML loader for settings, built on first use (PyYAML is imported only then)."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader without aliases (a few hundred bytes of anchors expand to gigabytes), with repeated keys
        refused (YAML and JSON parsers keep the last silently), in linear time."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in settings files; "
                                                  "write the value out", self.peek_event().start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            _refuse_repeated([self.construct_object(k, deep=deep) for k, _ in node.value])
            return super().construct_mapping(node, deep=deep)

    return BoundedLoader


def _refuse_repeated(keys: list) -> None:
    seen, twice = set(), set()
    for k in keys:
        (twice if k in seen else seen).add(k)
    if twice:
        names = sorted(str(k) for k in twice)
        raise ValueError(f"key(s) {names} appear more than once in one mapping; keep one of each")


def _check_shape(data, path: Path) -> None:
    """Refuse nesting deeper than MAX_DEPTH, more than MAX_KEYS keys, and keys that are not text."""
    keys, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"config file {path} nests deeper than {MAX_DEPTH} levels; settings are at most two")
        if isinstance(value, dict):
            keys += len(value)
            if keys > MAX_KEYS:
                raise ValueError(f"config file {path} has more than {MAX_KEYS} keys; a settings file has a few dozen")
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise ValueError(f"config file {path}: setting names are text, got {shown(bad[0])}; quote it or "
                                 "fix the key")
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]


def load_config_file(path: str | Path) -> dict:
    """Read a YAML, TOML or JSON settings file into a dict.

    Raises FileNotFoundError when it is missing and ValueError naming the file for a directory, another suffix,
    a file over MAX_CONFIG_BYTES, text that does not parse, repeated keys, YAML aliases, more than MAX_KEYS keys,
    nesting deeper than MAX_DEPTH, non-text keys, or content that is not a mapping.
    """
    import tomllib

    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; pass the settings file itself (.yaml, .yml, .toml or "
                         ".json)")
    if path.suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    if not path.is_file():
        raise ValueError(f"config file {path} is not a regular file; pass the settings file itself")
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes; a settings file is a few "
                         "hundred: pass the right file")
    kind = CONFIG_SUFFIXES[path.suffix]

    def json_pairs(pairs):
        _refuse_repeated([k for k, _ in pairs])
        return dict(pairs)

    parse = {"YAML": lambda text: yaml.load(text, Loader=_loader()), "TOML": tomllib.loads,
             "JSON": lambda text: json.loads(text, object_pairs_hook=json_pairs)}[kind]
    try:
        data = parse(raw.decode("utf-8"))
    except (yaml.YAMLError, tomllib.TOMLDecodeError, ValueError, RecursionError) as err:  # JSON, UnicodeDecode
        reason = " ".join(str(err).split())[:300]  # YAML's messages span lines
        raise ValueError(f"config file {path} is not valid {kind} ({reason}); fix it and rerun") from None
    if data is None:  # an empty YAML file
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    _check_shape(data, path)
    return data
