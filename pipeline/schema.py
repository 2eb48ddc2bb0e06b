"""Row schemas: the manifest, the result ledger, and the closed set of image statuses."""

from __future__ import annotations

from enum import Enum

import pyarrow as pa


class Status(str, Enum):
    OK = "ok"                          # faces restored, derivative written
    NO_FACE = "no_face"                # decoded, no face above threshold; nothing written by default
    READ_ERROR = "read_error"          # bytes could not be fetched (missing object, network)
    DECODE_ERROR = "decode_error"      # bytes are not an image we can decode
    TOO_LARGE = "too_large"            # pixel count above input.max_pixels (checked from the header)
    DETECT_ERROR = "detect_error"      # the detector failed on this image
    RESTORE_ERROR = "restore_error"    # the restoration network failed for this image's faces
    WRITE_ERROR = "write_error"        # the derivative could not be encoded or written


# Re-trying these cannot change the outcome for the same bytes and settings; a result row with one
# of them marks the image done. The others may be passing faults (storage, GPU) and are retried.
FINAL_STATUSES = frozenset({Status.OK, Status.NO_FACE, Status.DECODE_ERROR, Status.TOO_LARGE})
ERROR_STATUSES = frozenset(set(Status) - {Status.OK, Status.NO_FACE})

FACE_TYPE = pa.struct(
    [
        ("bbox", pa.list_(pa.float32(), 4)),          # x1, y1, x2, y2 in master pixels
        ("score", pa.float32()),
        ("landmarks", pa.list_(pa.float32(), 10)),    # eyes, nose, mouth corners: x, y pairs
        ("identity_similarity", pa.float32()),        # cosine(input face, restored face); null if not scored
        ("qa", pa.string()),                          # pass | flag
        ("action", pa.string()),                      # restored | kept_original (QA) | reverted (curator)
        ("fp32_fallback", pa.bool_()),                # half-precision output was bad; recomputed in fp32
        ("review", pa.string()),                      # a curator's decision: accepted | rejected; null: none
        ("review_before", pa.string()),               # review crop of the master around the face (URI)
        ("review_after", pa.string()),                # the same region of the derivative (URI)
    ]
)

RESULT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("output_uri", pa.string()),
        ("access_uri", pa.string()),         # the JPEG access copy, when output.access_copy is set
        ("output_key", pa.string()),         # the image's key below images/ and access/ (unique, see keys.py)
        ("output_name", pa.string()),        # the file written below images/ (kept on error rows: it exists)
        ("access_name", pa.string()),        # the file written below access/
        ("access_sha256", pa.string()),      # the access copy's bytes
        ("access_spec", pa.string()),        # what it was made with (output.access_spec); null before 2026-11
        ("c2pa_signed", pa.bool_()),         # derivative (and access copy) carry signed Content Credentials
        ("src_sha256", pa.string()),
        ("out_sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_faces", pa.int32()),
        ("faces_skipped", pa.int32()),       # detected but not restored: too small (min_eye_dist) or over max_faces
        ("faces", pa.list_(FACE_TYPE)),
        ("notes", pa.string()),              # e.g. pages dropped from a multi-page TIFF, colour space converted
        ("fingerprint", pa.string()),
        ("run_id", pa.string()),             # the run (or review) that wrote the derivative's bytes
        ("review_id", pa.string()),          # the curator review that wrote this row (decisions.py); null: a run
        ("derived_by", pa.string()),         # the run that added an access copy to this image (derive.py)
        ("untrained", pa.bool_()),
        ("detect_fingerprint", pa.string()),   # detector settings + weights that found these faces
        ("detect_reused", pa.bool_()),         # faces taken from an earlier result for the same bytes
        ("decode_s", pa.float32()),
        ("detect_s", pa.float32()),
        ("restore_s", pa.float32()),
        ("restore_device", pa.string()),     # what ran GFP-GAN: "cuda (<GPU name>)" or "cpu"
        ("compose_s", pa.float32()),
        ("cpu_s", pa.float32()),             # CPU seconds the stages spent on it (DecodeDetect, its share of
                                             # Restore's, Compose); null in rows made before 2026-11-26
        ("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
)

# Between stages: one row per image. The original travels as its encoded bytes (decoded again in
# Compose), faces as JSON (bbox, landmarks, alignment matrices, QA), crops as packed uint8 arrays.
WORK_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("output_key", pa.string()),
        ("key_error", pa.string()),          # set by planning when no unique output name could be given
        ("status", pa.string()),
        ("error", pa.string()),
        ("src_bytes", pa.large_binary()),
        ("src_sha256", pa.string()),
        ("src_format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_faces", pa.int32()),
        ("faces_skipped", pa.int32()),
        ("notes", pa.string()),
        ("faces_json", pa.string()),
        ("crops", pa.large_binary()),       # n_faces x 512 x 512 x 3 uint8 BGR, input to Restore
        ("restored", pa.large_binary()),    # same layout, output of Restore
        ("detect_fingerprint", pa.string()),
        ("detect_reused", pa.bool_()),
        ("decode_s", pa.float32()),
        ("detect_s", pa.float32()),
        ("restore_s", pa.float32()),
        ("restore_device", pa.string()),
        ("cpu_s", pa.float32()),             # CPU seconds so far (see RESULT_SCHEMA)
        ("defer_detect", pa.int8()),         # detect.device=gpu: the EXIF orientation of a JPEG master whose
                                             # faces the Restore actor finds (null: found by DecodeDetect)
        # output.device=gpu: the derivative's JPEG made by the Restore actor (before metadata; null: Compose
        # makes it on the CPU), its access copy's and its review crops (before, after of each face). Named
        # with "_", which is reserved already: no manifest column is renamed for them.
        ("_made", pa.large_binary()),
        ("_made_access", pa.large_binary()),
        ("_made_review", pa.list_(pa.large_binary())),
    ]
)


# Every column name the pipeline gives a column of its own: between stages, in results, and what planning
# adds for detection reuse (resume.attach_prior). A manifest column with one of these names is carried as
# ``manifest_<name>`` (manifest.read_manifest), so that it is neither overwritten nor read as ours.
RESERVED_COLUMNS = frozenset(WORK_SCHEMA.names) | frozenset(RESULT_SCHEMA.names) | frozenset(
    {"prior_sha256", "prior_detect_fp", "prior_faces", "prior_faces_skipped", "access_key"})


def is_reserved(name: str) -> bool:
    """A column name of ours: in ``RESERVED_COLUMNS``, or starting with ``_`` (the code's temporary columns
    and row keys: ``_source``, ``_i``, ``_faces``, ``_t0``, ...)."""
    return name in RESERVED_COLUMNS or name.startswith("_")


def with_passthrough(schema: pa.Schema, passthrough: pa.Schema | None) -> pa.Schema:
    """``schema`` plus the manifest's extra columns, which every stage carries along unchanged."""
    if passthrough is None:
        return schema
    return pa.schema(list(schema) + [f for f in passthrough if f.name not in schema.names])


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)
