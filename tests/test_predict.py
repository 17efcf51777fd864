"""predict.py: top-k for files and folders, JSON, figures, every colour mode, and its errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, ROOT, assert_clean_error, draw, mutations, run
from PIL import Image

import nin


def predict(trained, *args, check: bool = True, process: bool = False):
    return run("predict.py", *args, "--weights", trained["weights"], "--class-idx", trained["class_idx"],
               "--out-dir", trained["dir"] / "predict", cwd=trained["dir"], check=check, process=process)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """One fresh drawing per colour, in every colour mode and format a user may have."""
    folder = tmp_path_factory.mktemp("photos")
    modes = [("RGB", ".jpg"), ("L", ".png"), ("RGBA", ".png"), ("P", ".png"), ("CMYK", ".jpg"),
             ("I;16", ".png")]
    return {(name, mode): draw(folder / f"{name}_{mode.replace(';', '')}{suffix}", colour, seed=500 + i,
                               size=(120, 90), mode=mode)
            for i, (name, colour) in enumerate(COLOURS.items()) for mode, suffix in modes}


def test_json_top_k_and_correct_colours(trained, photos):
    rgb = [photos[(name, "RGB")] for name in COLOURS]
    results = json.loads(predict(trained, *rgb, "--json", "--top-k", "2").stdout)
    assert [r["image"] for r in results] == [str(p) for p in rgb]
    for name, result in zip(COLOURS, results, strict=True):
        probs = [t["probability"] for t in result["top"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert result["top"][0]["class"] == name


def test_every_colour_mode_is_classified(trained, photos):
    results = json.loads(predict(trained, *photos.values(), "--json", "--top-k", "9").stdout)
    assert len(results) == len(photos)
    for result in results:
        assert len(result["top"]) == 3  # top-k is capped at the number of classes
        assert abs(sum(t["probability"] for t in result["top"]) - 1) < 1e-3


def test_text_output_and_no_display(trained, photos):
    result = predict(trained, photos[("red", "RGB")], process=True)  # a fresh matplotlib finds no display
    assert result.stdout.startswith(f"{photos[('red', 'RGB')]}: red ")
    assert "--save" in result.stdout  # no display: a hint instead of a blocked or crashed window


def test_save_writes_a_figure(trained, photos, tmp_path):
    figure = tmp_path / "figs" / "pred.png"
    predict(trained, photos[("red", "RGB")], photos[("blue", "P")], "--save", figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_folders_are_searched_and_bad_files_skipped(trained, photos, tmp_path):
    folder = tmp_path / "photos"  # a copy: the bad files stay out of the other tests' photos
    folder.mkdir()
    for photo in photos.values():
        shutil.copy(photo, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    result = predict(trained, folder, "--json")
    assert len(json.loads(result.stdout)) == len(photos)
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr


def test_hidden_files_and_folders_are_not_photos(trained, tmp_path):
    """macOS's `._photo.jpg` metadata beside a photo and Jupyter's checkpoint folder: neither predicted nor
    warned about, on a folder given to predict and in an --eval folder."""
    for folder in (tmp_path / "photos", tmp_path / "eval" / "red"):
        draw(folder / "red.jpg", COLOURS["red"], seed=77)
        (folder / "._red.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata, not a JPEG")
        draw(folder / ".ipynb_checkpoints" / "red-checkpoint.jpg", COLOURS["red"], seed=78)
    result = predict(trained, tmp_path / "photos", "--json")
    assert [Path(r["image"]).name for r in json.loads(result.stdout)] == ["red.jpg"]
    assert "skipped" not in result.stderr
    result = predict(trained, "--eval", tmp_path / "eval", "--out-dir", tmp_path / "out")
    assert result.stdout.startswith(f"1 image of {tmp_path / 'eval'}:")
    assert "skipped" not in result.stderr


def test_weights_saved_on_a_gpu_load_on_the_cpu(trained, tmp_path, monkeypatch):
    """A NiN.pth written on a GPU tags its tensors cuda:0; load_weights maps them to the CPU. The file is made
    here by tagging every tensor so while saving, as torch.save does on a GPU."""
    saved = torch.load(trained["weights"], weights_only=True)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(saved, tmp_path / "gpu.pth")
    if not torch.cuda.is_available():  # the file really is a GPU one: a plain torch.load refuses it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pth", weights_only=True)
    model = nin.load_weights(tmp_path / "gpu.pth", "cpu").model
    assert next(model.parameters()).device.type == "cpu"
    photo = draw(tmp_path / "red.png", COLOURS["red"], seed=4321)
    result = predict(trained, photo, "--json", "--device", "cpu", "--weights", tmp_path / "gpu.pth")
    assert json.loads(result.stdout)[0]["top"][0]["class"] == "red"


def test_class_index_that_disagrees_with_the_weights(trained, photos, tmp_path):
    bad = tmp_path / "c.json"
    nin.save_class_names(["blue", "green", "red", "purple"], bad)
    result = run("predict.py", photos[("red", "RGB")], "--weights", trained["weights"], "--class-idx", bad,
                 cwd=tmp_path, check=False)
    assert_clean_error(result, "does not match")


@pytest.mark.parametrize("problem", ["missing", "truncated", "not_a_pth"])
def test_bad_weights_are_clear_errors(trained, photos, tmp_path, problem):
    weights = tmp_path / "NiN.pth"
    if problem == "truncated":
        weights.write_bytes(trained["weights"].read_bytes()[:5000])
    elif problem == "not_a_pth":
        weights.write_text("hello")
    result = run("predict.py", photos[("red", "RGB")], "--weights", weights, "--class-idx",
                 trained["class_idx"], cwd=tmp_path, check=False)
    assert_clean_error(result, str(weights))


def test_missing_or_unreadable_image(trained, tmp_path):
    assert_clean_error(predict(trained, tmp_path / "nope.jpg", check=False), "image not found")
    (tmp_path / "fake.jpg").write_bytes(b"\x00" * 100)
    assert_clean_error(predict(trained, tmp_path / "fake.jpg", check=False), "cannot read image")
    assert_clean_error(predict(trained, tmp_path / "fake.jpg", "--top-k", "0", check=False), "--top-k")
    assert_clean_error(predict(trained, tmp_path / "fake.jpg", "--json", "--heatmap", check=False), "--json")
    assert_clean_error(predict(trained, tmp_path / "fake.jpg", "--device", "gpu", check=False), "--device gpu")
    (tmp_path / "empty_folder").mkdir()
    result = predict(trained, tmp_path / "empty_folder", check=False)
    assert_clean_error(result, "no image could be read")
    assert "no images in folder" in result.stderr


def test_missing_class_index(trained, photos, tmp_path):
    result = run("predict.py", photos[("red", "RGB")], "--weights", trained["weights"], "--class-idx",
                 tmp_path / "absent.json", cwd=tmp_path, check=False)
    assert_clean_error(result, "class index not found")


def test_several_images_give_a_csv_row_each(trained, photos, tmp_path):
    rgb = [photos[(name, "RGB")] for name in COLOURS]
    result = predict(trained, *rgb, "--save", tmp_path / "grid.png", "--heatmap")
    rows = nin.load_csv(trained["dir"] / "predict" / "predictions.csv")
    assert [r["image"] for r in rows] == [str(p) for p in rgb]
    assert [r["predicted"] for r in rows] == list(COLOURS)
    for row in rows:
        assert abs(sum(float(row[c]) for c in COLOURS) - 1) < 1e-3
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG" and "saved" in result.stdout


def test_single_image_figure_with_heatmap(trained, photos, tmp_path):
    for name, flags in (("heat.png", ["--heatmap"]), ("plain.png", [])):
        predict(trained, photos[("green", "RGB")], *flags, "--tta", "--save", tmp_path / name)
    heat, plain = (tmp_path / "heat.png").read_bytes(), (tmp_path / "plain.png").read_bytes()
    assert heat[:4] == plain[:4] == b"\x89PNG" and heat != plain  # the class map drawn over the photo


def test_class_maps_are_what_the_logits_pool_and_tta_averages_the_mirror(trained):
    import predict as predict_module

    saved = nin.load_weights(trained["weights"])
    model, size = saved.model, saved.image_size
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    probs, maps = predict_module.classify(model, images)
    logits = model(nin.normalize(images))
    torch.testing.assert_close(maps.mean((2, 3)), logits)
    torch.testing.assert_close(probs, logits.softmax(1))
    tta_probs, _ = predict_module.classify(model, images, tta=True)
    mirrored = model(nin.normalize(images.flip(-1)))
    torch.testing.assert_close(tta_probs, ((logits + mirrored) / 2).softmax(1))


def test_eval_reports_numbers_that_match_its_csv(trained, split_data_dir, tmp_path):
    import predict as predict_module

    val = tmp_path / "val"
    shutil.copytree(split_data_dir / "val", val)
    draw(val / "purple" / "p.jpg", (120, 0, 120), seed=3)  # a class the weights do not know
    for i, photo in enumerate(sorted((val / "red").iterdir())[:4]):  # mislabelled: mistakes to report
        photo.rename(val / "blue" / f"red-{i}.jpg")
    out = trained["dir"] / "predict"
    result = predict(trained, "--eval", val, "--json", "--top-k", "2")
    report = json.loads(result.stdout)
    assert "purple" in result.stderr and "not scored" in result.stderr
    rows = nin.load_csv(out / "eval_predictions.csv")
    n_images = len(list((split_data_dir / "val").glob("*/*.jpg")))
    assert report["images"] == len(rows) == n_images
    assert report["top1"] == pytest.approx(sum(int(r["correct"]) for r in rows) / len(rows), abs=1e-4)
    assert report["top1"] <= report["top2"] <= 1
    classes = report["classes"]
    cm = [[0] * len(classes) for _ in classes]
    for r in rows:
        cm[classes.index(r["true"])][classes.index(r["predicted"])] += 1
    assert report["confusion_matrix"] == cm
    wrong = sorted((r for r in rows if r["correct"] == "0"), key=lambda r: -float(r["probability"]))
    assert len({r["probability"] for r in wrong}) >= 2  # the red photos in blue/: an order to get right
    shown = wrong[:predict_module.MISTAKES_SHOWN]
    assert [m["image"] for m in report["mistakes"]] == [r["image"] for r in shown]  # most confident first
    for figure in ("eval_confusion.png", "eval_mistakes.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"


def test_eval_text_report(trained, split_data_dir):
    out = predict(trained, "--eval", split_data_dir / "val").stdout
    assert "top-1 accuracy" in out and "precision" in out and "confusion matrix" in out
    for name in COLOURS:
        assert any(line.startswith(name) for line in out.splitlines())


def test_photos_the_weights_trained_on_are_told_apart(trained, split_data_dir, tmp_path):
    """NiN.pth lists its training photos by content: scores on them warn, a temperature is not fitted on them,
    a renamed copy is still recognised, and held-out photos raise nothing."""
    training = sorted((split_data_dir / "train").glob("*/*.jpg"))
    assert len(torch.load(trained["weights"], weights_only=True)["trained_on"]) == len(training)
    renamed = tmp_path / "holiday.jpg"
    shutil.copy(training[0], renamed)
    assert f"{renamed} is a photo {trained['weights']} trained on" in predict(trained, renamed).stderr
    on_training = predict(trained, "--eval", split_data_dir / "train").stderr
    assert f"{len(training)} of the {len(training)} photos of" in on_training
    assert "trained" not in predict(trained, "--eval", split_data_dir / "val").stderr
    shutil.copy(trained["weights"], tmp_path / "w.pth")
    refused = run("predict.py", "--calibrate", split_data_dir / "train", "--weights", tmp_path / "w.pth",
                  "--class-idx", trained["class_idx"], cwd=tmp_path, check=False)
    assert_clean_error(refused, "a temperature fitted on them would be wrong")
    assert (tmp_path / "w.pth").read_bytes() == trained["weights"].read_bytes()


def test_eval_of_a_folder_without_known_classes(trained, tmp_path):
    draw(tmp_path / "val" / "purple" / "p.jpg", (120, 0, 120), seed=3)
    assert_clean_error(predict(trained, "--eval", tmp_path / "val", check=False), "no images in folders")


class RunsCode:
    """A pickle that would create a file when unpickled, as a malicious .pth could."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pth_carrying_code_is_refused_and_runs_nothing(trained, photos, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "NiN.pth"
    torch.save({"model": RunsCode(marker), "config": {}, "classes": [], "image_size": 64}, evil)
    result = run("predict.py", photos[("red", "RGB")], "--weights", evil, "--class-idx", trained["class_idx"],
                 cwd=tmp_path, check=False)
    assert_clean_error(result, "holds Python objects, not only tensors, and loading it could run code")
    assert "weights_only=False" not in result.stderr  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()


