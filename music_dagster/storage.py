"""Dataset shards on disk: `<root>/<asset>/<shard_key>/` with `manifest.jsonl` plus PNG and JSON files.

A shard is visible only when complete. `ShardWriter` writes everything into a hidden temporary sibling folder
(`.<key>.tmp.<pid>.<random>`); on a clean exit it writes the manifest last and renames the folder into place (an
older complete shard is renamed away to `.<key>.old.<pid>.<random>`, the new one renamed in, the old one deleted).
On an exception the temporary folder is deleted; after a kill it stays hidden, and the next writer of that shard
deletes every such leftover whose process is gone. Readers only ever see folders holding `manifest.jsonl`. DVC
ignores both names (`.dvcignore`).

A write that cannot finish is refused before anything is computed or written (`check_replaceable`): a read-only
folder, or an older copy that could not be deleted (a read-only shard is never silently replaced). Clean-up never
ignores an error: a leftover that cannot be deleted is a one-line `WriteError` naming it.

Determinism: PNGs are written with fixed parameters and no metadata chunks, JSON with sorted keys, manifest records
in the order added, so the same inputs give the same bytes.

Every manifest record follows `RECORD_BASE` (a stable `sample_id`, unique in the shard, and the `parent_ids` it was
derived from) plus the asset's own properties; `record_schema` builds such a schema.

Stored paths (a manifest's image references, the weight files a checkpoint config lists) are read back only through
`resolve_stored`, which keeps them inside their root, as `_relative` does for the names a writer is given.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from music_dagster.errors import UserError

MANIFEST = "manifest.jsonl"
PNG_COMPRESS_LEVEL = 6
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")
_TEMP = re.compile(r"^\.(?P<key>.+)\.(?:tmp|old)\.(?P<pid>\d+)\.[0-9a-f]{32}$")

RECORD_BASE: dict = {
    "sample_id": {"type": "string", "minLength": 1},
    "parent_ids": {"type": "array", "items": {"type": "string", "minLength": 1}},
}


class WriteError(UserError):
    """A folder or file that cannot be written or replaced as asked: one line naming it and the fix."""


class ShardError(UserError):
    """A shard that cannot be written or read as asked; the message is one line naming the shard and the problem."""


class StoredPathError(UserError):
    """A stored path that would be read from outside its root (absolute, `..`, or through a symlink)."""


class StoredFileError(UserError):
    """A stored JSON file that is unreadable, not UTF-8, not JSON or not of its schema."""


def record_schema(properties: dict | None = None, required=(), additional: bool = False) -> dict:
    """A manifest record schema: `RECORD_BASE` (both required) plus the asset's `properties`."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {**RECORD_BASE, **(properties or {})},
        "required": ["sample_id", "parent_ids", *required],
        "additionalProperties": additional,
    }


