"""Progress and outcome of an output folder: counts by status and by face decision, current/outdated/
failed/missing against a manifest, throughput per run, and the review page (``report/index.html``).

The review page is one self-contained static HTML file (no network, no server): the header, counts and
throughput chart are rendered here; the faces and failed images travel as JSON inside the page and are
listed, sorted, filtered and paged by its own script (``report_page.html``), so 20,000 faces stay
responsive. A curator's accept/reject choices are kept in the browser and exported as a decisions file
for ``archive-restore review apply`` (decisions.py). Links are relative to the page, so a copy of the
output folder (or an ``s3://`` output synced or served as a static site) shows its crops.
"""

from __future__ import annotations

import html
import json
import urllib.parse
from datetime import datetime
from importlib import resources

import pyarrow as pa
import pyarrow.compute as pc

from . import ledger, provenance, resume, runs, storage
from .schema import ERROR_STATUSES
from .config import StorageConfig


def count_by_status(results: pa.Table) -> dict[str, int]:
    """Rows per status, sorted by status name."""
    if not results.num_rows:
        return {}
    counts = results.group_by("status").aggregate([("status", "count")]).to_pylist()
    return dict(sorted((r["status"], r["status_count"]) for r in counts))


def status(output_root: str, cfg: StorageConfig, manifest: pa.Table | None = None,
           fingerprint: str | None = None, results: pa.Table | None = None, max_attempts: int | None = None,
           records: list[dict] | None = None) -> dict:
    """Counts over the latest row per image; with a manifest (and fingerprint), what remains to do.
    ``results``: the ledger when the caller already loaded it (with at least the ledger columns and n_faces);
    ``records``: the run records, likewise."""
    if results is None:
        results = ledger.load_results(output_root, cfg, columns=ledger.LEDGER_COLUMNS + ["n_faces", "run_id",
                                                                                      "c2pa_signed", "faces"])
    latest = resume.latest_rows(results)
    if records is None:
        records = runs.read_records(output_root, cfg)
    out = {
        "output": output_root,
        "images": latest.num_rows,
        "result_rows": results.num_rows,
        "by_status": count_by_status(latest),
        "faces": int(pc.sum(latest["n_faces"]).as_py() or 0) if latest.num_rows else 0,
        "runs": [{"kind": r.get("kind", "job"), **{k: r.get(k) for k in ("run_id", "state", "fingerprint",
                                                                         "started_at", "finished_at", "summary")}}
                 for r in records],
        "signed": int(pc.sum(pc.cast(pc.fill_null(latest["c2pa_signed"], False), pa.int64())).as_py() or 0)
        if latest.num_rows and "c2pa_signed" in latest.column_names else 0,
        "verification": provenance.last_verification(output_root, cfg),
        "faces_by": face_counts(latest),
    }
    working = (runs.holder(output_root, cfg) or {}).get("run_id")  # a review still at work is not unfinished
    out["unfinished_reviews"] = [r["run_id"] for r in records if r.get("kind") == "review" and r.get("in_flight")
                                 and not (r.get("state") == "running" and r["run_id"] == working)]
    if manifest is not None:
        # Without a fingerprint from the caller, "current" means: made with the latest run's settings.
        # (and the fingerprints it counted as current: a legacy form, see RunConfig.accepted_fingerprints).
        jobs = [r for r in records if r.get("kind", "job") == "job" and r.get("fingerprint")]
        fp = fingerprint or ((jobs[-1].get("fingerprints") or jobs[-1]["fingerprint"]) if jobs else None)
        counts = resume.plan(manifest, results, fp or "", "missing", max_attempts).counts
        out["against_manifest"] = {k: counts[k] for k in ("manifest", "current", "outdated", "failed", "missing",
                                                           "gave_up")}
    return out