def test_weights_of_another_architecture_or_class_count(trained, photos, tmp_path):
    other = tmp_path / "other.pth"
    model = nin.NiN(7)
    nin.save_weights(model, [f"c{i}" for i in range(7)], 64, other)
    result = run("predict.py", photos[("red", "RGB")], "--weights", other, "--class-idx", trained["class_idx"],
                 cwd=tmp_path, check=False)
    assert_clean_error(result, "does not match")
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"fc.weight": torch.zeros(3, 3)}, "config": {"num_classes": 3}, "classes": ["a", "b", "c"],
                "image_size": 64}, foreign)
    result = run("predict.py", photos[("red", "RGB")], "--weights", foreign, "--class-idx", trained["class_idx"],
                 cwd=tmp_path, check=False)
    assert_clean_error(result, "does not fit the NiN architecture")


SHIPPED_CLASSES = {"daisy.jpg": "daisy", "dandelion.jpg": "dandelion", "rose.jpg": "roses",
                   "sunflower.jpg": "sunflowers", "tulip.jpg": "tulips"}


def shipped(name: str, tmp_path: Path) -> Path:
    """The committed NiN.pth or class_idx.json, copied out of git: `python train.py` replaces the working ones."""
    git = shutil.which("git")
    blob = git and subprocess.run([git, "-C", ROOT, "show", f"HEAD:./{name}"], capture_output=True)
    if not blob or blob.returncode != 0:
        pytest.skip(f"the shipped {name} is read from git, and there is no git checkout at {ROOT}")
    (tmp_path / name).write_bytes(blob.stdout)
    return tmp_path / name


