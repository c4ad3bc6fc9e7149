"""Real English text available offline: paragraphs of the Python standard library's docstrings.

Used for calibration and evaluation of the embedded MiniLM demo. Paragraphs are collected from a fixed
list of modules in a fixed order, de-duplicated, shuffled with a fixed seed and split into disjoint
calibration and evaluation sets.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import random
import re

_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath", "codecs",
    "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "enum", "fnmatch", "fractions", "functools", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "math", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pprint", "queue", "random", "re",
    "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse", "uuid", "warnings",
    "weakref", "xml.etree.ElementTree", "zipfile", "zlib",
)
_MIN_CHARS, _MAX_CHARS = 60, 600
_PROSE = re.compile(r"^[A-Z][^>|=]*[a-z][.!?:]?$", re.DOTALL)  # starts like a sentence, no doctest/table


def _docstrings(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    yield inspect.getdoc(module)
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        yield inspect.getdoc(member)
        if inspect.isclass(member):
            for attr_name, attr in sorted(vars(member).items()):
                if not attr_name.startswith("_") and callable(attr):
                    yield inspect.getdoc(attr)


@functools.lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Unique prose paragraphs (60-600 characters, whitespace folded) in a fixed, shuffled order."""
    seen, found = set(), []
    for module_name in _MODULES:
        for doc in _docstrings(module_name):
            for block in (doc or "").split("\n\n"):
                text = " ".join(block.split())
                if _MIN_CHARS <= len(text) <= _MAX_CHARS and _PROSE.match(text) and text not in seen:
                    seen.add(text)
                    found.append(text)
    random.Random(0).shuffle(found)
    return tuple(found)


def split(num_calibration: int, num_evaluation: int) -> tuple[list[str], list[str]]:
    """Disjoint (calibration, evaluation) paragraph lists."""
    texts = paragraphs()
    if num_calibration + num_evaluation > len(texts):
        raise ValueError(f"asked for {num_calibration + num_evaluation} paragraphs, only {len(texts)} available")
    return list(texts[num_evaluation:num_evaluation + num_calibration]), list(texts[:num_evaluation])
