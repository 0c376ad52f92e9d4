"""Shard writer / reader: atomic visibility, schema validation, determinism, recovery after a killed writer."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from music_dagster.errors import UserError
from music_dagster.storage import (
    MANIFEST, ShardError, ShardWriter, StoredFileError, StoredPathError, atomic_write_bytes, atomic_write_text,
    complete_shards, file_sha256, incomplete_shards, read_json, read_shard, record_schema, remove_stale,
    resolve_stored, staged_dir,
)
from processes import kill_when_ready

SCHEMA = record_schema({"caption": {"type": "string"}, "image": {"type": "string"},
                        "boxes": {"type": "array", "items": {"type": "array", "items": {"type": "number"},
                                                             "minItems": 4, "maxItems": 4}}},
                       required=["caption"])


def _image(seed=0, size=(16, 12)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _write(path, n=3):
    with ShardWriter(path, SCHEMA) as w:
        for i in range(n):
            rel = w.add_image(f"images/{i:04d}", _image(i))
            w.add_record({"sample_id": f"s{i}", "parent_ids": [f"p{i}"], "caption": f"a scene {i}", "image": rel,
                          "boxes": [(0.1, 0.2, 0.3, 0.4)]})
        w.add_json("stats.json", {"kept": n, "dropped": {"parse": 1}})
    return path


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(asset_dir):
    return [p.name for p in asset_dir.iterdir() if p.name.startswith(".")]


def test_write_and_read(tmp_path):
    shard = _write(tmp_path / "target_images" / "shard-0")
    s = read_shard(shard)
    assert s.sample_ids == ["s0", "s1", "s2"]
    assert s.records[0] == {"sample_id": "s0", "parent_ids": ["p0"], "caption": "a scene 0",
                            "image": "images/0000.png", "boxes": [[0.1, 0.2, 0.3, 0.4]]}
    np.testing.assert_array_equal(np.asarray(s.image("images/0001.png")), np.asarray(_image(1)))
    assert s.json("stats.json") == {"dropped": {"parse": 1}, "kept": 3}
    lines = (shard / MANIFEST).read_text().splitlines()
    assert len(lines) == 3 and all(list(json.loads(x)) == sorted(json.loads(x)) for x in lines)
    assert lines[0].index('"boxes"') < lines[0].index('"sample_id"')  # keys sorted in the bytes
    assert complete_shards(tmp_path / "target_images") == ["shard-0"]
    assert _leftovers(tmp_path / "target_images") == []


def test_same_inputs_same_bytes(tmp_path):
    a = _tree(_write(tmp_path / "a" / "k"))
    b = _tree(_write(tmp_path / "b" / "k"))
    assert a == b and len(a) == 5


def test_png_has_no_metadata(tmp_path):
    img = _image()
    info = PngImagePlugin.PngInfo()
    info.add_text("Creation Time", "now")
    img.info["icc_profile"] = b"fake"
    with ShardWriter(tmp_path / "x" / "k", SCHEMA) as w:
        w.add_image("a.png", img)
    data = (tmp_path / "x" / "k" / "a.png").read_bytes()
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunks.append(data[pos + 4:pos + 8].decode())
        pos += 12 + length
    assert chunks[0] == "IHDR" and chunks[-1] == "IEND" and set(chunks) == {"IHDR", "IDAT", "IEND"}


@pytest.mark.parametrize("record, match", [
    ({"parent_ids": [], "caption": "c"}, "'sample_id' is a required property"),
    ({"sample_id": "s", "parent_ids": "p", "caption": "c"}, r"parent_ids: 'p' is not of type 'array'"),
    ({"sample_id": "s", "parent_ids": [], "caption": 3}, "caption: 3 is not of type 'string'"),
    ({"sample_id": "s", "parent_ids": [], "caption": "c", "boxes": [[1, 2]]}, "boxes.0:"),
    ({"sample_id": "s", "parent_ids": [], "caption": "c", "extra": 1}, "'extra' was unexpected"),
    ({"sample_id": "s", "parent_ids": [], "caption": float("nan")}, "not JSON-serialisable"),
    ({"sample_id": "s", "parent_ids": [], "caption": np.int64(3)}, "not JSON-serialisable"),
])
def test_bad_record_leaves_nothing(tmp_path, record, match):
    path = tmp_path / "a" / "k"
    with pytest.raises(ShardError, match=match) as e:
        with ShardWriter(path, SCHEMA) as w:
            w.add_image("0", _image())
            w.add_record(record)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg and "record 0" in msg and str(path) in msg
    assert not path.exists() and _leftovers(path.parent) == []


def test_writer_misuse(tmp_path):
    with ShardWriter(tmp_path / "a" / "k", SCHEMA) as w:
        w.add_record({"sample_id": "s", "parent_ids": [], "caption": "c"})
        with pytest.raises(ShardError, match="repeats"):
            w.add_record({"sample_id": "s", "parent_ids": [], "caption": "d"})
        w.add_json("x.json", {})
        with pytest.raises(ShardError, match="written twice"):
            w.add_json("x.json", {})
        for name in ("../up.json", "/abs.json", MANIFEST, ""):
            with pytest.raises(ShardError, match="bad file name"):
                w.add_json(name, {})
    with pytest.raises(ShardError, match="not open"):
        w.add_record({"sample_id": "t", "parent_ids": [], "caption": "c"})
    with pytest.raises(ShardError, match="once"):
        with w:
            pass
    assert read_shard(tmp_path / "a" / "k").sample_ids == ["s"]  # the errors above were caught: the shard is whole
    with pytest.raises(ShardError, match="bad shard key"):
        ShardWriter(tmp_path / "a" / ".hidden", SCHEMA)
    with pytest.raises(ShardError, match="invalid record schema"):
        ShardWriter(tmp_path / "a" / "k2", {"type": "no-such-type"})


def test_replaces_older_shard(tmp_path):
    path = _write(tmp_path / "a" / "k", n=3)
    _write(path, n=1)
    assert read_shard(path).sample_ids == ["s0"]
    assert not (path / "images" / "0002.png").exists()
    assert _leftovers(tmp_path / "a") == []


def test_exception_keeps_older_shard(tmp_path):
    path = _write(tmp_path / "a" / "k", n=2)
    before = _tree(path)
    with pytest.raises(RuntimeError):
        with ShardWriter(path, SCHEMA) as w:
            w.add_record({"sample_id": "new", "parent_ids": [], "caption": "c"})
            raise RuntimeError("model crashed")
    assert _tree(path) == before and _leftovers(tmp_path / "a") == []


def test_read_refuses_incomplete(tmp_path):
    (tmp_path / "a" / "k").mkdir(parents=True)
    with pytest.raises(ShardError, match="not a complete shard") as e:
        read_shard(tmp_path / "a" / "k")
    assert "\n" not in str(e.value)
    with pytest.raises(ShardError, match="no such shard"):
        read_shard(tmp_path / "a" / "missing")
    (tmp_path / "a" / "k" / MANIFEST).write_text('{"sample_id": "s"}\n{oops\n')
    with pytest.raises(ShardError, match="line 2 is not JSON"):
        read_shard(tmp_path / "a" / "k")
    s = _write(tmp_path / "b" / "k")
    with pytest.raises(ShardError, match="no file"):
        read_shard(s).image("images/9999.png")
    with pytest.raises(ShardError, match="bad file name"):
        read_shard(s).json("../k/manifest.jsonl")


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from PIL import Image
    from music_dagster.storage import ShardWriter, record_schema
    path, ready = Path(sys.argv[1]), Path(sys.argv[2])
    with ShardWriter(path, record_schema()) as w:
        for i in range(5):
            w.add_image(f"{i}", Image.new("RGB", (8, 8), (i, 0, 0)))
            w.add_record({"sample_id": f"killed{i}", "parent_ids": []})
        ready.write_text("ready")
        time.sleep(60)
""")