def test_shipped_weights_classify_every_test_photo(tmp_path):
    weights, class_idx = shipped("NiN.pth", tmp_path), shipped("class_idx.json", tmp_path)
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    assert saved["classes"] == sorted(set(SHIPPED_CLASSES.values()))
    result = run("predict.py", *(nin.ROOT / "test_img" / name for name in SHIPPED_CLASSES), "--json",
                 "--weights", weights, "--class-idx", class_idx, "--out-dir", tmp_path, cwd=tmp_path)
    predicted = {Path(r["image"]).name: r["top"][0]["class"] for r in json.loads(result.stdout)}
    assert predicted == SHIPPED_CLASSES
    assert f"{len(SHIPPED_CLASSES)} of these {len(SHIPPED_CLASSES)} images are photos" in result.stderr  # it saw them


def test_fuzzed_files_never_show_a_traceback(tmp_path):
    """25 random and damaged files beside one intact photo: each is classified or skipped with a warning."""
    folder = tmp_path / "fuzz"
    draw(folder / "intact.jpg", COLOURS["red"], seed=7)
    for i, data in enumerate(mutations(seed=2, count=25, tmp_path=tmp_path)):
        (folder / f"f{i}.jpg").write_bytes(data)
    weights, class_idx = tmp_path / "NiN.pth", tmp_path / "c.json"
    nin.save_weights(nin.NiN(2), ["a", "b"], 64, weights)
    nin.save_class_names(["a", "b"], class_idx)
    result = run("predict.py", folder, "--weights", weights, "--class-idx", class_idx, "--json",
                 "--out-dir", tmp_path / "out", cwd=tmp_path, check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    classified, skipped = len(json.loads(result.stdout)), result.stderr.count("warning: skipped")
    assert classified >= 1 and skipped > 0 and classified + skipped == 26


def doctored(trained, tmp_path, change) -> Path:
    """A copy of the trained NiN.pth with change(saved) applied."""
    saved = torch.load(trained["weights"], weights_only=True)
    change(saved)
    torch.save(saved, tmp_path / "doctored.pth")
    return tmp_path / "doctored.pth"


@pytest.mark.parametrize("change,named", [
    (lambda s: s["config"].update(colour="blue"), "not NiN's"),
    (lambda s: s.update(config=[3]), "not a NiN.pth"),
    (lambda s: s.update(classes="blue"), "not a NiN.pth"),
    (lambda s: s.update(classes=["blue", "green"]), "3 outputs but 2 class names"),
    (lambda s: s.update(image_size="64"), "not a NiN.pth"),
    (lambda s: s.update(image_size=20000), "image size 20000"),
    (lambda s: s["model"]["features.0.0.weight"].fill_(float("nan")), "NaN or infinite weights"),
    (lambda s: s["calibration"].update(temperature="hot"), "calibration is not one this code wrote"),
    (lambda s: s.update(calibration=[1.0]), "calibration is not one this code wrote"),
    (lambda s: s["calibration"].update(temperature=float("nan")), "calibration is out of range"),
])
def test_weights_from_elsewhere_are_one_line_errors(trained, photos, tmp_path, change, named):
    weights = doctored(trained, tmp_path, change)
    result = run("predict.py", photos[("red", "RGB")], "--weights", weights, "--class-idx", trained["class_idx"],
                 "--json", cwd=tmp_path, check=False)
    assert_clean_error(result, named)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"' + "9" * 5000 + '": "a"}'])
