"""Split a folder of per-class image folders into data/train and data/val.

With no --source, uses data/flower_photos, downloading and verifying the TensorFlow flower_photos archive
first if it is not there. A photo's side (train or val) is a pure function of its bytes and --seed: the split
is the same on every machine, identical photos never straddle train and val, and adding photos never moves
the ones already there.

Each photo's bytes and --seed give it a number in [0, 1). --val-ratio R puts the photos below R into val/
(R = 0: every photo trains, for final weights once a recipe is settled). --folds K --fold I puts those in
[I/K, (I+1)/K) into val/ instead: the K folds of cross-validation (bench/cv.py). The default split, R = 0.1,
is fold 0 of 10.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

import nin

ARCHIVE_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
ARCHIVE_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
ARCHIVE_BYTES = 228_813_984
DEFAULT_SOURCE = nin.DATA_DIR / "flower_photos"
VAL_RATIO = 0.1
SEED = 0


# --------------------------------------------------------------------------------------------- download


def download(url: str, dest: Path) -> None:
    """Fetch url into dest with a progress bar, via a .part file so dest is only ever complete."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                      disable=None) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(part, dest)
    # A connection cut mid-body raises http.client.IncompleteRead, not an OSError; a garbled Content-Length, a
    # ValueError.
    except (OSError, http.client.HTTPException, ValueError) as error:
        part.unlink(missing_ok=True)
        raise nin.CLIError(f"download of {url} failed ({error}); download it by hand and pass --archive FILE, "
                       f"or pass --source DIR") from None


def is_published_archive(archive: Path) -> bool:
    """Whether the archive is the published flower_photos.tgz: its size, then its sha256."""
    return archive.stat().st_size == ARCHIVE_BYTES and nin.sha256_of(archive) == ARCHIVE_SHA256


