"""tinymorph.toml: one schema for the CLI, the LSP and the HTTP API.

Why one module: every front end must agree on what a config means and must refuse the same bad
files with the same messages. Layering: the user's file (``platformdirs.user_config_dir/config.toml``,
or ``$TINYMORPH_CONFIG_DIR/config.toml``) is read first, then the project's ``tinymorph.toml`` (the
first one found walking up from the working directory / workspace) overrides it: tables key by key,
``[[sae]]`` by name, and ``[[steer]]`` as a whole list when the project file has one.

Writes go to a temporary file in the same folder, are re-read and validated, then renamed over the
target, so a crash or a bad edit never leaves a half-written or invalid config behind; a file that
does not parse is never overwritten.

    [model]
    path = "default"        # "default", a folder, a .gguf file or a cached HF id
    dtype = "auto"          # auto | bfloat16 | float32 | float16
    threads = 2

    [[sae]]
    name = "mine"
    path = "saes/layer12"   # a folder (relative to this file), or RELEASE:SAE_ID in the HF cache

    [[steer]]
    feature = "default:1234"  # or "vector:formal"
    mode = "add"              # add | clamp | ablate
    strength = 0.8
    layer = 15                # optional: default is the SAE's (or vector's) layer

    [completion]
    max_tokens = 24
    stop = "sentence"         # word | line | sentence | paragraph
    debounce_ms = 120
    context_tokens = 1024
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .steering import MODES, SteeringEntry, SteeringError, SteeringPlan, validate_entry

PROJECT_FILE = "tinymorph.toml"
USER_FILE = "config.toml"
DTYPES = ("auto", "int4", "int8", "bfloat16", "float32", "float16")  # --dtype, [model].dtype, tinymorph.dtype
STOPS = ("word", "line", "sentence", "paragraph", "none")


class ConfigError(ValueError):
    """A config file is unreadable or invalid; the message names the file and the key."""


@dataclass
class ModelConfig:
    path: str = "default"
    dtype: str = "auto"
    threads: int | None = None


@dataclass
class SaeConfig:
    name: str
    path: str


@dataclass
class CompletionConfig:
    max_tokens: int = 24
    stop: str = "sentence"
    debounce_ms: int = 120
    context_tokens: int = 1024


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    saes: list[SaeConfig] = field(default_factory=list)
    steer: list[SteeringEntry] = field(default_factory=list)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    sources: list[Path] = field(default_factory=list)  # files read, lowest priority first

    def plan(self) -> SteeringPlan:
        return SteeringPlan(tuple(self.steer))

    def sae_specs(self) -> dict[str, str]:
        return {s.name: s.path for s in self.saes}

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


# -- locating files -------------------------------------------------------------------------------


def user_config_path() -> Path:
    env = os.environ.get("TINYMORPH_CONFIG_DIR")
    if env:
        return Path(env) / USER_FILE
    import platformdirs

    return Path(platformdirs.user_config_dir("tinymorph")) / USER_FILE


def find_project_config(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest `tinymorph.toml` in `start` (default: cwd) or one of its parents."""
    here = Path(start or os.getcwd()).resolve()
    if here.is_file():
        here = here.parent
    for folder in (here, *here.parents):
        candidate = folder / PROJECT_FILE
        if candidate.is_file():
            return candidate
    return None


# -- reading and validating -----------------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def _expect(where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(f"{where}: must be {what}, not {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: must be {what}, not {value!r}")
    return value


def _table(where: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    _expect(where, value, dict, "a table")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} "
                          f"(allowed: {', '.join(sorted(allowed))})")
    return value


