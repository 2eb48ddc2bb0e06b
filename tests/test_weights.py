import dataclasses

import pytest

from pipeline import weights
from pipeline.config import RunConfig
from pipeline.errors import WeightsError


def test_missing_file_error_names_file_places_and_how_to_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = RunConfig(weights_dir=str(tmp_path / "w"), allow_download=False)
    with pytest.raises(WeightsError) as e:
        weights.resolve("GFPGANv1.4", cfg)
    msg = str(e.value)
    assert "GFPGANv1.4.pth" in msg and str(tmp_path / "w") in msg and str(tmp_path / "cache") in msg
    assert "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth" in msg
    assert "--weights-dir" in msg


def test_untrained_stand_in_is_explicit(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = weights.resolve("arcface_ir_se50", RunConfig(allow_download=False, untrained=True))
    assert r.untrained and r.path is None and r.sha256 == "untrained:arcface_ir_se50"


def test_a_publisher_checksum_is_required_and_known_copies_are_named(tmp_path, weights_dir, monkeypatch):
    r = weights.resolve("retinaface_mobile0.25", RunConfig(weights_dir=str(weights_dir), allow_download=False))
    assert r.describe()["known_copy"].startswith("the copy in the public fork")
    assert r.describe()["publisher_sha256"] is None and r.size == r.path.stat().st_size
    spec = dataclasses.replace(weights.REGISTRY["retinaface_mobile0.25"], sha256=r.sha256)
    monkeypatch.setitem(weights.REGISTRY, "retinaface_mobile0.25", spec)  # as if its publisher published it
    assert weights.resolve("retinaface_mobile0.25", RunConfig(weights_dir=str(weights_dir),
                                                              allow_download=False)).sha256 == r.sha256
    (tmp_path / "detection_mobilenet0.25_Final.pth").write_bytes(b"corrupt")
    with pytest.raises(WeightsError, match="corrupt or a different model"):
        weights.resolve("retinaface_mobile0.25", RunConfig(weights_dir=str(tmp_path), allow_download=False))


def test_a_gfpgan_checkpoint_by_path_gets_its_architecture_from_its_tensors(tmp_path):
    from pipeline.restorer import build_gfpgan

    from conftest import TINY_GFPGAN, need

    cfg = RunConfig(allow_download=False, restore={"model": str(need(TINY_GFPGAN))})
    model, r = build_gfpgan(cfg)
    assert r.spec.licence == "user-supplied" and model.num_style_feat == 128
    with pytest.raises(WeightsError, match="needs a registry model"):
        weights.resolve(str(tmp_path / "missing.pth"), RunConfig(allow_download=False, untrained=True))


def test_checkpoint_with_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pth"
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(WeightsError, match="cannot load .* safely"):
        weights.load_torch_file(p)


def test_unknown_model_lists_known_ones():
    with pytest.raises(WeightsError, match="GFPGANv1.4"):
        weights.spec_for("GFPGANv9")
