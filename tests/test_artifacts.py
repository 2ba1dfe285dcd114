"""The shared artifact mechanism: output checks before the work, atomic publish, the manifest written last."""

import json

import pytest

from pipeline.artifacts import (SEAL, Kind, artifact_lock, atomic_write, check_file_output, check_output, check_sealed,
                                control_dir, publish_dir, read_seal, seal, staging_dir)
from pipeline.errors import IntegrityError, OutputError

THING = Kind("thing store", hint="rebuild it with `make thing`.", marker=lambda p: (p / "thing.marker").is_file())
OTHER = Kind("other store", hint="rebuild the other.")


def build(path, files):
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


@pytest.fixture
def sealed(tmp_path):
    d = build(tmp_path / "art", {"a.bin": b"alpha", "sub/b.bin": b"bravo" * 100})
    seal(d, THING)
    return d


def test_seal_lists_every_file_with_size_and_hash_and_is_deterministic(sealed, tmp_path):
    manifest = read_seal(sealed)
    assert manifest["kind"] == "thing store" and set(manifest["files"]) == {"a.bin", "sub/b.bin"}
    assert manifest["files"]["sub/b.bin"]["size"] == 500
    again = build(tmp_path / "again", {"a.bin": b"alpha", "sub/b.bin": b"bravo" * 100})
    seal(again, THING)
    assert (again / SEAL).read_bytes() == (sealed / SEAL).read_bytes()  # no clock, no absolute path
    assert check_sealed(sealed, THING, deep=True) == manifest


def test_seal_deletes_leftovers_that_keep_rejects(tmp_path):
    d = build(tmp_path / "art", {"c/0": b"x", "c/1.3f9a.partial": b"half"})
    manifest = seal(d, THING, keep=lambda rel: not rel.endswith(".partial"))
    assert set(manifest["files"]) == {"c/0"} and not (d / "c/1.3f9a.partial").exists()


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "a.bin").unlink(), "file 'a.bin' is missing"),
    (lambda d: (d / "sub/b.bin").write_bytes(b"bravo"), r"file 'sub/b.bin' has 5 bytes, expected 500"),
    (lambda d: (d / SEAL).unlink(), "has no layerscope.json"),
    (lambda d: (d / SEAL).write_text("{garbage"), "Manifest .* is damaged .*not valid JSON"),
    (lambda d: (d / SEAL).write_text((d / SEAL).read_text().replace("500", "501")), "digest does not match"),
])
def test_check_sealed_refuses_damage_naming_the_file_and_the_remedy(sealed, damage, match):
    damage(sealed)
    with pytest.raises(IntegrityError, match=match) as err:
        check_sealed(sealed, THING)
    assert "Hint: rebuild it with `make thing`." in str(err.value) and "\n" not in str(err.value)


def test_only_deep_checks_see_a_same_size_change_or_an_extra_file(sealed):
    data = bytearray((sealed / "sub/b.bin").read_bytes())
    data[7] ^= 1
    (sealed / "sub/b.bin").write_bytes(bytes(data))
    check_sealed(sealed, THING)  # names and sizes agree
    with pytest.raises(IntegrityError, match="file 'sub/b.bin' has been altered"):
        check_sealed(sealed, THING, deep=True)
    (sealed / "sub/b.bin").write_bytes(b"bravo" * 100)
    (sealed / "stray.partial").write_bytes(b"")
    with pytest.raises(IntegrityError, match="1 file.* not published with, e.g. 'stray.partial'"):
        check_sealed(sealed, THING, deep=True)


def test_check_sealed_refuses_another_kind(sealed):
    with pytest.raises(IntegrityError, match="is a thing store, not a other store"):
        check_sealed(sealed, OTHER)


def test_check_output_accepts_new_empty_or_same_kind(tmp_path, sealed):
    assert check_output(tmp_path / "new" / "deeper", THING) == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", THING)
    check_output(sealed, THING)
    legacy = build(tmp_path / "legacy", {"thing.marker": b"", "x": b"1"})
    check_output(legacy, THING)


def test_check_output_refuses_what_layerscope_did_not_write(tmp_path, sealed):
    user = build(tmp_path / "thesis", {"chapter1.tex": b"precious"})
    with pytest.raises(OutputError, match=r"Refusing to replace '.*thesis' \(--out\): .*not a thing store"):
        check_output(user, THING)
    with pytest.raises(OutputError, match="not a other store"):
        check_output(sealed, OTHER, option="--out")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match=r"--features '.*file.txt' is an existing file; expected a thing store"):
        check_output(tmp_path / "file.txt", THING, option="--features")
    with pytest.raises(OutputError, match="'.*file.txt' is a file, not a directory"):
        check_output(tmp_path / "file.txt" / "under", THING)
    assert (user / "chapter1.tex").read_bytes() == b"precious"


def test_check_file_output_refuses_a_directory(tmp_path):
    with pytest.raises(OutputError, match=r"--out '.*' is a directory; expected a file path for the thresholds"):
        check_file_output(tmp_path, "thresholds")
    assert check_file_output(tmp_path / "t.json", "thresholds") == tmp_path / "t.json"


def test_publish_swaps_and_leaves_nothing_behind(tmp_path, sealed):
    staged = staging_dir(sealed)
    build(staged, {"new.bin": b"new"})
    seal(staged, THING)
    publish_dir(staged, sealed)
    assert sorted(p.name for p in sealed.iterdir()) == [SEAL, "new.bin"]
    assert [p.name for p in control_dir(sealed).iterdir()] == []


def test_publish_clears_a_copy_displaced_by_a_killed_publish(tmp_path, sealed):
    displaced = control_dir(sealed) / f"{sealed.name}.replaced"
    build(displaced, {"old": b"left by a kill"})
    staged = build(staging_dir(sealed), {"n": b"1"})
    publish_dir(staged, sealed)
    assert not displaced.exists() and (sealed / "n").is_file()


def test_lock_is_exclusive_and_its_file_survives(tmp_path):
    target = tmp_path / "art"
    with artifact_lock(target, "thing store") as lock_path:
        with pytest.raises(OutputError, match="being written by another process"):
            with artifact_lock(target, "thing store"):
                pass
    assert lock_path.is_file()
    with artifact_lock(target, "thing store"):  # released: a new writer may go
        pass


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    atomic_write(tmp_path / "r.json", json.dumps({"a": 1}))
    atomic_write(tmp_path / "r.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and (tmp_path / "r.json").read_text() == "{}"
