"""rayexp.report on runs written to a real ``mlflow server``: synthetic metrics with known values (so the
bands, LR curves and tables are checked against numbers computed here), real Hessian results
(``rayexp.hessian.analyze`` + ``save_results`` + ``log_hessian_results``), and a headless-Chromium
screenshot of the MLflow UI showing the sweep (docs/mlflow_ui_sweep.png)."""
import asyncio
import base64
import os
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from rayexp import report, tracking
from rayexp.report.__main__ import main as report_main
from rayexp.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
STEPS = (0, 10, 20, 30, 40)
CONFIGS = [("adamw", 1e-3), ("adamw", 3e-3), ("adamw", 3e-2), ("sgd", 0.1), ("sgd", 0.3), ("mada", 3e-3)]
DIVERGED = ("adamw", 3e-2)


def val_loss(opt: str, lr: float, seed: int, step: int) -> float:
    """The synthetic val loss logged for one run (seed-dependent so the band has width)."""
    base = {"adamw": 3.0, "sgd": 3.4, "mada": 2.9}[opt] + 0.2 * abs(math.log10(lr) + 2.5)
    return base + 2.0 * math.exp(-step / 12) + 0.05 * (seed - 1) * (1 + step / 40) + 0.01 * seed ** 2


def train_loss(opt: str, lr: float, seed: int, step: int) -> float:
    return val_loss(opt, lr, seed, step) + 0.1 + 0.02 * seed


def mada_beta1(seed: int, step: int) -> float:
    return 0.9 - 0.002 * step * (1 + 0.1 * seed)


def make_sweep(uri: str, experiment: str, hessian_dir: Path | None = None) -> dict:
    """A sweep's parent run and one child run per (config, seed) with the metrics above; the diverged
    config stops at step 20. With ``hessian_dir``, the best adamw run of seed 0 gets real Hessian results."""
    parent = tracking.sweep_parent_run(uri, experiment, f"{experiment}-key", {"name": experiment},
                                       run_name=f"{experiment}-sweep")
    runs = {}
    for opt, lr in CONFIGS:
        for seed in SEEDS:
            exp = validate({"name": experiment, "seed": seed, "optimizer": {"name": opt, "lr": lr},
                            "train": {"steps": STEPS[-1], "warmup": 0}})
            rep = tracking.MlflowReporter(uri, experiment, exp, f"{opt}-{lr}-{seed}", parent_run_id=parent,
                                          run_name=f"{opt}-lr{lr:g}-s{seed}")
            diverged = (opt, lr) == DIVERGED
            batch = []  # one log_batch per run keeps the test quick against the server
            for step in STEPS:
                if diverged and step > 20:
                    break
                m = {"val_loss": val_loss(opt, lr, seed, step), "lr": lr}
                if step:
                    m["train_loss"] = float("nan") if diverged and step == 20 else train_loss(opt, lr, seed, step)
                if opt == "mada":
                    m.update({"mada/beta1": mada_beta1(seed, step), "mada/rho": 0.6 + 0.001 * step})
                batch += [Metric(k, v, 0, step) for k, v in m.items()]
            rep.client.log_batch(rep.run_id, metrics=batch)
            rep.last_step = 20 if diverged else STEPS[-1]
            if diverged:
                rep.finish("diverged", {"train_loss": float("nan"), "val_loss": float("nan"), "step": 20})
            else:
                rep.finish("finished", {"val_loss": val_loss(opt, lr, seed, STEPS[-1]), "step": STEPS[-1]})
            runs[(opt, lr, seed)] = rep.run_id
    hess = None
    if hessian_dir is not None:
        hess = _hessian_results(hessian_dir)
        tracking.log_hessian_results(runs[("adamw", 3e-3, 0)], uri, hess["metrics"], hess["files"])
    return {"parent": parent, "runs": runs, "hessian": hess}


def _hessian_results(out: Path) -> dict:
    """Real curvature results on a tiny GPT (the layout rayexp.hessian writes)."""
    import torch

    from rayexp.config import HessianConfig
    from rayexp.hessian import analyze, save_results
    from rayexp.models.gpt2 import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8, attention="naive",
                          dropout=0.0, bias=True))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(16, (4, 8), generator=g), torch.randint(16, (4, 8), generator=g))]
    cfg = HessianConfig(tasks=["slq", "slq_blocks", "l11", "grad_heterogeneity"], probes=2, slq_steps=8,
                        cauchy_vectors=8, grid_points=200, device="cpu")
    res = analyze(model, batches, cfg, progress=False)
    return {**res, "files": save_results(res, out)}


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory):
    return make_sweep(mlflow_server, "report-test", tmp_path_factory.mktemp("hessian"))


