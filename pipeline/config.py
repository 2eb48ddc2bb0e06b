"""The run's settings: one frozen pydantic tree, built once and passed down explicitly.

Sources, later wins: defaults < YAML file < ``ARCHIVE_RESTORE_<SECTION>__<FIELD>`` environment
variables < CLI flags. ``fingerprint()`` hashes every setting that changes output bytes, plus
the sha256 of every weight file, so that resume and re-processing know which results are current.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import typing

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

ENV_PREFIX = "ARCHIVE_RESTORE_"

# Bump when a code change alters output bytes for the same settings and weights,
# so that scheduled runs re-process what the old code made.
OUTPUT_VERSION = 2  # 2: paste-back's region holds the crop's whole footprint (faces enlarged over 2x)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputConfig(_Section):
    manifest: str | None = Field(None, description="Parquet/CSV/JSONL manifest, local path or s3:// URI.")
    uri_column: str = Field("uri", description="Column holding each image's location.")
    id_column: str = Field("image_id", description="Optional column with a stable id; derived from the URI if absent.")
    root: str | None = Field(
        None,
        description="Prefix that output keys are made relative to. Default: the manifest's common directory. "
        "Set it when new images may arrive outside today's common directory, so keys stay stable.",
    )
    max_pixels: int = Field(200_000_000, gt=0, description="Refuse images above this pixel count (decompression bombs).")


class DetectConfig(_Section):
    model: Literal["retinaface_resnet50", "retinaface_mobile0.25"] = Field(
        "retinaface_resnet50",
        description="resnet50: the official GFPGANer detector (~45x the FLOPs); mobile0.25: ~8x cheaper on CPU, "
        "misses more small and profile faces.",
    )
    threshold: float = Field(0.97, ge=0, le=1, description="Detector confidence threshold (official: 0.97).")
    nms_threshold: float = Field(0.4, ge=0, le=1)
    long_side: int | None = Field(
        1600,
        ge=64,
        description="Detect on a copy downscaled to this long side (boxes mapped back). None: native size, "
        "as the official code does, at several times the cost of restoring the faces on a 12 MP scan.",
    )
    min_eye_dist: float = Field(5.0, ge=0, description="Skip faces whose eye distance (master pixels) is smaller.")
    max_faces: int = Field(64, ge=1, description="Restore at most this many faces per image (highest scores first).")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where faces are found. auto: gpu when the Restore actors restore on CUDA "
        "(restore.device), else cpu. cpu: in the DecodeDetect actors. gpu: JPEG masters (RGB or grey) "
        "are decoded, detected and aligned in the Restore actor, on its device (nvJPEG through torchvision on "
        "CUDA), so ResNet-50 detection costs GPU milliseconds instead of CPU seconds and DecodeDetect only reads, "
        "hashes and reads the header; other masters (TIFF, PNG, CMYK JPEG, ...) are still detected on CPU. Their "
        "faces are the CPU's but for the decoders' and the detection canvas's differences (README: on CUDA "
        "nvJPEG's chroma moved one shared photo's landmarks by 4.3 px, the others' by 0.1), so switching it "
        "redoes nothing: it is not in the run's fingerprint, and stored faces found on either device are "
        "reused; each row's detect_fingerprint says where its faces were found. Masters travel to the Restore actor compressed.",
    )
    gpu_batch: int = Field(
        8, ge=1, description="Detection copies of the same size per detector forward with detect.device=gpu.",
    )


class RestoreConfig(_Section):
    model: str = Field("GFPGANv1.4", description="Weights registry name of the GFP-GAN model.")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="auto: fp16 on CUDA, fp32 on CPU."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Where the Restore actors restore. cuda: each asks Ray for one GPU and the job waits "
        "for GPU nodes (an autoscaler starts them); cpu: no GPU is asked for. auto: cuda when the cluster has a "
        "GPU at submission or cluster.max_gpus is set, else cpu with a warning: on a cluster whose GPU nodes "
        "are still starting, say cuda.",
    )
    micro_batch: int = Field(
        16, ge=1, description="Faces per forward pass; bounds GPU memory. Lowered by halves on CUDA out-of-memory.",
    )
    channels_last: bool | None = Field(
        None, description="NHWC memory format, what tensor-core convolutions want. None: on CUDA only (on CPU "
        "it measured 0-13% slower); True also on CPU, which is how the tests cover the GPU's layout.",
    )
    compile: bool = Field(False, description="torch.compile the network (falls back to eager if it fails).")
    cuda_graphs: bool = Field(
        False, description="Replay the network as a captured CUDA graph: one launch per micro-batch instead of "
        "hundreds of kernels; helps small micro-batches. Falls back to eager if capture fails or off CUDA.",
    )
    cpu_threads: int | None = Field(
        None, ge=1,
        description="Torch threads when restoring on CPU. None: all cores of the node. Ray would otherwise cap "
        "a fractional-CPU actor at 1 thread, and GFP-GAN (~395 GFLOP/face) dominates a CPU-only run.",
    )


class QAConfig(_Section):
    identity_backend: Literal["arcface_ir_se50", "onnx"] = Field(
        "arcface_ir_se50", description="facexlib ArcFace IR-SE50, or an ONNX face-embedding model."
    )
    onnx_model: str = Field(
        "mobilefacenet_arcface", description="Registry name or path of the ONNX model (identity_backend=onnx)."
    )
    min_identity_similarity: float = Field(
        0.5, ge=-1, le=1, description="Faces whose input/restored cosine similarity is lower are flagged."
    )
    on_low_identity: Literal["flag", "keep_original"] = Field(
        "flag", description="flag: keep the restoration and mark it; keep_original: paste nothing back for it."
    )


class OutputConfig(_Section):
    root: str | None = Field(None, description="Output folder or s3:// prefix. Never inside the input.")
    format: Literal["same", "jpeg", "png", "tiff", "webp"] = Field("same", description="Derivative format.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of a re-encoded derivative (jpeg_mode).")
    jpeg_mode: Literal["reencode", "blocks"] = Field(
        "reencode", description="JPEG derivatives of JPEG masters. reencode: the whole image encoded again at "
        "jpeg_quality (a second generation of JPEG loss everywhere). blocks: the master's own DCT blocks are kept "
        "wherever no face was pasted and only the blocks a face touches are encoded, with the master's tables, so "
        "the rest of the photograph decodes as the master does; progressive, CMYK, RGB, 12-bit and EXIF-rotated "
        "masters fall back to reencode with a note. Costs more CPU (the whole file is entropy-coded again).",
    )
    webp_quality: int = Field(95, ge=1, le=100)
    png_level: int | None = Field(
        None, ge=0, le=9, description="PNG zlib level (lossless; only size and time change). None: OpenCV's fastest "
        "(level 1, RLE strategy).",
    )
    tiff_compression: Literal["master", "lzw", "deflate", "none"] = Field(
        "master", description="TIFF compression (lossless: only size and time change). master: the master's own "
        "(none, lzw or deflate; lzw for other codecs and for masters in other formats). lzw: read everywhere, "
        "fast on 8-bit; on a grainy 16-bit scan larger than none and ~9x slower to write (BENCHMARKS.md). "
        "deflate: the smallest, 1.5-4x slower than lzw. none: the fastest.",
    )
    copy_no_face: bool = Field(False, description="Also write a derivative for images without faces.")
    access_copy: bool = Field(False, description="Also write an 8-bit JPEG access copy to access/<key>.jpg.")
    access_long_side: int = Field(2048, ge=16, description="Long side of the access copy (only ever downscaled).")
    access_quality: int = Field(85, ge=1, le=100, description="JPEG quality of the access copy.")
    device: Literal["cpu", "gpu"] = Field(
        "cpu", description="Where the derivative of a master whose faces were found on the device (detect.device="
        "gpu) is made. cpu: Compose decodes the master again, pastes the faces back and encodes, on a CPU. gpu: the "
        "Restore actor pastes them back into the master it decoded and encodes the JPEG there (nvJPEG through "
        "torchvision on CUDA), with its review crops and access copy; Compose only carries the metadata, signs and "
        "writes. Applies to colour JPEG derivatives re-encoded (jpeg_mode=reencode) of RGB JPEG masters; grey or "
        "toned masters (colour_policy), other formats and blocks mode are made on the CPU as before. Pixels "
        "agree with the CPU's paste within a level or two (tested); the encoder differs, so the bytes do.",
    )
    colour_policy: Literal["auto", "keep", "force_grey"] = Field(
        "auto", description="auto: monochrome masters (grey, sepia, tinted: found by chroma statistics) get only "
        "the restored faces' luminance, in the master's own tone; keep: paste the restored colour as is; "
        "force_grey: luminance only for every master.",
    )

    @property
    def access_spec(self) -> str | None:
        """What an access copy is made with (recorded per row, so a change of it remakes only access copies)."""
        return f"{self.access_long_side}px q{self.access_quality}" if self.access_copy else None


def parse_access_spec(spec: str) -> tuple[int, int]:
    """``OutputConfig.access_spec`` back into (long side, quality)."""
    side, quality = spec.split()
    return int(side.removesuffix("px")), int(quality.removeprefix("q"))


class ReviewConfig(_Section):
    """Curator review (review.py, the report page). Not in the fingerprint: these settings only add files
    or carry a curator's decisions, so changing them never makes GFP-GAN run again over an archive."""

    crops: bool = Field(
        True, description="Write a before/after pair per face (review/<key>/face-<i>-{before,after}.jpg) for the "
        "report's review page: the region around the face in the master and in the derivative.",
    )
    crop_size: int = Field(256, ge=32, le=2048, description="Long side of a review crop, in pixels.")
    crop_quality: int = Field(88, ge=1, le=100, description="JPEG quality of the review crops.")
    carry_decisions: bool = Field(
        True, description="When an image is processed again from the same master bytes, faces a curator "
        "rejected stay original (matched by box overlap). False: every face is restored again.",
    )