def extract(archive: Path, dest: Path) -> None:
    """Extract into a temporary folder beside dest, then rename: dest is complete or absent.

    Members with absolute paths or '..' are refused outright (tarfile's 'data' filter would strip the
    leading '/'), and so is any member whose place, or whose link's target, resolves outside the folder
    through the links extracted before it: the check that some Python versions' 'data' filter misses for
    chains of links (CVE-2025-4517). The filter itself refuses device files.
    """
    if not hasattr(tarfile, "data_filter"):  # new in Python 3.10.12, 3.11.4 and 3.12
        raise nin.CLIError(f"extracting {archive.name} safely needs Python 3.10.12, 3.11.4 or newer: upgrade Python, "
                           f"or extract it yourself and give the folder to --source")
    dest.parent.mkdir(parents=True, exist_ok=True)  # data/ itself may be gone
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    root = tmp.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=None):
                if member.name.startswith(("/", "\\")) or ".." in Path(member.name).parts:
                    raise tarfile.TarError(f"unsafe member {member.name!r}")
                place = root / member.name
                targets = [place.parent]
                if member.issym():
                    targets.append(place.parent / member.linkname)
                elif member.islnk():
                    targets.append(root / member.linkname)
                if not all(Path(os.path.realpath(t)).is_relative_to(root) for t in targets):
                    raise tarfile.TarError(f"member {member.name!r} leads outside the folder through a link")
                tar.extract(member, tmp, filter="data")
        # The archive holds one top folder (flower_photos/); use it, whatever its name.
        tops = [p for p in tmp.iterdir() if p.is_dir()]
        os.replace(tops[0] if len(tops) == 1 else tmp, dest)
    except (tarfile.TarError, OSError) as error:
        raise nin.CLIError(f"cannot extract {archive}: {error}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_flower_photos(dest: Path, archive: Path | None) -> None:
    downloaded = False
    if archive is None:
        archive = dest.parent / "flower_photos.tgz"
        if not archive.exists():  # else one an earlier run downloaded, or one put there by hand: checked, kept
            download(ARCHIVE_URL, archive)
            downloaded = True
    elif not archive.is_file():
        raise nin.CLIError(f"archive not found: {archive}")
    if not is_published_archive(archive):
        if downloaded:
            archive.unlink()
            raise nin.CLIError(f"the download of {ARCHIVE_URL} is corrupt (size or sha256 differs) and was deleted; "
                               f"run again")
        raise nin.CLIError(f"{archive} is not the flower_photos archive (size or sha256 differs); "
                           f"delete it and run again, or give the published one")
    extract(archive, dest)


# --------------------------------------------------------------------------------------------- split


def list_classes(source: Path) -> dict[str, list[Path]]:
    """Per-class files of source (hidden files and folders ignored). Special files and dangling links are
    listed too, so that is_usable_image warns about them as train.py and predict.py would. Folders inside a
    class folder are skipped with one warning for the class: the split is flat (class/photo), so their photos
    could collide."""
    if not source.is_dir():
        raise nin.CLIError(f"source folder not found: {source}")
    classes = {}
    try:
        for folder in sorted(d for d in source.iterdir() if d.is_dir() and not nin.is_hidden(d.name)):
            entries = sorted(e for e in folder.iterdir() if not nin.is_hidden(e.name))
            if inner := [e for e in entries if e.is_dir()]:
                hint = (f": move their photos up into {folder.name}" if any(nin.image_files(i) for i in inner)
                        else "")
                nin.warn(f"skipped the folder(s) {nin.few([i.name for i in inner])} inside {folder}: split_data.py "
                         f"takes each class folder's own files{hint}")
            classes[folder.name] = [e for e in entries if not e.is_dir()]
    except OSError as error:
        raise nin.CLIError(f"cannot read {source}: {error}") from None
    if not classes:
        raise nin.CLIError(f"{source} has no class folders (expected {source}/<class>/<image>)")
    if len(classes) < 2:
        raise nin.CLIError(f"{source} has one class folder ({next(iter(classes))}): a classifier needs at least two")
    return classes


def is_usable_image(path: Path) -> bool:
    """Whether train.py will use the file: an image name, and the whole file decodes (at reduced scale: fast,
    and truncated files are caught too). Warns with the reason when not."""
    if not nin.is_image_name(path):
        nin.warn(f"skipped {path}: not named like an image (.jpg, .png, ...), so train.py would not read it")
        return False
    try:
        nin.load_image(path, short_side=64)
        return True
    except nin.UnreadableImage as error:
        nin.warn(f"skipped {error}")
        return False


def val_fraction(content_sha256: str, seed: int) -> float:
    """A number in [0, 1) fixed by the photo's bytes and the seed alone."""
    digest = hashlib.sha256(f"{seed}:{content_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def val_fractions(files: Iterable[Path], seed: int, workers: int) -> dict[Path, float | None]:
    """val_fraction of each file, or None for a file that is not a readable image."""
    def fraction(path: Path) -> float | None:
        return val_fraction(nin.sha256_of(path), seed) if is_usable_image(path) else None

    files = list(files)
    with ThreadPoolExecutor(workers) as pool:
        fractions = list(tqdm(pool.map(fraction, files), total=len(files), desc="hash and check", unit="img",
                              disable=None))
    return dict(zip(files, fractions, strict=True))


def fold_of(fraction: float, folds: int) -> int:
    """The fold whose interval [I/K, (I+1)/K) holds the fraction."""
    return min(int(fraction * folds), folds - 1)


def sides_for(fractions: dict[Path, float | None], val_ratio: float | None = None,
              folds: int | None = None, fold: int | None = None) -> dict[Path, str | None]:
    """'train', 'val', or None (not an image) for each file: val below val_ratio, or val in the given fold."""
    def side(fraction: float | None) -> str | None:
        if fraction is None:
            return None
        in_val = fraction < val_ratio if folds is None else fold_of(fraction, folds) == fold
        return "val" if in_val else "train"

    return {f: side(fraction) for f, fraction in fractions.items()}


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_split(classes: dict[str, list[Path]], sides: dict[Path, str | None], out: Path) -> None:
    """Build the new train/ and val/ side by side in a folder of their own, then switch to it in one step.

    out/train and out/val are links into out/.split, itself a link to the current split's folder
    (.split-ID): replacing that one link is atomic, so whenever a run is cut, out/ holds both halves of one
    split, the old or the new. A lock keeps two runs on one out/ from deleting each other's work. Where links
    cannot be made (Windows without developer mode), the halves are moved in one after the other instead,
    and train.py refuses halves of two different splits (their .split_id files differ).
    """
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / ".split.lock"):
        current = out / ".split"
        in_use = os.readlink(current) if current.is_symlink() else None
        for stale in [*out.glob(".split-*"), *out.glob(".split.link-*")]:  # left by an interrupted run
            if stale.name != in_use:
                remove(stale)
        new = Path(tempfile.mkdtemp(dir=out, prefix=".split-"))
        os.chmod(new, 0o777 & ~nin.UMASK)  # mkdtemp's 0700 would make the split private to its writer
        try:
            fill(new, classes, sides)
            if links_work(out):
                switch_link(out, new)
            else:
                move_halves(out, new)
        except BaseException:
            if not (current.is_symlink() and os.readlink(current) == new.name):  # cut before the switch
                for half in ("train", "val"):  # a split from before links, moved aside: put back
                    if (aside := moved_aside(new, half)).exists() and not (out / half).is_dir():
                        remove(out / half)
                        os.replace(aside, out / half)
                remove(new)
            raise
        if in_use is not None:
            remove(out / in_use)


def fill(folder: Path, classes: dict[str, list[Path]], sides: dict[Path, str | None]) -> None:
    """folder/train/<class>/ and folder/val/<class>/ with each photo linked (or copied) to its side, and the
    split's id in both halves."""
    for half in ("train", "val"):
        for name in classes:
            (folder / half / name).mkdir(parents=True)
        (folder / half / nin.SPLIT_ID_FILE).write_text(folder.name + "\n")
    for name, files in classes.items():
        for f in files:
            if sides[f] is not None:
                link_or_copy(f, folder / sides[f] / name / f.name)


def switch_link(out: Path, new: Path) -> None:
    """Point out/.split at new, atomically; out/train and out/val (made once) point into out/.split."""
    for half in ("train", "val"):
        if (out / half).is_symlink() and os.readlink(out / half) != str(Path(".split") / half):
            (out / half).unlink()  # a link of the user's own, elsewhere: this split replaces it
        if not (out / half).is_symlink():
            if (out / half).exists():  # a split made before links were used: moved into the new folder, removed
                os.replace(out / half, moved_aside(new, half))
            os.symlink(Path(".split") / half, out / half)
    link = out / f".split.link-{new.name}"
    os.symlink(new.name, link)
    os.replace(link, out / ".split")
    for half in ("train", "val"):
        remove(moved_aside(new, half))


def move_halves(out: Path, new: Path) -> None:
    """Where links cannot be made: the old halves moved out, the new ones moved in (four renames)."""
    for half in ("train", "val"):
        if (out / half).exists():
            os.replace(out / half, moved_aside(new, half))
    for half in ("train", "val"):
        os.replace(new / half, out / half)
    remove(new)


def moved_aside(new: Path, half: str) -> Path:
    """Where a real out/train or out/val that a split replaces waits, inside the new split's folder, until the
    new split is in place (then it is removed with it) or has failed (then it is put back)."""
    return new / f"previous-{half}"


def links_work(folder: Path) -> bool:
    probe = folder / f".split.link-probe-{os.getpid()}"
    try:
        os.symlink("probe", probe)
    except (OSError, NotImplementedError):
        return False
    probe.unlink()
    return True


def remove(path: Path) -> None:
    """A link, a file or a whole folder (never what a link points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold path's lock for the block; another process holding it is a one-line error. (No lock where the
    platform has no fcntl, i.e. Windows.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise nin.CLIError(f"another split_data.py is writing {path.parent}: wait for it to end") from None
        yield


def split_table(classes: dict[str, list[Path]], sides: dict[Path, str | None]) -> str:
    rows = [(name, sum(sides[f] == "train" for f in files), sum(sides[f] == "val" for f in files))
            for name, files in classes.items()]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'class':<{width}}  {'train':>6}  {'val':>5}  {'val %':>5}"]
    lines += [f"{n:<{width}}  {t:>6}  {v:>5}  {100 * v / max(t + v, 1):>5.1f}" for n, t, v in rows]
    return "\n".join(lines)


def check_readable(classes: dict[str, list[Path]], fractions: dict[Path, float | None]) -> None:
    """Refuse a class folder without any usable image (val_fractions has said why each file was skipped)."""
    empty = [name for name, files in classes.items() if all(fractions[f] is None for f in files)]
    if empty:
        raise nin.CLIError(f"no readable images in class folder(s): {nin.few(empty)}")


# --------------------------------------------------------------------------------------------- main


def check_outside(out: Path, source: Path) -> None:
    """Refuse an --out inside the source folder: the next run would read it as photos (also bench/cv.py's)."""
    if out.resolve().is_relative_to(source.resolve()):
        raise nin.CLIError(f"--out {out} is inside the source folder {source}: choose another --out")


def check_out(out: Path, source: Path) -> None:
    """Refuse, before any work, an --out whose split would read its own output or remove photos that are not
    its own: a split replaces out/train and out/val and deletes the split they held, so they must be
    split_data.py's (every split it writes carries a .split_id file), and the source must lie outside them."""
    check_outside(out, source)
    replaced = [*out.glob(".split-*")]  # the current split's folder, and any left by an interrupted run
    for half in (out / "train", out / "val"):
        if half.is_dir() and not half.is_symlink():  # a link of the user's own is replaced, never followed
            if not (half / nin.SPLIT_ID_FILE).is_file():
                raise nin.CLIError(f"{half} has no {nin.SPLIT_ID_FILE} file, so split_data.py did not write it, and "
                                   f"a split replaces it: move it out of {out}, or choose another --out")
            replaced.append(half)
    for folder in replaced:
        if source.resolve().is_relative_to(folder.resolve()):
            raise nin.CLIError(f"the source folder {source} is inside the split that this one replaces "
                               f"({folder}): copy its photos elsewhere first")


def parse_args() -> argparse.Namespace:
    p = nin.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=None,
                   help=f"folder of per-class image folders (default: {DEFAULT_SOURCE}, downloaded if missing)")
    p.add_argument("--archive", type=Path, default=None,
                   help="a local copy of flower_photos.tgz to extract instead of downloading")
    p.add_argument("--out", type=Path, default=nin.DATA_DIR,
                   help="where train/ and val/ are written (default: %(default)s)")
    p.add_argument("--val-ratio", type=float, default=None,
                   help=f"share of the photos that goes to val/ (those whose hash number is below it, so each "
                        f"class gets about this share); 0: none, every photo trains (default: {VAL_RATIO})")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="cross-validation: cut the photos into K folds by their hash number (with --fold)")
    p.add_argument("--fold", type=int, default=None, metavar="I",
                   help="cross-validation: fold I (0 .. K-1) goes to val/, the other folds to train/")
    p.add_argument("--seed", type=int, default=SEED,
                   help="changes which photos go to val/ (default: %(default)s)")
    p.add_argument("--workers", type=int, default=nin.WORKERS,
                   help="threads that hash and check the photos (default: %(default)s)")
    args = p.parse_args()
    if (args.folds is None) != (args.fold is None):
        p.error("--folds K and --fold I go together")
    if args.folds is not None:
        if args.val_ratio is not None:
            p.error("give --val-ratio or --folds/--fold, not both")
        if args.folds < 2:
            p.error("--folds must be at least 2")
        if not 0 <= args.fold < args.folds:
            p.error(f"--fold must be between 0 and {args.folds - 1} (--folds {args.folds})")
    elif args.val_ratio is None:
        args.val_ratio = VAL_RATIO
    elif not 0 <= args.val_ratio < 1:
        p.error("--val-ratio must be at least 0 and below 1")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.source is not None and args.archive is not None:
        p.error("give --source or --archive, not both")
    return args


def main() -> None:
    args = parse_args()
    source = args.source or DEFAULT_SOURCE
    if args.archive is not None and source.is_dir():
        nin.warn(f"{source} is there already: --archive {args.archive} is not used (delete {source} to extract it)")
    check_out(args.out, source)
    if args.source is None and not source.is_dir():
        fetch_flower_photos(source, args.archive)
    classes = list_classes(source)
    fractions = val_fractions((f for files in classes.values() for f in files), args.seed, args.workers)
    check_readable(classes, fractions)
    sides = sides_for(fractions, args.val_ratio, args.folds, args.fold)
    write_split(classes, sides, args.out)
    print(split_table(classes, sides))
    print(f"wrote {args.out / 'train'} and {args.out / 'val'}"
          + (" (val/ is empty: every photo trains)" if args.val_ratio == 0 else ""))


if __name__ == "__main__":
    nin.run_cli(main)
