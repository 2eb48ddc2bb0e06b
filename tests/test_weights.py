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


def test_known_hash_is_verified(tmp_path, weights_dir):
    r = weights.resolve("retinaface_mobile0.25", RunConfig(weights_dir=str(weights_dir), allow_download=False))
    assert r.sha256 == weights.REGISTRY["retinaface_mobile0.25"].sha256
    (tmp_path / "detection_mobilenet0.25_Final.pth").write_bytes(b"corrupt")
    with pytest.raises(WeightsError, match="corrupt or a different model"):
        weights.resolve("retinaface_mobile0.25", RunConfig(weights_dir=str(tmp_path), allow_download=False))


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