@pytest.fixture(scope="module")
def built(sweep, mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return report.build_report("report-test", mlflow_server, out)


def test_seed_band_is_mean_plus_minus_sample_std():
    curves = [(np.array([0, 10, 20.]), np.array([1.0, 2.0, 4.0])), (np.array([0, 10.]), np.array([3.0, 6.0])),
              (np.array([0, 10, 20.]), np.array([2.0, 1.0, np.inf]))]
    steps, mean, lo, hi, n = report.seed_band(curves, "std")
    assert list(steps) == [0, 10, 20] and list(n) == [3, 3, 1]
    assert mean[1] == pytest.approx(3.0) and hi[1] - mean[1] == pytest.approx(np.std([2, 6, 1], ddof=1))
    assert lo[2] == hi[2] == mean[2] == 4.0  # one finite value: no band
    _, _, lo_m, hi_m, _ = report.seed_band(curves, "minmax")
    assert (lo_m[0], hi_m[0]) == (1.0, 3.0)
    with pytest.raises(ValueError, match="band"):
        report.seed_band(curves, "sem")


def test_series_labels_name_the_setting_and_skip_options_the_optimizer_ignores():
    """granularity varies only under adam: sgd's lines carry no granularity; rotation.kind reads rotation=."""
    def rec(i, **params):
        return report.RunRecord(f"r{i}", f"r{i}", {k.replace("__", "."): str(v) for k, v in params.items()},
                                {"rayexp.status": "finished"}, {"final/val_loss": 2.0 + i})
    runs = [rec(0, optimizer__name="adam", optimizer__granularity="row", optimizer__lr=1e-3, rotation__kind="none"),
            rec(1, optimizer__name="adam", optimizer__granularity="global", optimizer__lr=1e-3, rotation__kind="none"),
            rec(2, optimizer__name="sgd", optimizer__granularity="coordinate", optimizer__lr=0.3,
                rotation__kind="per_tensor")]
    configs = report.group_configs(runs)
    assert [c.series for c in configs] == ["adam granularity=row rotation=none",
                                           "adam granularity=global rotation=none", "sgd rotation=per_tensor"]
    assert [c.label for c in configs] == ["lr=0.001", "lr=0.001", "lr=0.3"]


@pytest.mark.slow  # shares an 18-run sweep + Hessian results on the mlflow server (about a minute)
def test_loss_band_equals_independent_mean_and_std(built, sweep):
    d = built.data["loss_curves"][("val_loss", "adamw")]
    assert list(d["steps"]) == list(STEPS)
    for i, step in enumerate(STEPS):  # best adamw is lr=3e-3 (closest to 10^-2.5)
        vals = np.array([val_loss("adamw", 3e-3, s, step) for s in SEEDS])
        assert d["mean"][i] == pytest.approx(vals.mean(), abs=1e-9)
        assert d["hi"][i] - d["mean"][i] == pytest.approx(vals.std(ddof=1), abs=1e-9)
        assert d["mean"][i] - d["lo"][i] == pytest.approx(vals.std(ddof=1), abs=1e-9)
    # the drawn band (fill_between polygon) spans exactly lo..hi
    runs = report.load_runs(built_uri(built), "report-test")
    fig, _ = report.plot_loss_curves(report.best_per_series(report.group_configs(runs.runs)))
    ax_val = fig.axes[1]
    poly = ax_val.collections[0].get_paths()[0].vertices
    want = np.array([val_loss("adamw", 3e-3, s, 40) for s in SEEDS])
    ys = poly[np.isclose(poly[:, 0], 40), 1]
    assert ys.max() == pytest.approx(want.mean() + want.std(ddof=1))
    assert ys.min() == pytest.approx(want.mean() - want.std(ddof=1))
    assert ax_val.get_xlabel() == "step" and ax_val.get_ylabel() == "val loss"
    legend = [t.get_text() for t in ax_val.get_legend().get_texts()]
    assert any(t.startswith("adamw (lr=0.003") for t in legend) and any(t.startswith("sgd") for t in legend)
    assert any(t.startswith("mada") for t in legend)


def built_uri(rep: report.Report) -> str:
    return re.search(r"MLflow (\S+),", rep.html.read_text()).group(1)


@pytest.mark.slow  # shares an 18-run sweep + Hessian results on the mlflow server (about a minute)
def test_lr_sensitivity_and_best_table_match_logged_values(built):
    d = built.data["lr_sensitivity"]
    assert list(d["adamw"]["lr"]) == [1e-3, 3e-3, 3e-2]
    for j, lr in enumerate([1e-3, 3e-3]):
        finals = np.array([val_loss("adamw", lr, s, 40) for s in SEEDS])
        assert d["adamw"]["mean"][j] == pytest.approx(finals.mean())
        assert d["adamw"]["std"][j] == pytest.approx(finals.std(ddof=1))
    assert math.isinf(d["adamw"]["mean"][2])  # the diverged config
    rows = {r["series"]: r for r in built.tables["best_configs"]}
    assert rows["adamw"]["config"] == "lr=0.003" and rows["sgd"]["config"] == "lr=0.1"
    finals = np.array([val_loss("sgd", 0.1, s, 40) for s in SEEDS])
    assert rows["sgd"]["val_loss_mean"] == pytest.approx(finals.mean())
    assert rows["sgd"]["val_loss_std"] == pytest.approx(finals.std(ddof=1))
    assert [r["series"] for r in built.tables["best_configs"]] == ["mada", "adamw", "sgd"]
    statuses = {(r["run"]): r["status"] for r in built.tables["runs"]}
    assert statuses["adamw-lr0.03-s1"] == "diverged"


@pytest.mark.slow  # shares an 18-run sweep + Hessian results on the mlflow server (about a minute)
def test_mada_trajectories_and_hessian_figures(built, sweep):
    d = built.data["mada"][("mada/beta1", "lr=0.003")]
    vals = np.array([[mada_beta1(s, st) for s in SEEDS] for st in STEPS])
    assert np.allclose(d["mean"], vals.mean(1)) and np.allclose(d["hi"] - d["mean"], vals.std(1, ddof=1))
    h = sweep["hessian"]
    for name in ("spectra", "block_spectra", "heterogeneity", "l11", "grad_norms"):
        assert name in built.figures, built.skipped
    l11 = next(iter(built.data["l11"].values()))
    assert l11["native"] == pytest.approx(h["metrics"]["l11_over_d"])
    assert l11["rotated"] == pytest.approx(h["metrics"]["l11_rotated_over_d"])
    js = next(iter(built.data["heterogeneity"].values()))
    assert np.allclose(js, h["arrays"]["js_matrix"])
    assert np.allclose(next(iter(built.data["grad_norms"].values())), h["arrays"]["block_grad_norms"])
    assert next(iter(built.data["block_spectra"].values())) == len(h["arrays"]["block_names"])


@pytest.mark.slow  # shares an 18-run sweep + Hessian results on the mlflow server (about a minute)
def test_every_figure_has_labelled_axes_and_a_legend(built, mlflow_server):
    runs = report.load_runs(mlflow_server, "report-test")
    configs = report.group_configs(runs.runs)
    hess = report.load_hessian(runs)
    figs = [report.plot_loss_curves(report.best_per_series(configs))[0], report.plot_lr_sensitivity(configs)[0],
            report.plot_mada(configs)[0], report.plot_spectra(hess)[0], report.plot_block_spectra(hess)[0],
            report.plot_l11(hess)[0], report.plot_grad_norms(hess)[0], report.plot_heterogeneity(hess)[0]]
    for fig in figs:
        for ax in [a for a in fig.axes if a.get_visible() and a.get_label() != "<colorbar>"]:
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), ax.get_title()
            if fig is not figs[-1]:  # heatmaps carry a colorbar instead of a legend
                assert ax.get_legend() is not None and ax.get_legend().get_texts(), ax.get_title()
    assert figs[1].axes[0].get_xscale() == "log"
    # the diverged lr is marked on the top edge
    assert any(t.get_text() == "diverged (all seeds)" for t in figs[1].axes[0].get_legend().get_texts())