def check_key(key: str, what: str = "shard key") -> str:
    """A shard key or asset name usable as one folder name (no separators, not hidden)."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise ShardError(f"bad {what} {key!r}: use letters, digits and . _ = - (not starting with . _ = -)")
    return key


def _dump_json(obj, indent=None) -> str:
    # ASCII escapes keep U+0085 / U+2028 out of the bytes, which some JSONL readers split lines on.
    return json.dumps(obj, sort_keys=True, ensure_ascii=True, allow_nan=False, indent=indent)


def _temp_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}.{os.getpid()}.{uuid.uuid4().hex}"


def check_writable(folder: str | os.PathLike, setting: str | None = None, target: Path | None = None) -> Path:
    """`folder` (or, while it does not exist, the nearest parent it would be made in) accepts new files and
    folders; else a one-line WriteError naming it, `target` (what was to be written there), the fix and `setting`,
    the params.yaml key that moves it."""
    folder = Path(folder)
    target = target or folder
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    elsewhere = f", or set {setting} in params.yaml to a writable folder" if setting else ""
    if not existing.is_dir():
        raise WriteError(f"{existing}: not a folder, so {target} cannot be written; move it away{elsewhere}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "read-only" if existing == target else f"read-only, so {target} cannot be written"
        raise WriteError(f"{existing}: {what}; make it writable (chmod u+w {existing}){elsewhere}")
    return folder


def check_replaceable(path: str | os.PathLike, setting: str | None = None) -> Path:
    """`path` can be written atomically: its folder is writable and, when it exists, the old copy can be deleted
    (every folder in it writable, or the file itself). A read-only copy is refused, never silently replaced.
    `setting`: the params.yaml key of the root `path` is under."""
    path = Path(path)
    check_writable(path.parent, setting, target=path)
    if path.is_dir() and not path.is_symlink():
        for folder in (path, *sorted(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())):
            if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
                place = "" if folder == path else f" ({folder.relative_to(path)} is)"
                raise WriteError(f"{path}: read-only{place}, so it is not replaced; make it writable "
                                 f"(chmod -R u+w {path}) to write it again")
    elif path.exists() and not os.access(path, os.W_OK):
        raise WriteError(f"{path}: read-only, so it is not replaced; make it writable (chmod u+w {path}) to write "
                         f"it again")
    return path


def _discard(path: Path) -> None:
    """Delete a temporary or renamed-away folder or file; one that cannot be deleted is named, never left silently."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        raise WriteError(f"{path}: left behind, it could not be deleted ({e.strerror}); delete it by hand "
                         f"(chmod -R u+w {path} && rm -r {path})") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling and `os.replace`: readers see the old or the new file."""
    path = check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _temp_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def staged_dir(directory: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """A temporary sibling of `directory` to fill, for folders that are not shards (checkpoints, evaluation
    outputs): renamed into place only when the block ends without error, so readers see the old folder or the new
    one, never a half-written one; deleted otherwise, and its leftovers after a kill are deleted by the next writer,
    as for shards. `replace=False`: `directory` must not exist (FileExistsError). A read-only `directory` or folder
    is refused before the block runs (`check_replaceable`)."""
    directory = check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(directory)
    tmp = _temp_sibling(directory, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if not replace and directory.exists():
            raise FileExistsError(f"{directory} already exists")
        _swap_in(tmp, directory)
    finally:
        if tmp.exists():
            _discard(tmp)


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` to `path`; an older `path` is renamed away first (and back if the rename
    fails), then deleted."""
    check_replaceable(path)  # it may have been locked while `tmp` was filled
    old = None
    if path.exists():
        old = _temp_sibling(path, "old")
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    if old is not None:
        _discard(old)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def png_bytes(image) -> bytes:
    """Deterministic PNG bytes of a PIL image: fixed compression, no ICC/EXIF/text chunks."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False, icc_profile=None)
    return buf.getvalue()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: Path) -> list[Path]:
    """Delete the leftovers (temporary or renamed-away folders or files) of killed writers of `path`.

    A leftover is recognised by its name and skipped while the process that made it is alive (same machine)."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        m = _TEMP.match(entry.name)
        if m and m["key"] == path.name and not _pid_alive(int(m["pid"])):
            _discard(entry)
            removed.append(entry)
    return removed


def _relative(name: str, shard: Path) -> PurePosixPath:
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or rel.name == MANIFEST or "\\" in name:
        raise ShardError(f"{shard}: bad file name {name!r} (a relative path inside the shard, not {MANIFEST})")
    return rel


def resolve_stored(root: str | os.PathLike, ref, where: str) -> Path:
    """The file that the stored path `ref` names under `root`. `where` says where `ref` was read (the manifest and its
    line, the config and its key) for the one-line error refusing a `ref` that is not a relative POSIX path, that
    holds `..`, or that leads out of `root` through a symlink. Readers of stored paths go through here only."""
    root = Path(root)
    if not isinstance(ref, str) or not ref or "\0" in ref or "\\" in ref:
        raise StoredPathError(f"{where}: {ref!r} is not a relative path (use / between names)")
    rel = PurePosixPath(ref)
    if rel.is_absolute():
        raise StoredPathError(f"{where}: path {ref!r} is absolute; stored paths are relative to {root}")
    if ".." in rel.parts:
        raise StoredPathError(f"{where}: path {ref!r} climbs out of {root} with '..'")
    target = root.joinpath(*rel.parts)
    inside = os.path.realpath(root)
    if os.path.commonpath([inside, os.path.realpath(target)]) != inside:
        raise StoredPathError(f"{where}: path {ref!r} leads out of {root} through a symlink")
    return target


