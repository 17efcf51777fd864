"""export.py: the ONNX file gives predict.py's answers, with the preprocessing and calibration inside."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import COLOURS, ROOT, assert_clean_error, draw, run

import nin

onnx = pytest.importorskip("onnx", reason="the export's packages are optional: pip install -r requirements-export.txt")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_export_matches_predict_and_carries_its_classes(trained, tmp_path):
    photos = [draw(tmp_path / "photos" / f"{name}.png", colour, seed=700 + i) for i, (name, colour) in
              enumerate(COLOURS.items())]
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not an image")  # skipped with a warning, as predict.py does
    out = tmp_path / "NiN.onnx"
    result = run("export.py", "--weights", trained["weights"], "--class-idx", trained["class_idx"], "--out", out,
                 "--check", tmp_path / "photos", ROOT / "test_img", cwd=tmp_path)
    assert "top-1 the same for every one" in result.stdout and "(8 photos, 7 drawn)" in result.stdout
    assert "warning: skipped" in result.stderr and "broken.jpg" in result.stderr
    model = onnx.load(out)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == ["blue", "green", "red"] and meta["image_size"] == "64"
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # any batch size
        images = torch.stack([nin.eval_tensor(photos[i % 3], 64) for i in range(batch)])
        probs = session.run(None, {"images": images.permute(0, 2, 3, 1).numpy()})[0]
        assert probs.shape == (batch, 3) and abs(probs.sum(1) - 1).max() < 1e-5
        assert [int(p.argmax()) for p in probs] == [i % 3 for i in range(batch)]  # each colour its class


def test_export_uses_the_calibrated_temperature(trained, tmp_path):
    saved = torch.load(trained["weights"], weights_only=True)
    saved["calibration"] = {"temperature": 3.0, "not_sure_below": 0.5, "fitted_on": "a test"}
    torch.save(saved, tmp_path / "hot.pth")
    out = tmp_path / "hot.onnx"
    result = run("export.py", "--weights", tmp_path / "hot.pth", "--class-idx", trained["class_idx"], "--out", out,
                 "--check", ROOT / "test_img", cwd=tmp_path)
    assert "largest probability difference" in result.stdout
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert float(meta["temperature"]) == 3.0


def test_an_export_that_disagrees_is_refused(trained, tmp_path, monkeypatch):
    import export

    monkeypatch.setattr(export.Exported, "forward",
                        lambda self, images: torch.ones(images.shape[0], 3).softmax(1))  # a broken graph
    monkeypatch.setattr("sys.argv", ["export.py", "--weights", str(trained["weights"]), "--class-idx",
                                     str(trained["class_idx"]), "--out", str(tmp_path / "bad.onnx"), "--check",
                                     str(ROOT / "test_img")])
    with pytest.raises(nin.CLIError, match=r"does not match predict\.py"):
        export.main()
    assert not (tmp_path / "bad.onnx").exists()  # a refused export is not left where an app would pick it up


@pytest.mark.parametrize("flags,named", [(["--tolerance", "2", "--check", "x.jpg"], "between 0 and 1"),
                                         (["--tolerance", "0.01"], "give it with --check"),
                                         (["--check", "missing.jpg", "--weights", "missing.pth"],  # before any work
                                          "image not found: missing.jpg"),
                                         (["--check", ".", "--weights", "missing.pth"],  # an empty folder
                                          "--check: no images in the folders given")])
def test_export_refuses_bad_flags(tmp_path, flags, named):
    assert_clean_error(run("export.py", *flags, cwd=tmp_path, check=False), named)
