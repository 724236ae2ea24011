"""Configuration: YAML in configs/ -> plain dataclasses here -> Dagster resources with the same names.

Environment variables override YAML (CB_DATA_ROOT, CB_DATASETS, CB_<SOURCE>_PATH, ...).

`CB_CONFIG_DIR` (read at call time) moves the whole configs/ folder: every YAML file is read from it, and a
relative path written inside a config file that starts with `configs/` is rewritten into it
(`configs/tool_schemas/x.json` -> `$CB_CONFIG_DIR/tool_schemas/x.json`); any other relative path is relative
to the project root; absolute paths (and `~`) are taken as they are.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from cb_core.schemas import DATASETS, SOURCES

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_PREFIX = "configs"

SOURCE_ENV = {name: env for name, (_module, env) in SOURCES.items()}  # dataset -> CB_<SOURCE>_PATH


class LocatedError(ValueError):
    """A config problem whose message starts ``<file>: <key path> ...``: the line of that key in the file, as
    `read_config` found it, goes after the file name (``<file>:<line>: ...``, as editors and compilers
    write it). The checks below are handed a key path, not a YAML node, so the line is found here once
    instead of threaded through every check."""

    def __init__(self, *args: Any) -> None:
        if args and isinstance(args[0], str):
            args = (located(args[0]), *args[1:])
        super().__init__(*args)


class ConfigError(LocatedError):
    """A configuration problem the user must fix; the message says what to set."""


class ConfigFileNotFound(ConfigError, FileNotFoundError):
    """A config file that is not there (still a FileNotFoundError for callers treating the file as optional)."""


def config_dir() -> Path:
    """$CB_CONFIG_DIR (read now, not at import), else the project's configs/."""
    base = os.environ.get("CB_CONFIG_DIR")
    return Path(os.path.expanduser(base)).resolve() if base else PROJECT_ROOT / CONFIG_PREFIX


def __getattr__(name: str):  # CONFIG_DIR kept for callers of the old constant, now evaluated per access
    if name == "CONFIG_DIR":
        return config_dir()
    raise AttributeError(name)