def test_class_index_bombs_are_one_line_errors(trained, photos, tmp_path, text):
    (tmp_path / "c.json").write_text(text)
    result = run("predict.py", photos[("red", "RGB")], "--weights", trained["weights"], "--class-idx",
                 tmp_path / "c.json", cwd=tmp_path, check=False)
    assert_clean_error(result, "c.json")
    assert len(result.stderr) < 1000


def test_special_files_are_skipped_never_waited_on(trained, photos, tmp_path):
    """A FIFO named like a photo would block open() forever: it is not a regular file, so it is no image."""
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result = run("predict.py", fifo, photos[("red", "RGB")], "--json", "--weights", trained["weights"],
                 "--class-idx", trained["class_idx"], cwd=tmp_path)
    assert "pipe.jpg: not a regular file" in result.stderr and len(json.loads(result.stdout)) == 1
    alone = run("predict.py", fifo, "--weights", trained["weights"], "--class-idx", trained["class_idx"],
                cwd=tmp_path, check=False)
    assert_clean_error(alone, "not a regular file")
    folder = tmp_path / "folder"  # among the photos of a folder, too
    folder.mkdir()
    fifo.rename(folder / "pipe.jpg")
    shutil.copy(photos[("red", "RGB")], folder)
    result = run("predict.py", folder, "--json", "--weights", trained["weights"], "--class-idx", trained["class_idx"],
                 cwd=tmp_path)
    assert "pipe.jpg: not a regular file" in result.stderr and len(json.loads(result.stdout)) == 1


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_names_that_are_not_utf8_are_printed_escaped(trained, photos, tmp_path):
    import os

    name = os.fsencode(tmp_path) + b"/fleur-\xe9t\xe9.jpg"  # Latin-1, as an old camera or archive may write
    with open(name, "wb") as f:
        f.write(photos[("red", "RGB")].read_bytes())
    for flags, process in ((["--save", tmp_path / "p.png"], True), (["--json"], False)):  # a real stdout for text
        result = run("predict.py", os.fsdecode(name), *flags, "--weights", trained["weights"], "--class-idx",
                     trained["class_idx"], cwd=tmp_path, process=process)
        assert "fleur-\\udce9t\\udce9.jpg" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--eval", "val", "--save", "e.png"], "--save names the figure of the images"),
    (["--calibrate", "val", "--save", "c.png"], "--save names the figure of the images"),
    (["--calibrate", "val", "--not-sure", "0.5"], "fits the 'not sure' threshold itself"),
    (["--calibrate", "val", "--tta"], "not with --json, --heatmap, --tta"),
    (["--calibrate", "val", "--json"], "not with --json, --heatmap, --tta"),
    (["--calibrate", "val", "--heatmap"], "not with --json, --heatmap, --tta"),
    (["--calibrate", "val", "--top-k", "3"], "--tta, --top-k or --out-dir"),  # even at the default's value
    (["--calibrate", "val", "--out-dir", "x"], "--tta, --top-k or --out-dir"),
    (["x.jpg", "--json", "--heatmap"], "--json draws no figure"),
    (["x.jpg", "--json", "--save", "p.png"], "--json draws no figure")],
    ids=["eval-save", "calibrate-save", "calibrate-not-sure", "calibrate-tta", "calibrate-json", "calibrate-heatmap",
         "calibrate-top-k", "calibrate-out-dir", "json-heatmap", "json-save"])
