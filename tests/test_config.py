import typing
import pytest

from pipeline import config
from pipeline.config import RunConfig, load_config
from pipeline.errors import ConfigError


def test_precedence_defaults_yaml_env_flags(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("restore:\n  micro_batch: 8\n  precision: bf16\ndetect:\n  threshold: 0.9\n")
    env = {"ARCHIVE_RESTORE_RESTORE__MICRO_BATCH": "32", "ARCHIVE_RESTORE_WEIGHTS_DIR": "/w"}
    cfg = load_config(y, {"restore.precision": "fp32"}, environ=env)
    assert cfg.restore.micro_batch == 32          # env over YAML
    assert cfg.restore.precision == "fp32"        # flag over YAML
    assert cfg.detect.threshold == 0.9            # YAML over default
    assert cfg.weights_dir == "/w"
    assert cfg.detect.model == "retinaface_resnet50"


def test_bad_values_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="restore.precision"):
        load_config(None, {"restore.precision": "fp8"}, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="detect.nonsense"):
        load_config(None, {"detect.nonsense": 1}, environ={})


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(Exception):
        cfg.restore.micro_batch = 3


def test_fingerprint_tracks_output_affecting_settings_only():
    base = RunConfig()
    w = {"GFPGANv1.4": "aa"}
    fp = base.fingerprint(w)
    assert fp == RunConfig().fingerprint(dict(w))
    assert base.model_copy(update={"cluster": base.cluster.model_copy(update={"rows_per_block": 99})}).fingerprint(w) == fp
    assert base.model_copy(update={"restore": base.restore.model_copy(update={"micro_batch": 3})}).fingerprint(w) == fp
    assert base.model_copy(update={"output": base.output.model_copy(update={"jpeg_quality": 80})}).fingerprint(w) != fp
    assert base.model_copy(update={"detect": base.detect.model_copy(update={"threshold": 0.9})}).fingerprint(w) != fp
    assert base.fingerprint({"GFPGANv1.4": "bb"}) != fp


def _with_output(cfg: RunConfig, **update) -> RunConfig:
    return cfg.model_copy(update={"output": cfg.output.model_copy(update=update)})


def test_encoder_settings_and_jpeg_mode_in_the_fingerprint(monkeypatch):
    from pipeline import config

    base = RunConfig()
    w = {"GFPGANv1.4": "aa", "retinaface": "bb"}
    # The defaults' fingerprint at OUTPUT_VERSION 1 is the one computed before output.jpeg_mode, png_level and
    # tiff_compression existed (value taken from the code at c8d1d2c): archives processed then were not redone
    # by that upgrade; OUTPUT_VERSION 2 (paste-back's whole footprint) redoes them, as it is meant to.
    with monkeypatch.context() as m:
        m.setattr(config, "OUTPUT_VERSION", 1)
        assert base.fingerprint(w) == "db5487900fdb137d"
    assert config.OUTPUT_VERSION == 2 and base.fingerprint(w) != "db5487900fdb137d"
    fp = base.fingerprint(w)
    # Lossless encoder settings change no pixel: no GFP-GAN run for them.
    assert _with_output(base, png_level=9).fingerprint(w) == fp
    assert _with_output(base, tiff_compression="deflate").fingerprint(w) == fp
    # Keeping the master's JPEG blocks changes the derivative's bytes: a new fingerprint.
    assert _with_output(base, jpeg_mode="blocks").fingerprint(w) != fp
    assert _with_output(base, jpeg_mode="reencode").fingerprint(w) == fp


# Every setting that changes the fingerprint (so that a `--reprocess outdated` run redoes the archive), with
# why. Every other field must not: the walk below changes each field alone and checks it against this list.
IN_FINGERPRINT = {
    "input.max_pixels": "which masters are refused as too large",
    "detect.model": "which faces are found", "detect.threshold": "", "detect.nms_threshold": "",
    "detect.long_side": "", "detect.min_eye_dist": "", "detect.max_faces": "",
    "restore.model": "the restoration (its weights' sha256 is hashed too)",
    "restore.precision": "the restoration's numerics",
    "restore.device": "with precision auto, which one runs (fp16 on CUDA, fp32 on CPU)",
    "qa.identity_backend": "identity scores, and so QA verdicts and kept faces", "qa.onnx_model": "",
    "qa.min_identity_similarity": "", "qa.on_low_identity": "",
    "output.format": "the derivative's bytes", "output.jpeg_quality": "", "output.jpeg_mode": "",
    "output.webp_quality": "", "output.colour_policy": "",
    "provenance.c2pa": "signed files differ (which key signs does not)",
}
# Settings that only add files: a run adds them (resume.plan's derive) without GFP-GAN. They were in the
# fingerprint before, so its legacy form (rows made then, with the same settings, stay current) has them.
ADDS_FILES = ("output.copy_no_face", "output.access_copy", "output.access_long_side", "output.access_quality")