def named_config(folder: str, name_or_path: str, what: str, error: type[Exception] = ConfigError) -> Path:
    """A YAML given as a path, or by name: ``config_dir()/<folder>/<name>.yaml``. Absent: ``error`` naming what
    was looked for and the names that exist (training presets, sweep manifests)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    base = config_dir() / folder
    cand = base / f"{name_or_path}.yaml"
    if not cand.is_file():
        known = sorted(x.stem for x in base.glob("*.yaml"))
        raise error(f"{what} {name_or_path!r} not found (looked for {cand}; known: {known})")
    return cand


def setting(env_var: str, file: str, section: str, key: str, default: Any, kind: type | None = None,
            lo: float | None = None, hi: float | None = None, choices: tuple[str, ...] | None = None,
            check: "Rule | None" = None) -> Any:
    """One setting with its environment overlay: ``$env_var`` when set and non-empty, else ``section.key`` of
    ``configs/<file>`` (an absent file is empty), else ``default`` (also for a null in the file).

    ``kind`` (int, float or str) checks the value found, naming where it came from: the variable (whose
    text is parsed first) or ``file: section.key``; ``lo``/``hi`` bound numbers, ``choices`` texts; ``check``
    (a Rule: value, where -> value) is what else the value must be (a cron schedule, an existing preset), its
    error naming the same place. The default is returned as given."""
    val = os.environ.get(env_var)
    if val not in (None, ""):
        if kind in (int, float):
            val = env_number(env_var, default, kind, lo, hi)
            return check(val, f"environment variable {env_var}") if check else val
        where = f"environment variable {env_var}"
    else:
        try:
            raw = load_yaml(file)
        except ConfigFileNotFound:
            raw = {}
        shown = display_path(config_dir() / file)
        sec = raw.get(section)
        if sec is not None and not isinstance(sec, dict):
            raise ConfigError(f"{shown}: {section} must be a mapping (key: value lines), got {sec!r}")
        val = (sec or {}).get(key)
        if val is None:
            return default
        where = f"{shown}: {section}.{key} (or ${env_var})"
    if kind is int:
        val = check_int(val, where, lo, hi)
    elif kind is float:
        val = check_number(val, where, lo, hi)
    elif kind is str:
        val = check_str(val, where, choices)
    return check(val, where) if check else val


def display_path(path: str | Path) -> str:
    """A path as messages show it: relative to the project root when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags) that refuses a key given twice in one mapping: PyYAML keeps the
    last copy without a word, so a second ``train:`` block would silently replace the first."""


def _unique_mapping(loader: StrictSafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on line {key_node.start_mark.line + 1} (first given on line "
                    f"{seen[key]}): only one may stay",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        except TypeError:  # an unhashable key: the constructor reports it
            continue
    return loader.construct_mapping(node, deep=deep)


StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def safe_load(stream: Any) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (`StrictSafeLoader`): every config file goes through it."""
    return yaml.load(stream, Loader=StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass


_KEY_LINES: dict[str, dict[str, int]] = {}  # a config file, as messages name it -> {key path: line}
_KEY_LINES_MAX = 256


def read_config(path: str | Path) -> Any:
    """A config file's YAML (`safe_load`, parsed once), remembering the line of every key path
    (``train.lr``, ``grid.train.lr[1]``) so that a `LocatedError` about it names the line. Raises what
    opening and parsing raise (OSError, yaml.YAMLError)."""
    path = Path(path)
    loader = StrictSafeLoader(path.read_text(encoding="utf-8"))
    lines: dict[str, int] = {}
    try:
        node = loader.get_single_node()
        if node is not None:  # before constructing: a `<<:` merge is flattened into the node by the constructor
            _key_lines(node, "", lines, set())
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    names = {str(path), display_path(path)}
    try:
        names.add(str(path.resolve()))
    except OSError:
        pass
    for name in names:
        _KEY_LINES.pop(name, None)
        _KEY_LINES[name] = lines
    while len(_KEY_LINES) > _KEY_LINES_MAX:
        del _KEY_LINES[next(iter(_KEY_LINES))]
    return data


def _key_lines(node: yaml.Node, prefix: str, out: dict[str, int], seen: set[int]) -> None:
    """Each node is walked once: an alias (``*base``) or a ``<<: *base`` merge is not walked again under the key
    that uses it (whose own line then stands for the values it brings), so a recursive alias ends and a
    nest of aliases cannot multiply the table."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out.setdefault(path, key_node.start_mark.line + 1)
            _key_lines(value, path, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault(f"{prefix}[{i}]", item.start_mark.line + 1)
            _key_lines(item, f"{prefix}[{i}]", out, seen)


def key_line(file: str, key_path: str) -> int | None:
    """The line of ``key_path`` in ``file`` (as messages name it) when `read_config` read it, else None."""
    return _KEY_LINES.get(file, {}).get(key_path)


# a key path; a part may carry a note in brackets (``curriculum.phases[1] (rampup).start_step``), not part of it
_LEAD_KEY = re.compile(r"[A-Za-z0-9_\-]+(?:(?: \([^()\n]{0,200}\))?(?:\.[A-Za-z0-9_\-]+|\[\d+\]))*")
_NOTE = re.compile(r" \([^()\n]{0,200}\)")
_PROFILE = re.compile(r"profile '([^'\n]{1,200})': ")
_NAMED_KEY = re.compile(r"(?:unknown (?:top-level )?(?:keys?|fields?|class)|axis) \[?'([^'\n]{1,200})'")
_LAST_PART = re.compile(r"(?:\.[^.\[]+|\[\d+\])$|^[^.\[]+$")


def located(message: str) -> str:
    """``"<file>: <key path> ..."`` with the key's line put after the file name when `read_config` read that
    file: the key path the message starts with, or the deepest part of it that is in the file (a missing
    ``train.foo`` points at ``train``; a curation value a profile inherits, at that profile, which
    `load_curation_config` then moves to the ancestor that writes it); for an
    unknown key or axis the message quotes (``unknown key 'paht'``), that key's own line. Anything else is
    returned as it is."""
    best = max((name for name in _KEY_LINES if message.startswith(name + ": ")), key=len, default="")
    if not best:
        return message
    lines, rest = _KEY_LINES[best], message[len(best) + 2:]
    scope = _PROFILE.match(rest)  # curation.yaml: "profile 'demo': gates.x" is profiles.demo.gates.x
    body = rest[scope.end():] if scope else rest
    m = _LEAD_KEY.match(body)
    base = f"profiles.{scope.group(1)}" if scope else ""
    key = ".".join(k for k in (base, _NOTE.sub("", m.group(0)) if m else "") if k)
    line = None
    named = _NAMED_KEY.search(body)
    if named:  # under the key the message starts with; a message that starts "unknown key ..." is about its scope
        under = base if named.start() == 0 or not m else key
        line = lines.get(f"{under}.{named.group(1)}" if under else named.group(1))
    while line is None and key:
        line = lines.get(key)
        key = _LAST_PART.sub("", key)
    return f"{best}:{line}: {rest}" if line else message


def load_yaml(name: str | Path) -> dict[str, Any]:
    """A YAML mapping from the config folder (or an absolute path); problems name the file."""
    path = Path(name)
    if not path.is_absolute():
        path = config_dir() / path
    try:
        data = read_config(path)
    except FileNotFoundError:
        raise ConfigFileNotFound(
            f"config file {display_path(path)} not found (CB_CONFIG_DIR={os.environ.get('CB_CONFIG_DIR') or 'unset'})"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{display_path(path)}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{display_path(path)}: must be a mapping of keys, got {type(data).__name__}")
    return data


def config_path(rel: str | Path) -> Path:
    """Resolve a path named in a config file: absolute (or ~) as is; `configs/...` inside the config folder
    ($CB_CONFIG_DIR when set); any other relative path relative to the project root."""
    p = Path(os.path.expanduser(str(rel)))
    if p.is_absolute():
        return p
    if p.parts and p.parts[0] == CONFIG_PREFIX:
        return config_dir().joinpath(*p.parts[1:])
    return PROJECT_ROOT / p


def _number_in(value: Any, lo: float, hi: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
        raise ConfigError(f"{where} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


# --- typed values: one check per kind, the message names where the value came from (``file: key`` or the
# environment variable) and what was found. YAML gives true/false, numbers and lists their own types; a
# quoted 'false' is a string, and Python would take it as true, so a flag must be a real boolean.
def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false (unquoted), got {_got(value)}")
    return value


def check_int(value: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be a whole number, got {_got(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{where} must be {_range(lo, hi)}, got {value}")
    return value


def check_number(value: Any, where: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite int or float in range (``lo_open``/``hi_open``: strictly inside that bound)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {_got(value)}")
    if ((lo is not None and (value <= lo if lo_open else value < lo))
            or (hi is not None and (value >= hi if hi_open else value > hi))):
        raise ConfigError(f"{where} must be {_range(lo, hi, lo_open, hi_open)}, got {value}")
    return float(value)


def check_str(value: Any, where: str, choices: tuple[str, ...] | list[str] | None = None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty text, got {_got(value)}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
    return value


def check_str_list(value: Any, where: str, choices: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """A YAML list of texts (one text is not a list: ``[airline]``, not ``airline``, which would be read as
    its letters)."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where} must be a list of texts, e.g. [a, b], got {_got(value)}")
    bad = [v for v in value if choices is not None and v not in choices]
    if bad:
        raise ConfigError(f"{where}: {bad} not among {list(choices)}")
    return value


