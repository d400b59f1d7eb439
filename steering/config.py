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
DTYPES = ("auto", "bfloat16", "float32", "float16")
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


def write_toml_atomic(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Validate `data`, write it to a temp file, re-read and re-validate it, then rename over `path`."""
    import tomli_w

    target = Path(path)
    parse_sections(data, str(target), target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            tomli_w.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        parse_sections(read_toml(tmp), str(target), target.parent)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def edit_target(start: str | os.PathLike | None = None, project: str | os.PathLike | None = None) -> Path:
    """Which file steering edits go to: the project file in effect, else the user's file."""
    if project is not None:
        return Path(project)
    found = find_project_config(start)
    return found if found is not None else user_config_path()


def _steer_list(data: dict[str, Any]) -> list[dict[str, Any]]:
    steer = data.get("steer", [])
    return list(steer) if isinstance(steer, list) else []


def set_steer_entry(path: str | os.PathLike, entry: SteeringEntry) -> list[SteeringEntry]:
    """Add `entry` to the file's [[steer]] list, or replace the one for the same feature."""
    validate_entry(entry)
    target = Path(path)
    data = read_toml(target)  # raises on a broken file: it is never overwritten
    steer = _steer_list(data)
    new = entry.to_dict()
    for i, old in enumerate(steer):
        if isinstance(old, dict) and old.get("feature") == entry.feature:
            steer[i] = new
            break
    else:
        steer.append(new)
    data["steer"] = steer
    write_toml_atomic(target, data)
    return parse_sections(data, str(target)).get("steer", [])


def update_steer_entry(path: str | os.PathLike, feature: str, **changes: Any) -> list[SteeringEntry]:
    """Change fields (strength/mode/layer) of an existing entry."""
    target = Path(path)
    data = read_toml(target)
    steer = _steer_list(data)
    for i, old in enumerate(steer):
        if isinstance(old, dict) and old.get("feature") == feature:
            merged = {**old, **{k: v for k, v in changes.items() if v is not None}}
            steer[i] = entry_from_dict(merged, f"{target}: {feature}").to_dict()
            break
    else:
        raise ConfigError(f"{feature} is not steered in {target}")
    data["steer"] = steer
    write_toml_atomic(target, data)
    return parse_sections(data, str(target)).get("steer", [])


def remove_steer_entry(path: str | os.PathLike, feature: str) -> list[SteeringEntry]:
    target = Path(path)
    data = read_toml(target)
    steer = _steer_list(data)
    kept = [s for s in steer if not (isinstance(s, dict) and s.get("feature") == feature)]
    if len(kept) == len(steer):
        raise ConfigError(f"{feature} is not steered in {target}")
    data["steer"] = kept
    write_toml_atomic(target, data)
    return parse_sections(data, str(target)).get("steer", [])


def clear_steering(path: str | os.PathLike) -> None:
    target = Path(path)
    data = read_toml(target)
    data["steer"] = []
    write_toml_atomic(target, data)