def _fields(model, prefix=""):
    for name in type(model).model_fields:
        value = getattr(model, name)
        if hasattr(type(value), "model_fields"):
            yield from _fields(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", type(model).model_fields[name].annotation, value


def _other(annotation, value):
    """A different value of the field's type (validity beyond the type does not matter to the hash)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return next(a for a in typing.get_args(annotation) if a != value)
    if value is None:
        return {int: 3, float: 0.5, str: "x", bool: True}[args[0]]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if isinstance(value, int) else value / 2
    if isinstance(value, str):
        return value + "x"
    raise AssertionError(f"no other value for {annotation}")


def _changed(cfg: RunConfig, dotted: str, value) -> RunConfig:
    *sections, name = dotted.split(".")
    if not sections:
        return cfg.model_copy(update={name: value})
    section = getattr(cfg, sections[0])
    return cfg.model_copy(update={sections[0]: section.model_copy(update={name: value})})


def test_every_setting_is_in_the_fingerprint_exactly_when_listed():
    base = RunConfig()
    w = {"GFPGANv1.4": "aa", "retinaface": "bb"}
    fp = base.fingerprint(w)
    walked = {}
    for dotted, annotation, value in _fields(base):
        walked[dotted] = _changed(base, dotted, _other(annotation, value)).fingerprint(w) != fp
    assert set(IN_FINGERPRINT) <= set(walked), set(IN_FINGERPRINT) - set(walked)
    wrong = {k: v for k, v in walked.items() if v != (k in IN_FINGERPRINT)}
    assert not wrong, f"fingerprint membership differs from IN_FINGERPRINT for: {wrong}"
    assert len(walked) > 60  # the walk reached every section


def test_output_version_keys_detection_reuse_and_version_1_keeps_old_values(monkeypatch):
    from pipeline import config
    from pipeline.config import DetectConfig, detect_fingerprint

    # The value rows carry from before the version was part of it (computed at 06ea38e), at version 1.
    monkeypatch.setattr(config, "OUTPUT_VERSION", 1)
    cpu = DetectConfig(device="cpu")  # a result's device is resolved; the default, auto, is not
    assert detect_fingerprint(cpu, "bb") == "277367903a5c26d1"
    # faces found on the device are said to be (the run's fingerprint leaves it out: test above); its batch
    # size changes nothing
    assert detect_fingerprint(DetectConfig(device="gpu"), "bb") != "277367903a5c26d1"
    assert detect_fingerprint(DetectConfig(device="cpu", gpu_batch=3), "bb") == "277367903a5c26d1"
    monkeypatch.setattr(config, "OUTPUT_VERSION", 2)
    assert detect_fingerprint(cpu, "bb") != "277367903a5c26d1"


def test_settings_that_only_add_files_leave_the_fingerprint_but_not_its_legacy_form():
    base = RunConfig()
    w = {"GFPGANv1.4": "aa", "retinaface": "bb"}
    resolved = [base.fingerprint(w, device="cuda"), base.fingerprint(w, device="cpu")]
    # the defaults: their results on either device, and those made before the precision was resolved
    assert base.accepted_fingerprints(w) == [*resolved, base.fingerprint(w)]
    for dotted in ADDS_FILES:
        annotation = type(base.output).model_fields[dotted.split(".")[1]].annotation
        changed = _changed(base, dotted, _other(annotation, getattr(base.output, dotted.split(".")[1])))
        assert changed.fingerprint(w) == base.fingerprint(w), dotted
        legacy = changed.fingerprint(w, legacy=True)
        assert legacy != base.fingerprint(w)
        assert changed.accepted_fingerprints(w) == [*resolved, base.fingerprint(w), legacy]


def test_the_fingerprint_hashes_the_precision_that_runs(monkeypatch):
    """auto means fp16 on CUDA and fp32 on CPU: other bytes, other fingerprints; the form without a device
    (what versions before computed, auto hashed as the word) stays the pinned defaults' value."""
    w = {"GFPGANv1.4": "aa", "retinaface": "bb"}

    def cfg(precision="auto", device="auto"):
        base = RunConfig()
        return base.model_copy(update={"restore": base.restore.model_copy(update={"precision": precision,
                                                                                    "device": device})})

    auto = cfg()
    with monkeypatch.context() as m:  # unresolved: archives made before stayed current (until OUTPUT_VERSION 2)
        m.setattr(config, "OUTPUT_VERSION", 1)
        assert auto.fingerprint(w) == "db5487900fdb137d"
    assert auto.fingerprint(w, device="cuda") == cfg("fp16").fingerprint(w) == cfg(device="cuda").fingerprint(w)
    assert auto.fingerprint(w, device="cpu") == cfg("fp32").fingerprint(w) == cfg(device="cpu").fingerprint(w)
    assert auto.fingerprint(w, device="cuda") != auto.fingerprint(w, device="cpu") != auto.fingerprint(w)
    assert cfg("bf16").fingerprint(w, device="cuda") == cfg("bf16").fingerprint(w, device="cpu")
    # restore.device names what counts: CUDA results are not current for a run asked to restore on CPU
    assert cfg(device="cpu").accepted_fingerprints(w) == [auto.fingerprint(w, device="cpu"), auto.fingerprint(w)]
    assert cfg(device="cuda").accepted_fingerprints(w) == [auto.fingerprint(w, device="cuda"), auto.fingerprint(w)]
    # an explicit precision was hashed as written before too: one fingerprint
    assert cfg("fp32").accepted_fingerprints(w) == [cfg("fp32").fingerprint(w)]
    assert cfg("fp32", "cpu").fingerprint(w) == cfg("fp32").unresolved().fingerprint(w)