def first_lines(records: list[dict]) -> dict[str, int]:
    """Each string stored in manifest records (at any depth) -> the first manifest line (1-based) holding it: where a
    stored path was read, for `resolve_stored`'s error."""
    lines: dict[str, int] = {}

    def walk(value, line: int) -> None:
        if isinstance(value, str):
            lines.setdefault(value, line)
        elif isinstance(value, (dict, list)):
            for item in value.values() if isinstance(value, dict) else value:
                walk(item, line)

    for number, record in enumerate(records, start=1):
        walk(record, number)
    return lines


def schema_problem(validator, value) -> str | None:
    """`<where>: <what>` of the most relevant way `value` breaks a jsonschema validator's schema, in one line."""
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = ".".join(str(p) for p in error.absolute_path) or "record"
    message = error.message.splitlines()[0]
    return f"{where}: {message if len(message) <= 160 else message[:157] + '...'}"


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | os.PathLike, schema: dict | None = None, error: type[UserError] = StoredFileError):
    """The JSON value stored in the file `path`, checked against `schema`. An unreadable file, bytes that are not
    UTF-8, text that is not JSON (NaN and Infinity included) or a value off the schema raise `error` with one line
    naming the file and the fault."""
    from jsonschema import Draft202012Validator

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:
        raise error(f"{path}: not JSON ({e})") from None
    problem = schema_problem(Draft202012Validator(schema), value) if schema is not None else None
    if problem is not None:
        raise error(f"{path}: {problem.removeprefix('record: ')}")
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in blocks: the content hash a checkpoint records of its weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """`with ShardWriter(root / asset / key, schema) as w: w.add_image(...); w.add_record({...})`."""

    def __init__(self, path: str | os.PathLike, schema: dict):
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        self.path = Path(path)
        check_key(self.path.name)
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as e:
            raise ShardError(f"{self.path}: invalid record schema ({e.message})") from None
        self._base = Draft202012Validator(record_schema(additional=True))
        self._validator = Draft202012Validator(schema)
        self._tmp: Path | None = None
        self._used = False
        self._lines: list[str] = []
        self._ids: set[str] = set()
        self._files: set[str] = set()

    def __enter__(self) -> "ShardWriter":
        if self._used:
            raise ShardError(f"{self.path}: a ShardWriter writes one shard once; make a new one")
        self._used = True
        check_replaceable(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.path)
        self._tmp = _temp_sibling(self.path, "tmp")
        self._tmp.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        tmp, self._tmp = self._tmp, None
        if exc_type is not None:
            _discard(tmp)
            return
        try:
            (tmp / MANIFEST).write_text("".join(self._lines), encoding="utf-8")
            _swap_in(tmp, self.path)
        except BaseException:
            if tmp.exists():
                _discard(tmp)
            raise

    def _target(self, name: str) -> tuple[str, Path]:
        if self._tmp is None:
            raise ShardError(f"{self.path}: the writer is not open (use it in a `with` block)")
        rel = _relative(name, self.path)
        key = rel.as_posix()
        if key in self._files:
            raise ShardError(f"{self.path}: file {key!r} written twice")
        self._files.add(key)
        target = self._tmp.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return key, target

    def add_image(self, name: str, image) -> str:
        """Save `image` as PNG (`.png` appended when missing); returns its path relative to the shard."""
        if not name.endswith(".png"):
            name += ".png"
        key, target = self._target(name)
        try:
            data = png_bytes(image)
        except (OSError, ValueError, KeyError) as e:
            raise ShardError(f"{self.path}: cannot write {key} as PNG ({e})") from None
        target.write_bytes(data)
        return key

    def add_json(self, name: str, obj) -> str:
        """Save `obj` as indented JSON with sorted keys; returns its path relative to the shard."""
        key, target = self._target(name)
        try:
            text = _dump_json(obj, indent=2)
        except (TypeError, ValueError) as e:
            raise ShardError(f"{self.path}: {key} is not JSON-serialisable ({e})") from None
        target.write_text(text + "\n", encoding="utf-8")
        return key

    def add_record(self, record: dict) -> None:
        """Append one manifest record after validating it against `RECORD_BASE` and the shard's schema."""
        if self._tmp is None:
            raise ShardError(f"{self.path}: the writer is not open (use it in a `with` block)")
        index = len(self._lines)
        try:
            line = _dump_json(record)
        except (TypeError, ValueError) as e:
            raise ShardError(f"{self.path}: record {index} is not JSON-serialisable ({e})") from None
        stored = json.loads(line)  # validate what will be read back (tuples become arrays, and so on)
        for validator in (self._base, self._validator):
            problem = schema_problem(validator, stored)
            if problem is not None:
                raise ShardError(f"{self.path}: record {index}: {problem}")
        if stored["sample_id"] in self._ids:
            raise ShardError(f"{self.path}: record {index}: sample_id {stored['sample_id']!r} repeats")
        self._ids.add(stored["sample_id"])
        self._lines.append(line + "\n")


