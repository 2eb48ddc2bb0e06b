"""``archive-restore``: a thin click layer over the library. PipelineError -> one line on stderr, exit 1."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click

from .errors import ConfigError, PipelineError, Stopped

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
log = logging.getLogger("pipeline")


def _clean_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        except Stopped as e:  # SIGTERM (job.run): 128 + 15, the shell's code for a process ended by it
            click.echo(f"Error: {e}; the images it finished are saved: run it again to go on", err=True)
            sys.exit(143)
    return wrapper


def _parse_sets(values: tuple[str, ...]) -> dict:
    from .config import parse_value

    out = {}
    for item in values:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. restore.precision=fp32")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(k.strip(), v)
    return out


@click.group(context_settings=CONTEXT)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="archive-restore")
def cli(verbose: int) -> None:
    """Restore faces in photo archives with GFP-GAN, on Ray.

    \b
    Example:
      archive-restore demo
      archive-restore run --manifest scans.parquet --output s3://museum/restored/
    """
    # Default: our progress (INFO) and everyone's warnings; -v: our debug messages; -vv: everyone's.
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)


def _run_options(fn):
    opts = [
        click.option("--manifest", "-m", help="Parquet/CSV/JSONL manifest with a 'uri' column (local or s3://)."),
        click.option("--output", "-o", help="Output folder or s3:// prefix (never inside the input)."),
        click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                     help="YAML config file (sections: input, detect, restore, qa, output, storage, cluster)."),
        click.option("--weights-dir", help="Folder or s3:// prefix with the model files [env ARCHIVE_RESTORE_WEIGHTS_DIR]."),
        click.option("--untrained", is_flag=True, default=None,
                     help="SMOKE TESTS ONLY: seeded random weights for missing model files."),
        click.option("--reprocess", type=click.Choice(["missing", "outdated", "failed", "all"]),
                     help="Which images to process: missing (default), outdated (other settings/weights), failed, all."),
        click.option("--redetect", is_flag=True, default=None,
                     help="Detect faces again even where stored detections of the same bytes could be reused."),
        click.option("--detector", type=click.Choice(["retinaface_resnet50", "retinaface_mobile0.25"]),
                     help="Face detector (resnet50: official quality; mobile0.25: much cheaper on CPU)."),
        click.option("--precision", type=click.Choice(["auto", "fp16", "bf16", "fp32"]),
                     help="GFP-GAN precision (auto: fp16 on CUDA, fp32 on CPU)."),
        click.option("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
        click.option("--s3-endpoint-url", help="S3-compatible endpoint URL (MinIO, Ceph, ...)."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Any setting by dotted name, e.g. --set restore.micro_batch=32. Repeatable."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _config(manifest=None, output=None, config_path=None, weights_dir=None, untrained=None, reprocess=None,
            redetect=None, detector=None, precision=None, ray_address=None, s3_endpoint_url=None, sets=()):
    from .config import load_config

    overrides = {"input.manifest": manifest, "output.root": output, "weights_dir": weights_dir,
                 "untrained": untrained, "reprocess": reprocess, "redetect": redetect, "detect.model": detector,
                 "restore.precision": precision, "cluster.address": ray_address,
                 "storage.s3_endpoint_url": s3_endpoint_url, **_parse_sets(sets)}
    return load_config(config_path, overrides)


def _echo_summary(record: dict) -> None:
    s = record["summary"]
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(s["by_status"].items())) or "none"
    gave_up = record["plan"].get("gave_up", 0)
    click.echo(f"run {record['run_id']}: {s['images']} images processed ({statuses}); {s['faces']} faces; "
               f"{record['plan']['skipped']} skipped as done; {s['detections_reused']} detections reused"
               + (f"; {gave_up} not retried after {record['config']['max_attempts']} failed attempts "
                  "(--reprocess failed tries them again)" if gave_up else ""))
    click.echo(f"throughput: {s['images_per_s']} images/s, {s['faces_per_s']} faces/s over {s['elapsed_s']} s")
    if record.get("untrained"):
        click.echo("WARNING: untrained weights were used; derivatives are NOT restorations.", err=True)
    click.echo(f"results: {record['results']}  derivatives: {record['output']}/images/")


@cli.command(context_settings=CONTEXT)
@_run_options
@_clean_errors
def run(**kwargs) -> None:
    """Restore the faces of every image in a manifest; re-running resumes.

    \b
    Example:
      archive-restore run -m s3://museum/manifests/scans.parquet -o s3://museum/restored/ -c jobs/museum.yaml
    """
    from . import job

    record = job.run(_config(**kwargs))
    _echo_summary(record)


@cli.command(context_settings=CONTEXT)
@click.argument("prefix")
@click.option("--output", "-o", required=True, help="Manifest to write (.parquet or .csv), local or s3://.")
@click.option("--s3-endpoint-url", help="S3-compatible endpoint URL.")
@_clean_errors
def manifest(prefix: str, output: str, s3_endpoint_url: str | None) -> None:
    """List the images below PREFIX (recursive, case-insensitive extensions) into a manifest.

    \b
    Example:
      archive-restore manifest s3://museum/scans/ -o s3://museum/manifests/scans.parquet
    """
    from .config import StorageConfig
    from .manifest import build_manifest

    n = build_manifest(prefix, output, StorageConfig(s3_endpoint_url=s3_endpoint_url))
    click.echo(f"{n} images listed into {output}")


def _read_options(fn):
    """Options of the commands that read an output: the same config sources as a run (file, env, --set)."""
    opts = [
        click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                     help="YAML config file of the runs (input columns, storage endpoint)."),
        click.option("--s3-endpoint-url", help="S3-compatible endpoint URL."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any setting by dotted name."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@cli.command(context_settings=CONTEXT)
@click.argument("output")
@click.option("--manifest", "-m", help="Also count current/outdated/failed/missing against this manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_read_options
@_clean_errors
def status(output: str, manifest: str | None, as_json: bool, config_path: str | None, s3_endpoint_url: str | None,
           sets: tuple[str, ...]) -> None:
    """Progress of an output folder: images by status, faces, runs. Reads only; never changes the output.

    \b
    Example:
      archive-restore status s3://museum/restored/ -m s3://museum/manifests/scans.parquet -c jobs/museum.yaml
    """
    from . import report
    from .manifest import read_manifest

    cfg = _config(manifest=manifest, config_path=config_path, s3_endpoint_url=s3_endpoint_url, sets=sets)
    table = read_manifest(cfg).table if manifest else None
    st = report.status(output, cfg.storage, table, max_attempts=cfg.max_attempts)
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    click.echo(f"{output}: {st['images']} images, {st['faces']} faces, {len(st['runs'])} runs")
    for k, v in st["by_status"].items():
        click.echo(f"  {k:<14}{v}")
    if st.get("signed"):
        last = st.get("verification")
        runs_done = [r.get("finished_at") for r in st["runs"] if r.get("finished_at")]
        stale = last and runs_done and max(runs_done) > last["verified_at"]
        click.echo(f"  signed        {st['signed']} derivatives with Content Credentials"
                   + (f"; last verify {last['verified_at'][:19]} ("
                      + ("against trust anchors" if last.get("trust_anchors") else "no trust anchors")
                      + (", before the latest run" if stale else "")
                      + f"): {last['valid']} valid, {last['invalid']} invalid"
                      if last else "; not verified yet (archive-restore verify)"))
    for r in st["unfinished_reviews"]:
        click.echo(f"  review {r} did not finish writing its files: apply any decisions file to finish it")
    for what, counts in st["faces_by"].items():
        if counts:
            click.echo(f"  faces by {what:<9}" + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if "against_manifest" in st:
        click.echo("  against manifest: " + ", ".join(f"{k} {v}" for k, v in st["against_manifest"].items()))
    for r in st["runs"][-5:]:
        s = r.get("summary") or r.get("progress") or {}
        if r.get("kind") == "review":
            click.echo(f"  review {r['run_id']} {r['state']}: {s.get('images_changed', '?')} images changed")
            continue
        if r.get("kind") == "compact":
            click.echo(f"  compact {r['run_id']} {r['state']}: {s.get('files_before', '?')} result files -> "
                       f"{s.get('files_after', '?')}, {s.get('rows_to_history', '?')} rows to history")
            continue
        click.echo(f"  run {r['run_id']} {r['state']}: {s.get('images', '?')} images, {s.get('images_per_s', '?')} img/s")


@cli.command(context_settings=CONTEXT)
@click.argument("output")
@_read_options
@_clean_errors
def report(output: str, config_path: str | None, s3_endpoint_url: str | None, sets: tuple[str, ...]) -> None:
    """Write OUTPUT/report/index.html, the review page: runs, models, counts, throughput, failed images,
    and every face before/after, to accept or reject (exported as a decisions file).

    \b
    Example:
      archive-restore report s3://museum/restored/
    """
    from . import report as rep

    cfg = _config(config_path=config_path, s3_endpoint_url=s3_endpoint_url, sets=sets)
    click.echo(rep.write_report(output, cfg.storage))


@cli.command(context_settings=CONTEXT)
@click.argument("output")
@click.option("--delete-history", is_flag=True,
              help="Delete the rows no reader needs (and earlier compactions' history) instead of keeping them "
                   "in OUTPUT/_history/.")
@_read_options
@_clean_errors
def compact(output: str, delete_history: bool, config_path: str | None, s3_endpoint_url: str | None,
            sets: tuple[str, ...]) -> None:
    """Fold the results ledger into few files (about one per 100,000 images). Each image's latest row, and
    the older rows that planning, retries, detection reuse and reviews read, stay; the other rows move to
    OUTPUT/_history/. Plans, `status` and reviews answer as before. Takes the output's lease, so it waits
    for no run: it is refused while one works on the output.

    \b
    Example:
      archive-restore compact s3://museum/restored/
    """
    from .compaction import run_compact

    cfg = _config(config_path=config_path, s3_endpoint_url=s3_endpoint_url, sets=sets)
    record = run_compact(output, cfg, delete_history)
    s = record["summary"]
    click.echo(f"{output}: {s['files_before']} result files -> {s['files_after']}; {s['rows_kept']} rows kept, "
               + (f"{s['rows_deleted']} deleted, and {s['history_files_deleted']} history files" if delete_history
                  else f"{s['rows_to_history']} moved to _history/")
               + (f"; {len(s['torn_left'])} incomplete files left for the next run to set aside"
                  if s["torn_left"] else ""))


@cli.command(context_settings=CONTEXT)
@click.argument("targets", nargs=-1, required=True)
@click.option("--trust-anchors", help="PEM bundle of trusted roots (path, s3:// or env:NAME) "
              "[default: provenance.trust_anchors].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_read_options
@_clean_errors
def verify(targets: tuple[str, ...], trust_anchors: str | None, as_json: bool, config_path: str | None,
           s3_endpoint_url: str | None, sets: tuple[str, ...]) -> None:
    """Check Content Credentials: signature, hard binding and parent ingredient. Exit 1 if any is invalid.

    With one OUTPUT folder: every signed derivative and access copy of its latest results, each parent's
    sha256 checked against the result row; the summary also goes to OUTPUT/_verify/latest.json for status
    and report. With files (PATH...): each file on its own.

    \b
    Example:
      archive-restore verify s3://museum/restored/ --trust-anchors museum-root.pem
      archive-restore verify restored/images/box1/scan-0001.tif
    """
    from . import provenance, storage

    cfg = _config(config_path=config_path, s3_endpoint_url=s3_endpoint_url, sets=sets)
    ref = trust_anchors or cfg.provenance.trust_anchors
    anchors = provenance.read_reference(ref, cfg.storage, "trust anchors") if ref else None
    is_output = len(targets) == 1 and storage.exists(storage.join(targets[0], "_results"), cfg.storage)
    if is_output:
        summary = provenance.verify_output(targets[0], cfg.storage, anchors)
        bad = summary["invalid_files"]
    else:
        bad, summary = [], {"files": len(targets)}
        for t in targets:
            v = provenance.verify_file(t, cfg.storage, anchors)
            bad += [] if v["ok"] else [v]
        summary.update(valid=len(targets) - len(bad), invalid=len(bad), invalid_files=bad)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for v in bad:
            click.echo(f"INVALID {v['uri']}: {v['why']}")
        click.echo(f"{summary['files']} files checked: {summary['valid']} valid, {summary['invalid']} invalid"
                   + ("" if anchors else " (no trust anchors given: signers are not checked against a root)"))
    if bad:
        sys.exit(1)


@cli.group(context_settings=CONTEXT)
def review() -> None:
    """Apply a curator's decisions from the report's review page.

    \b
    Example:
      archive-restore report s3://museum/restored/        # review faces, export decisions.csv
      archive-restore review apply s3://museum/restored/ decisions.csv
    """


@review.command("apply", context_settings=CONTEXT)
@click.argument("output")
@click.argument("decisions")
@_read_options
@_clean_errors
def review_apply(output: str, decisions: str, config_path: str | None, s3_endpoint_url: str | None,
                 sets: tuple[str, ...]) -> None:
    """Apply DECISIONS (CSV or JSON: image_id, face, decision=accept|reject) to OUTPUT.

    Rejected faces are reverted to the master's pixels in the derivative (its label and Content
    Credentials follow); accepted faces are recorded. Each changed image gets a new result row; the file
    is checked whole before anything changes, and applying it twice changes nothing more. Exits 1 when
    an image could not be changed (its current derivative and row stay).

    \b
    Example:
      archive-restore review apply s3://museum/restored/ ~/Downloads/decisions.csv
    """
    from . import decisions as dec

    cfg = _config(config_path=config_path, s3_endpoint_url=s3_endpoint_url, sets=sets)
    record = dec.apply(output, decisions, cfg)
    s = record["summary"]
    click.echo(f"review {record['run_id']}: {s['images_changed']} images changed ({s['faces_reverted']} faces "
               f"reverted, {s['faces_rejected']} rejected, {s['faces_accepted']} accepted), "
               f"{s['images_unchanged']} already as decided, {s['images_finished']} finished from an interrupted "
               f"review, {len(s['failed'])} failed")
    for w in s["warnings"]:
        click.echo(f"warning: {w}")
    for f in s["failed"]:
        click.echo(f"FAILED {f['image_id']}: {f['error']}")
    if s["failed"]:
        sys.exit(1)


@cli.group(context_settings=CONTEXT)
def models() -> None:
    """List, download and verify model files.

    \b
    Example:
      archive-restore models list
    """


@models.command("list", context_settings=CONTEXT)
def models_list() -> None:
    """Every model the pipeline can use, with file name, licence and source.

    \b
    Example:
      archive-restore models list
    """
    from .weights import REGISTRY

    for s in REGISTRY.values():
        click.echo(f"{s.name:<24}{s.filename:<38}{s.licence:<36}{s.url or s.note or '-'}")


@models.command("download", context_settings=CONTEXT)
@click.option("--dest", required=True, type=click.Path(file_okay=False), help="Folder to download into.")
@click.argument("names", nargs=-1)
@_clean_errors
def models_download(dest: str, names: tuple[str, ...]) -> None:
    """Download model files from their official URLs (needs network).

    \b
    Example:
      archive-restore models download --dest weights/ GFPGANv1.4 retinaface_resnet50 arcface_ir_se50
    """
    from pathlib import Path

    from . import weights
    from .errors import WeightsError

    os.makedirs(dest, exist_ok=True)
    for name in names or ("GFPGANv1.4", "retinaface_resnet50", "arcface_ir_se50"):
        spec = weights.spec_for(name)
        if not spec.url:
            raise WeightsError(f"{name} has no download URL; {spec.note or 'stage it by hand'}")
        path = Path(dest) / spec.filename
        try:
            weights.download(spec.url, path)
        except OSError as e:
            raise WeightsError(f"download of {spec.url} failed: {e}") from None
        click.echo(f"{path}  sha256 {weights.sha256_file(path)}")


@models.command("verify", context_settings=CONTEXT)
@click.option("--weights-dir", help="Folder or s3:// prefix with the model files.")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), help="YAML config file.")
@_clean_errors
def models_verify(weights_dir: str | None, config_path: str | None) -> None:
    """Resolve and hash every model file the settings need (what a run's preflight does).

    \b
    Example:
      archive-restore models verify --weights-dir s3://museum/models/
    """
    from . import weights

    cfg = _config(config_path=config_path, weights_dir=weights_dir, sets=("allow_download=false",))
    for name, r in weights.resolve_all(cfg).items():
        click.echo(f"{name:<24}{r.path}  sha256 {r.sha256}")


@cli.command(context_settings=CONTEXT)
@click.option("--output", "-o", default="demo-output", show_default=True, help="Folder for the archive and results.")
@click.option("--weights-dir", help="Folder with model files [env ARCHIVE_RESTORE_WEIGHTS_DIR].")
@_clean_errors
def demo(output: str, weights_dir: str | None) -> None:
    """Build a small sample archive and restore it on a local Ray.

    Uses the real models when they can be found or downloaded; otherwise says so loudly and runs
    with seeded random weights so the pipeline itself can still be seen working.

    \b
    Example:
      archive-restore demo -o /tmp/demo
    """
    from . import job, weights
    from .errors import WeightsError
    from .manifest import build_manifest
    from .samples import build_sample_archive
    from .config import StorageConfig

    archive = os.path.join(output, "archive")
    paths = build_sample_archive(archive)
    manifest_path = os.path.join(output, "manifest.parquet")
    build_manifest(archive, manifest_path, StorageConfig())
    click.echo(f"sample archive: {len(paths)} images in {archive}")
    cfg = _config(manifest=manifest_path, output=os.path.join(output, "restored"), weights_dir=weights_dir,
                  detector="retinaface_mobile0.25")
    try:
        weights.resolve_all(cfg)
    except WeightsError as e:
        click.echo(f"WARNING: {e}\nThe demo goes on with seeded random weights for the missing files: the "
                   "pipeline runs end to end, but its derivatives are NOT restorations.", err=True)
        cfg = cfg.model_copy(update={"untrained": True})
    _echo_summary(job.run(cfg))


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="archive-restore")


if __name__ == "__main__":
    main()
