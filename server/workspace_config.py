"""The tinymorph.toml in effect for one editor session: found from the workspace folders the
client named at `initialize` (editors start servers in any working directory), watched for changes
by a cheap stat fingerprint, and written back where steering edits belong.
"""

from __future__ import annotations

from pathlib import Path

from ..steering.config import (
    PROJECT_FILE,
    Config,
    edit_target,
    find_project_config,
    load_config,
    user_config_path,
)


class WorkspaceConfig:
    """Which config files apply to a session, and whether they changed since last read."""

    def __init__(self, roots: list[str] | None = None, explicit: str | None = None):
        self.roots = [r for r in (roots or []) if r]
        self.explicit = explicit

    def _start(self) -> str | None:
        """The workspace folder whose project file is in effect (the first one that has one)."""
        for root in self.roots:
            if find_project_config(root) is not None:
                return root
        return self.roots[0] if self.roots else None

    def project_file(self) -> Path | None:
        if self.explicit:
            return Path(self.explicit)
        start = self._start()
        return find_project_config(start) if start is not None else None

    def load(self) -> Config:
        """The effective config (raises `ConfigError` for a broken file)."""
        if self.explicit:
            return load_config(start=self._start(), project=self.explicit)
        start = self._start()
        if start is None:  # no workspace: the user's file only, never the process's cwd
            return _user_only()
        return load_config(start=start)

    def edit_target(self) -> Path:
        """Where steering edits go: the project file in effect, else the user's file."""
        if self.explicit:
            return Path(self.explicit)
        start = self._start()
        return edit_target(start=start) if start is not None else user_config_path()

    def watched(self) -> list[Path]:
        """Files whose appearance, change or removal changes the config."""
        files = [user_config_path()]
        found = self.project_file()
        if found is not None:
            files.append(found)
        files += [Path(r) / PROJECT_FILE for r in self.roots]
        return list(dict.fromkeys(files))

    def fingerprint(self) -> tuple:
        out = []
        for path in self.watched():
            try:
                st = path.stat()
                out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((str(path), None))
        return tuple(out)


def _user_only() -> Config:
    from ..steering.config import merge, parse_sections, read_toml

    path = user_config_path()
    if not path.is_file():
        return Config()
    cfg = merge([parse_sections(read_toml(path), str(path), path.parent)])
    cfg.sources = [path]
    return cfg