@pytest.mark.slow  # shares an 18-run sweep + Hessian results on the mlflow server (about a minute)
def test_html_is_self_contained_and_report_is_logged_on_the_parent(built, sweep, mlflow_server):
    page = built.html.read_text()
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    drawn = [name for name, _ in report.SECTIONS if name != "sharpness"]  # this sweep logs no curv/* metrics
    assert len(imgs) == len(built.figures) == len(drawn) and sorted(built.figures) == sorted(drawn)
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in imgs)
    assert not re.search(r"src=['\"](?!data:)", page)  # nothing fetched from elsewhere
    assert "best configs" in page and page.count("skipped") == 1 and "no curv/lambda_max" in page
    for path in built.figures.values():
        assert Path(path).stat().st_size > 5000
    client = MlflowClient(mlflow_server)
    logged = {f.path for f in client.list_artifacts(sweep["parent"], "report")}
    assert {"report/report.html", "report/loss_curves.png", "report/best_configs.txt"} <= logged
    assert built.parent_run_id == sweep["parent"]


def test_missing_data_is_skipped_and_cli_errors_are_one_line(mlflow_server, tmp_path, capsys):
    parent = tracking.sweep_parent_run(mlflow_server, "report-bare", "bare-key")
    for seed in (0, 1):
        exp = validate({"name": "bare", "seed": seed})
        rep = tracking.MlflowReporter(mlflow_server, "report-bare", exp, f"bare-{seed}", parent_run_id=parent)
        rep.report(5, {"train_loss": 3.0 + seed, "val_loss": 3.1 + seed})
        rep.finish("finished", {"val_loss": 3.1 + seed})
    assert report_main(["report-bare", "--uri", mlflow_server, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "figure loss_curves" in out and "skipped spectra" in out and "skipped lr_sensitivity" in out
    assert "skipped: no hessian" in (tmp_path / "r" / "report.html").read_text()
    assert report_main(["no-such-experiment", "--uri", mlflow_server, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: experiment 'no-such-experiment' not found") and "report-bare" in err
    with pytest.raises(ConfigError, match="band"):
        report.build_report("report-bare", mlflow_server, tmp_path / "y", band="sem")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package (.ci/run installs it)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900", "--hide-scrollbars"]


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium) for the MLflow UI screenshot")
def test_mlflow_ui_screenshot_of_a_sweep(mlflow_server, tmp_path):
    """Headless Chromium, driven over the DevTools protocol, opens the MLflow UI of the real server on a
    sweep, expands the parent run, shows all child runs and the chart view of val_loss (what the README
    tells users to click), checks the runs are rendered; the picture stays in tmp_path (RAYEXP_UPDATE_SCREENSHOT=1
    copies it to docs/mlflow_ui_sweep.png)."""
    pytest.importorskip("aiohttp")

    make_sweep(mlflow_server, "adam_vs_sgd")
    client = MlflowClient(mlflow_server)
    eid = client.get_experiment_by_name("adam_vs_sgd").experiment_id
    client.set_experiment_tag(eid, "mlflow.experimentKind", "custom_model_development")  # "Model training" UI
    url = f"{mlflow_server}/#/experiments/{eid}/runs?compareRunsMode=CHART"
    shot = tmp_path / "ui.png"
    texts = asyncio.run(_cdp_session(url, shot, tmp_path / "profile", [
        ("wait", "document.body.innerText.includes('adam_vs_sgd-sweep')"),
        ("click", "document.querySelector('button[data-component-id*=runnamecellrenderer]')"),  # expand parent
        ("click", "Array.from(document.querySelectorAll('button')).find(b => b.getAttribute('aria-label') === 'Close')"),
        ("wait", "document.body.innerText.includes('adamw-lr0.001-s0')"),
        ("click", "document.querySelector('[data-testid=experiment-view-runs-visibility-column-header]')"),
        ("click", "Array.from(document.querySelectorAll('[role=menuitemradio],[role=menuitem]'))"
                  ".find(x => x.innerText.trim() === 'Show all runs')"),
        ("js", "(() => {const i = document.querySelector('input[placeholder=\"Search metric charts\"]');"
               "Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(i, 'val_loss');"
               "i.dispatchEvent(new Event('input', {bubbles: true})); return 1})()"),
        ("click", "Array.from(document.querySelectorAll('.du-bois-light-collapse-header[role=button]'))"
                  ".find(e => /^final\\s*\\(/.test(e.innerText.trim()))"),
        ("wait", "document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length >= 18"),  # lines drawn
        ("sleep", 2),
        ("js", "document.body.innerText"),
    ]))
    page = texts[-1]
    assert "adam_vs_sgd-sweep" in page and "val_loss" in page
    assert all(f"{o}-lr{lr:g}-s{s}" in page for o, lr in CONFIGS for s in SEEDS)  # every child run listed
    img = _png_pixels(shot)
    assert img.shape[:2] == (900, 1400) and img.std() > 20  # a rendered page, not a blank one
    if os.environ.get("RAYEXP_UPDATE_SCREENSHOT") == "1":  # a deliberate refresh of the README's picture
        shutil.copyfile(shot, ROOT / "docs" / "mlflow_ui_sweep.png")


async def _cdp_session(url: str, shot: Path, profile: Path, steps: list) -> list:
    """Run Chromium headless with a DevTools port, navigate to ``url``, run ``steps`` (wait for a JS
    condition, click the element a JS expression returns, evaluate JS, sleep), then save a screenshot.
    Returns the values of the ``js`` steps."""
    import aiohttp

    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = []
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.2)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                target = next(t for t in await r.json() if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 10**6))

                async def cmd(method, **params):
                    i = next(ids)
                    await ws.send_json({"id": i, "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json()
                        if msg.get("id") == i:
                            return msg.get("result", {})

                async def js(expr):
                    r = await cmd("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
                    return r.get("result", {}).get("value")

                await cmd("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
                await cmd("Page.navigate", url=url)
                for kind, arg in steps:
                    if kind == "wait":
                        for _ in range(240):
                            if await js(arg):
                                break
                            await asyncio.sleep(0.5)
                        else:
                            raise AssertionError(f"MLflow UI never satisfied: {arg}")
                    elif kind == "click":  # real mouse events (Radix menus open on pointerdown)
                        box = await js(f"(() => {{const e = {arg}; if (!e) return null;"
                                       f"const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]}})()")
                        assert box, f"nothing to click: {arg}"
                        for t in ("mouseMoved", "mousePressed", "mouseReleased"):
                            await cmd("Input.dispatchMouseEvent", type=t, x=box[0], y=box[1], button="left", clickCount=1)
                        await asyncio.sleep(0.7)
                    elif kind == "js":
                        out.append(await js(arg))
                    else:
                        await asyncio.sleep(arg)
                data = await cmd("Page.captureScreenshot", format="png")
                shot.write_bytes(base64.b64decode(data["data"]))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def _png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg
    return (mpimg.imread(path)[..., :3] * 255).astype(float)


def _pick_sweep(uri, name, outcomes):
    """A sweep run with one child per (lr, status) in ``outcomes``."""
    parent = tracking.sweep_parent_run(uri, "report-pick", f"{name}-key", run_name=name)
    for lr, status in outcomes:
        exp = validate({"name": "pick", "optimizer": {"name": "sgd", "lr": lr}, "train": {"steps": 10, "warmup": 0}})
        rep = tracking.MlflowReporter(uri, "report-pick", exp, f"{name}-{lr}", parent_run_id=parent)
        rep.report(10, {"train_loss": 3.0, "val_loss": 3.0 + lr})
        rep.finish(status, {"val_loss": 3.0 + lr} if status == "finished" else None)
    return parent


def test_report_names_its_sweep_skips_one_without_finished_trials_and_tells_failed_from_diverged(
        mlflow_server, tmp_path):
    import os
    import sys
    from rayexp.report.figures import plot_lr_sensitivity
    good = _pick_sweep(mlflow_server, "pick-good", [(0.1, "finished"), (0.3, "finished"), (1.0, "diverged"),
                                                   (3.0, "failed")])
    _pick_sweep(mlflow_server, "pick-broken", [(0.1, "failed"), (0.3, "failed")])  # newer, nothing finished
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "rayexp.report", "report-pick", "--out", str(tmp_path / "r"),
                          "--uri", mlflow_server, "--no-log"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("report of MLflow ") and f"sweep pick-good (parent run {good}), 4 runs" in \
        out.stdout.splitlines()[0], out.stdout
    sweep = report.load_runs(mlflow_server, "report-pick")
    fig, _ = plot_lr_sensitivity(report.group_configs(sweep.runs))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "diverged (all seeds)" in labels and "failed (all seeds)" in labels, labels


BAND_SEEDS = (0, 1, 3)  # uneven: ± std differs from min..max even for values linear in the seed


def _records(lrs, seeds=BAND_SEEDS, opt="adamw"):
    """Runs of ``opt`` at each lr × seed with loss, MADA and curvature histories (no MLflow)."""
    out = []
    for lr in lrs:
        for seed in seeds:
            hist = {k: (np.array(STEPS, float), np.array([f(lr, seed, st) for st in STEPS]))
                    for k, f in (("train_loss", lambda a, b, c: train_loss(opt, a, b, c)),
                                 ("val_loss", lambda a, b, c: val_loss(opt, a, b, c)),
                                 ("mada/beta1", lambda a, b, c: mada_beta1(b, c)),
                                 ("curv/lambda_max", lambda a, b, c: 10.0 + seed ** 2 + c),
                                 ("lr", lambda a, b, c: a))}
            rec = report.RunRecord(f"{lr}-{seed}", f"{lr}-{seed}", {"optimizer.name": opt, "optimizer.lr": str(lr),
                                   "seed": str(seed)}, {"rayexp.status": "finished"},
                                   {"final/val_loss": val_loss(opt, lr, seed, STEPS[-1])})
            rec.histories.update(hist)
            out.append(rec)
    return out


def _overlapping_tick_labels(fig) -> list:
    """Pairs of visible tick labels of one axis whose rendered (Agg) bounding boxes intersect."""
    from itertools import combinations
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pairs = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
            boxes = [(t.get_text(), t.get_window_extent(canvas.get_renderer())) for t in labels]
            pairs += [(a, b) for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)]
    return pairs


@pytest.mark.parametrize("lo, decades, n", [(1e-3, 0.25, 4), (1e-3, 0.05, 5), (1e-4, 0.01, 3), (1e-3, 2.5, 2),
                                            (1e-6, 6, 13)])
def test_lr_sensitivity_tick_labels_never_overlap_and_have_3_significant_digits(lo, decades, n):
    """Narrow lr ranges used to get matplotlib's minor log labels (1.1×10⁻³, 1.2×10⁻³, ...) on top of each other."""
    lrs = np.logspace(np.log10(lo), np.log10(lo) + decades, n)
    fig, _ = report.plot_lr_sensitivity(report.group_configs(_records(lrs)))
    assert _overlapping_tick_labels(fig) == []
    texts = [t.get_text() for t in fig.axes[0].xaxis.get_ticklabels(which="both") if t.get_text()]
    assert texts[0] == f"{lrs[0]:.3g}" and len(texts) >= 2, texts  # ticks at values tried, the first kept
    assert all(len(re.sub(r"[^0-9]", "", t.split("e")[0]).lstrip("0")) <= 3 for t in texts), texts


def _drawn(fig) -> list:
    """Every drawn polygon, line and error-bar segment of a figure, as arrays (what --band changes)."""
    out = []
    for ax in fig.axes:
        out += [p.vertices for c in ax.collections for p in c.get_paths()]
        out += [np.asarray(line.get_xydata()) for line in ax.lines]
    return out


def test_band_applies_to_every_plot_that_aggregates_seeds():
    from rayexp.report.figures import plot_sharpness
    configs = report.group_configs(_records([1e-3, 3e-3]))
    plots = {"loss_curves": lambda b: report.plot_loss_curves(report.best_per_series(configs), b),
             "lr_sensitivity": lambda b: report.plot_lr_sensitivity(configs, b),
             "mada": lambda b: report.plot_mada(configs, b), "sharpness": lambda b: plot_sharpness(configs, b)}
    for name, plot in plots.items():
        (f_std, d_std), (f_mm, d_mm) = plot("std"), plot("minmax")
        a, b = _drawn(f_std), _drawn(f_mm)
        assert len(a) == len(b) and any(x.shape != y.shape or not np.allclose(x, y) for x, y in zip(a, b)), name
        titles = " ".join([f_mm._suptitle.get_text() if f_mm._suptitle else ""] + [ax.get_title() for ax in f_mm.axes])
        assert "min..max over seeds" in titles, (name, titles)
        key = next(iter(d_mm))
        assert np.all(d_mm[key]["lo"] <= d_mm[key]["mean"]) and np.all(d_mm[key]["mean"] <= d_mm[key]["hi"]), name
    finals = np.array([val_loss("adamw", 3e-3, s, STEPS[-1]) for s in BAND_SEEDS])  # lr_sensitivity's minmax band
    d = report.plot_lr_sensitivity(configs, "minmax")[1]["adamw"]
    assert d["lo"][1] == pytest.approx(finals.min()) and d["hi"][1] == pytest.approx(finals.max())
    lam = plot_sharpness(configs, "minmax")[1][("curv/lambda_max", "adamw lr=0.001")]
    assert np.allclose(lam["hi"] - lam["lo"], max(BAND_SEEDS) ** 2)