_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{40,}")


def looks_like_material(value: object) -> bool:
    """PEM text, or a long base64 run of mixed case and digits (a key's body without its BEGIN line; a hex
    digest in a path is not one): never to be echoed or recorded."""
    text = str(value)
    runs = _BASE64_RUN.findall(text)
    return "BEGIN" in text or "\n" in text or any(
        re.search("[A-Z]", r) and re.search("[a-z]", r) and re.search("[0-9]", r) for r in runs)


class ProvenanceConfig(_Section):
    c2pa: Literal["off", "sign"] = Field(
        "off", description="sign: embed a signed C2PA manifest (Content Credentials) in every derivative with a "
        "restored face, and in its access copy.",
    )
    cert_chain: str | None = Field(
        None, description="Signing certificate chain (PEM, end-entity first): a path, an s3:// URI or env:NAME.",
    )
    private_key: str | None = Field(
        None, description="The signing key (PEM): a path, an s3:// URI or env:NAME. Read into memory only; never "
        "logged or recorded.",
    )
    alg: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = Field(
        "es256", description="Signature algorithm; must match the key (es*: EC, ps*: RSA, ed25519).",
    )
    tsa_url: str | None = Field(None, description="RFC 3161 timestamp authority URL (none offline).")
    trust_anchors: str | None = Field(
        None, description="PEM bundle of trusted roots for `verify`: a path, an s3:// URI or env:NAME.",
    )

    @field_validator("cert_chain", "private_key", "trust_anchors")
    @classmethod
    def _reference_not_material(cls, v: str | None) -> str | None:
        if v and looks_like_material(v):
            raise ValueError("give a path, an s3:// URI or env:NAME, not the PEM itself (settings are recorded)")
        return v


