"""The device's side of a JPEG master with detect.device=gpu and output.device=gpu, measured on the device.

    python bench/device_side.py                       # CUDA if present: 12 and 40 MP, 8 masters, 3 repeats
    python bench/device_side.py --mp 1 --images 2 --repeats 1    # on CPU: checks the script (figures meaningless)

What ``bench/cpu_side.py`` can only time on a CPU, timed where it runs in production. Masters are its masters
(a real two-face photograph scaled to the size, JPEG q95). Rows, per image, median of the repeats:

- detect: ``DeviceFaces`` over ``--images`` masters in batches of ``detect.gpu_batch``: nvJPEG decode
  (``torchvision.io.decode_jpeg`` on the device), the INTER_AREA detection copy, RetinaFace mobile0.25 (the
  real weights) and the 512x512 crops brought to the host; then the networks alone on a batch of copies,
  mobile0.25 and ResNet-50 (the shipped default; seeded weights: the file cannot be had here, and its cost
  does not depend on them).
- new input shapes: mobile0.25 alone on canvases it has not seen, in cuDNN's benchmark mode (as the Restore
  actor runs) cold and warm, and with benchmark mode off (the twelfth session measured whole masters of new
  sizes before the canvases: 1,776 ms cold, 16.6 ms warm on an H200).
- made: ``devicepaste.make_derivative`` on a master already on the device: both faces pasted, the derivative,
  the access copy and four review crops encoded (nvJPEG through ``torchvision.io.encode_jpeg`` on CUDA).

Each row gives wall milliseconds (device synchronised) and host CPU milliseconds (``time.process_time``, all
threads: on CUDA this includes the driver's spin while the host waits, so it is an upper bound of what the
work costs a core). Images per second on one device follow from the wall time. The last line is
machine-readable: ``device=<name> detect_ms=<ms> detect_host_cpu_ms=<ms> net_mobile_ms=<ms> net_r50_ms=<ms>
made_ms=<ms> made_host_cpu_ms=<ms> peak_gib=<GiB>`` for the 12 MP master (the first size when 12 is not
asked for).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from cpu_side import bench_config, make_master  # noqa: E402

from pipeline import devicepaste, imageio, weights  # noqa: E402
from pipeline.devicefaces import DeviceFaces, canvas_side  # noqa: E402
from pipeline.faces import FaceDetector  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median wall and host-CPU seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    _sync(device)
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def shapes(faces: DeviceFaces, device: torch.device) -> None:
    """What an input shape the network has not seen costs here: mobile0.25 alone on five canvas shapes, in
    cuDNN's benchmark mode (as the Restore actor runs) cold and then warm, and on five more with it off."""
    net = faces.detector.net

    def each(todo):
        out = []
        for n, h, w in todo:
            x = torch.rand(n, 3, h, w, device=device).mul(255).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                _sync(device)
                t = time.perf_counter()
                net(x - net.mean_tensor)
                _sync(device)
            out.append((time.perf_counter() - t) * 1e3)
        return out

    sides = [(1600, 640), (1600, 960), (1600, 1600), (640, 1600), (960, 1600)]  # none run before (main: 1280 x 1600)
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        cold = each([(1, h, w) for h, w in sides])
        warm = each([(1, h, w) for h, w in sides])
        torch.backends.cudnn.benchmark = False
        off = each([(3, h, w) for h, w in sides])  # batch 3: shapes not seen yet
    finally:
        torch.backends.cudnn.benchmark = before
    print(f"\nnew input shapes, mobile0.25 alone (5 canvases): benchmark mode cold {statistics.median(cold):.1f} ms, "
          f"warm {statistics.median(warm):.1f} ms; benchmark off, new shapes {statistics.median(off):.1f} ms "
          f"(medians; cold: {' '.join(f'{x:.0f}' for x in cold)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mp", type=float, nargs="+", default=[12, 40])
    ap.add_argument("--images", type=int, default=8, help="masters per detect measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = bench_config(tmp)
        r50 = cfg.model_copy(update={"untrained": True, "detect": cfg.detect.model_copy(
            update={"model": "retinaface_resnet50"})})
        mobile = DeviceFaces(FaceDetector(cfg.detect, weights.resolve(cfg.detect.model, cfg), device=device),
                             cfg.detect.gpu_batch)
        resnet = DeviceFaces(FaceDetector(r50.detect, weights.resolve(r50.detect.model, r50), device=device),
                             cfg.detect.gpu_batch)
        print(f"device: {name}; torch {torch.__version__}; {args.images} masters per detect run, batch "
              f"{cfg.detect.gpu_batch}; median of {args.repeats}")
        rows = {}
        for mp in args.mp:
            data = make_master(tmp, mp, "jpeg").read_bytes()
            head = imageio.probe(data, cfg.input.max_pixels)
            many, orient = [data] * args.images, [head.orientation] * args.images
            pixels = [head.stored_size[0] * head.stored_size[1]] * args.images
            found = mobile([data], [head.orientation], keep=[True])[0]
            assert not isinstance(found, Exception) and len(found.faces) >= 2, f"{mp} MP: {found}"
            records = [{"bbox": f.bbox.tolist(), "affine": a.ravel().tolist(), "action": "restored"}
                       for f, a in zip(found.faces[:2], found.affines[:2])]
            restored = np.ascontiguousarray(found.crops[:2])  # stand-ins for the restored faces
            master = found.master
            del found
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            dw, dc = timed(lambda: mobile(many, orient, pixels), device, args.repeats)
            # ResNet-50's network alone on a batch of detection copies: seeded weights find thousands of
            # "faces", whose post-processing would time nothing a trained detector does
            _, ch, cw = mobile.detector.copy_size(*master.shape[1:])
            ch, cw = canvas_side(ch), canvas_side(cw)  # what the network sees
            batch = min(args.images, cfg.detect.gpu_batch)
            copies = torch.rand(batch, 3, ch, cw, device=device).mul(255).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                rw, rc = timed(lambda: resnet.detector.net(copies - resnet.detector.net.mean_tensor), device,
                               args.repeats)
                mnw, _ = timed(lambda: mobile.detector.net(copies - mobile.detector.net.mean_tensor), device,
                               args.repeats)
            rw, rc, mnw = rw * args.images / batch, rc * args.images / batch, mnw * args.images / batch

            def made():
                with mobile.using():
                    return devicepaste.make_derivative(master.clone(), records, restored, cfg.output.jpeg_quality,
                                                       (cfg.output.access_long_side, cfg.output.access_quality),
                                                       (cfg.review.crop_size, cfg.review.crop_quality))

            mw, mc = timed(made, device, args.repeats)
            out = made()
            assert out.derivative[:2] == b"\xff\xd8" and len(out.review) == 2
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            n = args.images
            rows[mp] = dict(detect_ms=dw / n * 1e3, detect_host_cpu_ms=dc / n * 1e3, net_mobile_ms=mnw / n * 1e3,
                            net_r50_ms=rw / n * 1e3, made_ms=mw * 1e3, made_host_cpu_ms=mc * 1e3, peak_gib=peak)
            r = rows[mp]
            print(f"\njpeg {mp:g} MP ({len(data) / 1e6:.1f} MB), per image:")
            print(f"  detect mobile0.25 (decode, copy, detect, crops)  {r['detect_ms']:8.2f} ms wall "
                  f"{r['detect_host_cpu_ms']:8.2f} ms host CPU  ({1e3 / r['detect_ms']:.0f} images/s)")
            print(f"  network alone, batch {batch}: mobile0.25 {r['net_mobile_ms']:.2f} ms, resnet50 "
                  f"{r['net_r50_ms']:.2f} ms per canvas of {cw}x{ch}  ({1e3 / r['net_r50_ms']:.0f} images/s on resnet50)")
            print(f"  made (paste 2 faces, derivative, access, crops)  {r['made_ms']:8.2f} ms wall "
                  f"{r['made_host_cpu_ms']:8.2f} ms host CPU  ({1e3 / r['made_ms']:.0f} images/s)")
            print(f"  peak device memory {peak:.2f} GiB; derivative {len(out.derivative) / 1e6:.2f} MB "
                  f"(master {len(data) / 1e6:.2f} MB)")
        shapes(mobile, device)
        r = rows.get(12.0) or rows[args.mp[0]]
        print(f"device={name.replace(' ', '_')} " + " ".join(f"{k}={v:.2f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