def test_flags_that_would_be_ignored_are_refused(tmp_path, flags, message):
    assert_clean_error(run("predict.py", *flags, cwd=tmp_path, check=False), message)


@pytest.mark.parametrize("problem", ["unknown format", "a folder", "inside a file"])
def test_outputs_that_cannot_be_written_are_refused_before_any_work(trained, photos, tmp_path, problem):
    save, named = tmp_path / "figure.png", "is a folder"
    if problem == "unknown format":
        save, named = tmp_path / "figure.xyz", "not a figure format"
    elif problem == "a folder":
        save.mkdir()
    else:
        (tmp_path / "plain").write_text("a file where a folder should be")
        save, named = tmp_path / "plain" / "figure.png", "is a file, not a folder"
    result = run("predict.py", photos[("red", "RGB")], "--save", save, "--weights", trained["weights"],
                 "--class-idx", trained["class_idx"], cwd=tmp_path, check=False)
    assert_clean_error(result, named)


def test_out_dir_is_checked_only_when_something_goes_there(trained, photos, tmp_path):
    """One image writes nothing into --out-dir, so a folder that cannot be written does not stop it; two images
    write predictions.csv there, so it does."""
    (tmp_path / "plain").write_text("a file where a folder should be")
    image = photos[("red", "RGB")]
    flags = ["--weights", trained["weights"], "--class-idx", trained["class_idx"], "--out-dir",
             tmp_path / "plain" / "out", "--save", tmp_path / "one.png"]
    assert "red" in run("predict.py", image, *flags, cwd=tmp_path).stdout
    assert_clean_error(run("predict.py", image, image, *flags, cwd=tmp_path, check=False), "is a file, not a folder")