class StorageConfig(_Section):
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, Ceph). None: AWS.")
    retries: int = Field(
        4, ge=0, validation_alias=AliasChoices("retries", "read_retries"),
        description="Retries (with backoff) of a failed read, write or listing, on top of the S3 client's own "
        "(s3_max_attempts); then an image becomes a read_error/write_error, or a ledger read fails the command.",
    )
    s3_max_attempts: int = Field(
        10, ge=1, description="Attempts per S3 request by botocore's 'standard' retry mode (503 SlowDown, 500, "
        "resets, with exponential backoff and jitter), before our own retries count one failure.",
    )


class ClusterConfig(_Section):
    address: str | None = Field(
        None, description="Ray address. None: the cluster in RAY_ADDRESS / `ray job submit`, else a local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray started by the program.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local Ray started by the program.")
    rows_per_block: int = Field(8, ge=1, description="Manifest rows per Ray block; small blocks spread work.")
    decode_batch_size: int = Field(4, ge=1, description="Images per DecodeDetect call.")
    restore_batch_size: int = Field(16, ge=1, description="Images per Restore call; all their faces batch together.")
    restore_calls_in_flight: int | None = Field(
        None, ge=1, description="Restore calls an actor runs at once: their faces are restored together by one "
        "device thread, so micro-batches stay full across batches and the next batch's faces are queued while the "
        "device works (bench/restore_batching.py: 13.4 / 14.4 / 15.9 faces per forward of 16 with 1 / 2 / 3). "
        "Each holds its batch in host memory. None: 3 on a pool of fixed size, 1 on a pool that grows (Ray Data "
        "asks for another actor only when tasks in flight reach 1.75 x the calls an actor runs: with 2 or 3, a GPU "
        "node joining mid-run got no actor in the cluster test).",
    )
    compose_batch_size: int = Field(4, ge=1, description="Images per Compose task.")
    decode_actor_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each DecodeDetect actor.")
    decode_actors_max: int | None = Field(
        None, ge=1, description="Cap on DecodeDetect actors. None: a local Ray's CPUs; on a cluster, no cap (the "
        "pool grows as CPU nodes join).",
    )
    max_gpus: int | None = Field(
        None, ge=1, description="Cap on Restore actors (one per GPU). None: no cap; the pool grows as GPU nodes join.",
    )
    decode_actor_memory_gb: float | None = Field(
        None, gt=0, description="Memory declared to Ray per DecodeDetect actor on a cluster (what packs a node). "
        "None: 1.1 GB + 8 bytes per pixel of input.max_pixels up to 50 MP (one image decoded at a time; "
        "measured peaks: 1.05 GB with 12 MP masters, 1.48 GB with 100 MP, bench/stage_memory.py). Set it for "
        "archives of larger scans.",
    )
    restore_actor_memory_gb: float | None = Field(
        None, gt=0, description="Memory declared per Restore actor on a cluster. None: on CPU 1 GB + 0.6 GB per "
        "face of restore.micro_batch (measured: 10.3 GB at 16); on CUDA 3 GB of host memory (not yet measured "
        "on a GPU).",
    )
    compose_task_memory_gb: float | None = Field(
        None, gt=0, description="Memory declared per Compose task on a cluster. None: 0.7 GB + 24 bytes per pixel "
        "of input.max_pixels up to 50 MP (measured: 0.93 GB at 12 MP, 2.6 GB at 100 MP). Set it for archives of "
        "larger scans.",
    )
    restore_actor_cpus: float = Field(
        1.0, ge=0, description="CPUs reserved by the Restore actor when it restores on CPU. A GPU actor reserves no "
        "CPU, so a CPU stage can never take the core it needs: GPU nodes keep one for it by advertising one CPU "
        "fewer than they have (deploy/, ray_cluster.yaml).",
    )
    compose_task_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each Compose task.")
    carry_masters: bool = Field(
        False, description="Carry each master's bytes from DecodeDetect through the GPU actor to Compose. False: "
        "Compose reads the master again and checks its sha256; one more read per image with faces, but masters "
        "stay out of the GPU actor (one actor moved 269 faces/s with 6 MB masters vs 1,352 without: BENCHMARKS.md).",
    )
    heartbeat_s: float = Field(
        10.0, gt=0,
        description="A run renews its lease on the output (_lock/) this often. Another run takes the output over "
        "only after watching the lease stand still for 3x this long (or at once when the holder is a dead "
        "process on the same host).",
    )
    progress_s: float = Field(30.0, gt=0, description="How often a run logs progress and updates its _runs record.")
    elastic: bool | None = Field(
        None, description="Pools that start at one actor and grow as nodes join (True), or sized once to the "
        "resources there are (False). None: elastic on a Ray the job joined (a cluster), sized on a local Ray "
        "it started.",
    )
    stall_timeout_s: float = Field(
        1800.0, gt=0, description="A run in which no stage takes or hands on a batch for this long fails, saying "
        "which stage's actors are pending or restarting: waiting for nodes that never come, or a lost GPU node "
        "whose actor cannot restart. Ray Data's own no-progress guard. A re-run resumes.",
    )
    actor_restarts: int = Field(
        3, ge=0, description="Restarts of a stage actor whose process or node died (its batches are retried).",
    )
    takeover_grace_s: float = Field(
        60.0, ge=0,
        description="After taking the output over from a run whose lease lapsed (not one that died on this host, "
        "whose processes are stopped), wait this long before planning, so that a write its surviving tasks "
        "began just before the takeover lands first. Longer than one write takes with its retries.",
    )


