"""Benchmark: flashing an image to a loop device, meshcloud against `dd` (and bmaptool).

    python bench/flash.py [--quick] [--out FILE] [--image IMG] [--trials N]

Each trial writes the same image to the same loop device, alternating
`dd bs=4M conv=fsync` (the usual instruction), the same with
`oflag=direct`, `meshcloud flash` (mapped
blocks only, each range hashed, flushed; then read back and the identity
written and read back), and `bmaptool copy` where installed. Every writer
ends with its data on the backing medium (fsync). Ratios are taken per
pair of neighbouring runs, so that the shared machine's drift cancels out.

By default the image is the rack image (`meshcloud image build`: the one
the current sources would build, or else the latest build) if there is one, else (and with --quick) a synthetic image with the rack
image's shape: 60 % of its blocks mapped, in extents of 64 KiB to 8 MiB, of
random (incompressible) bytes. The image is read from the page cache by
every writer alike.

Headline: ``write_speedup_vs_dd`` (dd time / meshcloud write time, median of
pairs) and ``verify_s`` (median read-back verification time, identity included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from argon2 import PasswordHasher  # noqa: E402

from meshcloud.images.bmap import generate_bmap, render_bmap  # noqa: E402
from meshcloud.images.disklayout import MIB, layout_for_root, sfdisk_script  # noqa: E402
from meshcloud.images.flash import flash_devices, load_image, plan_flash  # noqa: E402
from meshcloud.images.identity import encode_record  # noqa: E402
from meshcloud.images.kit import create_kit, load_kit, plan_kit  # noqa: E402
from meshcloud.images.rackos import DEFAULT_BUILD_DIR, find_rack_image  # noqa: E402

MB = 1_000_000


def synthetic_image(path: Path, root_mib: int, mapped_fraction: float = 0.6) -> Path:
    """A sparse image with the rack layout and ``mapped_fraction`` of its root mapped."""
    layout = layout_for_root(root_mib * MIB)
    with open(path, "xb") as f:
        f.truncate(layout.total_bytes)
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)],
                   input=sfdisk_script(layout), text=True, check=True)  # fmt: skip
    rng = random.Random(42)
    with open(path, "r+b") as f:
        f.seek(layout.identity.start_bytes)
        f.write(encode_record(None))
        pos = layout.root.start_bytes
        end = layout.total_bytes
        while pos < end:
            extent = min(rng.choice([64 * 1024, 512 * 1024, 2 * MIB, 8 * MIB]), end - pos)
            if rng.random() < mapped_fraction:
                f.seek(pos)
                f.write(os.urandom(extent))
            pos += extent
    path.with_name(path.name + ".bmap").write_text(render_bmap(generate_bmap(path)))
    return path


def distribution(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {"p50": round(statistics.median(ordered), 3), "p95": round(pct(0.95), 3),
            "p99": round(pct(0.99), 3), "max": round(ordered[-1], 3)}  # fmt: skip


def run_dd(image: Path, device: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={image}", f"of={device}", "bs=4M", "conv=fsync", "status=none"],
                   check=True)  # fmt: skip
    return time.monotonic() - t0


def run_dd_direct(image: Path, device: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={image}", f"of={device}", "bs=4M", "oflag=direct", "conv=fsync",
                    "status=none"], check=True)  # fmt: skip
    return time.monotonic() - t0


def run_bmaptool(image: Path, device: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(["bmaptool", "-q", "copy", "--bmap", f"{image}.bmap", str(image), str(device)],
                   check=True, capture_output=True)  # fmt: skip
    return time.monotonic() - t0


def run_meshcloud(image: Path, device: Path, kit_dir: Path) -> tuple[float, float]:
    info = load_image(image)
    plan = plan_flash(info, [(device, "rack-1")])
    if plan.refused:
        raise SystemExit(f"refused: {plan.refused[0].reasons}")
    [result] = flash_devices(plan, load_kit(kit_dir))
    if not result.ok:
        raise SystemExit(f"meshcloud flash failed: {result.error}")
    return result.write_s, result.verify_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "flash.json")
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--trials", type=int, default=None)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/flash.py needs root (loop devices)", file=sys.stderr)
        return 2
    trials = args.trials or (3 if args.quick else 7)
    work = Path(tempfile.mkdtemp(prefix="mc-bench-flash-"))
    device = ""
    try:
        image = args.image
        kind = "given"
        if image is None and not args.quick:
            cached = find_rack_image()
            latest = DEFAULT_BUILD_DIR / "current" / "rack-os.img"
            if cached is not None:
                image, kind = cached.image, "rack-os"
            elif latest.exists():
                image, kind = latest.resolve(), "rack-os (latest build)"
        if image is None:
            image = synthetic_image(work / "rack-os.img", 160 if args.quick else 1024)
            kind = "synthetic"
        info = load_image(image)
        backing = work / "disk.raw"
        with open(backing, "xb") as f:
            f.truncate(info.bmap.image_bytes)
        device = subprocess.run(["losetup", "--find", "--show", str(backing)],
                                capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        create_kit(plan_kit("bench", "rack-1"), work / "kit",
                   hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))  # fmt: skip
        use_bmaptool = shutil.which("bmaptool") is not None
        dd_s: list[float] = []
        mc_s: list[float] = []
        verify_s: list[float] = []
        bt_s: list[float] = []
        ddd_s: list[float] = []
        run_dd(image, Path(device))  # warm the page cache with the image for everyone
        for trial in range(trials):
            dd_s.append(run_dd(image, Path(device)))
            ddd_s.append(run_dd_direct(image, Path(device)))
            write, verify = run_meshcloud(image, Path(device), work / "kit")
            mc_s.append(write)
            verify_s.append(verify)
            if use_bmaptool:
                bt_s.append(run_bmaptool(image, Path(device)))
            print(f"trial {trial + 1}/{trials}: dd {dd_s[-1]:.2f} s, dd direct {ddd_s[-1]:.2f} s, meshcloud {write:.2f} s"
                  f" + verify {verify:.2f} s" + (f", bmaptool {bt_s[-1]:.2f} s" if bt_s else ""),
                  flush=True)  # fmt: skip
    finally:
        if device:
            subprocess.run(["losetup", "--detach", device], check=False)
        shutil.rmtree(work, ignore_errors=True)

    image_mb = info.bmap.image_bytes / MB
    mapped_mb = info.bmap.mapped_bytes / MB
    speedups = [d / m for d, m in zip(dd_s, mc_s, strict=True)]
    results: dict[str, object] = {
        "meshcloud_write_s": distribution(mc_s),
        "meshcloud_verify_s": distribution(verify_s),
        "dd_s": distribution(dd_s),
        "meshcloud_image_mb_per_s": round(image_mb / statistics.median(mc_s), 1),
        "meshcloud_written_mb_per_s": round(mapped_mb / statistics.median(mc_s), 1),
        "dd_mb_per_s": round(image_mb / statistics.median(dd_s), 1),
        "write_speedup_vs_dd": distribution(speedups),
        "flash_failures": 0,
    }
    results["speedup_vs_dd_direct"] = distribution(
        [d / m for d, m in zip(ddd_s, mc_s, strict=True)]
    )
    baseline: dict[str, object] = {
        "dd": {"argv": "dd bs=4M conv=fsync", "s": distribution(dd_s)},
        "dd_direct": {"argv": "dd bs=4M oflag=direct conv=fsync", "s": distribution(ddd_s)},
    }
    if bt_s:
        results["speedup_vs_bmaptool"] = distribution(
            [b / m for b, m in zip(bt_s, mc_s, strict=True)]
        )
        baseline["bmaptool"] = {"argv": "bmaptool copy --bmap", "s": distribution(bt_s)}
    doc = {
        "benchmark": "flash",
        "quick": args.quick,
        "machine": {
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "params": {
            "trials": trials,
            "image": kind,
            "image_mb": round(image_mb, 1),
            "mapped_mb": round(mapped_mb, 1),
            "device": "loop device on a file",
        },
        "results": results,
        "baseline": baseline,
        "headline": {
            "write_speedup_vs_dd": round(statistics.median(speedups), 2),
            "verify_s": round(statistics.median(verify_s), 2),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nimage {image_mb:.0f} MB ({mapped_mb:.0f} MB mapped, {kind}), {trials} trials")
    print(f"{'writer':<12}{'p50 s':>8}{'MB/s (image)':>14}")
    print(f"{'dd':<12}{statistics.median(dd_s):>8.2f}{image_mb / statistics.median(dd_s):>14.1f}")
    print(f"{'dd direct':<12}{statistics.median(ddd_s):>8.2f}"
          f"{image_mb / statistics.median(ddd_s):>14.1f}")  # fmt: skip
    print(f"{'meshcloud':<12}{statistics.median(mc_s):>8.2f}"
          f"{image_mb / statistics.median(mc_s):>14.1f}   + verify {statistics.median(verify_s):.2f} s")  # fmt: skip
    if bt_s:
        print(f"{'bmaptool':<12}{statistics.median(bt_s):>8.2f}"
              f"{image_mb / statistics.median(bt_s):>14.1f}")  # fmt: skip
    print(f"headline: {json.dumps(doc['headline'])}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