def parse_sections(data: dict[str, Any], source: str, base: Path | None = None) -> dict[str, Any]:
    """Validate one file's content; return the sections it defines (only those present)."""
    _table(source, data, {"model", "sae", "steer", "completion"})
    out: dict[str, Any] = {}
    if "model" in data:
        m = _table(f"{source}: [model]", data["model"], {"path", "dtype", "threads"})
        model: dict[str, Any] = {}
        if "path" in m:
            model["path"] = _expect(f"{source}: [model].path", m["path"], str, "a string")
        if "dtype" in m:
            if m["dtype"] not in DTYPES:
                raise ConfigError(f"{source}: [model].dtype must be one of {', '.join(DTYPES)}, "
                                  f"not {m['dtype']!r}")
            model["dtype"] = m["dtype"]
        if "threads" in m:
            t = _expect(f"{source}: [model].threads", m["threads"], int, "a positive integer")
            if t < 1:
                raise ConfigError(f"{source}: [model].threads must be a positive integer, not {t}")
            model["threads"] = t
        out["model"] = model
    if "sae" in data:
        saes = _expect(f"{source}: sae", data["sae"], list, "an array of [[sae]] tables")
        parsed = []
        for i, s in enumerate(saes, 1):
            where = f"{source}: [[sae]] #{i}"
            s = _table(where, s, {"name", "path"})
            if "name" not in s or "path" not in s:
                raise ConfigError(f"{where}: needs both name and path")
            name = _expect(f"{where}.name", s["name"], str, "a string")
            if not name or ":" in name or name == "vector":
                raise ConfigError(f"{where}.name: {name!r} cannot be used (no ':' and not 'vector')")
            path = _expect(f"{where}.path", s["path"], str, "a string")
            if base is not None and path not in ("default",) and ":" not in path:
                p = Path(path).expanduser()
                path = str(p if p.is_absolute() else (base / p))
            parsed.append(SaeConfig(name, path))
        out["sae"] = parsed
    if "steer" in data:
        steer = _expect(f"{source}: steer", data["steer"], list, "an array of [[steer]] tables")
        entries = []
        for i, s in enumerate(steer, 1):
            where = f"{source}: [[steer]] #{i}"
            entries.append(entry_from_dict(_table(where, s, {"feature", "mode", "strength", "layer"}), where))
        features = [e.feature for e in entries]
        dupes = sorted({f for f in features if features.count(f) > 1})
        if dupes:
            raise ConfigError(f"{source}: feature(s) {', '.join(dupes)} steered more than once")
        out["steer"] = entries
    if "completion" in data:
        c = _table(f"{source}: [completion]", data["completion"],
                   {"max_tokens", "stop", "debounce_ms", "context_tokens"})
        comp: dict[str, Any] = {}
        limits = (("max_tokens", 1, 4096), ("debounce_ms", 0, 60_000), ("context_tokens", 16, 1 << 20))
        for key, lo, hi in limits:
            if key in c:
                v = _expect(f"{source}: [completion].{key}", c[key], int, "an integer")
                if not lo <= v <= hi:
                    raise ConfigError(f"{source}: [completion].{key} must be in {lo}..{hi}, not {v}")
                comp[key] = v
        if "stop" in c:
            if c["stop"] not in STOPS:
                raise ConfigError(f"{source}: [completion].stop must be one of {', '.join(STOPS)}, "
                                  f"not {c['stop']!r}")
            comp["stop"] = c["stop"]
        out["completion"] = comp
    return out


def entry_from_dict(d: dict[str, Any], where: str = "steering entry") -> SteeringEntry:
    """A validated `SteeringEntry` from a TOML/JSON table (used by config, LSP and HTTP)."""
    if "feature" not in d:
        raise ConfigError(f"{where}: needs a feature")
    feature = _expect(f"{where}.feature", d["feature"], str, "a feature id string")
    strength = _expect(f"{where}.strength", d.get("strength", 0.0), (int, float), "a number")
    mode = d.get("mode", "add")
    if mode not in MODES:
        raise ConfigError(f"{where}.mode must be one of {', '.join(MODES)}, not {mode!r}")
    layer = d.get("layer")
    if layer is not None:
        layer = _expect(f"{where}.layer", layer, int, "an integer")
        if layer < 0:
            raise ConfigError(f"{where}.layer must be >= 0, not {layer}")
    entry = SteeringEntry(feature=feature, strength=float(strength), mode=mode, layer=layer)
    try:
        validate_entry(entry)
    except SteeringError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return entry


def merge(layers: list[dict[str, Any]]) -> Config:
    """Combine parsed sections, later ones overriding earlier ones."""
    cfg = Config()
    saes: dict[str, SaeConfig] = {}
    for sec in layers:
        for k, v in sec.get("model", {}).items():
            setattr(cfg.model, k, v)
        for k, v in sec.get("completion", {}).items():
            setattr(cfg.completion, k, v)
        for s in sec.get("sae", []):
            saes[s.name] = s
        if "steer" in sec:
            cfg.steer = list(sec["steer"])
    cfg.saes = list(saes.values())
    return cfg


def load_config(start: str | os.PathLike | None = None, project: str | os.PathLike | None = None,
                user: str | os.PathLike | None = None, use_user: bool = True) -> Config:
    """The effective config: user file, then the project file (`project`, or found from `start`)."""
    files: list[Path] = []
    user_path = Path(user) if user is not None else user_config_path()
    if use_user and user_path.is_file():
        files.append(user_path)
    project_path = Path(project) if project is not None else find_project_config(start)
    if project is not None and not Path(project).is_file():
        raise ConfigError(f"config file {project} does not exist")
    if project_path is not None and project_path.is_file() and project_path not in files:
        files.append(project_path)
    layers = [parse_sections(read_toml(f), str(f), f.parent) for f in files]
    cfg = merge(layers)
    cfg.sources = files
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    model = {k: v for k, v in vars(cfg.model).items() if v is not None}
    out: dict[str, Any] = {"model": model}
    if cfg.saes:
        out["sae"] = [{"name": s.name, "path": s.path} for s in cfg.saes]
    out["steer"] = [e.to_dict() for e in cfg.steer]
    out["completion"] = dict(vars(cfg.completion))
    return out


def library_from_config(cfg: Config | None):
    from .library import FeatureLibrary

    return FeatureLibrary(cfg.sae_specs() if cfg is not None else None)


# -- writing --------------------------------------------------------------------------------------
# Steering edits rewrite the user's file with tomlkit, which keeps comments, key order and layout;
# only the [[steer]] entries change. A temporary file carries the writer's pid in its name, so a
# writer that was killed mid-write leaves nothing behind for long: the next write removes the
# leftovers of writers that are gone.