def face_counts(latest: pa.Table) -> dict[str, dict[str, int]]:
    """Faces of the latest rows by QA verdict, by action, and by a curator's decision."""
    out = {"qa": {}, "action": {}, "decision": {}}
    if not latest.num_rows or "faces" not in latest.column_names:
        return out
    faces = pc.list_flatten(latest["faces"])
    if not len(faces):
        return out
    for key, field, none in (("qa", "qa", "unscored"), ("action", "action", "none"),
                             ("decision", "review", "undecided")):
        try:
            values = pc.fill_null(pc.struct_field(faces, field), none)
        except (KeyError, pa.ArrowInvalid):  # results written before the field existed
            values = pa.array([none] * len(faces))
        vc = pc.value_counts(values).to_pylist()
        out[key] = dict(sorted((v["values"], v["counts"]) for v in vc))
    return out


PAGE_COLUMNS = ledger.LEDGER_COLUMNS + ["uri", "error", "output_uri", "out_sha256", "faces", "untrained", "run_id",
                                        "review_id", "n_faces", "c2pa_signed"]
CHART_BINS = 60


def _link(uri: str | None, output_root: str) -> str | None:
    """``uri`` as the page (``<output>/report/index.html``) links to it: relative inside the output, a
    file:// URL for other local files, http(s) as is; None for anything else (s3://, and never a
    scheme a browser would run, such as javascript:, whatever a manifest holds)."""
    if not uri:
        return None
    if uri.startswith(output_root.rstrip("/") + "/"):
        return "../" + urllib.parse.quote(uri[len(output_root.rstrip("/")) + 1:])
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        return uri
    if not scheme and uri.startswith("/"):
        return "file://" + urllib.parse.quote(uri)
    return None


def throughput(results: pa.Table, records: list[dict]) -> dict:
    """Faces/s and images/s over the job runs' active time (``CHART_BINS`` bins; runs laid end to end,
    so that days between scheduled runs do not flatten the chart), from each row's finish time."""
    jobs = {r["run_id"]: r for r in records if r.get("kind", "job") == "job"}
    if not results.num_rows:
        return {"bins": [], "runs": [], "bin_s": 0}
    keep = pc.is_in(results["run_id"], value_set=pa.array(sorted(jobs), pa.string()))
    for col in ("review_id", "derived_by"):  # a review's rows, and access copies added later: no run's throughput
        if col in results.column_names:
            keep = pc.and_(keep, pc.is_null(results[col]))
    t = results.select(["run_id", "finished_at", "n_faces"]).filter(keep)
    spans, total = [], 0.0
    for run_id in sorted(set(t["run_id"].to_pylist())):
        rows = t.filter(pc.equal(t["run_id"], run_id))
        ts = pc.cast(rows["finished_at"], pa.timestamp("ms", tz="UTC"))
        end = pc.max(ts).as_py().timestamp()
        started = jobs[run_id].get("started_at")
        start = datetime.fromisoformat(started).timestamp() if started else pc.min(ts).as_py().timestamp()
        start = min(start, pc.min(ts).as_py().timestamp())
        spans.append((run_id, start, max(end, start + 1e-3), rows, ts))
        total += max(end, start + 1e-3) - start
    if not spans:
        return {"bins": [], "runs": [], "bin_s": 0}
    bin_s = total / CHART_BINS
    faces, images = [0.0] * CHART_BINS, [0.0] * CHART_BINS
    offset, marks = 0.0, []
    for run_id, start, end, rows, ts in spans:
        marks.append({"run_id": run_id, "at": offset / total})
        secs = [x.timestamp() - start + offset for x in ts.to_pylist()]
        for x, n in zip(secs, rows["n_faces"].to_pylist()):
            i = min(CHART_BINS - 1, int(x / bin_s))
            faces[i] += n or 0
            images[i] += 1
        offset += end - start
    return {"bin_s": bin_s, "runs": marks, "bins": [{"faces_per_s": f / bin_s, "images_per_s": m / bin_s}
                                                     for f, m in zip(faces, images)]}