def _kill_mid_write(path, tmp_path):
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    kill_when_ready(_KILLED_WRITER, [str(path), str(ready)], ready, timeout_s=60)


def test_killed_writer_leaves_nothing_visible_and_next_writer_cleans_up(tmp_path):
    asset = tmp_path / "a"
    path = asset / "k"
    _kill_mid_write(path, tmp_path)
    assert not path.exists()
    assert complete_shards(asset) == []
    assert len(_leftovers(asset)) == 1  # the hidden temporary folder of the dead writer
    _write(path, n=2)
    assert read_shard(path).sample_ids == ["s0", "s1"]
    assert _leftovers(asset) == []


def test_killed_writer_keeps_older_complete_shard(tmp_path):
    asset = tmp_path / "a"
    path = _write(asset / "k", n=2)
    before = _tree(path)
    _kill_mid_write(path, tmp_path)
    assert _tree(path) == before and complete_shards(asset) == ["k"]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_spares_live_writers_and_other_shards(tmp_path):
    asset = tmp_path / "a"
    asset.mkdir()
    dead, live = _dead_pid(), os.getpid()
    names = [f".k.tmp.{dead}.{'a' * 32}", f".k.old.{dead}.{'b' * 32}", f".k.tmp.{live}.{'c' * 32}",
             f".k2.tmp.{dead}.{'d' * 32}"]
    for n in names:
        (asset / n).mkdir()
    removed = remove_stale(asset / "k")
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert sorted(_leftovers(asset)) == sorted(names[2:])


