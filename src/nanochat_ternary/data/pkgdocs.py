"""``pkgdocs``: English prose from the installed Python distributions, a second offline corpus.

Why
---
The default corpus (``stdlib``) is Python code. Continual-learning experiments (FIRE, docs/roadmap.md)
need a second corpus that is *different* yet present on every machine that has this package, with no
download. Every environment that can run the trainer has dozens of distributions installed (torch,
numpy, tokenizers, ...), and they carry a lot of English text about themselves:

1. the long description of each distribution (its README, the body of ``METADATA``), one document
   per distribution;
2. the documentation files they ship: ``*.md``, ``*.rst`` and ``*.txt`` files listed in their
   ``RECORD`` (license, notice, copying and authors files are left out: legal boilerplate repeated
   across packages, not prose about anything), one document per file;
3. the module docstrings of their Python files (the text at the top of a module, usually the
   clearest prose in a package), those of at least ``MIN_DOCSTRING_CHARS`` characters, one
   document each.

Identical texts are kept once (vendored copies of a package appear under several distributions).
Our own distribution is left out, so the corpus does not change while this project is edited.
In this project's venv (Python 3.11, 71 distributions) it is about 1.8 MB (see docs/roadmap.md).

Deterministic given the installed packages: distributions are read in (name, version) order and
files in path order, and the cache key is a hash of the sorted (name, version) list, so installing,
removing or upgrading a package builds a new corpus, and nothing else does.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import re
import tokenize
from pathlib import Path

from ..errors import DataError
from .corpus import Documents

#: module docstrings shorter than this are one-liners ("Utilities."): too little prose to keep
MIN_DOCSTRING_CHARS = 300
DOC_SUFFIXES = (".md", ".rst", ".txt")
#: file names (lower case, suffix dropped) that are legal boilerplate or packaging data, not prose
_SKIP_STEMS = re.compile(r"^(licen[cs]e|copying|notice|authors|contributors|patents|third[-_]party)|"
                         r"(^|[-_.])licen[cs]e|^(entry_points|top_level|requires|sources|"
                         r"dependency_links|not-zip-safe|namespace_packages)$")
#: this package: left out (its docs change while it is developed)
OWN_DISTRIBUTION = "nanochat-ternary"


def _norm_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions() -> list[md.Distribution]:
    """The installed distributions visible to this interpreter, minus our own, sorted by (name,
    version), each name once (the first on ``sys.path`` wins, as for imports)."""
    seen: dict[str, md.Distribution] = {}
    for d in md.distributions():
        name = d.metadata["Name"] if d.metadata else None
        if not name or _norm_name(name) == OWN_DISTRIBUTION:
            continue
        seen.setdefault(_norm_name(name), d)
    return [seen[k] for k in sorted(seen)]


def installed_fingerprint() -> list[tuple[str, str]]:
    """Sorted ``(name, version)`` of what :func:`collect_pkgdocs` reads: the corpus's cache key."""
    return [(_norm_name(d.metadata["Name"]), d.version or "") for d in distributions()]


def _description(d: md.Distribution) -> str:
    """The long description: the METADATA body (metadata 2.1+), else the Description header, whose
    continuation lines older tools indent by 8 spaces or ``7 spaces + |``."""
    body = d.metadata.get_payload() if hasattr(d.metadata, "get_payload") else None
    if isinstance(body, str) and body.strip():
        return body.strip()
    text = d.metadata.get("Description") or ""
    if text.strip() in ("", "UNKNOWN"):
        return ""
    lines = text.splitlines()
    out = lines[:1] + [re.sub(r"^( {8}| {7}\|)", "", ln) for ln in lines[1:]]
    return "\n".join(out).strip()


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _module_docstring(path: Path) -> str | None:
    """The module docstring, read with the tokenizer up to the first statement (not a full parse:
    thousands of files are read in ~2 s)."""
    try:
        with path.open("rb") as fh:
            for tok in tokenize.tokenize(fh.readline):
                if tok.type in (tokenize.ENCODING, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
                    continue
                if tok.type != tokenize.STRING:
                    return None
                value = ast.literal_eval(tok.string)
                return value.strip() if isinstance(value, str) else None
    except (OSError, SyntaxError, ValueError, tokenize.TokenError, UnicodeDecodeError, MemoryError):
        return None
    return None


def _is_doc_file(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1].lower()
    if not name.endswith(DOC_SUFFIXES):
        return False
    return not _SKIP_STEMS.search(name.rsplit(".", 1)[0])


def collect_pkgdocs() -> Documents:
    """Every document of the corpus, in deterministic order (see the module docstring)."""
    docs = Documents(texts=[])
    seen: set[bytes] = set()

    def add(text: str | None) -> None:
        if not text or not text.strip():
            return
        key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        if key not in seen:
            seen.add(key)
            docs.texts.append(text)

    for d in distributions():
        docs.sources.append(f"{d.metadata['Name']}=={d.version}")
        add(_description(d))
        for f in sorted(d.files or [], key=str):
            rel = str(f).replace("\\", "/")
            if rel.endswith(".py"):
                doc = _module_docstring(Path(f.locate()))
                if doc is not None and len(doc) >= MIN_DOCSTRING_CHARS:
                    docs.n_files += 1
                    add(doc)
            elif _is_doc_file(rel):
                docs.n_files += 1
                text = _read_text(Path(f.locate()))
                if text is None:
                    docs.skipped.append(rel)
                add(text)
    if len(docs.texts) < 2:
        raise DataError(f"the pkgdocs corpus found {len(docs.texts)} document(s) in the installed distributions "
                        f"(need at least 2); use --dataset text --data-path DIR instead")
    return docs


__all__ = ["collect_pkgdocs", "distributions", "installed_fingerprint"]


def _main() -> None:  # python -m nanochat_ternary.data.pkgdocs: what the corpus holds here
    docs = collect_pkgdocs()
    print(f"{len(docs.sources)} distributions, {len(docs.texts)} documents, {docs.n_bytes:,} bytes "
          f"({docs.n_bytes / 2**20:.2f} MiB) of UTF-8 text")


if __name__ == "__main__":
    _main()
