"""What a model's components hold, by content: so that two model directories whose component
files are the same bytes (the T5 encoder of an SD3 and of a FLUX.1 directory, the VAE and text
encoders that FLUX.1-dev and FLUX.1-schnell share, the VAE of many SD fine-tunes) are served by
one pool.

A component (a subfolder of a diffusers directory) is identified by the SHA-256 of its files'
relative names and SHA-256 digests. Computing one reads each file once per machine:

- a file in a Hugging Face cache snapshot is a symlink to ``blobs/<sha256>`` for the large
  (LFS) files: the blob's name is the digest, nothing is read;
- any other file is hashed once and its digest kept, keyed by its real path, size and
  modification time, in memory and in ``DIGEST_DIR`` (``digests`` in the default cache
  directory, ``~/.cache/legodiffusion``: a pool's name must not depend on a process's
  settings), so every process of a machine and every later start reuses it.

A builtin is identified without building it: ``common.models.builtin_components`` names the
recipe each of its components is built from, and components of one recipe are byte-identical
(the builtins' tests check it). Reads only the file system, never weights into memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

#: a Hugging Face cache blob named by its SHA-256 (large files; small ones are named by git's
#: SHA-1, which is not a digest of the bytes alone, so they are hashed)
_HF_BLOB = re.compile(r"^[0-9a-f]{64}$")
#: below this a file is hashed in memory each time rather than looked up on disk
_SMALL = 1 << 20


#: where large files' digests are kept between processes (a machine's, whatever its settings);
#: None: ``digests`` in the default cache directory
DIGEST_DIR: Path | None = None


def _digest_dir() -> Path:
    from common.settings import default_cache_dir  # (settings imports the kinds, which us)

    return DIGEST_DIR or default_cache_dir() / "digests"


def file_digest(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes (hex)."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _HF_BLOB.match(real.name):
        return real.name
    stat = real.stat()
    return _digest(str(real), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _digest(real: str, size: int, mtime_ns: int) -> str:
    if size < _SMALL:
        return _hash(real)
    entry = _digest_dir() / (hashlib.sha1(real.encode()).hexdigest() + ".json")
    try:
        kept = json.loads(entry.read_text())
        if kept["size"] == size and kept["mtime_ns"] == mtime_ns:
            return str(kept["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = _hash(real)
    try:  # a cache that cannot be written only costs the next process a re-read
        entry.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=entry.parent, delete=False) as tmp:
            json.dump({"path": real, "size": size, "mtime_ns": mtime_ns, "sha256": digest}, tmp)
        os.replace(tmp.name, entry)
    except OSError:
        pass
    return digest


def _hash(real: str) -> str:
    with open(real, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def folder_digest(folder: Path) -> str:
    """The SHA-256 of a component folder: every file under it (hidden ones skipped), by its
    path relative to the folder and its digest."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such component folder")
    files = sorted(
        path for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".")
                                      for part in path.relative_to(folder).parts)
    )
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(folder).as_posix()}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


def components_digest(spec: str, components: Iterable[str]) -> str | None:
    """One digest of ``components`` of model ``spec`` (a builtin or a diffusers directory), the
    same for every model whose components, in this order, hold the same bytes whatever their
    folders are called (SD3's T5 is ``text_encoder_3``, FLUX's ``text_encoder_2``); None where
    it cannot be told (a plug-in scheme's model, a directory that is not there or lacks one of
    them)."""
    from common.builtins import RECIPE_VERSION
    from common.models import BUILTIN_PREFIX, builtin_components, builtin_names

    h = hashlib.sha256()
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in builtin_names():
            return None
        recipes = builtin_components(name)
        h.update(f"recipe {RECIPE_VERSION}\n".encode())
        for component in components:
            h.update(f"builtin:{recipes.get(component, f'{name}/{component}')}\n".encode())
        return h.hexdigest()
    root = Path(spec).expanduser()  # a plug-in's spec (``emulated:...``) is no directory here
    try:
        for component in components:
            h.update(f"{folder_digest(root / component)}\n".encode())
    except OSError:
        return None
    return h.hexdigest()
