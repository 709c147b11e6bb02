"""The HTML report and optuna-dashboard: what a user reviewing a search sees.

One tiny run (test_fmnist_vit, sqnr_drop) is searched and reported once per module; the tests read
its study, its report page, the dashboard's API and, in headless Chromium, both pages.
"""
import base64
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta

from policysearch.cli import main
from policysearch.deploy.record import LatencyStage
from policysearch.errors import ConfigError
from policysearch.finetune.record import FinetuneStage
from policysearch.run import RunRecord
from policysearch.search import SearchConfig, search
from policysearch.study import KIND_ANSWER, KIND_RULE, KIND_UNIFORM

RUN = "tiny-report"
FIGS = ("fig1_sensitivity.png", "fig2_histograms.png", "fig3_site_sqnr.png")


def _config(root: Path) -> SearchConfig:
    return SearchConfig(strategy="sqnr_drop", model="test_fmnist_vit", calib_size=32, eval_size=48, batch_size=48,
                        results_dir=str(root / "results"), storage=f"sqlite:///{root / 'studies.db'}", run_name=RUN)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    res = search(_config(root), progress=False)
    return root, res


@pytest.fixture(scope="module")
def reported(run):
    from policysearch.report import build_report

    root, res = run
    page = build_report(RUN, results_dir=root / "results")
    return root, res, page


def _study(root: Path) -> optuna.Study:
    return optuna.load_study(study_name=RUN, storage=f"sqlite:///{root / 'studies.db'}")


def _answers(study):
    return [t for t in study.get_trials() if t.user_attrs.get("kind") == KIND_ANSWER]


# -- the study -------------------------------------------------------------------------------------

def test_every_trial_says_what_it_is(run):
    from optuna_dashboard import get_note

    root, res = run
    study = _study(root)
    trials = study.get_trials()
    kinds = [t.user_attrs.get("kind") for t in trials]
    assert kinds.count(KIND_UNIFORM) == 3 and kinds.count(KIND_RULE) == 1
    assert {t.user_attrs["uniform_method"] for t in trials if t.user_attrs.get("kind") == KIND_UNIFORM} == {
        "ibert", "fqvit", "ivit"}
    rule = next(t for t in trials if t.user_attrs.get("kind") == KIND_RULE)
    assert rule.user_attrs["policy_key"] == res.policy.key()
    # evaluations keep their real start and end times
    assert all(t.datetime_complete > t.datetime_start for t in trials if t.user_attrs.get("kind") != KIND_ANSWER)
    # per-site metrics, readable
    site = res.policy.sites[1].name
    text = rule.user_attrs[f"site.{site}"]
    m = res.result.sites[site]
    assert text == f"{res.policy[site]}: gamma {m.gamma:.1f} / beta {m.beta:.1f} dB (diff {m.diff:+.1f})"
    assert sum(k.startswith("site.") for k in rule.user_attrs) == len(res.policy)
    assert study.metric_names == ["kl"]
    # run.json's evaluation tags say the same
    tags = [e["tag"] for e in RunRecord.load(root / "results" / RUN).data["evaluations"]]
    assert sorted(tags) == ["baseline", "baseline", "baseline", "ceiling", "rule"]
    # the answer: one copy of the rule's result, marked by attributes and notes
    (answer,) = _answers(study)
    assert answer.user_attrs["answer_of"] == rule.number and answer.params == rule.params
    assert answer.values == rule.values and answer.user_attrs["answer_stage"] == "search"
    assert study.user_attrs["answer_trial"] == answer.number and study.user_attrs["answer_of"] == rule.number
    assert study.user_attrs["answer"].startswith(f"trial #{answer.number} ")
    record = RunRecord.load(root / "results" / RUN).data
    assert record["answer"]["trial"] == answer.number and record["answer"]["evaluation_trial"] == rule.number
    assert f"The answer is trial #{answer.number}" in get_note(study)
    assert "The run's answer" in get_note(optuna.trial.Trial(study, answer._trial_id))
    assert f"Trial #{answer.number} is its copy" in get_note(optuna.trial.Trial(study, rule._trial_id))


def test_answer_carries_the_policy_json_and_is_never_read_back_as_an_evaluation(run):
    from policysearch.objectives import load_objective
    from policysearch.study import _results

    root, _ = run
    study = _study(root)
    (answer,) = _answers(study)
    metas = get_all_artifact_meta(answer, storage=study._storage)
    assert [m.filename for m in metas] == ["policy.json"]
    stored = root / "results" / "artifacts" / metas[0].artifact_id
    assert stored.read_bytes() == (root / "results" / RUN / "policy.json").read_bytes()
    assert len(_results(study, load_objective("kl"))) == 5  # 3 uniform + the ceiling + the rule's pick, no copy