class RunConfig(_Section):
    input: InputConfig = InputConfig()
    detect: DetectConfig = DetectConfig()
    restore: RestoreConfig = RestoreConfig()
    qa: QAConfig = QAConfig()
    output: OutputConfig = OutputConfig()
    storage: StorageConfig = StorageConfig()
    cluster: ClusterConfig = ClusterConfig()
    provenance: ProvenanceConfig = ProvenanceConfig()
    review: ReviewConfig = ReviewConfig()
    weights_dir: str | None = Field(None, description="Folder or s3:// prefix holding the model files.")
    allow_download: bool = Field(True, description="Download missing weights from their official URL when online.")
    untrained: bool = Field(False, description="Smoke tests only: seeded random weights for missing model files.")
    redetect: bool = Field(
        False, description="Detect faces again even where an image's bytes and the detector settings are unchanged."
    )
    reprocess: Literal["missing", "outdated", "failed", "all"] = Field(
        "missing", description="Which images to (re)do: see README."
    )
    max_attempts: int = Field(
        3, ge=1, description="An image whose latest results are this many errors in a row under the current "
        "fingerprint is not tried again (counted as gave_up) unless --reprocess failed or all.",
    )

    @field_validator("weights_dir")
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        return v.rstrip("/") if v else v

    def accepted_fingerprints(self, weight_hashes: dict[str, str]) -> list[str]:
        """The fingerprints a result may carry and be current: today's for each device ``restore.device``
        allows (with ``auto``, results restored on CUDA and on CPU both count), then the forms earlier
        versions computed for the same settings (``unresolved``, then ``legacy``) when they differ."""
        devices = ["cuda", "cpu"] if self.restore.device == "auto" else [self.restore.device]
        fps = [self.fingerprint(weight_hashes, device=d) for d in devices]
        fps += [self.unresolved().fingerprint(weight_hashes), self.fingerprint(weight_hashes, legacy=True)]
        return list(dict.fromkeys(fps))

    def resolved_precision(self, device: str | None = None) -> str:
        """``restore.precision`` as it runs on ``device`` (cuda or cpu; None: ``restore.device``): auto is
        fp16 on CUDA and fp32 on CPU, and stays ``auto`` while the device is not known."""
        if self.restore.precision != "auto":
            return self.restore.precision
        return {"cuda": "fp16", "cpu": "fp32"}.get(device or self.restore.device, "auto")

    def unresolved(self) -> "RunConfig":
        """These settings with ``restore.device=auto``: their fingerprint without a device is the form versions
        before the precision was resolved computed (``auto`` hashed as the word)."""
        return self.model_copy(update={"restore": self.restore.model_copy(update={"device": "auto"})})

    def fingerprint(self, weight_hashes: dict[str, str], legacy: bool = False, device: str | None = None) -> str:
        """Hash of everything that changes a derivative's bytes or a result's faces. Settings that only add
        files (``_ADDS_FILES``: no-face copies, access copies) are hashed at their defaults, so that turning
        them on adds those files (``resume.plan``'s ``derive``) instead of making GFP-GAN run again, and the
        defaults' fingerprint stays what it was. The precision is hashed as it runs (``resolved_precision``
        on ``device``, else on ``restore.device``): fp16 on CUDA and fp32 on CPU give other bytes. The job
        knows the device once Ray is up (``job.resolve_device``); before, with ``restore.device=auto``, the
        value is the unresolved form. ``legacy``: the hash as versions before the settings that only add
        files left it computed it (with their values, and the precision as written)."""
        output = self.output.model_dump(exclude={"root", *_NOT_IN_FINGERPRINT, *_WHEN_NOT_DEFAULT})
        restore = self.restore.model_dump(include={"model", "precision"})
        if not legacy:
            output.update({k: OutputConfig.model_fields[k].default for k in _ADDS_FILES})
            restore["precision"] = self.resolved_precision(device)
        relevant = {
            "output_version": OUTPUT_VERSION,
            "detect": _detect_settings(self.detect, with_device=False),
            "restore": restore,
            "qa": self.qa.model_dump(),
            "output": output,
            "max_pixels": self.input.max_pixels,
            "weights": dict(sorted(weight_hashes.items())),
        }
        relevant.update({f"output.{k}": getattr(self.output, k) for k in _WHEN_NOT_DEFAULT
                         if getattr(self.output, k) != OutputConfig.model_fields[k].default})
        if self.provenance.c2pa != "off":  # signed files differ; which key or algorithm signs does not redo GFP-GAN
            relevant["provenance"] = self.provenance.c2pa
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Lossless encoder settings: the derivative's pixels stay the same, so GFP-GAN need not run again for them.
# And where the derivative is made (output.device): the device's paste agrees with the CPU's within a level or
# two (tested), as detect.device's faces agree within rounding; switching it must not redo an archive.
_NOT_IN_FINGERPRINT = ("png_level", "tiff_compression", "device")
# Settings that only add files: out of the fingerprint (hashed at their defaults), see RunConfig.fingerprint.
_ADDS_FILES = ("copy_no_face", "access_copy", "access_long_side", "access_quality")
# Settings added after archives were processed: in the fingerprint only when changed from their default, so
# that fingerprints (and so the archives made with the defaults) stay valid across the upgrade.
_WHEN_NOT_DEFAULT = ("jpeg_mode",)