def _svg_chart(tp: dict) -> str:
    """A small inline SVG of faces/s (line) and images/s (dashed) over the runs' active time."""
    if not tp["bins"]:
        return "<p>No finished images yet.</p>"
    w, h, pad = 720, 160, 30
    peak = max(max(b["faces_per_s"], b["images_per_s"]) for b in tp["bins"]) or 1.0
    n = len(tp["bins"])

    def line(key: str) -> str:
        return " ".join(f"{pad + (w - 2 * pad) * (i + 0.5) / n:.1f},{h - pad - (h - 2 * pad) * b[key] / peak:.1f}"
                        for i, b in enumerate(tp["bins"]))
    marks = "".join(
        f'<line x1="{pad + (w - 2 * pad) * m["at"]:.1f}" y1="{pad}" x2="{pad + (w - 2 * pad) * m["at"]:.1f}" '
        f'y2="{h - pad}" stroke="#bbb"/><text x="{pad + 3 + (w - 2 * pad) * m["at"]:.1f}" y="{pad - 4}" '
        f'font-size="9" fill="#666">{html.escape(str(m["run_id"]))}</text>' for m in tp["runs"])
    return (f'<svg id="throughput" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
            f'aria-label="throughput over time">{marks}'
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>'
            f'<text x="2" y="{pad + 4}" font-size="10">{peak:.3g}</text><text x="2" y="{h - pad}" font-size="10">0'
            f'</text><polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line("faces_per_s")}"/>'
            f'<polyline fill="none" stroke="#ff7f0e" stroke-dasharray="4 3" points="{line("images_per_s")}"/>'
            f'<text x="{pad}" y="{h - 8}" font-size="10">faces/s (solid), images/s (dashed); '
            f'{tp["bin_s"]:.3g} s per point, runs end to end</text></svg>')


def page_data(output_root: str, latest: pa.Table) -> dict:
    """What the page's script lists: every face of ``latest`` (the latest row per image) and every failed
    image, as compact column-ordered arrays (20,000 faces in a few MB)."""
    images, faces, failed = [], [], []
    if latest.num_rows:
        cols = [c for c in ("image_id", "uri", "status", "error", "output_uri", "out_sha256", "faces", "run_id")
                if c in latest.column_names]
        errors = {s.value for s in ERROR_STATUSES}
        for r in latest.select(cols).to_pylist():
            if r["status"] in errors:
                failed.append([r["image_id"], r["status"], r.get("error"), _link(r["uri"], output_root), r["uri"]])
                continue
            if not r.get("faces"):
                continue
            k = len(images)
            # the derivative's sha256 (prefix) goes into each decision: `review apply` refuses stale ones
            images.append([r["image_id"], _link(r["uri"], output_root), r["uri"],
                           _link(r.get("output_uri"), output_root), r.get("run_id"), (r.get("out_sha256") or "")[:16]])
            for i, f in enumerate(r["faces"]):
                sim = f.get("identity_similarity")
                faces.append([k, i, None if sim is None else round(float(sim), 4), f.get("qa"), f.get("action"),
                              f.get("review"), _link(f.get("review_before"), output_root),
                              _link(f.get("review_after"), output_root)])
    return {"output": output_root, "images": images, "faces": faces, "failed": failed,
            "face_fields": ["image", "face", "similarity", "qa", "action", "review", "before", "after"],
            "image_fields": ["image_id", "uri_link", "uri", "derivative_link", "run_id", "derivative_sha256"],
            "failed_fields": ["image_id", "status", "error", "uri_link", "uri"]}


def _models(records: list[dict]) -> str:
    seen = {}
    for r in records:
        for name, w in (r.get("weights") or {}).items():
            seen[(name, w.get("sha256"), bool(w.get("untrained")))] = r["run_id"]
    esc = html.escape
    return "".join(f"<tr><td>{esc(str(n))}</td><td><code>{esc(str(sha))}</code></td>"
                   f"<td>{'UNTRAINED (seeded random weights)' if u else 'trained'}</td><td>{esc(str(run))}</td></tr>"
                   for (n, sha, u), run in seen.items())