def _tmp_path(target: Path, pid: int | None = None) -> Path:
    return target.with_name(f".{target.name}.{os.getpid() if pid is None else pid}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(target: str | os.PathLike) -> list[Path]:
    """Delete `.NAME.<pid>.tmp` files next to `target` whose writer process no longer exists."""
    target = Path(target)
    removed = []
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        pid_text = tmp.name[len(target.name) + 2: -len(".tmp")]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def _write_text_atomic(target: Path, text: str) -> Path:
    """Validate `text` as a config, write it beside `target`, fsync, rename over `target`."""
    import tomllib as _tomllib

    try:
        data = _tomllib.loads(text)
    except _tomllib.TOMLDecodeError as exc:  # pragma: no cover - we produced it
        raise ConfigError(f"{target}: refusing to write invalid TOML: {exc}") from None
    parse_sections(data, str(target), target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target)
    tmp = _tmp_path(target)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        parse_sections(read_toml(tmp), str(target), target.parent)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def write_toml_atomic(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Validate `data`, write it to a temp file, re-read and re-validate it, then rename over `path`."""
    import tomlkit

    target = Path(path)
    parse_sections(data, str(target), target.parent)
    return _write_text_atomic(target, tomlkit.dumps(data))


def edit_target(start: str | os.PathLike | None = None, project: str | os.PathLike | None = None) -> Path:
    """Which file steering edits go to: the project file in effect, else the user's file."""
    if project is not None:
        return Path(project)
    found = find_project_config(start)
    return found if found is not None else user_config_path()


def _document(target: Path):
    """The file as a tomlkit document (comments kept); a file that does not parse is never touched."""
    import tomlkit

    read_toml(target)  # raises ConfigError for a broken file
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        return tomlkit.document()
    return tomlkit.parse(text)


def _steer_tables(doc) -> list:
    """The document's [[steer]] entries as editable tomlkit tables (an inline `steer = []` becomes
    an array of tables)."""
    import tomlkit
    from tomlkit.items import AoT

    steer = doc.get("steer")
    if isinstance(steer, AoT):
        return steer
    existing = [dict(t) for t in steer] if isinstance(steer, list) else []
    if "steer" in doc:
        del doc["steer"]
    aot = tomlkit.aot()
    for item in existing:
        aot.append(_steer_table(item))
    doc.append("steer", aot)
    return doc["steer"]


def _steer_table(values: dict[str, Any]):
    import tomlkit

    table = tomlkit.table()
    for key in ("feature", "mode", "strength", "layer"):
        if values.get(key) is not None:
            table[key] = values[key]
    return table


def _save(target: Path, doc) -> list[SteeringEntry]:
    import tomlkit

    text = tomlkit.dumps(doc)
    _write_text_atomic(target, text)
    return parse_sections(tomllib.loads(text), str(target)).get("steer", [])


def _index_of(tables, feature: str) -> int | None:
    for i, t in enumerate(tables):
        if t.get("feature") == feature:
            return i
    return None


def set_steer_entry(path: str | os.PathLike, entry: SteeringEntry) -> list[SteeringEntry]:
    """Add `entry` to the file's [[steer]] list, or replace the one for the same feature."""
    validate_entry(entry)
    target = Path(path)
    doc = _document(target)
    tables = _steer_tables(doc)
    new = entry.to_dict()
    i = _index_of(tables, entry.feature)
    if i is None:
        tables.append(_steer_table(new))
    else:
        table = tables[i]
        for key in ("mode", "strength", "layer"):
            if new.get(key) is None:
                table.pop(key, None)
            else:
                table[key] = new[key]
    return _save(target, doc)


def update_steer_entry(path: str | os.PathLike, feature: str, **changes: Any) -> list[SteeringEntry]:
    """Change fields (strength/mode/layer) of an existing entry."""
    target = Path(path)
    doc = _document(target)
    tables = _steer_tables(doc)
    i = _index_of(tables, feature)
    if i is None:
        raise ConfigError(f"{feature} is not steered in {target}")
    merged = {**dict(tables[i]), **{k: v for k, v in changes.items() if v is not None}}
    entry = entry_from_dict(merged, f"{target}: {feature}").to_dict()
    for key in ("mode", "strength", "layer"):
        if entry.get(key) is not None:
            tables[i][key] = entry[key]
    return _save(target, doc)


def remove_steer_entry(path: str | os.PathLike, feature: str) -> list[SteeringEntry]:
    target = Path(path)
    doc = _document(target)
    tables = _steer_tables(doc)
    i = _index_of(tables, feature)
    if i is None:
        raise ConfigError(f"{feature} is not steered in {target}")
    del tables[i]
    return _save(target, doc)


def clear_steering(path: str | os.PathLike) -> None:
    """No steering from this file: `steer = []` (in a project file this also hides the user's list)."""
    import tomlkit

    target = Path(path)
    doc = _document(target)
    if "steer" in doc:
        del doc["steer"]
    doc["steer"] = tomlkit.array()
    _save(target, doc)
