"""nin.py: the architecture, the shared image preprocessing and the weight files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, draw, mutations, run
from PIL import Image

import nin


def expected_parameters(num_classes: int, batch_norm: bool = True, head_width: int = nin.HEAD_WIDTH) -> int:
    """Counted from the paper's geometry: k*k*in*out weights per conv, plus BN's scale and shift (2*out), or a
    bias (out) where there is no BN: everywhere in the faithful net, and on the very last conv by default.
    The last block is head_width wide (0: num_classes) and ends in num_classes maps."""
    blocks = [(3, 96, 11), (96, 256, 5), (256, 384, 3), (384, head_width or num_classes, 3)]
    convs = [(cin_, cout, k_) for cin, cout, k in blocks for cin_, k_ in ((cin, k), (cout, 1), (cout, 1))]
    convs[-1] = (convs[-1][0], num_classes, 1)
    total = 0
    for i, (cin, cout, k) in enumerate(convs):
        has_bn = batch_norm and i < len(convs) - 1
        total += cin * cout * k * k + (2 * cout if has_bn else cout)
    return total


@pytest.mark.parametrize("num_classes", [2, 5, 17])
@pytest.mark.parametrize("size", [64, 96, 128, 224])
def test_logit_shape_for_any_size_and_class_count(num_classes, size):
    model = nin.NiN(num_classes).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, num_classes)


@pytest.mark.parametrize("num_classes", [5, 10])
def test_parameter_count_matches_the_geometry(num_classes):
    count = sum(p.numel() for p in nin.NiN(num_classes).parameters())
    assert count == expected_parameters(num_classes)
    faithful = sum(p.numel() for p in nin.NiN(num_classes, faithful=True).parameters())
    assert faithful == expected_parameters(num_classes, batch_norm=False)
    narrow = sum(p.numel() for p in nin.NiN(num_classes, head_width=0).parameters())
    assert narrow == expected_parameters(num_classes, head_width=0)


def test_wide_head_still_ends_in_one_map_per_class():
    model = nin.NiN(5, head_width=64).eval()
    assert model.class_maps(torch.randn(2, 3, 96, 96)).shape[:2] == (2, 5)
    assert model.config["head_width"] == 64


def test_default_class_maps_are_linear_and_faithful_is_classic():
    default, faithful = nin.NiN(5), nin.NiN(5, faithful=True)
    assert isinstance(default.features[-1][-1], torch.nn.Conv2d)  # no ReLU can zero the logits
    assert isinstance(faithful.features[-1][-1], torch.nn.ReLU)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in faithful.modules())
    assert faithful.config == {"num_classes": 5, "batch_norm": False, "dropout": 0.5, "faithful": True,
                               "head_width": nin.HEAD_WIDTH}


def test_logits_are_the_means_of_the_class_maps():
    model = nin.NiN(4).eval()
    x = torch.randn(3, 3, 128, 128)
    maps = model.class_maps(x)
    assert maps.shape[:2] == (3, 4) and maps.shape[2] > 1
    torch.testing.assert_close(model(x), maps.mean((2, 3)))


def test_default_model_learns_from_a_random_init():
    """The dead-logit trap: loss must leave ln(num_classes) within a few steps on separable data."""
    torch.manual_seed(0)
    model = nin.NiN(2)
    x = torch.cat([torch.full((8, 3, 64, 64), 1.0), torch.full((8, 3, 64, 64), -1.0)]) + torch.randn(16, 3, 64, 64)
    y = torch.tensor([0] * 8 + [1] * 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_too_small_input_fails():
    with pytest.raises(RuntimeError):
        nin.NiN(5)(torch.randn(1, 3, nin.MIN_IMAGE_SIZE - 8, nin.MIN_IMAGE_SIZE - 8))


def test_nin_script_prints_shapes_and_parameters(tmp_path):
    out = run("nin.py", "--num-classes", "5", "--image-size", "224", cwd=tmp_path).stdout
    assert "(1, 5, 6, 6)" in out  # the class maps at 224 px
    assert f"parameters: {expected_parameters(5):,}" in out  # the default network


@pytest.mark.parametrize("mode,suffix", [("RGB", ".jpg"), ("L", ".png"), ("RGBA", ".png"), ("P", ".png"),
                                         ("CMYK", ".jpg"), ("I;16", ".png"), ("LA", ".png")])
def test_eval_tensor_accepts_every_colour_mode(tmp_path, mode, suffix):
    path = draw(tmp_path / f"img{suffix}", (200, 30, 30), seed=1, size=(150, 100), mode=mode)
    image = nin.eval_tensor(path, 64)
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    if mode == "I;16":  # 16-bit greys keep their range instead of clipping to white
        assert 40 < image.float().mean() < 220


def test_eval_tensor_resizes_short_side_then_centre_crops(tmp_path):
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # white middle third
    img.save(tmp_path / "wide.png")
    assert nin.eval_tensor(tmp_path / "wide.png", 64).float().mean() > 250  # only the middle survives


def test_weights_round_trip_and_class_index(tmp_path):
    model = nin.NiN(3, dropout=0.2)
    nin.save_weights(model, ["a", "b", "c"], 96, tmp_path / "w.pth")
    saved = nin.load_weights(tmp_path / "w.pth")
    loaded, classes = saved.model, saved.classes
    assert classes == ["a", "b", "c"] and saved.image_size == 96 and not loaded.training
    assert saved.calibration == nin.Calibration() and saved.trained_on is None  # none given: the raw softmax
    for key, value in model.state_dict().items():  # float16 on disk, float32 again once loaded
        assert loaded.state_dict()[key].dtype == value.dtype
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-3, atol=1e-5)
    nin.save_class_names(classes, tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == {"0": "a", "1": "b", "2": "c"}
    assert nin.load_class_names(tmp_path / "c.json") == classes


@pytest.mark.parametrize("stored", ["no head_width", None])
def test_weights_from_before_the_wide_head_still_load_narrow(tmp_path, stored):
    nin.save_weights(nin.NiN(3, head_width=0), ["a", "b", "c"], 96, tmp_path / "w.pth")
    saved = torch.load(tmp_path / "w.pth", weights_only=True)
    if stored is None:
        saved["config"]["head_width"] = None
    else:
        del saved["config"]["head_width"]
    torch.save(saved, tmp_path / "w.pth")
    model = nin.load_weights(tmp_path / "w.pth").model
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(3, head_width=0)


def test_weights_are_stored_as_float16_and_predict_the_same(tmp_path):
    torch.manual_seed(0)
    model = nin.NiN(5, head_width=64)
    with torch.no_grad():  # trained-looking batch-norm statistics, one of them beyond float16's range
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-2, 2)
                m.running_var.uniform_(0.5, 3)
        model.features[0][1].running_var[0] = 1e6
        model.features[0][1].running_var[1] = 7e4
    nin.save_weights(model, list("abcde"), 96, tmp_path / "w.pth")
    stored = torch.load(tmp_path / "w.pth", weights_only=True)["model"]
    assert stored["features.0.0.weight"].dtype == torch.float16
    assert stored["features.0.1.running_var"].dtype == torch.float32  # 7e4 > 65504: kept exact
    loaded = nin.load_weights(tmp_path / "w.pth").model
    x = torch.randn(8, 3, 96, 96)
    with torch.no_grad():
        before, after = model.eval()(x).softmax(1), loaded(x).softmax(1)
    assert (before - after).abs().max() < 1e-2
    assert torch.equal(before.argmax(1), after.argmax(1))


@pytest.mark.parametrize("text", ['["a", "b"]', '{"1": "a", "2": "b"}', '{"0": 3}', "{nope"])
def test_malformed_class_index_is_a_clear_error(tmp_path, text):
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(nin.CLIError):
        nin.load_class_names(tmp_path / "c.json")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "NiN.pth"
    target.write_bytes(b"old")

    def explode(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        nin.atomic_write(target, explode)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_temporaries_left_by_a_killed_run_are_cleaned_on_the_next_write(tmp_path):
    import os
    import time

    target = tmp_path / "checkpoint.pth"
    stale, fresh = tmp_path / ".checkpoint.pth.abc123.tmp", tmp_path / ".checkpoint.pth.def456.tmp"
    for leftover in (stale, fresh):
        leftover.write_bytes(b"half a checkpoint")
    old = time.time() - nin.STALE_SECONDS - 60
    os.utime(stale, (old, old))
    nin.atomic_write(target, lambda f: f.write(b"new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, fresh.name])  # fresh: maybe in use


def test_device_is_picked_or_refused_by_name(monkeypatch):
    for cuda, mps, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert nin.pick_device(None).type == expected
    monkeypatch.undo()
    assert nin.pick_device("cpu") == torch.device("cpu")
    for name, message in [("gpu", "not a device name"), ("meta", "not a device name"),
                          ("cuda:99", "no such CUDA GPU here")]:
        with pytest.raises(nin.CLIError, match=message):
            nin.pick_device(name)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "824633720832 bytes"), MemoryError()], ids=["gpu", "cpu", "python"])
def test_running_out_of_memory_is_one_line(error, capsys):
    def main() -> None:
        raise error

    with pytest.raises(SystemExit) as exited:
        nin.run_cli(main)
    message = capsys.readouterr().err
    assert exited.value.code == 2 and "out of memory" in message and "smaller batch" in message
    assert len(message.splitlines()) == 1


def test_other_runtime_errors_keep_their_traceback():
    """A bug must not be dressed up as the user's problem."""
    def main() -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        nin.run_cli(main)


