"""The benchmark scripts run and print their machine-readable last line (figures checked elsewhere: BENCHMARKS.md)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED, need

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gfpgan_throughput_runs_every_row():
    """--smoke runs the CUDA-only rows' code on CPU (bf16, CUDA graphs falling back) with a tiny model."""
    r = subprocess.run([sys.executable, "bench/gfpgan_throughput.py", "--smoke", "--repeat", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    for row in ("official-style loop", "ours fp32 auto", "ours bf16 channels_last (micro-batch 4)",
                "ours bf16 + CUDA graphs (micro-batch 1) [fell back]", "FaceRestorer bf16 end to end"):
        assert any(line.startswith(row) for line in lines), (row, r.stdout)
    figures = dict(kv.split("=") for kv in lines[-1].split())
    assert set(figures) == {"speedup_fp32_vs_official_loop", "speedup_bf16_vs_official_loop",
                            "roofline_fraction", "actor_fraction_of_model", "peak_tflops_measured"}
    # Numbers, whatever this machine's speed: a slow or loaded runner may print 0.000 and must still pass.
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in figures.values()), figures
    assert "measured just now" in r.stdout  # the roofline is this device's, measured, not a quoted figure


def test_sign_cost_prints_its_figures():
    r = subprocess.run([sys.executable, "bench/sign_cost.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split())
    assert set(figures) == {"sign_ms_1mp", "sign_ms_12mp"}
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in figures.values()), figures


def test_report_scale_prints_its_figures():
    r = subprocess.run([sys.executable, "bench/report_scale.py", "--faces", "400"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split())
    assert set(figures) == {"report_20k_faces_s", "page_mb"}
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in figures.values()), figures
    assert "faces=400 images=100 failed=50" in r.stdout


def test_review_cost_prints_its_figures():
    need(SHARED / "models/detection_mobilenet0.25_Final.pth")
    r = subprocess.run([sys.executable, "bench/review_cost.py", "--repeats", "1", "--megapixels", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split())
    assert set(figures) == {"review_crops_ms_per_face", "compose_share"}
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in figures.values()), figures


def test_cpu_side_prints_its_figures():
    need(SHARED / "models/detection_mobilenet0.25_Final.pth")
    r = subprocess.run([sys.executable, "bench/cpu_side.py", "--mp", "12", "--formats", "jpeg", "--repeats", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split())
    assert set(figures) == {"cpu_ms_per_12mp_jpeg", "cores_per_h100", "gpu_detect_cpu_ms_per_12mp_jpeg",
                            "gpu_detect_cores_per_h100", "gpu_made_cpu_ms_per_12mp_jpeg", "gpu_made_cores_per_h100",
                            "cpu_floor_ms_per_12mp_jpeg"}
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in figures.values()), figures
    # with detection on the device, the CPU side is read + hash + header + Compose: all timed steps printed
    assert "gpu.probe" in r.stdout and "info.device_faces_on_cpu" in r.stdout and "with detect.device=gpu" in r.stdout
    assert "baseline.detect_facexlib" in r.stdout and "c.review_crops" in r.stdout
    # and with the derivatives made on the device too: what stays on a CPU, and the device's work timed here
    assert "gm.grey" in r.stdout and "gm.review_writes" in r.stdout and "info.device_paste_on_cpu" in r.stdout
    assert float(figures["gpu_made_cpu_ms_per_12mp_jpeg"]) < float(figures["gpu_detect_cpu_ms_per_12mp_jpeg"])


def test_detect_precision_prints_its_figures():
    need(SHARED / "models/detection_mobilenet0.25_Final.pth")
    r = subprocess.run([sys.executable, "bench/detect_precision.py", "--photos", "3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split())
    assert set(figures) == {"net_ms_fp32", "net_ms_bf16", "photos_count_differs", "worst_landmark_px",
                            "median_face_worst_px"}
    if "no bfloat16 arithmetic" in r.stdout:  # oneDNN has no bfloat16 on this CPU: said, nothing measured
        assert set(figures.values()) == {"nan"}
    else:
        assert all(re.fullmatch(r"\d+(\.\d+)?", v) for v in figures.values()), figures
        assert "3 photos, " in r.stdout and "median of each face's largest landmark distance" in r.stdout


@pytest.mark.slow
def test_device_side_and_detect_agreement_print_their_figures():
    """The GPU benches run on the CPU too (their figures then mean nothing): a broken script is found here,
    not in a lent GPU's few minutes."""
    r = subprocess.run([sys.executable, "bench/device_side.py", "--mp", "0.5", "--images", "1", "--repeats", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("device=CPU") and all(f" {k}=" in last for k in ("detect_ms", "net_r50_ms", "made_ms"))
    assert "new input shapes" in r.stdout and "benchmark mode cold" in r.stdout
    r = subprocess.run([sys.executable, "bench/detect_agreement.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # on the CPU the first three rows compare the CPU with itself; the canvas moves Blake's tied anchors
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("worst_net_tf32=0.000 worst_net_ieee=0.000 worst_device=0.000 worst_canvas="), last