def test_complete_shards_lists_only_complete(tmp_path):
    asset = tmp_path / "a"
    _write(asset / "s1")
    _write(asset / "s0")
    (asset / "s2").mkdir()
    (asset / ".s3.tmp.1.0").mkdir()
    assert complete_shards(asset) == ["s0", "s1"]
    assert complete_shards(tmp_path / "nothing") == []


def test_atomic_write(tmp_path):
    target = tmp_path / "d" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")
    assert target.read_bytes() == b"two" and os.listdir(target.parent) == ["f.txt"]
    stale = target.parent / f".f.txt.tmp.{_dead_pid()}.{'e' * 32}"
    stale.write_text("half")
    atomic_write_text(target, "three")
    assert os.listdir(target.parent) == ["f.txt"] and target.read_text() == "three"


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False,
                                                                                           allow_infinity=False)
                     | st.text(), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3),
                     max_leaves=10)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.text(min_size=1).filter(lambda k: k not in ("sample_id", "parent_ids")), _json,
                                max_size=4), max_size=5))
def test_records_round_trip(tmp_path, extras):
    path = tmp_path / "rt" / "k"
    records = [{**e, "sample_id": f"s{i}", "parent_ids": ["x"]} for i, e in enumerate(extras)]
    with ShardWriter(path, record_schema(additional=True)) as w:
        for r in records:
            w.add_record(r)
    assert read_shard(path).records == records
    first = (path / MANIFEST).read_bytes()
    with ShardWriter(path, record_schema(additional=True)) as w:
        for r in records:
            w.add_record(r)
    assert (path / MANIFEST).read_bytes() == first


def test_dataset_store(tmp_path):
    from music_dagster.config import load_config
    from music_dagster.resources.storage import DatasetStore

    store = DatasetStore.from_config(load_config())
    assert Path(store.root) == load_config().paths.resolve("datasets")
    store = DatasetStore(root=str(tmp_path))
    assert store.shard_path("grid_layouts", "shard-1") == tmp_path / "grid_layouts" / "shard-1"
    assert not store.exists("grid_layouts", "shard-1")
    with store.writer("grid_layouts", "shard-1", SCHEMA) as w:
        w.add_record({"sample_id": "s", "parent_ids": [], "caption": "c"})
    assert store.exists("grid_layouts", "shard-1")
    assert store.read("grid_layouts", "shard-1").sample_ids == ["s"]
    assert store.complete_shards("grid_layouts") == ["shard-1"]
    with pytest.raises(ShardError, match="bad asset name"):
        store.shard_path("../x", "k")
    with pytest.raises(ShardError, match="bad shard key"):
        store.shard_path("grid_layouts", "a/b")