def render_html(output_root: str, cfg: StorageConfig) -> str:
    out = storage.normalize(output_root)
    # Once, for everything on the page; with the rows `compact` moved to history (the throughput chart)
    results = ledger.load_results(out, cfg, columns=PAGE_COLUMNS, history=True)
    records = runs.read_records(out, cfg)
    st = status(out, cfg, results=results, records=records)
    latest = resume.latest_rows(results)
    esc = html.escape
    untrained_rows = int(pc.sum(pc.cast(pc.fill_null(latest["untrained"], False), pa.int64())).as_py() or 0) \
        if latest.num_rows and "untrained" in latest.column_names else 0
    untrained_runs = [r["run_id"] for r in records if r.get("untrained")]
    banner = ""
    if untrained_rows or untrained_runs:
        banner = (f'<div id="untrained-banner" class="banner">UNTRAINED RESULTS: {untrained_rows} current result(s) '
                  f'were made with seeded random weights, not a trained model (runs: '
                  f'{esc(", ".join(map(str, untrained_runs)) or "see the results")}). Their derivatives are NOT '
                  'restorations and must not enter the archive.</div>')
    if st["unfinished_reviews"]:
        banner += (f'<div id="unfinished-banner" class="banner">Review(s) {esc(", ".join(st["unfinished_reviews"]))} '
                   'did not finish writing their files: some derivatives may still show faces their rows say were '
                   'reverted. Run <code>archive-restore review apply</code> with any decisions file to finish.</div>')
    by_status = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in st["by_status"].items())
    fb = st["faces_by"]
    face_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(', '.join(f'{a} {b}' for a, b in v.items()) or '-')}</td>"
                        "</tr>" for k, v in fb.items())
    last = st["verification"]
    verified = (f"; last verified {esc(last['verified_at'][:19])} "
                f"({'against trust anchors' if last.get('trust_anchors') else 'no trust anchors'}): "
                f"{last['valid']} valid, {last['invalid']} invalid" if last else "; not verified yet")
    run_rows = "".join(
        f"<tr><td>{esc(str(r['run_id']))}</td><td>{esc(str(r.get('kind', 'job')))}</td>"
        f"<td>{esc(str(r.get('state')))}</td><td>{esc(str(r.get('started_at', ''))[:19])}</td>"
        f"<td>{esc(str(r.get('finished_at', '') or '')[:19])}</td>"
        f"<td>{esc(str((r.get('summary') or {}).get('images', '')))}</td>"
        f"<td>{esc(str((r.get('summary') or {}).get('faces_per_s', '')))}</td>"
        f"<td><code>{esc(str(r.get('fingerprint') or ''))}</code></td></tr>" for r in records)
    static = f"""<h1>archive-restore review: {esc(out)}</h1>{banner}
<p>{st['images']} images, {st['faces']} faces, {st['result_rows']} result rows over {len(records)} runs and reviews.
{st['signed']} derivatives carry signed Content Credentials (C2PA){verified}.</p>
<h2>Runs</h2><table id="runs"><tr><th>run</th><th>kind</th><th>state</th><th>started</th><th>finished</th>
<th>images</th><th>faces/s</th><th>fingerprint</th></tr>{run_rows}</table>
<h2>Models</h2><table id="models"><tr><th>model</th><th>weights sha256</th><th></th><th>latest run</th></tr>
{_models(records)}</table>
<h2>Images by status (latest result per image)</h2><table id="by-status">{by_status}</table>
<h2>Faces</h2><table id="faces-by">{face_rows}</table>
<h2>Throughput</h2>{_svg_chart(throughput(results, records))}"""
    # "<" only ever occurs inside JSON strings: as \u003c no text can end the script element early.
    data = json.dumps(page_data(out, latest), separators=(",", ":")).replace("<", "\\u003c")
    page = resources.files("pipeline").joinpath("report_page.html").read_text(encoding="utf-8")
    head, rest = page.split("{{STATIC}}")
    middle, tail = rest.split("{{DATA}}")
    return head + static + middle + data + tail


def write_report(output_root: str, cfg: StorageConfig) -> str:
    uri = storage.join(storage.normalize(output_root), "report", "index.html")
    storage.write_bytes(uri, render_html(output_root, cfg).encode(), cfg)
    return uri