def test_an_invalid_matplotlib_backend_is_one_line(trained, photos, split_data_dir, tmp_path):
    """An error where predict.py draws the images (it may show them); --eval writes its figures through
    matplotlib's file backend, whatever MPLBACKEND says, as train.py and bench/cv.py do."""
    def with_bad_backend(*flags: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, ROOT / "predict.py", *flags, "--weights", trained["weights"],
                               "--class-idx", trained["class_idx"]], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "MPLBACKEND": "no-such-backend"})

    assert_clean_error(with_bad_backend(photos[("red", "RGB")]), "matplotlib cannot start")
    result = with_bad_backend("--eval", split_data_dir / "val", "--out-dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "eval" / "eval_confusion.png").is_file()


def test_a_sliver_of_an_image_is_refused_from_its_header(trained, photos, tmp_path):
    Image.new("RGB", (100_000, 1)).save(tmp_path / "sliver.png")  # 0.1 megapixels, but gigabytes to resize
    result = run("predict.py", tmp_path / "sliver.png", photos[("red", "RGB")], "--json", "--weights",
                 trained["weights"], "--class-idx", trained["class_idx"], cwd=tmp_path)
    assert "not a photo's shape" in result.stderr and len(json.loads(result.stdout)) == 1


def predict_with(weights: Path, trained, *args):
    """predict.py with other weights than the trained ones (and their class map)."""
    return run("predict.py", *args, "--weights", weights, "--class-idx", trained["class_idx"],
               "--out-dir", trained["dir"] / "predict", cwd=trained["dir"])


def calibrated_copy(trained, tmp_path, **calibration) -> Path:
    saved = torch.load(trained["weights"], weights_only=True)
    saved["calibration"] = {"temperature": 1.0, "not_sure_below": 0.0, "fitted_on": "a test", **calibration}
    torch.save(saved, tmp_path / "calibrated.pth")
    return tmp_path / "calibrated.pth"


def test_calibrate_on_a_folder_or_on_out_of_fold_predictions(trained, split_data_dir, tmp_path):
    held_out = tmp_path / "held_out"
    shutil.copytree(split_data_dir / "val", held_out)
    for name, other in zip(COLOURS, [*list(COLOURS)[1:], next(iter(COLOURS))], strict=True):  # a few wrong labels,
        for photo in sorted((held_out / name).glob("*.jpg"))[:2]:  # as real data has: the fit has an optimum
            photo.rename(held_out / other / f"moved-{photo.name}")
    weights = calibrated_copy(trained, tmp_path)
    result = run("predict.py", "--calibrate", held_out, "--weights", weights, "--class-idx",
                 trained["class_idx"], cwd=tmp_path)
    calibration = nin.load_weights(weights).calibration
    assert f"temperature {calibration.temperature:.3f}" in result.stdout and "held_out" in calibration.fitted_on
    assert 0 < calibration.not_sure_below < 1
    # The same photos as bench/cv.py's CSV of probabilities: the same temperature.
    saved = nin.load_weights(weights)
    model, classes, size = saved.model, saved.classes, saved.image_size
    paths = sorted(held_out.glob("*/*.jpg"))
    with torch.no_grad():
        logits = model(nin.normalize(torch.stack([nin.eval_tensor(p, size) for p in paths])))
    rows = [{"photo": f"{p.parent.name}/{p.name}", "label": p.parent.name,
             **{f"p_{c}": f"{q:.6g}" for c, q in zip(classes, row.softmax(0).tolist(), strict=True)}}
            for p, row in zip(paths, logits, strict=True)]
    nin.save_csv(rows, tmp_path / "oof_predictions.csv")
    run("predict.py", "--calibrate", tmp_path / "oof_predictions.csv", "--weights", weights, "--class-idx",
        trained["class_idx"], cwd=tmp_path)
    assert nin.load_weights(weights).calibration.temperature == pytest.approx(calibration.temperature, rel=1e-2)


@pytest.mark.parametrize("content,named", [
    ("photo,label\nred/a.jpg,red\n", "not an oof_predictions.csv"),
    ("label,{p}\nred,{ones}\nred\n", "line 3: too few columns"),
    ("label,{p}\npurple,{ones}\n", "line 2: too few columns, or a label"),
    ("label,{p}\nred,{ones}\nred,{words}\n", "line 3: a probability that is not a number from 0 to 1"),
    ("label,{p}\nred,\"{ones}\n", "line 2"),  # a quote that never closes: the row swallows the file
    ("label,{p}\nred,{ones}\nred,{nans}\n", "line 3: a probability that is not a number from 0 to 1"),
    ("label,{p}\nred,{twos}\n", "line 2: a probability that is not a number from 0 to 1"),
])
def test_calibrate_refuses_a_broken_predictions_file(trained, tmp_path, content, named):
    classes = nin.load_class_names(trained["class_idx"])
    (tmp_path / "oof.csv").write_text(content.format(p=",".join(f"p_{c}" for c in classes),
                                                     ones=",".join("1" for _ in classes),
                                                     words=",".join("x" for _ in classes),
                                                     nans=",".join("nan" for _ in classes),
                                                     twos=",".join("2" for _ in classes)))
    weights = calibrated_copy(trained, tmp_path)
    before = weights.read_bytes()
    result = run("predict.py", "--calibrate", tmp_path / "oof.csv", "--weights", weights,
                 "--class-idx", trained["class_idx"], cwd=tmp_path, check=False)
    assert_clean_error(result, named)
    assert weights.read_bytes() == before


def test_probabilities_use_the_stored_temperature_and_old_weights_the_raw_softmax(trained, photos, tmp_path):
    saved = torch.load(trained["weights"], weights_only=True)
    del saved["calibration"]  # as written before calibration existed
    torch.save(saved, tmp_path / "old.pth")
    assert nin.load_weights(tmp_path / "old.pth").calibration == nin.Calibration()
    photo = photos[("red", "RGB")]
    raw = json.loads(predict_with(tmp_path / "old.pth", trained, photo, "--json").stdout)[0]["top"]
    hot = json.loads(predict_with(calibrated_copy(trained, tmp_path, temperature=4.0), trained, photo, "--json"
                                  ).stdout)[0]["top"]
    assert raw[0]["class"] == hot[0]["class"] == "red"  # the temperature never changes the answer...
    saved = nin.load_weights(trained["weights"])
    with torch.no_grad():
        logits = saved.model(nin.normalize(nin.eval_tensor(photo, saved.image_size)[None]))[0]
    assert hot[0]["probability"] == pytest.approx(float((logits / 4).softmax(0).max()), abs=1e-4)  # ...only how sure
    assert hot[0]["probability"] < raw[0]["probability"]


def test_not_sure_in_text_json_csv_and_eval(trained, photos, split_data_dir, tmp_path):
    # a temperature so high that every answer is nearly a three-way tie: below the threshold whatever the logits
    weights = calibrated_copy(trained, tmp_path, temperature=100.0, not_sure_below=0.9)
    images = [photos[("red", "RGB")], photos[("blue", "RGB")]]
    text = predict_with(weights, trained, *images, "--save", tmp_path / "grid.png").stdout
    assert text.count("not sure (best guess: ") == 2
    listed = json.loads(predict_with(weights, trained, *images, "--json").stdout)
    assert [r["not_sure"] for r in listed] == [True, True]
    assert [r["not_sure"] for r in nin.load_csv(trained["dir"] / "predict" / "predictions.csv")] == ["1", "1"]
    sure = json.loads(predict_with(weights, trained, *images, "--json", "--not-sure", "0").stdout)
    assert [r["not_sure"] for r in sure] == [False, False]  # the flag wins over the stored threshold
    for flags, answered in (([], 0.0), (["--not-sure", "0"], 1.0)):  # in --eval's report too
        report = json.loads(predict_with(weights, trained, "--eval", split_data_dir / "val", "--json", *flags).stdout)
        assert report["answered"] == answered
        rows = nin.load_csv(trained["dir"] / "predict" / "eval_predictions.csv")  # and in each photo's row
        assert {r["not_sure"] for r in rows} == {"0" if answered else "1"}
        assert all(m["not_sure"] == (not answered) for m in report["mistakes"])


def test_eval_reports_calibration_and_draws_a_reliability_diagram(trained, split_data_dir, tmp_path):
    weights = calibrated_copy(trained, tmp_path, temperature=2.0, not_sure_below=0.6)
    result = predict_with(weights, trained, "--eval", split_data_dir / "val", "--json")
    report = json.loads(result.stdout)
    rows = nin.load_csv(trained["dir"] / "predict" / "eval_predictions.csv")  # each photo's calibrated top probability
    confidence = torch.tensor([float(r["probability"]) for r in rows], dtype=torch.float64)
    correct = torch.tensor([float(r["correct"]) for r in rows], dtype=torch.float64)
    assert report["ece"] == pytest.approx(nin.calibration_gap(confidence, correct), abs=2e-3)
    assert report["ece"] != report["ece_raw"]
    assert 0 < report["ece_if_calibrated"] < 1
    answered = [float(r["probability"]) >= 0.6 for r in rows]
    assert report["answered"] == pytest.approx(sum(answered) / len(answered), abs=1e-4)
    assert (trained["dir"] / "predict" / "eval_reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_temperature_fit_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=generator) * 3
    labels = torch.multinomial((logits / 2.5).softmax(1), 1, generator=generator)[:, 0]  # drawn as if T were 2.5
    assert nin.fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    calibrated = (logits / 2.5).softmax(1)
    assert nin.expected_calibration_error(calibrated, labels) < 0.03 < nin.expected_calibration_error(
        logits.softmax(1), labels)  # the raw softmax of these logits is overconfident


def test_ece_floor_is_what_a_calibrated_model_reads_on_so_few_photos():
    generator = torch.Generator().manual_seed(0)
    probs = (torch.randn(20 * 300, 5, generator=generator) * 1.2).softmax(1)
    labels = torch.multinomial(probs, 1, generator=generator)[:, 0]  # calibrated by construction
    measured = [nin.expected_calibration_error(probs[i:i + 300], labels[i:i + 300]) for i in range(0, 6000, 300)]
    floor = nin.ece_of_a_calibrated_model(probs[:300])
    assert sum(measured) / len(measured) == pytest.approx(floor, rel=0.2)
    assert nin.ece_of_a_calibrated_model(probs) < floor / 3  # 20 times the photos: about a fourth of the floor