def test_repo_paths_do_not_depend_on_the_working_folder():
    assert nin.ROOT == ROOT and nin.WEIGHTS_PATH.parent == ROOT and nin.DATA_DIR == ROOT / "data"


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (120, 60), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 60, 60))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.save(tmp_path / "rotated.jpg", exif=exif)
    upright = nin.load_image(tmp_path / "rotated.jpg")
    assert upright.size == (60, 120)
    top = upright.crop((0, 0, 60, 40)).convert("RGB").resize((1, 1)).getpixel((0, 0))
    assert top[0] > 200 and top[2] < 60  # red ends up on top


def test_non_ascii_and_space_names(tmp_path):
    path = draw(tmp_path / "fleurs d'été" / "rosé 1 — 🌹.png", (200, 30, 30), seed=2)
    assert nin.eval_tensor(path, 64).shape == (3, 64, 64)


@pytest.mark.parametrize("width,height", [(12_000, 10_000), (100_000, 100_000)])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, width, height):
    """A tiny PNG whose header declares a huge image: refused from the header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(nin.UnreadableImage, match="pixels is over"):
        nin.eval_tensor(tmp_path / "bomb.png", 64)


def test_fuzzed_files_give_an_image_or_the_clear_error(tmp_path):
    """predict.py's loader on 300 random and mutated files: a uint8 image or UnreadableImage, nothing else."""
    decoded = refused = 0
    for i, data in enumerate(mutations(seed=1, count=300, tmp_path=tmp_path)):
        path = tmp_path / f"fuzz{i}.jpg"
        path.write_bytes(data)
        try:
            image = nin.eval_tensor(path, 64)
        except nin.UnreadableImage as error:
            assert str(path) in str(error)
            refused += 1
        else:
            assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
            decoded += 1
    assert decoded > 0 and refused > 0


def test_image_files_follow_links_to_folders_once_and_skip_hidden_ones(tmp_path):
    """As torchvision's ImageFolder does for train.py: a linked class folder is read; a link back to a parent is
    read once, not forever; hidden folders and files not named like images are left out."""
    folder, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    for path in (folder / "a.jpg", elsewhere / "b.png", folder / ".ipynb_checkpoints" / "c.jpg"):
        draw(path, (200, 30, 30), seed=1)
    (folder / "notes.txt").write_text("not a photo")
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    assert nin.image_files(folder) == [folder / "a.jpg", folder / "linked" / "b.png"]


def test_a_class_without_photos_has_no_recall_and_stays_out_of_the_macro_average():
    cm = torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]])  # no photo of c (as in a val/ that got none of it)
    lines = nin.classification_report(cm, ["a", "b", "c"]).splitlines()
    assert lines[3].split() == ["c", "0.000", "-", "-", "0"]
    assert lines[4].split()[:5] == ["macro", "avg", "0.900", "0.875", "0.873"]  # a and b only, not c as 0
