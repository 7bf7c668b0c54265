"""Copies the files named on standard input into DEST, less those that a
.dockerignore (the first argument) excludes: what `docker build` would send
as its context. Plain patterns only (no `!` exceptions): a pattern matches a
path or any of its parent directories, and `**/` matches at any depth."""

import fnmatch
import shutil
import sys
from pathlib import Path


def patterns(path: str) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    found = [p for p in lines if p and not p.startswith("#")]
    for p in found:
        if p.startswith("!"):
            sys.exit(f"context.py: {path}: exceptions (!{p[1:]}) are not supported")
    return found


def excluded(path: str, pats: list[str]) -> bool:
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for p in pats:
            if fnmatch.fnmatchcase(prefix, p):
                return True
            if p.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], p[3:]):
                return True
    return False


def main() -> None:
    pats = patterns(sys.argv[1])
    dest = Path(sys.argv[2])
    for line in sys.stdin:
        path = line.strip()
        if path and Path(path).is_file() and not excluded(path, pats):
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / path)


main()