def check_mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping (key: value lines), got {_got(value)}")
    return value


def did_you_mean(name: Any, known: Any) -> str:
    """`` (did you mean 'lr'?)`` for the known name nearest a misspelt one, else ``""``."""
    import difflib

    near = difflib.get_close_matches(str(name), [str(x) for x in known], n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def check_keys(mapping: dict, known: Any, where: str) -> None:
    """Every key of ``mapping`` is one of ``known``; a misspelt one is named with its nearest known key (a
    key nobody reads would silently leave its default in force)."""
    unknown = [k for k in mapping if k not in known]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{where}: unknown key {k!r}{did_you_mean(k, known)}; known: {sorted(map(str, known))}")


def _range(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"{'<' if hi_open else '<='} {hi:g}"


# Rules: ``check(value, where) -> the checked value``, raising ConfigError naming ``where``. A config's loader
# keeps one table of key -> rule (a key without one is unknown), built from these.
Rule = Callable[[Any, str], Any]


def nullable(rule: Rule) -> Rule:
    """``rule``, or null (where null has a meaning: "all", "the default", "off")."""
    return lambda v, where: None if v is None else rule(v, where)


def whole(lo: int | None = None, hi: int | None = None) -> Rule:
    return lambda v, where: check_int(v, where, lo, hi)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    return lambda v, where: check_number(v, where, lo, hi, lo_open, hi_open)


def one_of(choices: Any) -> Rule:
    return lambda v, where: check_str(v, where, tuple(choices))


def texts(choices: Any = None) -> Rule:
    return lambda v, where: check_str_list(v, where, None if choices is None else tuple(choices))


def section(rules: dict[str, Rule]) -> Rule:
    """A mapping whose every key has a rule in ``rules``: the checked values (keys not given keep their
    defaults)."""
    def check(v: Any, where: str) -> dict[str, Any]:
        check_keys(check_mapping(v, where), rules, where)
        return {k: rules[k](x, f"{where}.{k}") for k, x in v.items()}
    return check


def env_number(var: str, default: Any, kind: type = int, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, env: Any = None) -> Any:
    """``$var`` (from ``env``, default ``os.environ``) parsed as ``kind`` (int or float) and checked, naming the
    variable; ``default`` when unset or empty (the default is returned as given)."""
    raw = (os.environ if env is None else env).get(var)
    if raw in (None, ""):
        return default
    where = f"environment variable {var}"
    try:
        value = kind(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{where} must be a {'whole number' if kind is int else 'number'}, got {raw!r}") from None
    return check_int(value, where, lo, hi) if kind is int else check_number(value, where, lo, hi, lo_open)


def resolve_source_paths(spec: str | Path) -> list[Path]:
    """A file, a folder (its files, sorted) or a glob. Names with spaces and brackets work: a path that
    exists is taken literally before any glob expansion."""
    p = Path(os.path.expanduser(str(spec)))
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith("."))
    return sorted(Path(x) for x in glob.glob(str(p), recursive=True) if Path(x).is_file())


@dataclass
class SourceSelection:
    """Which sources run and from where. `demo` means no path was configured anywhere: the embedded
    synthetic sample is used instead."""

    paths: dict[str, str | None]
    selected: list[str]
    demo: bool
    explicit: bool  # CB_DATASETS was given

    def path_for(self, dataset: str) -> str:
        path = self.paths.get(dataset)
        if not path:
            raise ConfigError(
                f"source '{dataset}' is selected but has no path: set {SOURCE_ENV[dataset]} "
                f"(or sources.{dataset}.path in configs/datasets.yaml), or drop it from CB_DATASETS"
            )
        return path


def _text(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{where} must be a text, got {v!r} ({type(v).__name__})")
    return v


def _config_file(v: Any, where: str) -> None:
    """A file named in the config (``configs/...`` or a path) must exist: found now, not when a source reads."""
    if not config_path(check_str(v, where)).is_file():
        raise ConfigError(f"{where}: file {config_path(v)} not found")


def _max_rows(v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{where} must be a positive integer or null, got {v!r}")


# Each source section's keys and the check of each (null always means the reader's default); a key not
# listed is an error naming it. The readers read exactly these (cb_core/sources/<source>.py).
SOURCE_SETTINGS: dict[str, dict[str, Callable[[Any, str], Any]]] = {
    "fujitsu_b4": {"tool_schema": _config_file, "required_fields": check_str_list, "system_prompt": _text},
    "agentdojo": {"tool_schemas": _config_file, "tool_schemas_version": check_str, "attacker_targets": check_mapping,
                  "injection_tasks": _config_file},
    "llmail_inject": {"jobs_file": check_str, "scenarios_file": check_str, "system_prompt_file": check_str,
                      "system_prompt_key": check_str, "tool_schema": _config_file, "retrieval_tool": check_str,
                      "attacker_tool": check_str, "levels_file": check_str, "attacker_args_by_scenario": check_mapping,
                      "scenario_map": check_mapping, "email_template": _text, "email_separator": _text},
    "tau2": {"domains": check_str_list, "system_prompt": _text, "tool_schemas": _config_file},
    "ultrachat": {"max_rows": _max_rows, "splits": check_str_list},
    "xstest": {},
}


@dataclass
class DatasetsConfig:
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    agentdojo: dict[str, Any] = field(default_factory=dict)
    llmail_inject: dict[str, Any] = field(default_factory=dict)
    fujitsu_b4: dict[str, Any] = field(default_factory=dict)
    tau2: dict[str, Any] = field(default_factory=dict)
    ultrachat: dict[str, Any] = field(default_factory=dict)
    xstest: dict[str, Any] = field(default_factory=dict)
    stop_the_line: dict[str, Any] = field(default_factory=dict)

    file: str = "configs/datasets.yaml"  # shown in messages

    @classmethod
    def load(cls, name: str = "datasets.yaml") -> "DatasetsConfig":
        path = Path(name) if Path(name).is_absolute() else config_dir() / name
        raw = load_yaml(path)
        shown = display_path(path)
        check_keys(raw, [k for k in cls.__dataclass_fields__ if k != "file"], shown)
        known = {}
        for k in cls.__dataclass_fields__:
            if k == "file":
                continue
            val = raw.get(k)
            if val is not None and not isinstance(val, dict):
                raise ConfigError(f"{shown}: {k} must be a mapping, got {type(val).__name__} {val!r}")
            known[k] = val or {}
        cfg = cls(**known, file=shown)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Fail at load time, naming file and key, instead of silently misbehaving later: a misspelt key
        (``pth:`` for ``path:``) would leave its default in force, here the demo sample instead of the data."""
        for ds, spec in self.sources.items():
            if ds not in DATASETS:
                raise ConfigError(f"{self.file}: sources.{ds} is not a known source ({', '.join(DATASETS)})")
            if spec is not None and not isinstance(spec, dict):
                raise ConfigError(f"{self.file}: sources.{ds} must be a mapping like {{path: ...}}, got {spec!r}")
            check_keys(spec or {}, ["path"], f"{self.file}: sources.{ds}")
            path = (spec or {}).get("path")
            if path is not None and not isinstance(path, str):
                raise ConfigError(f"{self.file}: sources.{ds}.path must be a string or null, got {path!r}")
        check_keys(self.stop_the_line, ["max_reject_fraction"], f"{self.file}: stop_the_line")
        for section, rules in SOURCE_SETTINGS.items():
            values = getattr(self, section)
            check_keys(values, rules, f"{self.file}: {section}")
            for key, rule in rules.items():
                if values.get(key) is not None:
                    rule(values[key], f"{self.file}: {section}.{key}")
        if "max_reject_fraction" in self.stop_the_line:
            _number_in(self.stop_the_line["max_reject_fraction"], 0, 1,
                       f"{self.file}: stop_the_line.max_reject_fraction")

    @property
    def max_reject_fraction(self) -> float:
        value = self.stop_the_line.get("max_reject_fraction", 0.10)
        return _number_in(value, 0, 1, f"{self.file}: stop_the_line.max_reject_fraction")

    def selection(self, env: dict[str, str] | None = None) -> SourceSelection:
        env = dict(os.environ if env is None else env)
        paths: dict[str, str | None] = {}
        for ds in DATASETS:
            val = env.get(SOURCE_ENV[ds]) or (self.sources.get(ds) or {}).get("path")
            paths[ds] = str(config_path(val)) if val else None
        raw_sel = env.get("CB_DATASETS", "").strip()
        if raw_sel:
            selected = [s.strip() for s in raw_sel.split(",") if s.strip()]
            if not selected:
                raise ConfigError(
                    f"CB_DATASETS={env['CB_DATASETS']!r} names no source; give a comma list of "
                    f"{', '.join(DATASETS)}, or unset CB_DATASETS to run every configured source"
                )
            unknown = [s for s in selected if s not in DATASETS]
            if unknown:
                raise ConfigError(
                    f"CB_DATASETS names unknown source(s) {unknown}; known: {', '.join(DATASETS)}"
                )
            return SourceSelection(paths, selected, demo=False, explicit=True)
        configured = [ds for ds in DATASETS if paths[ds]]
        if not configured:
            return SourceSelection(paths, list(DATASETS), demo=True, explicit=False)
        return SourceSelection(paths, configured, demo=False, explicit=False)
