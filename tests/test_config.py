"""tinymorph.toml: layering, validation messages, round trips, and that bad files are never destroyed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinymorph.steering.config import (
    ConfigError,
    clear_steering,
    config_to_dict,
    find_project_config,
    load_config,
    parse_sections,
    remove_steer_entry,
    set_steer_entry,
    update_steer_entry,
    write_toml_atomic,
)
from tinymorph.steering.steering import SteeringEntry, SteeringError

USER = """
[model]
path = "default"
dtype = "float32"
threads = 2

[[sae]]
name = "mine"
path = "saes/l12"

[[steer]]
feature = "default:10"
strength = 0.5

[completion]
max_tokens = 40
stop = "line"
"""

PROJECT = """
[model]
dtype = "bfloat16"

[[steer]]
feature = "mine:3"
mode = "clamp"
strength = 1.5
layer = 12

[completion]
debounce_ms = 50
"""


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "config.toml").write_text(USER)
    project = tmp_path / "proj"
    (project / "sub" / "deeper").mkdir(parents=True)
    (project / "tinymorph.toml").write_text(PROJECT)
    monkeypatch.setenv("TINYMORPH_CONFIG_DIR", str(user_dir))
    return user_dir, project


def test_layering_project_over_user(dirs: tuple[Path, Path]) -> None:
    user_dir, project = dirs
    cfg = load_config(start=project / "sub" / "deeper")
    assert cfg.sources == [user_dir / "config.toml", project / "tinymorph.toml"]
    assert cfg.model.path == "default" and cfg.model.dtype == "bfloat16" and cfg.model.threads == 2
    assert (cfg.completion.max_tokens, cfg.completion.debounce_ms, cfg.completion.stop) == (40, 50, "line")
    assert [e.feature for e in cfg.steer] == ["mine:3"]  # the project's list replaces the user's
    assert cfg.steer[0] == SteeringEntry("mine:3", 1.5, "clamp", 12)
    # relative SAE paths are relative to the file that names them
    assert cfg.sae_specs() == {"mine": str(user_dir / "saes/l12")}
    assert find_project_config(project / "sub") == project / "tinymorph.toml"


def test_user_only_and_defaults(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = load_config(start=elsewhere)
    assert [e.feature for e in cfg.steer] == ["default:10"]
    assert cfg.completion.context_tokens == 1024  # untouched default


@pytest.mark.parametrize("text,message", [
    ("[model]\ndtype = 'fp8'\n", "dtype must be one of"),
    ("[model]\nthreads = 0\n", "positive integer"),
    ("[model]\nthreads = true\n", "positive integer"),
    ("[modle]\npath = 'x'\n", "unknown key"),
    ("[[steer]]\nstrength = 1\n", "needs a feature"),
    ("[[steer]]\nfeature = 'default:1'\nstrength = 'loud'\n", "must be a number"),
    ("[[steer]]\nfeature = 'default:1'\nstrength = 99\n", "out of range"),
    ("[[steer]]\nfeature = 'default:1'\nmode = 'boost'\n", "mode must be one of"),
    ("[[steer]]\nfeature = 'default:1x'\n", "bad feature id"),
    ("[[steer]]\nfeature = 'default:1'\n[[steer]]\nfeature = 'default:1'\n", "more than once"),
    ("[[sae]]\nname = 'x'\n", "needs both name and path"),
    ("[[sae]]\nname = 'vector'\npath = 'p'\n", "cannot be used"),
    ("[completion]\nmax_tokens = 0\n", "must be in 1..4096"),
    ("[completion]\nstop = 'never'\n", "stop must be one of"),
    ("model = 3\n", "must be a table"),
    ("[model\n", "not valid TOML"),
])
def test_bad_files_have_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tinymorph.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(project=path, use_user=False)
    assert str(path) in str(info.value)


def test_round_trip(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    _, project = dirs
    cfg = load_config(start=project)
    out = tmp_path / "copy.toml"
    write_toml_atomic(out, config_to_dict(cfg))
    again = load_config(project=out, use_user=False)
    assert again.steer == cfg.steer
    assert vars(again.model) == vars(cfg.model)
    assert vars(again.completion) == vars(cfg.completion)
    assert again.sae_specs() == cfg.sae_specs()


def test_steer_edits(tmp_path: Path) -> None:
    path = tmp_path / "tinymorph.toml"
    path.write_text("# my settings\n[completion]\nmax_tokens = 12\n")
    set_steer_entry(path, SteeringEntry("default:5", 1.0))
    set_steer_entry(path, SteeringEntry("vector:calm", -0.5, "add", 10))
    entries = set_steer_entry(path, SteeringEntry("default:5", 2.0, "clamp"))  # replaces, keeps order
    assert [(e.feature, e.strength, e.mode) for e in entries] == [("default:5", 2.0, "clamp"),
                                                                  ("vector:calm", -0.5, "add")]
    entries = update_steer_entry(path, "vector:calm", strength=0.25)
    assert entries[1] == SteeringEntry("vector:calm", 0.25, "add", 10)
    entries = remove_steer_entry(path, "default:5")
    assert [e.feature for e in entries] == ["vector:calm"]
    with pytest.raises(ConfigError, match="not steered"):
        remove_steer_entry(path, "default:5")
    clear_steering(path)
    cfg = load_config(project=path, use_user=False)
    assert cfg.steer == [] and cfg.completion.max_tokens == 12
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_bad_edits_never_touch_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tinymorph.toml"
    good = "[[steer]]\nfeature = \"default:5\"\nstrength = 1.0\n"
    path.write_text(good)
    with pytest.raises(SteeringError, match="out of range"):
        set_steer_entry(path, SteeringEntry("default:6", 500.0))
    with pytest.raises(ConfigError, match="out of range"):
        update_steer_entry(path, "default:5", strength=-40.0)
    assert path.read_text() == good
    broken = "[[steer]\nfeature = 'default:5'\n"  # a file the user is half-way through editing
    path.write_text(broken)
    with pytest.raises(ConfigError, match="not valid TOML"):
        set_steer_entry(path, SteeringEntry("default:6", 1.0))
    assert path.read_text() == broken


def test_atomic_write_validates_before_replacing(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[completion]\nmax_tokens = 5\n")
    with pytest.raises(ConfigError):
        write_toml_atomic(path, {"completion": {"max_tokens": -1}})
    assert path.read_text() == "[completion]\nmax_tokens = 5\n"
    assert parse_sections({"steer": []}, "x") == {"steer": []}


def test_steer_edits_keep_comments_and_layout(tmp_path: Path) -> None:
    """Steering edits rewrite only [[steer]]: the user's comments and other tables survive."""
    path = tmp_path / "tinymorph.toml"
    path.write_text("# my project\n[completion]\nmax_tokens = 30  # keep it short\n\n"
                    "[[steer]]\n# gardening, found with features.search\nfeature = \"default:5\"\nstrength = 0.5\n")
    set_steer_entry(path, SteeringEntry("default:5", 2.0, "clamp"))
    set_steer_entry(path, SteeringEntry("default:7", 1.0))
    text = path.read_text()
    assert "# my project" in text and "max_tokens = 30  # keep it short" in text
    assert "# gardening, found with features.search" in text
    remove_steer_entry(path, "default:7")
    clear_steering(path)
    text = path.read_text()
    assert "# my project" in text and "# keep it short" in text
    assert load_config(project=path, use_user=False).steer == []


def test_a_killed_writer_leaves_no_temp_file_behind(tmp_path: Path) -> None:
    """A `steer set` killed mid-write leaves `.tinymorph.toml.<pid>.tmp`; the next write removes it
    (its writer is gone), and never removes the temp file of a writer that is still running."""
    import subprocess
    import sys

    path = tmp_path / "tinymorph.toml"
    path.write_text("[completion]\nmax_tokens = 12\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    leftover = tmp_path / f".tinymorph.toml.{dead.stdout.strip()}.tmp"
    leftover.write_text("[completion]\nmax_tok")  # what a SIGKILL mid-write leaves
    alive = tmp_path / f".tinymorph.toml.{os.getppid()}.tmp"
    alive.write_text("")
    set_steer_entry(path, SteeringEntry("default:5", 1.0))
    assert not leftover.exists()
    assert alive.exists()
    assert [e.feature for e in load_config(project=path, use_user=False).steer] == ["default:5"]
