"""Symlink into DEST the installed files of distributions and of everything they require.

CI's wheel leg (.ci/wheel.sh) gives a fresh virtual environment the project's torch by a
.pth line pointing at this view: torch and its dependencies (5.8 GB) are not copied or
downloaded again, and nothing else of the development environment, in particular its
editable adpo_kernels, is visible.  Usage: python torch_view.py DEST DIST [DIST ...]
"""
import importlib.metadata as md
import os
import re
import sys

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def main(dest, names):
    os.makedirs(dest, exist_ok=True)
    todo, seen, done = [(n, ()) for n in names], set(), set()
    while todo:
        name, extras = todo.pop()
        name = canonical(name)
        if (name, extras) in done:
            continue
        done.add((name, extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency that is not installed
        seen.add(name)
        for req in map(Requirement, dist.requires or []):  # with the extras asked for (cuda-toolkit[cudart])
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("",) + extras):
                todo.append((req.name, tuple(sorted(req.extras))))
        base = str(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            link, target = os.path.join(dest, top), os.path.join(base, top)
            if os.path.exists(target) and not os.path.lexists(link) and not top.endswith(".pth"):
                os.symlink(target, link)
    print(f"{len(seen)} distributions: {' '.join(sorted(seen))}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