def test_store_import_does_not_import_torch():
    code = "import sys, music_dagster.resources.storage; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_staged_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "scores"
    with staged_dir(final) as folder:
        (folder / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_dir(final) as folder:
            (folder / "a.txt").write_text("2")
            raise RuntimeError("generation crashed")
    assert (final / "a.txt").read_text() == "1"
    with staged_dir(final) as folder:
        (folder / "b.txt").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]  # replaced whole, not merged
    with pytest.raises(FileExistsError):
        with staged_dir(final, replace=False) as folder:
            (folder / "c.txt").write_text("4")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]  # kept as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]  # no temporary or old folder left behind


def test_staged_dir_deletes_the_leftovers_of_a_killed_writer(tmp_path):
    final = tmp_path / "lora"
    leftover = tmp_path / f".lora.tmp.{_dead_pid()}.{'a' * 32}"
    (leftover / "adapter").mkdir(parents=True)
    with staged_dir(final) as folder:
        (folder / "a.txt").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


# ---------------------------------------------------------------------------------------------------------------
# Read-only folders: refused before anything is written, nothing left behind. Root ignores file permissions, so the
# writes run in a child process with CAP_DAC_OVERRIDE dropped (`as_user`).
def _write_as_user(code: str, **paths: Path) -> str:
    """Run `code` (storage imported, `paths` bound as Path variables) in a child bound by file permissions; the
    one-line message of the UserError it raises, or "ok"."""
    from faults.helpers import as_user

    script = "\n".join([
        "import os, sys", "from pathlib import Path", "from music_dagster import storage",
        "from music_dagster.errors import UserError",
        *(f"{name} = Path({str(path)!r})" for name, path in paths.items()),
        "try:", textwrap.indent(textwrap.dedent(code), "    "),
        "except UserError as e:", "    print(e)", "else:", "    print('ok')"])
    proc = subprocess.run(as_user(sys.executable, "-c", script), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout.strip()


@pytest.fixture()
def locked():
    """`locked(path, ...)` takes write permission away; given back at the end so tmp_path can be deleted."""
    from faults.helpers import read_only, writable

    taken = []
    yield lambda *paths: (read_only(*paths), taken.extend(paths))
    writable(*taken)


def test_a_read_only_shard_is_never_silently_replaced(tmp_path, locked):
    asset = tmp_path / "a"
    shard = _write(asset / "k", n=2)
    before = _tree(shard)
    locked(shard)
    message = _write_as_user("""
        with storage.ShardWriter(shard, {"type": "object"}) as w:
            print("computed")  # never reached: refused before the block
            w.add_record({"sample_id": "x", "parent_ids": []})
    """, shard=shard)
    assert message == (f"{shard}: read-only, so it is not replaced; make it writable (chmod -R u+w {shard}) to "
                       f"write it again")
    assert _tree(shard) == before
    assert _leftovers(asset) == []


def test_a_read_only_folder_inside_a_shard_is_named(tmp_path, locked):
    shard = tmp_path / "a" / "k"
    (shard / "images").mkdir(parents=True)
    (shard / MANIFEST).write_text("")
    locked(shard / "images")
    message = _write_as_user("""
        with storage.ShardWriter(shard, {"type": "object"}):
            pass
    """, shard=shard)
    assert message.startswith(f"{shard}: read-only (images is), so it is not replaced;")
    assert sorted(p.name for p in shard.parent.iterdir()) == ["k"]


def test_a_read_only_asset_folder_refuses_a_new_shard_before_anything_is_written(tmp_path, locked):
    asset = tmp_path / "a"
    _write(asset / "k0")
    locked(asset)
    message = _write_as_user("""
        with storage.ShardWriter(asset / "k1", {"type": "object"}):
            print("computed")
    """, asset=asset)
    assert message == (f"{asset}: read-only, so {asset / 'k1'} cannot be written; make it writable "
                       f"(chmod u+w {asset})")
    assert sorted(p.name for p in asset.iterdir()) == ["k0"]


def test_staged_dir_refuses_a_read_only_folder_before_its_block_runs(tmp_path, locked):
    final = tmp_path / "lora"
    final.mkdir()
    (final / "weights.bin").write_bytes(b"trained")
    locked(final)
    message = _write_as_user("""
        with storage.staged_dir(final) as folder:
            print("trained")
    """, final=final)
    assert message == (f"{final}: read-only, so it is not replaced; make it writable (chmod -R u+w {final}) to "
                       f"write it again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    assert (final / "weights.bin").read_bytes() == b"trained"


def test_a_shard_locked_while_it_was_computed_is_kept_and_nothing_is_left(tmp_path):
    from faults.helpers import writable

    asset = tmp_path / "a"
    shard = _write(asset / "k", n=2)
    before = _tree(shard)
    try:
        message = _write_as_user("""
            with storage.ShardWriter(shard, {"type": "object"}) as w:
                w.add_record({"sample_id": "new", "parent_ids": []})
                for p in [shard, *shard.rglob("*")]:  # someone locks it meanwhile
                    p.chmod(p.stat().st_mode & ~0o222)
        """, shard=shard)
    finally:
        writable(shard)
    assert message.startswith(f"{shard}: read-only, so it is not replaced;")
    assert _tree(shard) == before
    assert _leftovers(asset) == []


def test_a_leftover_that_cannot_be_deleted_is_named(tmp_path, locked):
    asset = tmp_path / "a"
    leftover = asset / f".k.old.{_dead_pid()}.{'a' * 32}"
    (leftover / "images").mkdir(parents=True)
    (leftover / "images" / "0.png").write_bytes(b"png")
    locked(leftover / "images")
    message = _write_as_user("""
        with storage.ShardWriter(asset / "k", {"type": "object"}):
            print("computed")
    """, asset=asset)
    assert message == (f"{leftover}: left behind, it could not be deleted (Permission denied); delete it by hand "
                       f"(chmod -R u+w {leftover} && rm -r {leftover})")
    assert sorted(p.name for p in asset.iterdir()) == [leftover.name]  # no second leftover


def test_atomic_write_refuses_a_read_only_file(tmp_path, locked):
    target = tmp_path / "scores.json"
    target.write_text("kept")
    locked(target)
    message = _write_as_user("storage.atomic_write_text(target, 'new')", target=target)
    assert message == (f"{target}: read-only, so it is not replaced; make it writable (chmod u+w {target}) to "
                       f"write it again")
    assert target.read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


def test_a_failed_rename_puts_the_old_copy_back(tmp_path, monkeypatch):
    import music_dagster.storage as storage

    shard = _write(tmp_path / "a" / "k", n=2)
    before = _tree(shard)
    real = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".k.tmp."):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(storage.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        with ShardWriter(shard, SCHEMA) as w:
            w.add_record({"sample_id": "new", "parent_ids": [], "caption": "c"})
    assert _tree(shard) == before
    assert _leftovers(shard.parent) == []


# ---------------------------------------------------------------------------------------------------------------
# Stored paths and stored JSON
def _datasets(tmp_path):
    root = tmp_path / "datasets"
    (root / "a" / "k").mkdir(parents=True)
    (root / "a" / "k" / "x.png").write_bytes(b"inside")
    (tmp_path / "outside.png").write_bytes(b"outside")
    return root


def test_resolve_stored_keeps_paths_inside_their_root(tmp_path):
    root = _datasets(tmp_path)
    (root / "a" / "k" / "alias.png").symlink_to(root / "a" / "k" / "x.png")  # a symlink inside the root is fine
    assert resolve_stored(root, "a/k/x.png", "m: line 1") == root / "a" / "k" / "x.png"
    assert resolve_stored(root, "a/k/alias.png", "m: line 1").read_bytes() == b"inside"
    assert resolve_stored(root, "a/./k/x.png", "m: line 1") == root / "a" / "k" / "x.png"
    assert resolve_stored(root, "a/k/not-yet.png", "m: line 1") == root / "a" / "k" / "not-yet.png"


@pytest.mark.parametrize("ref, fault", [
    ("../outside.png", "climbs out of"), ("a/../../outside.png", "climbs out of"), ("a/k/..", "climbs out of"),
    ("/etc/passwd", "is absolute"), ("", "is not a relative path"), ("a\\..\\..\\outside.png", "is not a relative path"),
    ("a/k\0x.png", "is not a relative path"), (None, "is not a relative path"), (["a"], "is not a relative path"),
])
def test_resolve_stored_refuses_paths_that_leave_the_root(tmp_path, ref, fault):
    root = _datasets(tmp_path)
    with pytest.raises(StoredPathError) as e:
        resolve_stored(root, ref, "d/a/k/manifest.jsonl: line 3")
    message = str(e.value)
    assert message.startswith("d/a/k/manifest.jsonl: line 3: ") and fault in message and "\n" not in message


def test_resolve_stored_refuses_a_symlink_leading_out(tmp_path):
    root = _datasets(tmp_path)
    (root / "a" / "k" / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "a" / "out").symlink_to(tmp_path)  # a linked folder leading out
    for ref in ("a/k/link.png", "a/out/outside.png"):
        with pytest.raises(StoredPathError, match="leads out of .* through a symlink"):
            resolve_stored(root, ref, "m: line 2")
    # what decides is where the file is: back in through the linked folder, or under a linked root, is inside
    assert resolve_stored(root, "a/out/datasets/a/k/x.png", "m").read_bytes() == b"inside"
    (tmp_path / "linked").symlink_to(root)
    assert resolve_stored(tmp_path / "linked", "a/k/x.png", "m").read_bytes() == b"inside"


def test_a_shard_file_read_through_a_symlink_leading_out_is_refused(tmp_path):
    shard = _write(tmp_path / "target_images" / "shard-0")
    (tmp_path / "secret.json").write_text("{}")
    (shard / "stats2.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(StoredPathError, match="stats2.json.* through a symlink"):
        read_shard(shard).json("stats2.json")


def test_read_json_names_the_file_and_the_fault(tmp_path):
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    path = tmp_path / "c.json"
    cases = [
        (b'{"n": 1}', None),
        (b'{"n": "\xff"}', "not UTF-8 (byte 0xff at offset 7)"),
        (b"{this is not json", "not JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
        (b'{"n": NaN}', "not JSON (NaN is not a JSON number)"),
        (b'{"n": "x"}', "n: 'x' is not of type 'integer'"),
        (b"[]", "[] is not of type 'object'"),
        (b"{}", "'n' is a required property"),
    ]
    for data, fault in cases:
        path.write_bytes(data)
        if fault is None:
            assert read_json(path, schema) == {"n": 1}
            continue
        with pytest.raises(StoredFileError) as e:
            read_json(path, schema)
        assert str(e.value) == f"{path}: {fault}"
    with pytest.raises(ShardError, match=f"{tmp_path / 'none.json'}: cannot be read"):
        read_json(tmp_path / "none.json", error=ShardError)


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib

    data = os.urandom(3 << 20)  # several read blocks
    (tmp_path / "w").write_bytes(data)
    assert file_sha256(tmp_path / "w") == hashlib.sha256(data).hexdigest()


def test_incomplete_shards_are_the_folders_without_a_manifest(tmp_path):
    asset = tmp_path / "training_samples"
    _write(asset / "shard-00000", n=1)
    (asset / "shard-00001").mkdir()
    (asset / "shard-00001" / "0.png").write_bytes(b"x")
    (asset / ".shard-00002.tmp.1.0123456789abcdef0123456789abcdef").mkdir()  # a writer's temporary folder
    (asset / "notes.txt").write_text("not a shard")
    assert complete_shards(asset) == ["shard-00000"]
    assert incomplete_shards(asset) == ["shard-00001"]
    assert incomplete_shards(tmp_path / "nothing") == []

