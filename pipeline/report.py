"""Progress and outcome of an output folder: counts by status, current/outdated/failed/missing
against a manifest, throughput per run, and a self-contained HTML report with flagged faces."""

from __future__ import annotations

import html

import pyarrow as pa
import pyarrow.compute as pc

from . import ledger, provenance, resume, runs, storage
from .config import StorageConfig


def count_by_status(results: pa.Table) -> dict[str, int]:
    """Rows per status, sorted by status name."""
    if not results.num_rows:
        return {}
    counts = results.group_by("status").aggregate([("status", "count")]).to_pylist()
    return dict(sorted((r["status"], r["status_count"]) for r in counts))


def status(output_root: str, cfg: StorageConfig, manifest: pa.Table | None = None,
           fingerprint: str | None = None, results: pa.Table | None = None, max_attempts: int | None = None) -> dict:
    """Counts over the latest row per image; with a manifest (and fingerprint), what remains to do.
    ``results``: the ledger when the caller already loaded it (with at least the ledger columns and n_faces)."""
    if results is None:
        results = ledger.load_results(output_root, cfg, columns=ledger.LEDGER_COLUMNS + ["n_faces", "run_id",
                                                                                      "c2pa_signed"])
    latest = resume.latest_rows(results)
    out = {
        "output": output_root,
        "images": latest.num_rows,
        "result_rows": results.num_rows,
        "by_status": count_by_status(latest),
        "faces": int(pc.sum(latest["n_faces"]).as_py() or 0) if latest.num_rows else 0,
        "runs": [{k: r.get(k) for k in ("run_id", "state", "fingerprint", "started_at", "finished_at", "summary")}
                 for r in runs.read_records(output_root, cfg)],
        "signed": int(pc.sum(pc.cast(pc.fill_null(latest["c2pa_signed"], False), pa.int64())).as_py() or 0)
        if latest.num_rows and "c2pa_signed" in latest.column_names else 0,
        "verification": provenance.last_verification(output_root, cfg),
    }
    if manifest is not None:
        # Without a fingerprint from the caller, "current" means: made with the latest run's settings.
        fp = fingerprint or (out["runs"][-1]["fingerprint"] if out["runs"] else None)
        counts = resume.plan(manifest, results, fp or "", "missing", max_attempts).counts
        out["against_manifest"] = {k: counts[k] for k in ("manifest", "current", "outdated", "failed", "missing",
                                                           "gave_up")}
    return out


def flagged_faces(results: pa.Table, limit: int = 200) -> list[dict]:
    """Faces flagged by identity QA in the latest row per image, least similar first."""
    results = resume.latest_rows(results)
    rows = []
    if not results.num_rows or "faces" not in results.column_names:
        return rows
    for r in results.filter(pc.greater(results["n_faces"], 0)).select(
            ["image_id", "uri", "output_uri", "faces"]).to_pylist():
        for i, f in enumerate(r["faces"] or []):
            if f.get("qa") == "flag":
                rows.append({"image_id": r["image_id"], "uri": r["uri"], "output_uri": r["output_uri"], "face": i,
                             "identity_similarity": f["identity_similarity"], "action": f["action"]})
    rows.sort(key=lambda x: x["identity_similarity"] if x["identity_similarity"] is not None else 2)
    return rows[:limit]


def render_html(output_root: str, cfg: StorageConfig) -> str:
    results = ledger.load_results(output_root, cfg)  # once, for the counts and the flagged faces
    st = status(output_root, cfg, results=results)
    flagged = flagged_faces(results)
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in st["by_status"].items())
    last = st["verification"]
    verified = (f"; last verified {esc(last['verified_at'][:19])} "
                f"({'against trust anchors' if last.get('trust_anchors') else 'no trust anchors'}): "
                f"{last['valid']} valid, {last['invalid']} invalid" if last else "; not verified yet")
    runs = "".join(
        f"<tr><td>{esc(str(r['run_id']))}</td><td>{esc(str(r.get('state')))}</td>"
        f"<td>{esc(str((r.get('summary') or {}).get('images', '')))}</td>"
        f"<td>{esc(str((r.get('summary') or {}).get('images_per_s', '')))}</td></tr>" for r in st["runs"])
    faces = "".join(
        f"<tr><td>{esc(f['image_id'])}</td><td>{f['face']}</td><td>{f['identity_similarity']:.3f}</td>"
        f"<td>{esc(f['action'])}</td><td><a href=\"{esc(f['uri'])}\">before</a></td>"
        f"<td><a href=\"{esc(f['output_uri'] or '')}\">after</a></td></tr>" for f in flagged)
    return f"""<!doctype html><meta charset="utf-8"><title>archive-restore report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:left}}</style>
<h1>archive-restore: {esc(output_root)}</h1>
<p>{st['images']} images, {st['faces']} faces, {st['result_rows']} result rows over {len(st['runs'])} runs.</p>
<h2>Images by status (latest result per image)</h2><table>{rows}</table>
<p>{st['signed']} derivatives carry signed Content Credentials (C2PA){verified}.</p>
<h2>Runs</h2><table><tr><th>run</th><th>state</th><th>images</th><th>images/s</th></tr>{runs}</table>
<h2>Faces flagged by identity QA ({len(flagged)})</h2>
<table><tr><th>image</th><th>face</th><th>similarity</th><th>action</th><th></th><th></th></tr>{faces}</table>
"""


def write_report(output_root: str, cfg: StorageConfig) -> str:
    uri = storage.join(output_root, "report", "index.html")
    storage.write_bytes(uri, render_html(output_root, cfg).encode(), cfg)
    return uri
