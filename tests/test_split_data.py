"""split_data.py: a reproducible, stable, all-or-nothing split of per-class folders."""

from __future__ import annotations

import http.client
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import COLOURS, assert_clean_error, draw, make_dataset, run

import nin
import split_data
from nin import CLIError


def sides(data: Path) -> dict[str, str]:
    """'class/file' -> 'train' or 'val' for every photo of a split."""
    return {f"{f.parent.name}/{f.name}": half for half in ("train", "val")
            for f in (data / half).glob("*/*") if f.is_file()}


@pytest.fixture
def source(tmp_path) -> Path:
    return make_dataset(tmp_path / "source", per_class=30)


def split(source: Path, out: Path, *flags: str, check: bool = True):
    return run("split_data.py", "--source", source, "--out", out, *flags, cwd=out.parent, check=check)


def test_split_is_reproducible_and_seed_dependent(source, tmp_path):
    split(source, tmp_path / "a", "--val-ratio", "0.3")
    split(source, tmp_path / "b", "--val-ratio", "0.3")
    split(source, tmp_path / "c", "--val-ratio", "0.3", "--seed", "7")
    assert sides(tmp_path / "a") == sides(tmp_path / "b")
    assert sides(tmp_path / "a") != sides(tmp_path / "c")
    assert len(sides(tmp_path / "a")) == 90
    assert 10 <= list(sides(tmp_path / "a").values()).count("val") <= 45


def test_the_split_is_as_readable_as_any_folder_the_user_makes(source, tmp_path):
    """Other users (or a container running as another uid) read data/train as they would any new folder."""
    split(source, tmp_path / "a")
    folder = (tmp_path / "a" / "train").resolve().parent  # the split's own folder, .split-ID
    assert folder.name.startswith(".split-")
    assert folder.stat().st_mode & 0o777 == 0o777 & ~nin.UMASK


def test_adding_photos_never_moves_existing_ones(source, tmp_path):
    split(source, tmp_path / "data", "--val-ratio", "0.3")
    before = sides(tmp_path / "data")
    make_dataset(source, per_class=10, start=30)
    split(source, tmp_path / "data", "--val-ratio", "0.3")
    after = sides(tmp_path / "data")
    assert len(after) == 120
    assert {k: after[k] for k in before} == before


def test_identical_photos_land_on_the_same_side(source, tmp_path):
    for i in range(20):  # the same bytes under two classes, as in flower_photos' roses/tulips
        (source / "green" / f"dup{i}.jpg").write_bytes((source / "red" / f"{i:03d}.jpg").read_bytes())
    split(source, tmp_path / "data", "--val-ratio", "0.5")
    s = sides(tmp_path / "data")
    assert all(s[f"green/dup{i}.jpg"] == s[f"red/{i:03d}.jpg"] for i in range(20))


def test_prints_a_table_of_counts(source, tmp_path):
    out = split(source, tmp_path / "data", "--val-ratio", "0.3").stdout
    s = sides(tmp_path / "data")
    for name in COLOURS:
        train = sum(1 for k, v in s.items() if k.startswith(name + "/") and v == "train")
        row = next(line.split() for line in out.splitlines() if line.startswith(name))
        assert row[1:3] == [str(train), str(30 - train)]
    assert next(line for line in out.splitlines() if line.startswith("total")).split()[1:3] == [
        str(list(s.values()).count("train")), str(list(s.values()).count("val"))]


