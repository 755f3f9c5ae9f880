"""English prose that the machine itself carries, split into disjoint calibration and evaluation halves.

Three built-in domains, each read with the standard library only:

- ``pydoc``: the Python documentation topics (``pydoc_data.topics``), which every Python install has;
- ``manpages``: the English manual pages (``/usr/share/man/man{1,5,7,8}``), roff markup stripped;
- ``gitnotes``: git's release notes (``/usr/share/doc/git/RelNotes``), where the git package installed them.

Each document (a topic, a page, a release) goes to one half by a stable hash of its name, so calibration text
never leaks into evaluation. Large domains are read only up to ``MAX_CHARS`` per half, in hash order, which is
far more than calibration or evaluation windows need and keeps reading them to a second or two.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
from pathlib import Path
from typing import Callable, Iterable

from qexport.errors import TextSourceError

log = logging.getLogger(__name__)

PURPOSES = ("evaluation", "calibration")
MAX_CHARS = 600_000
MAN_ROOT = Path("/usr/share/man")
MAN_SECTIONS = ("man1", "man5", "man7", "man8")
GIT_NOTES = Path("/usr/share/doc/git/RelNotes")
MIN_DOC_CHARS = 400  # shorter pages are mostly synopsis and options, not prose
PAGES_PER_PREFIX = 3  # one tool's many subcommand pages (a cloud SDK installs thousands) must not fill the domain


def _half(name: str) -> int:
    """0 (evaluation) or 1 (calibration), stable across machines and Python versions."""
    return hashlib.sha256(name.encode()).digest()[0] % 2


def _ordered(names: Iterable[str]) -> list[str]:
    """A stable order that interleaves documents from everywhere in the tree (not alphabetical runs)."""
    return sorted(names, key=lambda name: hashlib.sha256(b"order:" + name.encode()).hexdigest())


def _take(purpose: str, docs: list[tuple[str, Callable[[], str]]], domain: str) -> str:
    """The texts of ``purpose``'s half of ``docs`` ((name, reader) pairs), in stable order, up to MAX_CHARS."""
    wanted = PURPOSES.index(purpose)
    readers = dict(docs)
    chosen, size = [], 0
    for name in _ordered(name for name, _ in docs if _half(name) == wanted):
        text = readers[name]()
        if len(text) < MIN_DOC_CHARS:
            continue
        chosen.append(text)
        size += len(text)
        if size >= MAX_CHARS:
            break
    if not chosen:
        raise TextSourceError(f"this machine has no {domain} text for {purpose}; pass --text FILE instead")
    return "\n\n".join(chosen)


def pydoc_text(purpose: str) -> str:
    """One half of the Python documentation topics."""
    from pydoc_data.topics import topics

    wanted = PURPOSES.index(purpose)
    return "\n\n".join(text for name, text in sorted(topics.items()) if _half(name) == wanted)


_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_NAMED = {"em": "-", "en": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "bu": "*",
          "hy": "-", "co": "(c)", "mu": "x", "<=": "<=", ">=": ">=", "ti": "~", "ha": "^", "rs": "\\"}
_CHAR = re.compile(r"\\\((..)|\\\[([^\]]*)\]")
_ESCAPES = [(re.compile(r"\\s[+-]?\d"), ""), (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),
            (re.compile(r"\\[&|^%:c]"), ""), (re.compile(r"\\[-e]"), lambda m: "-" if m.group() == "\\-" else "\\"),
            (re.compile(r"\\ "), " "), (re.compile(r"\\[nkwhvoz]('[^']*'|\[[^\]]*\]|\(..|.)"), ""),
            (re.compile(r"\\(.)"), r"\1")]
_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "UR", "MT", "Nm", "Nd",
                "Sh", "Ss", "Pp", "It", "Dl", "Ql"}
_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_SKIP_BLOCKS = {"TS": "TE", "EQ": "EN", "de": "..", "ig": ".."}


