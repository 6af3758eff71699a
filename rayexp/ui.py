"""``rayexp ui [--uri URI] [--port 5000]``: the MLflow UI on the store the last sweep used.

Starts ``mlflow server`` on 127.0.0.1 in its own process group, prints (and opens, where a browser is
available) the sweep experiment's Training runs view ``http://HOST:PORT/#/experiments/<id>/runs``, and on
Ctrl-C or SIGTERM stops the whole group (MLflow's gunicorn/huey workers included). A remote ``http(s)``
store is already served: its link is printed only.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
import webbrowser

from rayexp import tracking


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"error: mlflow server did not start (exit {proc.poll()})")
            time.sleep(0.5)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve(uri: str, port: int, experiment_id: str, open_browser: bool) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # both handlers explicit: a process started with SIGINT ignored (a script's background job, or a parent
    # that ignores it) inherits that, and Python then installs no KeyboardInterrupt: Ctrl-C would not stop us
    stop, sigint = signal.signal(signal.SIGTERM, _interrupt), signal.signal(signal.SIGINT, _interrupt)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        link = tracking.runs_link(url, experiment_id) if experiment_id else url
        print(f"MLflow UI on {uri} (server pid {proc.pid}): {link}   (Ctrl-C stops it)", flush=True)
        if open_browser:
            webbrowser.open(link)
        proc.wait()
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, sigint)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the whole group: gunicorn and huey workers too
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rayexp ui", description=__doc__.splitlines()[0])
    ap.add_argument("--uri", help="tracking URI (default: the store of the last sweep)")
    ap.add_argument("--port", type=int, default=tracking.UI_PORT)
    ap.add_argument("--no-browser", action="store_true", help="print the link only")
    args = ap.parse_intermixed_args(argv)
    last = tracking.last_sweep()
    uri = args.uri or last.get("uri") or tracking.resolve_uri(None)
    experiment_id = last.get("experiment_id") if uri == last.get("uri") else None
    if uri.startswith(("http://", "https://")):
        print(tracking.runs_link(uri, experiment_id) if experiment_id else uri)
        return 0
    return _serve(uri, args.port, experiment_id, not args.no_browser and bool(os.environ.get("DISPLAY")))


if __name__ == "__main__":
    sys.exit(main())
