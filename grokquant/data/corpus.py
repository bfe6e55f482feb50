"""A built-in English corpus that every machine has: docstrings of Python's standard library.

Read from the library's source files with `ast` (nothing is imported or downloaded), in a fixed order, so the
same Python version always yields the same text. Documents are split deterministically into a
training part and a held-out part (every `HOLDOUT_EVERY`-th document).
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
from functools import lru_cache
from pathlib import Path

MODULES = (
    "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.locks", "asyncio.queues",
    "asyncio.streams", "asyncio.tasks", "base64", "bisect", "calendar", "codecs", "collections",
    "concurrent.futures._base", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "_pydecimal", "difflib", "dis", "doctest", "email.message", "email.parser", "email.utils",
    "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser",
    "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "ipaddress", "json.decoder",
    "json.encoder", "locale", "logging", "logging.handlers", "mailbox", "mimetypes", "multiprocessing.pool",
    "numbers", "operator", "optparse", "pathlib", "pdb", "pickle", "pickletools", "pprint", "pydoc",
    "queue", "random", "re._compiler", "re", "sched", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "turtle", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "webbrowser",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo._zoneinfo",
)
MIN_DOC_CHARS = 60
HOLDOUT_EVERY = 10


def _docstrings(tree: ast.AST) -> list[str]:
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                docs.append(inspect.cleandoc(doc))
    return docs


@lru_cache(maxsize=1)
def documents() -> tuple[str, ...]:
    """All docstrings, in a fixed order, duplicates removed."""
    seen, docs = set(), []
    for name in MODULES:
        base = Path(sysconfig.get_paths()["stdlib"], *name.split("."))
        path = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for doc in _docstrings(tree):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return tuple(docs)


def split_documents(split: str = "all") -> list[str]:
    """The documents of one split: "train", "heldout" or "all"."""
    docs = documents()
    if split == "train":
        return [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    if split == "heldout":
        return [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    if split != "all":
        raise ValueError(f"unknown split {split!r}")
    return list(docs)


def builtin_text(split: str = "all", max_chars: int | None = None) -> str:
    """The corpus as one string; split is "train", "heldout" or "all"."""
    text = "\n\n".join(split_documents(split))
    return text[:max_chars] if max_chars else text