def _inline(text: str) -> str:
    text = _FONT.sub("", text)
    text = _CHAR.sub(lambda m: _NAMED.get(m.group(1) or m.group(2), ""), text)
    for pattern, repl in _ESCAPES:
        text = pattern.sub(repl, text)
    return text


def roff_to_text(source: str) -> str:
    """The prose of a manual page: man/mdoc macros dropped or reduced to their text, escapes resolved.

    Not a roff implementation: good enough for natural-language text, which is all calibration needs."""
    paragraphs, current, skip_until = [], [], None
    for line in source.splitlines():
        if skip_until is not None:
            if line.strip().startswith(skip_until):
                skip_until = None
            continue
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].strip().partition(" ")
            if request in _SKIP_BLOCKS:
                skip_until = "." + _SKIP_BLOCKS[request] if _SKIP_BLOCKS[request] != ".." else ".."
                continue
            if request in ("so", "TH", "Dd", "Dt", "Os") or request.startswith(("if", "ie", "el", "ds", "nr")):
                continue
            if current:
                paragraphs.append(" ".join(current))
                current = []
            words = _inline(rest.replace('"', "")).strip() if request in _TEXT_MACROS else ""
            if words and request in _HEADINGS:
                paragraphs.append(words)
            elif words:
                current.append(words)
            continue
        words = _inline(line).strip()
        if words:
            current.append(words)
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(re.sub(r"\s+", " ", p).strip() for p in paragraphs if p.strip())


def _man_reader(path: Path) -> Callable[[], str]:
    def read() -> str:
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            log.debug("skipped manual page %s: %s", path, exc)
            return ""
        source = raw.decode("utf-8", errors="replace")
        return "" if source.lstrip().startswith(".so ") else roff_to_text(source)
    return read


def _diverse(pages: list[Path]) -> list[Path]:
    """At most PAGES_PER_PREFIX pages per leading name word (``gcloud``, ``git``, ``systemd``), in stable order."""
    kept, seen = [], {}
    for name in _ordered(f"{page.parent.name}/{page.name}" for page in pages):
        prefix = re.split(r"[-_.]", name.split("/", 1)[1], maxsplit=1)[0].lower()
        seen[prefix] = seen.get(prefix, 0) + 1
        if seen[prefix] <= PAGES_PER_PREFIX:
            kept.append(MAN_ROOT / name)
    return kept


def manpages_text(purpose: str) -> str:
    """One half of the English manual pages (each page whole, a few pages per tool), as plain text."""
    pages = [page for section in MAN_SECTIONS if (MAN_ROOT / section).is_dir()
             for page in (MAN_ROOT / section).iterdir() if page.is_file() and not page.is_symlink()]
    docs = [(f"{page.parent.name}/{page.name}", _man_reader(page)) for page in _diverse(pages)]
    return _take(purpose, docs, f"English manual pages (in {MAN_ROOT})")


def gitnotes_text(purpose: str) -> str:
    """One half of git's release notes (one release each)."""
    def reader(path: Path) -> Callable[[], str]:
        return lambda: (gzip.decompress(path.read_bytes()).decode("utf-8", "replace") if path.suffix == ".gz"
                        else path.read_text(encoding="utf-8", errors="replace"))
    notes = sorted(GIT_NOTES.glob("*.txt*")) if GIT_NOTES.is_dir() else []
    return _take(purpose, [(path.name, reader(path)) for path in notes], f"git release notes (in {GIT_NOTES})")


DOMAINS: dict[str, Callable[[str], str]] = {"pydoc": pydoc_text, "manpages": manpages_text, "gitnotes": gitnotes_text}


def has_text(domain: str, purpose: str) -> bool:
    """Whether this machine carries ``domain``'s ``purpose`` half (reads it: under a second for any domain)."""
    try:
        return bool(DOMAINS[domain](purpose).strip())
    except TextSourceError:
        return False
