"""A screenshot of a run in the real TensorBoard, opened at the address lillm prints at the end of a run.

    .venv/bin/python benchmarks/tensorboard_screenshot.py runs/mix-debug docs/images/tensorboard.png \
        --pin train/loss val/loss val/bpb val/pydoc/loss val/stdlib/loss

Starts `tensorboard` on a free port, waits until it answers, and has headless Chromium (Debian's `chromium`
package) load the Time Series view with the cards pinned as `lillm.runs.tensorboard_hint` pins them. What it
shows is what a user sees on opening that address (drawn as SVG: without a GPU, headless Chromium leaves some
of TensorBoard's WebGL charts blank).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lillm.runs import tensorboard_hint  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="A lillm run directory (with tensorboard/).")
    ap.add_argument("out", help="The PNG to write.")
    ap.add_argument("--pin", nargs="+", default=["train/loss", "val/loss", "val/bpb"], help="Scalar tags to pin.")
    ap.add_argument("--size", default="1600,1300", help="Window width,height in pixels.")
    ap.add_argument("--wait", type=int, default=20, help="Seconds of page time Chromium gives TensorBoard to draw.")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("tensorboard_screenshot: no chromium on PATH (Debian: apt-get install chromium)")
    port = free_port()
    logdir = Path(args.run_dir) / "tensorboard"
    tb = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(logdir), "--port",
                           str(port), "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                if time.time() > deadline or tb.poll() is not None:
                    sys.exit("tensorboard_screenshot: TensorBoard did not start")
                time.sleep(0.5)
        url = tensorboard_hint(args.run_dir, args.pin).split("then open ", 1)[1].split()[0]
        # forceSVG: headless Chromium without a GPU draws only some of TensorBoard's WebGL charts.
        url = url.replace("localhost:6006", f"127.0.0.1:{port}").replace("#timeseries", "&forceSVG=true#timeseries")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={args.size}", f"--virtual-time-budget={args.wait * 1000}",
                        f"--screenshot={Path(args.out).resolve()}", url],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        print(f"wrote {args.out} from {url}")
    finally:
        tb.terminate()
        tb.wait(timeout=30)


if __name__ == "__main__":
    main()
