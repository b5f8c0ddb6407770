"""What made an output: the settings that change its results, with model and input fingerprints.

Every output a command writes records its provenance, a strict-JSON object::

    {"command": "score", "version": "0.1.0", "written": "2026-12-04T20:31:00Z",
     "settings": {"sft_model": "dir:sha256:3f2a...", "template": "nemo", "seed": 0, ...},
     "about": {"sft_model": "/models/sft", ...}}

in ``<output>.provenance.json`` beside a JSONL output (``score``, ``sample``) and in
``<run dir>/provenance.json`` (``train``; ``pipeline.json`` for ``pipeline``). ``settings`` holds
what a resume must not change; ``about`` what helps a reader (paths) and is never compared.

Fingerprints (:func:`model_fingerprint`, :func:`file_fingerprint`):

* a built-in model: ``builtin:<name>`` (its weights are a function of ``--seed``, a setting of its own);
* a model directory: ``dir:sha256:<hex>`` over every regular, non-hidden file at its top level (config,
  tokenizer, weights): each file's name, size and SHA-256 of its content - the whole content for files up
  to :data:`FULL_HASH_BYTES`, else its first and last :data:`PARTIAL_HASH_BYTES` (a weight file's header
  and tail change with any change of its tensors' layout; a fine-tuned copy of the same size whose changes
  all lie in the middle is the blind spot, stated here);
* an input file: ``sha256:<hex>`` of its whole content.

A resume compares the recorded settings with the command's (:func:`compare_settings`) and refuses
the first difference with one line naming the setting and both values. ``--allow-changed
SETTING[,SETTING]`` accepts the named differences (printed as a warning; the new values are recorded
from then on). Records are checked one by one as well (:func:`record_digest`: a digest of each input
record, kept beside a JSONL output, compared for every kept record on resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from steerlm_kernels.steerlm2.formats.outputs import OutputError

__all__ = ["FULL_HASH_BYTES", "PARTIAL_HASH_BYTES", "compare_settings", "file_fingerprint", "model_fingerprint",
           "parse_allow_changed", "read_provenance", "record_digest", "write_provenance"]

#: Files up to this size are hashed whole for a model fingerprint.
FULL_HASH_BYTES = 64 << 20
#: Bytes hashed at each end of a larger file.
PARTIAL_HASH_BYTES = 4 << 20
_CHUNK = 1 << 20


def _sha256_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        else:
            h.update(f.read(PARTIAL_HASH_BYTES))
            f.seek(size - PARTIAL_HASH_BYTES)
            h.update(f.read(PARTIAL_HASH_BYTES))
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the whole content of ``path`` (an input file).

    Raises:
        OutputError: the file cannot be read (naming it).
    """
    p = Path(path)
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise OutputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    return f"sha256:{h.hexdigest()}"


def model_fingerprint(spec: str | os.PathLike, builtin: Collection[str] = ()) -> str:
    """The identity of a model given as ``--model`` (module notes): ``builtin:<name>`` for a name in
    ``builtin``, ``dir:sha256:<hex>`` for a directory, else ``name:<spec>``."""
    if str(spec) in builtin:
        return f"builtin:{spec}"
    p = Path(spec)
    if not p.is_dir():
        return f"name:{spec}"
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        size = f.stat().st_size
        try:
            digest = _sha256_file(f, size)
        except OSError:
            digest = "unreadable"
        h.update(f"{f.name}\0{size}\0{digest}\n".encode())
    return f"dir:sha256:{h.hexdigest()}"


def record_digest(obj: Any) -> str:
    """A 32-hex-digit digest of a decoded input record (canonical JSON: keys sorted), so a reformatted
    but equal line has the same digest and any change of a value does not."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance object stored at ``path`` (None when there is none).

    Raises:
        OutputError: the file is not a provenance object (naming it).
    """
    p = Path(path)
    if not p.exists():
        return None
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"{p}: not a provenance record ({exc}); --overwrite starts afresh") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("settings"), dict):
        raise OutputError(f"{p}: not a provenance record (no 'settings'); --overwrite starts afresh")
    return obj


def write_provenance(path: str | os.PathLike, command: str, settings: Mapping[str, Any],
                     about: Mapping[str, Any] | None = None) -> None:
    """Write the provenance object atomically (a temporary file renamed over ``path``)."""
    import steerlm_kernels

    p = Path(path)
    obj = {"command": command, "version": getattr(steerlm_kernels, "__version__", None),
           "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "settings": dict(settings), "about": dict(about or {})}
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=1, allow_nan=False, default=str) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_allow_changed(text: str | None, known: Collection[str], option: str = "--allow-changed") -> set[str]:
    """The setting names of ``--allow-changed a,b`` (``-`` and ``_`` alike); OutputError for an unknown name."""
    if not text:
        return set()
    names = {t.strip().replace("-", "_") for t in text.split(",") if t.strip()}
    unknown = sorted(names - set(known))
    if unknown:
        raise OutputError(f"{option} {text!r}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return names


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def compare_settings(recorded: Mapping[str, Any], current: Mapping[str, Any], *, where: str,
                     allowed: Collection[str] = (), about: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None
                     ) -> list[str]:
    """Compare an output's recorded settings with this command's.

    Returns one warning line per accepted difference (a name in ``allowed``). The first other
    difference raises :class:`OutputError`: ``<where> was made with <name> = <old>; this command has
    <new> (--allow-changed <name> accepts the change, --overwrite starts afresh)``. A setting missing
    on one side counts as a difference (``null``). ``about``: (recorded, current) paths shown next to
    fingerprints.
    """
    warnings_: list[str] = []
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        if json.dumps(old, default=str, sort_keys=True) == json.dumps(new, default=str, sort_keys=True):
            continue
        old_s, new_s = _shown(old), _shown(new)
        if about is not None:
            if about[0].get(name) is not None:
                old_s += f" ({about[0][name]})"
            if about[1].get(name) is not None:
                new_s += f" ({about[1][name]})"
        if name in allowed:
            warnings_.append(f"warning: {where}: setting {name} changed from {old_s} to {new_s} (--allow-changed)")
            continue
        raise OutputError(f"{where} was made with {name} = {old_s}; this command has {new_s} "
                          f"(--allow-changed {name} accepts the change, --overwrite starts afresh)")
    return warnings_
