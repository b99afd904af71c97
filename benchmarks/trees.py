"""Two source trees of this project in one process, for side-by-side benchmarks.

``checkout(tag)`` puts a git tag into a temporary worktree; ``Tree(root)`` imports the
project's packages from ``root`` under their usual names, kept apart from another tree's
(each tree swaps its modules into ``sys.modules`` while active).  Code loaded from a tree
keeps its own module globals, so a benchmark can alternate old and new calls in one
process under the same load, memory state and BLAS settings; ``active()`` is needed only
while a call might import (building operators, first calls).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

PACKAGES = ("framework", "problems", "backends", "benchmarks", "conf")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


class Tree:
    """The project's packages as found under ``root``."""

    def __init__(self, root: str) -> None:
        self.root, self.modules = root, {}

    @contextlib.contextmanager
    def active(self) -> Iterator[Tree]:
        saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _ours(k)]}
        sys.modules.update(self.modules)
        sys.path.insert(0, self.root)
        try:
            yield self
        finally:
            sys.path.remove(self.root)
            self.modules = {k: sys.modules.pop(k) for k in [k for k in sys.modules if _ours(k)]}
            sys.modules.update(saved)

    def load(self, module: str) -> Any:
        with self.active():
            return importlib.import_module(module)


@contextlib.contextmanager
def checkout(tag: str) -> Iterator[str]:
    """A temporary git worktree of ``tag``; removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", path, tag],
                       check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", path],
                           check=True)


def blas_threads() -> list[tuple[str, int]]:
    """(BLAS, threads) pairs that threadpoolctl sees in this process."""
    import numpy  # noqa: F401  (loads the BLAS)
    from threadpoolctl import threadpool_info

    return [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()
            if i.get("user_api") == "blas"]


def stepped_workers(
    workers: dict[str, tuple[list[str], str]], steps: int
) -> dict[str, list[dict]]:
    """Start one process per entry ``name: (argv, cwd)`` and step them in turn.

    Each worker prints one JSON line when ready, then answers every ``step`` line on its
    stdin with one JSON line; stepping the workers in turn (a, b, c, a, b, c, …) makes
    them see the same machine load.  Returns each worker's answers in order.
    """
    import json

    procs: dict[str, subprocess.Popen] = {}
    answers: dict[str, list[dict]] = {name: [] for name in workers}
    try:
        for name, (argv, cwd) in workers.items():
            procs[name] = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
            json.loads(procs[name].stdout.readline())
        for _ in range(steps):
            for name, proc in procs.items():
                proc.stdin.write("step\n")
                proc.stdin.flush()
                answers[name].append(json.loads(proc.stdout.readline()))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    return answers