def test_publishing_needs_the_answers_evaluation(tmp_path):
    from policysearch.study import publish_answer

    storage = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="empty", storage=storage)
    with pytest.raises(ConfigError, match="no completed evaluation of the run's answer"):
        publish_answer(storage, "empty", "w8a8|x=ibert", stage="search")


# -- the report ------------------------------------------------------------------------------------

def _imgs(page_text: str) -> list[tuple[str, bytes]]:
    return [(f, base64.b64decode(b)) for f, b in
            re.findall(r'<img data-file="([^"]+)" alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page_text)]


def test_report_figures_exist_and_are_referenced(reported):
    root, res, page = reported
    run_dir = root / "results" / RUN
    assert page == run_dir / "report.html"
    text = page.read_text()
    imgs = dict(_imgs(text))
    assert set(imgs) == {f"figures/{f}" for f in FIGS}
    for name, png in imgs.items():
        assert png.startswith(b"\x89PNG\r\n") and len(png) > 10_000
        assert (run_dir / name).read_bytes() == png  # the file written and the figure shown are one
    # self-contained: nothing is loaded from elsewhere
    assert not re.search(r'(src|href)="(?!data:)', text) and "<script" not in text and "<link" not in text
    # the tables
    assert f'<span id="run-name">{RUN}</span>' in text and f'<b id="study-name">{RUN}</b>' in text
    assert "result (sqnr_drop)" in text and "uniform ivit" in text and "Table 3" in text
    table3 = text.split("(Table 3)</h2>")[1].split("</table>")[0]
    head = re.findall(r"<th>([^<]*)</th>", table3)
    rows = {r[0]: r[1:] for r in (re.findall(r"<td>([^<]*)</td>", row) for row in table3.split("<tr>")[2:])}
    assert head[0] == "kind" and head[-1] == "sites"
    for kind, counts in res.policy.method_counts().items():
        assert rows[kind] == [str(counts.get(m, 0)) for m in head[1:-1]] + [str(sum(counts.values()))]
    assert '<h2 id="headroom">Headroom and verdict</h2>' in text and "headroom = ceiling - uniform" in text
    assert 'id="finetune-status">not run' in text and 'id="latency-status">not run' in text
    assert "result after training</td><td>not run" in text
    for site in res.policy.sites:
        assert f"<td>{site.name}</td>" in text
    stage = RunRecord.load(run_dir).data["stages"]["report"]
    assert stage["figures"] == [f"figures/{f}" for f in FIGS] and stage["file"] == "report.html"


def test_report_attaches_itself_to_a_new_answer_trial_once(reported):
    from policysearch.report import build_report

    root, _, page = reported
    study = _study(root)
    first, second = _answers(study)
    assert first.user_attrs["answer_stage"] == "search" and second.user_attrs["answer_stage"] == "report"
    assert study.user_attrs["answer_trial"] == second.number
    names = sorted(m.filename for m in get_all_artifact_meta(second, storage=study._storage))
    assert names == sorted(["report.html", "policy.json", *FIGS])
    assert f"#{second.number} (a copy of evaluation #{first.user_attrs['answer_of']}" in page.read_text()
    n = len(study.trials)
    build_report(RUN, results_dir=root / "results")  # nothing changed: the same copy is reused
    assert len(_study(root).trials) == n and _study(root).user_attrs["answer_trial"] == second.number


def test_report_shows_the_training_and_latency_stages(reported, tmp_path):
    """Synthetic stage outputs, as the training and latency stages record them."""
    root, res, _ = reported
    shutil.copytree(root / "results" / RUN, tmp_path / "results" / RUN)
    shutil.copy(root / "studies.db", tmp_path / "studies.db")
    record = RunRecord.load(tmp_path / "results" / RUN)
    sites = {s: {"gamma": m.gamma + 1.0, "beta": m.beta + 3.0} for s, m in res.result.sites.items()}
    record.set_stage(FinetuneStage.from_json({"weights": "finetuned.safetensors", "eval_images": 48, "top1_before": 0.0833,
                                  "top1_after": 0.4321, "settings": {"epochs": 2, "lr": 1e-4},
                                  "before": {"top1": 0.0833, "agreement": 0.5, "kl": 0.5, "sites": res.result.to_dict()["sites"]},
                                  "after": {"top1": 0.4321, "agreement": 0.9, "kl": 0.0123, "sites": sites}}))
    record.set_stage(LatencyStage(file="latency.json", provider="cpu", threads=2,
                                  median_ms={"float": {"1": 2.5, "8": 11.25}, "int8_gelu": {"1": 2.0, "8": 9.5},
                                             "int8_relu": {"1": 1.75, "8": 7.75}},
                                  ratios={"8": {"int8_relu/int8_gelu": 0.816}},
                                  top1={"float": 0.9, "int8_gelu": 0.88, "int8_relu": 0.87}))
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    assert main(["report", RUN, "--results-dir", str(tmp_path / "results"), "--storage", storage,
                 "--no-histograms"]) == 0
    text = (tmp_path / "results" / RUN / "report.html").read_text()
    assert "result after training (48 images)</td><td>43.21%" in text and "<td>0.0123</td>" in text
    assert "result before training (48 images)</td><td>8.33%" in text and "<td>settings.epochs</td><td>2</td>" in text
    assert "<th>β after training</th>" in text and f"<td>{sites[res.policy.sites[0].name]['beta']:.2f}</td>" in text
    assert "<td>11.25</td>" in text and "<td>7.75</td>" in text and "<td>0.816</td>" in text
    assert "<td>87.00%</td>" in text  # the runtime's top-1 of the int8 ReLU model
    assert "not run" not in text.split("<h2>Training stage")[1].split("<h2>Per-site SQNR")[0]
    assert "Dashed: the chosen policy after training" in text
    files = dict(_imgs(text))
    assert "figures/fig4_pareto.png" in files and "figures/fig2_histograms.png" not in files
    assert "Figure 2: left out (--no-histograms)" in text


def test_pareto_front_and_stage_readers():
    from policysearch.finetune.record import FinetuneStage
    from policysearch.report.figures import pareto_front

    pts = [(1.0, 0.80), (2.0, 0.90), (1.5, 0.70), (3.0, 0.91), (2.5, 0.85)]
    assert pareto_front(pts) == [0, 1, 3]
    # earlier layouts of the training stage's metrics are read as the typed stage's ``after``
    assert FinetuneStage.from_json({"top1_after": 0.5, "top1_before": 0.4}).after == {"top1": 0.5}
    assert FinetuneStage.from_json({"metrics": {"top1": 0.6}}).after["top1"] == 0.6
    assert FinetuneStage.from_json({"after_training": {"kl": 0.1}}).after == {"kl": 0.1}
    assert FinetuneStage.from_json({"checkpoint": "x"}).after is None


def test_missing_extras_say_what_to_install(monkeypatch, tmp_path, capsys):
    from policysearch.report import annotate
    from policysearch.report.dashboard import require_dashboard
    from policysearch.report.figures import require_matplotlib

    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r'pip install "policysearch\[dashboard\]"'):
        require_dashboard()
    with pytest.raises(ConfigError, match=r'pip install "policysearch\[report\]"'):
        require_matplotlib()
    assert annotate(optuna.create_study()) is False
    assert main(["dashboard", "--results-dir", str(tmp_path), "--port", "0"]) == 2
    assert 'policysearch[dashboard]' in capsys.readouterr().err


def test_report_of_an_unfinished_run_is_one_line(tmp_path, capsys):
    assert main(["report", "nope", "--results-dir", str(tmp_path)]) == 2
    assert "no run record" in capsys.readouterr().err


def test_resuming_a_finished_run_adds_no_answer_copy(reported):
    root, _, _ = reported
    before = _study(root)
    n, current = len(before.trials), before.user_attrs["answer_trial"]
    again = search(_config(root), progress=False)
    assert again.evaluated == 0
    after = _study(root)
    assert len(after.trials) == n and after.user_attrs["answer_trial"] == current


# -- optuna-dashboard ------------------------------------------------------------------------------

def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return resp.status, body


def test_dashboard_command_serves_the_study(reported):
    root, _, _ = reported
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "policysearch", "dashboard", RUN, "--results-dir",
                             str(root / "results"), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the server listens
        m = re.search(r"(http://127\.0\.0\.1:\d+)/dashboard/studies/(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        base, study_id = m.group(1), int(m.group(2))
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body = _get(f"{base}/api/studies")
                break
            except OSError:
                assert time.monotonic() < deadline, "optuna-dashboard did not answer /api/studies"
                time.sleep(0.3)
        assert status == 200
        summaries = json.loads(body)["study_summaries"]
        assert [(s["study_id"], s["study_name"]) for s in summaries] == [(study_id, RUN)]
        _, body = _get(f"{base}/api/studies/{study_id}")
        detail = json.loads(body)
        assert detail["objective_names"] == ["kl"]
        assert "The answer is trial #" in detail["note"]["body"]
        current = _study(root).user_attrs["answer_trial"]
        trial = next(t for t in detail["trials"] if t["number"] == current)
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert attrs["kind"] == KIND_ANSWER and "The run's answer" in trial["note"]["body"]
        names = {a["filename"]: a["artifact_id"] for a in trial["artifacts"]}
        assert set(names) >= {"policy.json", "report.html", *FIGS}
        status, png = _get(f"{base}/artifacts/{study_id}/{trial['trial_id']}/{names[FIGS[0]]}")
        assert status == 200 and png == (root / "results" / RUN / "figures" / FIGS[0]).read_bytes()
        status, bundle = _get(f"{base}/static/bundle.js")
        assert status == 200 and len(bundle) > 100_000
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


# -- headless Chromium -----------------------------------------------------------------------------

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-dev-shm-usage", "--virtual-time-budget=8000"]


def _chromium(*args: str, size: str = "1400,1800", timeout: float = 90) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory(prefix="policysearch-chromium-") as profile:
        return subprocess.run([exe, *_FLAGS, f"--window-size={size}", f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    probe = tmp_path_factory.mktemp("probe") / "probe.html"
    probe.write_text("<html><body><p id='x'>chromium-probe-ok</p></body></html>")
    try:
        out = _chromium("--dump-dom", probe.as_uri(), timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Chromium cannot start here: {exc}")
    if "chromium-probe-ok" not in out.stdout:
        pytest.skip(f"Chromium cannot start here (exit {out.returncode}): {out.stderr.strip()[-300:]}")
    return _chromium


def _coloured_pixels(png: Path) -> int:
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((rgb.max(-1) - rgb.min(-1)) > 80).sum())


def _keep(shot: Path) -> None:
    folder = os.environ.get("POLICYSEARCH_SCREENSHOT_DIR")  # to look at them after a run
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(folder) / shot.name)


def _render(chromium, url: str, shot: Path, size: str = "1400,1800") -> str:
    """The page's DOM after its scripts ran, and a screenshot of it (one Chromium run)."""
    out = chromium("--dump-dom", f"--screenshot={shot}", url, size=size)
    assert shot.is_file(), out.stderr[-500:]
    _keep(shot)
    return out.stdout


def test_chromium_shows_the_report(reported, chromium, tmp_path):
    root, _, page = reported
    shot = tmp_path / "report.png"
    dom = _render(chromium, page.as_uri(), shot, size="1400,3800")
    assert f'<span id="run-name">{RUN}</span>' in dom and f'<b id="study-name">{RUN}</b>' in dom
    assert len(re.findall(r'<img data-file="figures/fig\d_\w+\.png"[^>]+src="data:image/png;base64,', dom)) == 3
    assert _coloured_pixels(shot) > 50_000  # the figures' colours, not only text


def test_chromium_shows_the_dashboard(reported, chromium, tmp_path):
    from policysearch.report import dashboard_target, serving

    root, _, _ = reported
    current = _study(root).user_attrs["answer_trial"]
    with serving(dashboard_target(RUN, results_dir=root / "results"), port=0) as url:
        dom = _render(chromium, url, tmp_path / "dashboard-study.png")
        assert f"{RUN} (id=" in dom  # the study's name in the header
        assert "js-plotly-plot" in dom and "History" in dom  # the study's plots are drawn
        assert f"trial #{current} (kind answer)" in dom  # the study's first user attribute names the answer
        assert _coloured_pixels(tmp_path / "dashboard-study.png") > 5_000
        dom = _render(chromium, f"{url}/trials?numbers={current}", tmp_path / "dashboard-answer.png", size="1400,2000")
        assert f"Trial {current}" in dom and "The run's answer" in dom
        shown = re.findall(r'<img[^>]+src="[^"]*/artifacts/[^"]+"[^>]*>', dom)
        assert len(shown) >= len(FIGS)  # the report's figures, shown as the answer trial's artifacts
        for fig in FIGS:
            assert fig in dom