@dataclass(frozen=True)
class Shard:
    """A complete shard: its records (manifest order) and access to its files."""

    path: Path
    records: list[dict] = field(repr=False)

    def file(self, name: str) -> Path:
        _relative(name, self.path)  # the names a writer accepts (never the manifest)
        target = resolve_stored(self.path, name, str(self.path))
        if not target.is_file():
            raise ShardError(f"{self.path}: no file {name!r} in the shard")
        return target

    def image(self, name: str):
        """The PIL image stored as `name`, fully loaded, in its stored mode."""
        from PIL import Image

        with Image.open(self.file(name)) as im:
            im.load()
            return im.copy()

    def json(self, name: str):
        return json.loads(self.file(name).read_text(encoding="utf-8"))

    @property
    def sample_ids(self) -> list[str]:
        return [r["sample_id"] for r in self.records]


def read_shard(path: str | os.PathLike) -> Shard:
    """Open the complete shard at `path`; a folder without a manifest is refused."""
    path = Path(path)
    manifest = path / MANIFEST
    if not path.is_dir():
        raise ShardError(f"{path}: no such shard")
    if not manifest.is_file():
        raise ShardError(f"{path}: not a complete shard (no {MANIFEST})")
    lines = manifest.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    if lines[-1] == "":
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ShardError(f"{manifest}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ShardError(f"{manifest}: line {number} is not a JSON object")
        records.append(record)
    return Shard(path, records)


def _shard_folders(asset_dir: Path) -> list[Path]:
    """The folders under an asset folder named as shards (hidden temporary folders of writers are not)."""
    if not asset_dir.is_dir():
        return []
    return sorted(p for p in asset_dir.iterdir() if _KEY.match(p.name) and p.is_dir())


def complete_shards(asset_dir: str | os.PathLike) -> list[str]:
    """The keys of the complete shards under an asset folder, sorted."""
    return [p.name for p in _shard_folders(Path(asset_dir)) if (p / MANIFEST).is_file()]


def incomplete_shards(asset_dir: str | os.PathLike) -> list[str]:
    """The keys of the shard folders under an asset folder that have no manifest (not written by a `ShardWriter`,
    or emptied by hand), sorted: readers never see them, so whoever skips them says so."""
    return [p.name for p in _shard_folders(Path(asset_dir)) if not (p / MANIFEST).is_file()]
