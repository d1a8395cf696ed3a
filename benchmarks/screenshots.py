"""Manual check that the TensorBoard export renders for a person (not part of the test run).

Exports a query's results with the CLI, starts TensorBoard on them, opens each dashboard in
headless Chromium (Debian's ``chromium`` package: ``apt-get install -y chromium``) and saves
one screenshot per dashboard. Look at the PNGs afterwards.

    python benchmarks/screenshots.py --log runs/digits/influence --config configs/digits.yaml \\
        --train-logdir runs/digits/lightning_logs --out benchmarks/results/screenshots

``--train-logdir`` adds the training run's own TensorBoard events (the tracker's live signals)
next to the export. Screenshots: scalars, images (at actual size), text, histograms, custom
scalars, projector (coloured by score bucket). Chromium is driven over the DevTools protocol on
a pipe (``--remote-debugging-pipe``), so nothing but the standard library is needed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise TimeoutError(f"TensorBoard did not answer at {url} within {timeout:.0f}s")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("headless Chromium not found: apt-get install -y chromium")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (stdlib only, no websocket)."""

    def __init__(self, binary: str, width: int, height: int) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # the protocol pipe is fd 3 (commands in) and fd 4 (replies out)
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             "--hide-scrollbars", f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe",
             f"--window-size={width},{height}", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4, to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False,
                  session=True)
        self.call("Page.enable", session=True)

    def call(self, method: str, session: bool = False, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, wait: float) -> None:
        self.call("Page.navigate", url=url, session=True)
        time.sleep(wait)

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True, session=True)
        return res.get("result", {}).get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", session=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._profile.cleanup()


# Find elements through Polymer's shadow roots and plugin iframes.
DEEP = """
window.__deep = (sel) => { const out = []; const walk = (root) => { root.querySelectorAll(sel).forEach(e => out.push(e));
  root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) walk(e.shadowRoot);
    if (e.tagName === 'IFRAME' && e.contentDocument) walk(e.contentDocument); }); }; walk(document); return out; };
"""

# dashboard -> (URL fragment, JS run once the page is loaded, extra seconds to wait after it)
VIEWS = {
    "scalars": ("#scalars&tagFilter=influence&_smoothingWeight=0", "", 0),
    "images": ("#images", "__deep('tf-image-dashboard').forEach(d => d._actualSize = true)", 3),
    "text": ("#text", "", 0),
    "histograms": ("#histograms", "", 0),
    "custom_scalars": ("#custom_scalars&_smoothingWeight=0", "", 0),
    "projector": ("#projector", "__deep('vz-projector-data-panel').forEach(p => { p.selectedColorOptionName = 'score_bucket'; "
                                "p.selectedLabelOption = 'id'; })", 4),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", help="influence log directory (to export)")
    p.add_argument("--config", help="the run's LightningCLI config (to export)")
    p.add_argument("--export", help="an existing export (tensorboard --logdir) to show instead of exporting again")
    p.add_argument("--method", default=None, help="estimator (default: the CLI's default)")
    p.add_argument("--grid", default="epochs")
    p.add_argument("--train-logdir", help="the training run's TensorBoard directory (live tracker signals)")
    p.add_argument("--out", default="benchmarks/results/screenshots", help="where the PNGs go")
    p.add_argument("--size", default="1600,1100", help="browser window WIDTH,HEIGHT")
    p.add_argument("--wait", type=float, default=8.0, help="seconds to let each dashboard load")
    args = p.parse_args(argv)

    from lightning_influence.cli import main as cli

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    if not args.export and not (args.log and args.config):
        p.error("pass --log and --config (to export), or --export DIR")
    with tempfile.TemporaryDirectory(prefix="li-tb-") as tmp:
        logdir = Path(tmp) / "tb"
        if args.export:
            shutil.copytree(args.export, logdir)
        else:
            cmd = ["tensorboard", args.log, "--config", args.config, "--logdir", str(logdir), "--grid", args.grid]
            if args.method:
                cmd += ["--method", args.method]
            rc = cli(cmd)
            if rc:
                return rc
        if args.train_logdir:
            shutil.copytree(args.train_logdir, logdir / "training")
        port = free_port()
        tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
                               "--host", "127.0.0.1", "--load_fast", "false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/data/environment")
            time.sleep(5)  # first scan of the event files
            width, height = (int(v) for v in args.size.split(","))
            chrome = Browser(browser, width, height)
            try:
                for name, (fragment, script, extra) in VIEWS.items():
                    chrome.open(f"{base}/{fragment}", args.wait)
                    if script:
                        chrome.js(DEEP + script)
                        time.sleep(extra)
                    path = out / f"{name}.png"
                    chrome.screenshot(path)
                    print(path)
            finally:
                chrome.close()
        finally:
            tb.terminate()
            tb.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
