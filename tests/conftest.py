"""Shared fixtures: real images, weights and fixtures from ../shared, a local Ray with a logical GPU,
and a real S3 endpoint (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # the S3 fault proxy and the fault harness live there
# Not ARCHIVE_RESTORE_*: that prefix belongs to the config's environment variables.
SHARED = Path(os.environ.get("ARCHIVE_SHARED_DIR", REPO.parent / "shared"))
IMAGES = SHARED / "images"
MODELS = SHARED / "models"
FIXTURES = SHARED / "fixtures" / "gfpgan"

# Credentials for the local S3 endpoint. Set before any Ray starts so that its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Weights fetched from s3:// are cached here, not in the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="archive-restore-test-cache-")

# Images with few faces, so an end-to-end job on CPU stays fast; the crowd photos are used elsewhere.
E2E_IMAGES = ["whole/codeformer_00.jpg", "whole/codeformer_02.png", "whole/codeformer_04.jpg",
              "whole/facexlib_test.jpg", "whole/gfpgan_Blake_Lively.jpg", "old/old_a.png", "old/old_b.png",
              "old/old_d.png"]


def need(path: Path) -> Path:
    """A file from ../shared. Outside CI a missing one skips the test; in CI it fails it, so a broken
    checkout can never pass by skipping everything."""
    if not path.exists():
        msg = f"{path} not present (../shared is provided by the workplace and CI)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """Real detector and identity weights (the tiny GFP-GAN is given by its path: see TINY_GFPGAN)."""
    d = tmp_path_factory.mktemp("weights")
    for name in ("detection_mobilenet0.25_Final.pth", "identity_mobilefacenet_arcface.onnx"):
        os.symlink(need(MODELS / name), d / name)
    return d


# The tiny seeded GFP-GAN of the golden fixture: a user-supplied checkpoint, its architecture read from it.
TINY_GFPGAN = FIXTURES / "gfpgan_tiny_a_checkpoint.pth"


def test_overrides(weights_dir: Path, out: Path, manifest: Path | str | None = None, **extra) -> dict:
    """Settings for a fast CPU job: real mobile0.25 detector, tiny seeded GFP-GAN, untrained ArcFace. Faces are
    found by DecodeDetect (detect.device=cpu): with the tests' logical GPU, auto would send JPEG masters to the
    Restore actor (tests/test_devicefaces.py runs that path)."""
    o = {"weights_dir": str(weights_dir), "allow_download": False, "untrained": True,
         "detect.model": "retinaface_mobile0.25", "detect.device": "cpu", "restore.model": str(need(TINY_GFPGAN)),
         "output.root": str(out),
         "input.manifest": str(manifest) if manifest else None, "cluster.rows_per_block": 2,
         "cluster.restore_batch_size": 4}
    o.update(extra)
    return o


test_overrides.__test__ = False  # a helper, not a test


def jpeg_of(bgr, orientation: int = 1, grey: bool = False) -> bytes:
    """A JPEG (quality 92) of 8-bit BGR pixels, RGB or grey, with an EXIF orientation."""
    import io

    from PIL import Image

    im = Image.fromarray(bgr[:, :, ::-1]).convert("L" if grey else "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs and 1 logical GPU: the GPU actor path is scheduled as on a cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float) -> bool:
    """Whether something listens on 127.0.0.1:port within the time."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode, in its own process: a real HTTP S3 endpoint on 127.0.0.1."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_for_port(port, 30):
        proc.kill()
        pytest.fail("moto server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3fs_client(s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    return fs


@pytest.fixture
def archive(tmp_path) -> Path:
    """A small archive folder with real photographs (copied: originals are never written)."""
    root = tmp_path / "archive"
    for rel in E2E_IMAGES:
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(need(IMAGES / rel), dst)
    return root