def test_bad_files_are_skipped_with_a_warning(source, tmp_path):
    (source / "red" / "notes.txt").write_text("not an image")
    (source / "red" / "empty.jpg").write_bytes(b"")
    good = (source / "blue" / "000.jpg").read_bytes()
    (source / "blue" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (source / "green" / "text.jpg").write_text("a text file named like a photo")
    result = split(source, tmp_path / "data")
    for name in ("notes.txt", "empty.jpg", "truncated.jpg", "text.jpg"):
        assert f"skipped {source}" in result.stderr and name in result.stderr
        assert not list((tmp_path / "data").glob(f"*/*/{name}"))
    assert len(sides(tmp_path / "data")) == 90


def test_hidden_files_and_folders_are_neither_classes_nor_photos(source, tmp_path):
    """Finder's .DS_Store, macOS's `._photo.jpg` metadata and Jupyter's checkpoint folders: not copied, not
    classes, and not worth a warning."""
    (source / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    draw(source / ".ipynb_checkpoints" / "copy-checkpoint.jpg", COLOURS["red"], seed=5)
    draw(source / "red" / ".ipynb_checkpoints" / "copy-checkpoint.jpg", COLOURS["red"], seed=6)
    (source / "red" / "._000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata, not a JPEG")
    result = split(source, tmp_path / "data")
    assert "warning" not in result.stderr
    assert visible(tmp_path / "data" / "train") == sorted(COLOURS) == visible(tmp_path / "data" / "val")
    assert len(sides(tmp_path / "data")) == 90 and not list((tmp_path / "data").rglob("*checkpoint*"))


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_names_that_are_not_utf8_are_split_and_trained_on(source, tmp_path):
    """A Latin-1 file name, as an old camera or archive may write: copied by the split, then listed and decoded
    by train.py's functions."""
    import train

    name = os.fsencode(source / "red") + b"/fleur-\xe9t\xe9.jpg"
    with open(name, "wb") as f:
        f.write((source / "red" / "000.jpg").read_bytes())
    result = split(source, tmp_path / "data", "--val-ratio", "0")
    assert "Traceback" not in result.stderr and "warning" not in result.stderr
    copied = tmp_path / "data" / "train" / "red" / os.fsdecode(b"fleur-\xe9t\xe9.jpg")
    assert copied.read_bytes() == (source / "red" / "000.jpg").read_bytes()
    photos = train.find_images(tmp_path / "data" / "train")
    assert str(copied) in [path for path, _ in photos.samples] and len(photos) == 91
    assert train.train_tensor(str(copied), 64).shape == (3, 73, 73)


def test_old_split_is_replaced_completely(source, tmp_path):
    data = tmp_path / "data"
    draw(data / "train" / "purple" / "old.jpg", (120, 0, 120), seed=1)
    draw(data / "val" / "red" / "stale.jpg", (200, 0, 0), seed=2)
    for half in ("train", "val"):  # as a split_data.py from before links left it: real folders, with the id
        (data / half / nin.SPLIT_ID_FILE).write_text("old\n")
    split(source, data)
    assert sorted(p.name for p in (data / "train").iterdir() if p.is_dir()) == sorted(COLOURS)
    assert not list(data.glob("*/*/stale.jpg"))
    assert visible(data) == ["train", "val"] and len(hidden_splits(data)) == 1
    ids = {(data / half / nin.SPLIT_ID_FILE).read_text() for half in ("train", "val")}
    assert len(ids) == 1


def test_interrupted_split_leaves_the_old_one_untouched(source, tmp_path, monkeypatch):
    data = tmp_path / "data"
    split(source, data)
    before = sides(data)
    calls = 0

    def interrupted_copy(src, dst):
        nonlocal calls
        calls += 1
        if calls == 40:
            raise KeyboardInterrupt
        dst.write_bytes(src.read_bytes())

    monkeypatch.setattr(split_data, "link_or_copy", interrupted_copy)
    classes = split_data.list_classes(source)
    fractions = split_data.val_fractions([f for fs in classes.values() for f in fs], seed=0, workers=1)
    assignment = split_data.sides_for(fractions, val_ratio=0.5)
    with pytest.raises(KeyboardInterrupt):
        split_data.write_split(classes, assignment, data)
    assert sides(data) == before
    assert visible(data) == ["train", "val"] and len(hidden_splits(data)) == 1  # no temporary folder left behind


def visible(data: Path) -> list[str]:
    return sorted(p.name for p in data.iterdir() if not p.name.startswith("."))


def hidden_splits(data: Path) -> list[str]:
    """The folders of splits kept in data/: the current one only, once a run has ended."""
    return sorted(p.name for p in data.glob(".split-*") if p.is_dir())


def split_args(source: Path, ratio: float = 0.5):
    classes = split_data.list_classes(source)
    fractions = split_data.val_fractions([f for fs in classes.values() for f in fs], seed=0, workers=1)
    return classes, split_data.sides_for(fractions, val_ratio=ratio)


@pytest.mark.parametrize("cut_at", ["before the switch", "after the switch"])
def test_a_split_cut_at_its_swap_leaves_both_halves_of_one_split(source, tmp_path, monkeypatch, cut_at):
    """The swap is one atomic replacement of a link: a kill just before or after it leaves the old split or
    the new one, whole, and the next run tidies up."""
    data = tmp_path / "data"
    split(source, data, "--val-ratio", "0.3")
    before = sides(data)
    real_replace = os.replace

    def killed(src, dst):
        if Path(dst).name == ".split":
            if cut_at == "after the switch":
                real_replace(src, dst)
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(split_data.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        split_data.write_split(*split_args(source, 0.6), data)
    monkeypatch.undo()
    after = sides(data)
    assert after == (before if cut_at == "before the switch" else sides_of(split_args(source, 0.6)[1]))
    ids = {(data / half / nin.SPLIT_ID_FILE).read_text() for half in ("train", "val")}
    assert len(ids) == 1  # both halves of one split
    split(source, data, "--val-ratio", "0.3")  # the next run removes what the cut one left
    assert sides(data) == before and len(hidden_splits(data)) == 1


def sides_of(assignment: dict[Path, str | None]) -> dict[str, str]:
    return {f"{f.parent.name}/{f.name}": side for f, side in assignment.items() if side is not None}


def test_a_second_split_at_the_same_time_is_refused(source, tmp_path):
    import fcntl

    data = tmp_path / "data"
    data.mkdir()
    with open(data / ".split.lock", "w") as held:  # as a run in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert_clean_error(split(source, data, check=False), "another split_data.py is writing")
    split(source, data)  # free again
    assert visible(data) == ["train", "val"]


def test_where_links_cannot_be_made_the_halves_are_moved(source, tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError("symbolic links are not allowed here")

    data = tmp_path / "data"
    monkeypatch.setattr(split_data.os, "symlink", no_links)
    for ratio in (0.3, 0.6):
        split_data.write_split(*split_args(source, ratio), data)
        assert not (data / "train").is_symlink() and sides(data) == sides_of(split_args(source, ratio)[1])
    assert visible(data) == ["train", "val"] and hidden_splits(data) == []
    split_data.check_out(data, source)  # real halves of its own: a later split may replace them
    with pytest.raises(CLIError, match="inside the split that this one replaces"):
        split_data.check_out(data, data / "train")  # but they are no source for it


def test_missing_or_empty_source_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    assert_clean_error(split(tmp_path / "nowhere", data, check=False), "source folder not found")
    (tmp_path / "flat").mkdir()
    draw(tmp_path / "flat" / "a.jpg", (1, 2, 3), seed=1)
    assert_clean_error(split(tmp_path / "flat", data, check=False), "no class folders")
    (tmp_path / "flat" / "empty_class").mkdir()
    assert_clean_error(split(tmp_path / "flat", data, check=False), "empty_class")
    assert not data.exists()


def test_bad_flags_are_rejected(source, tmp_path):
    for ratio in ("1", "-0.2", "1.5"):
        assert_clean_error(split(source, tmp_path / "data", "--val-ratio", ratio, check=False), "--val-ratio")
    for flags, named in [(("--folds", "3", "--fold", "3"), "--fold must be between 0 and 2"),
                         (("--folds", "1", "--fold", "0"), "--folds must be at least 2"),
                         (("--folds", "5", "--fold", "0", "--val-ratio", "0.2"), "not both"),
                         (("--folds", "5"), "go together"), (("--fold", "1"), "go together")]:
        assert_clean_error(split(source, tmp_path / "data", *flags, check=False), named)
    assert not (tmp_path / "data").exists()


def test_folds_partition_the_photos(source, tmp_path):
    for i in range(3):
        split(source, tmp_path / f"fold{i}", "--folds", "3", "--fold", str(i))
    folds = [sides(tmp_path / f"fold{i}") for i in range(3)]
    val = [{photo for photo, side in fold.items() if side == "val"} for fold in folds]
    assert all(len(fold) == 90 for fold in folds)
    assert all(val) and sum(map(len, val)) == 90 and set().union(*val) == set(folds[0])  # each photo once
    for i, fold in enumerate(folds):
        assert {photo for photo, side in fold.items() if side == "train"} == set(fold) - val[i]


def test_a_photos_fold_never_changes_and_duplicates_share_it(source, tmp_path):
    def fold_of_each(out: Path) -> dict[str, int]:
        found = {}
        for i in range(4):
            split(source, out, "--folds", "4", "--fold", str(i))
            found.update({photo: i for photo, side in sides(out).items() if side == "val"})
        return found

    before = fold_of_each(tmp_path / "a")
    make_dataset(source, per_class=10, start=30)
    for i in range(10):
        (source / "green" / f"dup{i}.jpg").write_bytes((source / "red" / f"{i:03d}.jpg").read_bytes())
    after = fold_of_each(tmp_path / "b")
    assert len(after) == 130 and {k: after[k] for k in before} == before
    assert all(after[f"green/dup{i}.jpg"] == after[f"red/{i:03d}.jpg"] for i in range(10))


def test_the_default_split_is_fold_0_of_10(tmp_path):
    source = make_dataset(tmp_path / "source", per_class=60)
    split(source, tmp_path / "default")
    split(source, tmp_path / "fold", "--folds", "10", "--fold", "0")
    assert sides(tmp_path / "default") == sides(tmp_path / "fold")
    assert 0 < list(sides(tmp_path / "default").values()).count("val") < 60


def test_the_default_split_of_flower_photos_is_unchanged():
    """The split that every figure before cross-validation was measured on: 2,995 train and 308 val."""
    source = nin.ROOT.parent / "shared" / "data" / "flower_photos"
    if not source.is_dir():
        pytest.skip("no copy of flower_photos in ../shared/data")
    classes = split_data.list_classes(source)
    fractions = split_data.val_fractions([f for fs in classes.values() for f in fs], seed=0, workers=2)
    default = split_data.sides_for(fractions, val_ratio=split_data.VAL_RATIO)
    assert list(default.values()).count("val") == 308 and list(default.values()).count("train") == 2995
    assert split_data.sides_for(fractions, folds=10, fold=0) == default


def test_val_ratio_0_puts_every_photo_in_train(source, tmp_path):
    out = split(source, tmp_path / "data", "--val-ratio", "0").stdout
    assert set(sides(tmp_path / "data").values()) == {"train"} and len(sides(tmp_path / "data")) == 90
    assert sorted(p.name for p in (tmp_path / "data" / "val").iterdir() if p.is_dir()) == sorted(COLOURS)
    assert "every photo trains" in out


def test_wrong_archive_is_refused_and_nothing_extracted(tmp_path, monkeypatch):
    fake = tmp_path / "flower_photos.tgz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(make_dataset(tmp_path / "flower_photos", per_class=2), arcname="flower_photos")
    out = tmp_path / "data"
    # The default source in data/ of a checkout that already holds the real photos would be used instead
    monkeypatch.setattr(nin, "DATA_DIR", out)
    result = run("split_data.py", "--archive", fake, "--out", out, cwd=tmp_path, check=False)
    assert_clean_error(result, "not the flower_photos archive")
    assert not out.exists() or not list(out.glob("*/*/*"))


def tar_with(member: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return buffer


@pytest.mark.parametrize("name,kind,target", [("../{unique}.txt", tarfile.REGTYPE, ""),
                                              ("/tmp/{unique}.txt", tarfile.REGTYPE, ""),
                                              ("flower_photos/link", tarfile.SYMTYPE, "/etc/passwd"),
                                              ("flower_photos/dev", tarfile.CHRTYPE, "")])
def test_extraction_never_writes_outside_its_folder(tmp_path, name, kind, target):
    unique = f"escape-{tmp_path.name}-{os.getpid()}"  # a name no other file has, in /tmp or anywhere
    member = tarfile.TarInfo(name.format(unique=unique))
    member.type, member.linkname = kind, target
    archive = tmp_path / "evil.tar"
    archive.write_bytes(tar_with(member).getvalue())
    (tmp_path / "data").mkdir()
    with pytest.raises(CLIError):
        split_data.extract(archive, tmp_path / "data" / "flower_photos")
    assert list((tmp_path / "data").iterdir()) == []  # no flower_photos, no temporary folder, nothing beside
    assert not list(tmp_path.rglob(f"{unique}*")) and not Path(f"/tmp/{unique}.txt").exists()


def test_a_chain_of_links_cannot_lead_out_of_the_folder(tmp_path):
    """The first link stays inside (flower_photos/.. is the folder); through it, the second points outside."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, target in (("flower_photos/up", ".."), ("flower_photos/up/up", "..")):
            member = tarfile.TarInfo(name)
            member.type, member.linkname = tarfile.SYMTYPE, target
            tar.addfile(member)
        payload = tarfile.TarInfo("flower_photos/up/up/escape.txt")
        payload.size = 1
        tar.addfile(payload, io.BytesIO(b"x"))
    archive = tmp_path / "chain.tar"
    archive.write_bytes(buffer.getvalue())
    (tmp_path / "data").mkdir()
    with pytest.raises(CLIError, match="leads outside the folder"):
        split_data.extract(archive, tmp_path / "data" / "flower_photos")
    assert not list(tmp_path.rglob("escape.txt"))


def test_archive_beside_an_extracted_copy_is_not_silently_ignored(source, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(split_data, "DEFAULT_SOURCE", source)  # as if data/flower_photos were there
    monkeypatch.setattr("sys.argv", ["split_data.py", "--archive", str(tmp_path / "any.tgz"),
                                     "--out", str(tmp_path / "data")])
    split_data.main()
    assert "--archive" in capsys.readouterr().err and sides(tmp_path / "data")


def test_extraction_of_a_good_archive(tmp_path, monkeypatch):
    make_dataset(tmp_path / "src" / "flower_photos", per_class=2)
    archive = tmp_path / "good.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "flower_photos", arcname="flower_photos")
    split_data.extract(archive, tmp_path / "data" / "flower_photos")  # data/ not there yet: made
    assert len(list((tmp_path / "data" / "flower_photos").glob("*/*.jpg"))) == 6
    monkeypatch.delattr(tarfile, "data_filter")  # a Python older than 3.10.12: refused in words, not a TypeError
    with pytest.raises(nin.CLIError, match=r"needs Python 3\.10\.12"):
        split_data.extract(archive, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_symlinks_and_unusual_names(source, tmp_path):
    elsewhere = draw(tmp_path / "elsewhere" / "linked.jpg", (40, 190, 60), seed=77)
    (source / "green" / "link to photo.jpg").symlink_to(elsewhere)
    (source / "red" / "dangling.jpg").symlink_to(tmp_path / "nothing.jpg")
    os.mkfifo(source / "red" / "pipe.jpg")  # would block open() forever
    draw(source / "red" / "fleur d'été — 1.jpg", (220, 40, 40), seed=78)
    (source / "blue").rename(tmp_path / "blue kept elsewhere")
    (source / "blue").symlink_to(tmp_path / "blue kept elsewhere", target_is_directory=True)  # a linked class
    result = split(source, tmp_path / "data")
    s = sides(tmp_path / "data")
    assert "green/link to photo.jpg" in s and "red/fleur d'été — 1.jpg" in s
    assert len([name for name in s if name.startswith("blue/")]) == 30
    assert "red/dangling.jpg" not in s and "dangling.jpg: a dangling link" in result.stderr
    assert "red/pipe.jpg" not in s and "pipe.jpg: not a regular file" in result.stderr
    linked = tmp_path / "data" / s["green/link to photo.jpg"] / "green" / "link to photo.jpg"
    assert linked.read_bytes() == elsewhere.read_bytes()


def test_a_corrupt_download_is_deleted_and_an_archive_already_there_kept(tmp_path, monkeypatch):
    def fake_download(url, dest):
        dest.write_bytes(b"this is not the archive")

    monkeypatch.setattr(split_data, "download", fake_download)
    dest = tmp_path / "data" / "flower_photos"
    dest.parent.mkdir()
    with pytest.raises(CLIError, match="corrupt"):
        split_data.fetch_flower_photos(dest, archive=None)
    assert list((tmp_path / "data").iterdir()) == []  # neither the archive nor anything extracted
    # One that was there before (an earlier run's, or put there by hand) is checked, refused, and never deleted.
    (tmp_path / "data" / "flower_photos.tgz").write_bytes(b"someone else's archive")
    monkeypatch.setattr(split_data, "download", None)  # not called: the archive is there
    with pytest.raises(CLIError, match="is not the flower_photos archive"):
        split_data.fetch_flower_photos(dest, archive=None)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["flower_photos.tgz"]


class FakeResponse(io.BytesIO):
    """What urlopen returns, serving `payload`, optionally failing after `fail_after` bytes."""

    def __init__(self, payload: bytes, fail_after: int | None = None, failure: Exception | None = None):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}
        self.fail_after, self.failure = fail_after, failure

    def read(self, size=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise self.failure
        return super().read(min(size, 4) if size > 0 else size)


@pytest.mark.parametrize("fail_after,failure", [(None, None), (8, ConnectionResetError("connection reset by peer")),
                                                (8, http.client.IncompleteRead(b"01234567", 8))])
def test_download_is_complete_or_absent(tmp_path, monkeypatch, fail_after, failure):
    """A download cut by a reset (an OSError) or mid-body (http.client's IncompleteRead, which is not one) is a
    one-line error that leaves no partial file."""
    monkeypatch.setattr(split_data.urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(b"0123456789abcdef", fail_after, failure))
    dest = tmp_path / "flower_photos.tgz"
    (tmp_path / "flower_photos.tgz.part").write_bytes(b"left by an interrupted run")
    if fail_after is None:
        split_data.download("https://example.invalid/a.tgz", dest)
        assert dest.read_bytes() == b"0123456789abcdef"
    else:
        with pytest.raises(CLIError, match="download of"):
            split_data.download("https://example.invalid/a.tgz", dest)
        assert not dest.exists()
    assert not (tmp_path / "flower_photos.tgz.part").exists()


def test_one_class_is_refused(tmp_path):
    draw(tmp_path / "only" / "red" / "a.jpg", COLOURS["red"], seed=1)
    assert_clean_error(split(tmp_path / "only", tmp_path / "data", check=False), "at least two")
    assert not (tmp_path / "data").exists()


def test_files_train_py_would_not_read_are_skipped_with_the_reason(source, tmp_path):
    (source / "red" / "no_extension").write_bytes((source / "red" / "000.jpg").read_bytes())
    draw(source / "blue" / "animated.gif", COLOURS["blue"], seed=5, mode="P")
    result = split(source, tmp_path / "data")
    assert "no_extension: not named like an image" in result.stderr
    assert "blue/animated.gif" in sides(tmp_path / "data")  # a GIF is an image for all three scripts
    assert "red/no_extension" not in sides(tmp_path / "data")


def test_out_inside_the_source_is_refused(source):
    assert_clean_error(split(source, source / "data", check=False), "inside the source folder")
    assert_clean_error(split(source, source, check=False), "inside the source folder")


def test_photos_that_are_not_a_split_are_never_replaced(source, tmp_path):
    data = tmp_path / "data"
    mine = draw(data / "train" / "red" / "mine.jpg", COLOURS["red"], seed=4)  # made by hand, as train.py reads it
    (data / "train" / "red" / "notes.txt").write_text("not a photo: a split would not take it")
    for photos in (source, data / "train"):  # their own photos split from there, or others
        assert_clean_error(split(photos, data, check=False), f"{data / 'train'} has no .split_id file")
    assert mine.is_file() and (data / "train" / "red" / "notes.txt").is_file() and os.listdir(data) == ["train"]
    shutil.rmtree(data)
    split(source, data)  # a split of split_data.py's own: its halves are not a source to split again
    for inside in (data / "train", data / "val" / "red"):
        assert_clean_error(split(inside, tmp_path / "data", check=False), "inside the split that this one replaces")
    assert len(sides(data)) == 90


def test_photos_in_a_subfolder_are_skipped_with_a_warning(source, tmp_path):
    (source / "blue" / "more").mkdir()
    (source / "green" / "empty").mkdir()  # no photos to move up: no hint
    photos = sorted((source / "blue").glob("*.jpg"))
    for photo in photos[:3]:
        photo.rename(source / "blue" / "more" / photo.name)
    result = split(source, tmp_path / "data")
    assert "skipped the folder(s) more inside" in result.stderr and "move their photos up into blue" in result.stderr
    assert "skipped the folder(s) empty inside" in result.stderr and "into green" not in result.stderr
    assert len([name for name in sides(tmp_path / "data") if name.startswith("blue/")]) == len(photos) - 3
    for photo in photos[3:]:  # all of them in the subfolder: nothing left to split
        photo.rename(source / "blue" / "more" / photo.name)
    result = split(source, tmp_path / "data", check=False)
    assert_clean_error(result, "no readable images in class folder(s): blue")
    assert "move their photos up into blue" in result.stderr


def test_a_split_from_before_links_is_put_back_when_the_first_switch_is_cut(source, tmp_path, monkeypatch):
    data = tmp_path / "data"
    draw(data / "train" / "red" / "old.jpg", COLOURS["red"], seed=1)  # as an older split_data.py left it
    draw(data / "val" / "red" / "old-val.jpg", COLOURS["red"], seed=2)
    for half in ("train", "val"):
        (data / half / nin.SPLIT_ID_FILE).write_text("old\n")
    real_replace = os.replace

    def killed(src, dst):
        if Path(dst).name == ".split":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(split_data.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        split_data.write_split(*split_args(source), data)
    assert (data / "train" / "red" / "old.jpg").is_file() and (data / "val" / "red" / "old-val.jpg").is_file()


def test_a_link_of_the_users_own_is_replaced_by_the_split(source, tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "my_photos"
    draw(elsewhere / "red" / "mine.jpg", COLOURS["red"], seed=3)
    data.mkdir()
    (data / "train").symlink_to(elsewhere)
    split(source, data)
    assert "red/mine.jpg" not in sides(data) and (elsewhere / "red" / "mine.jpg").is_file()