def _detect_settings(detect: DetectConfig, with_device: bool = True) -> dict:
    """The detector settings that are hashed: ``gpu_batch`` changes nothing. ``device`` only in a detection
    result's fingerprint (``with_device``; resolved there, cpu or gpu), and only when it is gpu, so values made
    before it existed stay valid; not in a run's: faces found on the GPU are the CPU's but for the decoders' and the
    detection canvas's differences (README), and switching it must not redo an archive; each row's
    detect_fingerprint says where its faces were found."""
    out = detect.model_dump(exclude={"device", "gpu_batch"})
    if with_device and detect.device == "auto":
        raise ValueError("a detection result's device is resolved (cpu or gpu), not auto")
    if with_device and detect.device != "cpu":
        out["device"] = detect.device
    return out


def detect_fingerprint(detect: DetectConfig, detector_sha256: str) -> str:
    """Identity of a detection result: the detector settings and weights, and ``OUTPUT_VERSION`` (a code
    change that redoes outputs may change detection or alignment too, so stored faces are not reused across
    it). Same bytes + same value = same faces. Version 1 is left out, so rows written before the version
    was part of it keep their value."""
    relevant = {"detect": _detect_settings(detect), "weights": detector_sha256}
    if OUTPUT_VERSION != 1:
        relevant["output_version"] = OUTPUT_VERSION
    blob = json.dumps(relevant, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def _is_str_field(annotation) -> bool:
    """Whether a field holds text: then a raw value stays text ("no" is not False, "007" is not 7)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return all(a is str or (typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)))
               for a in args)


def _field(dotted: str):
    """The pydantic field a dotted name refers to, or None when there is none."""
    model: type[BaseModel] = RunConfig
    *sections, name = dotted.split(".")
    for sec in sections:
        f = model.model_fields.get(sec)
        if f is None or not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)):
            return None
        model = f.annotation
    return model.model_fields.get(name)


def parse_value(dotted: str, raw: str) -> Any:
    """A flag's or environment variable's text as the setting's type: text fields keep the text (YAML 1.1
    would turn "no" into False); other fields parse as YAML scalars ("true", "16", "null")."""
    f = _field(dotted)
    if f is not None and _is_str_field(f.annotation):
        nullable = type(None) in typing.get_args(f.annotation)
        return None if nullable and raw.strip() in ("", "null", "~") else raw
    return yaml.safe_load(raw) if raw else raw


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """``ARCHIVE_RESTORE_RESTORE__PRECISION=fp32`` -> ``{"restore": {"precision": "fp32"}}``.

    Only names that address the config tree are settings: ``SECTION__FIELD`` (a misspelt field is an error,
    since it was meant as a setting) or a top-level field (``WEIGHTS_DIR``). Anything else that happens to
    share the prefix (a test helper's variable, another tool's) is not ours and is ignored.
    """
    tree: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        dotted = key[len(ENV_PREFIX):].lower().replace("__", ".")
        if "." not in dotted and dotted not in RunConfig.model_fields:
            continue
        if "." in dotted and dotted.split(".")[0] not in RunConfig.model_fields:
            continue
        _set_dotted(tree, dotted, parse_value(dotted, value))
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> RunConfig:
    """Build the run's config. ``overrides`` maps dotted names (``"restore.precision"``) to values."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        tree = loaded
    tree = _merge(tree, _env_overrides(dict(os.environ if environ is None else environ)))
    flat: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(flat, dotted, value)
    tree = _merge(tree, flat)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        got = "" if looks_like_material(first.get("input")) else f" (got {first.get('input')!r})"
        raise ConfigError(f"setting {where!r}: {first['msg']}{got}") from None
