"""The ceiling (every non-linear site in float) in every run, the headroom and the verdict on the
answer with paired intervals, and ``export --pick best``."""
import json

import numpy as np
import optuna
import pytest

from policysearch.cli import main
from policysearch.errors import ConfigError
from policysearch.objectives.headroom import (
    Headroom,
    Verdict,
    best_uniform,
    ceiling_policy,
    compare,
    per_image_objective,
)
from policysearch.objectives.objective import load_objective
from policysearch.policy import read_policy
from policysearch.report import export_run, summary_text
from policysearch.report.verdict import headroom_sentence, verdict_sentence
from policysearch.result import EvalResult, PerImage
from policysearch.search import SearchConfig, search
from policysearch.stats import paired_difference
from policysearch.study import KIND_ANSWER, KIND_CEILING

RUN = "tiny-headroom"


def _config(root):
    return SearchConfig(strategy="sqnr_diff", model="test_fmnist_vit", calib_size=32, eval_size=48, batch_size=48,
                        results_dir=str(root / "results"), storage=f"sqlite:///{root / 'studies.db'}", run_name=RUN)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("headroom")
    return root, search(_config(root), progress=False)


def _study(root):
    return optuna.load_study(study_name=RUN, storage=f"sqlite:///{root / 'studies.db'}")


def _record(root):
    return json.loads((root / "results" / RUN / "run.json").read_text())


def test_every_run_measures_the_ceiling_as_a_trial(run):
    root, res = run
    ceiling = ceiling_policy(res.policy)
    trials = [t for t in _study(root).trials if t.user_attrs.get("kind") == KIND_CEILING]
    assert len(trials) == 1 and trials[0].user_attrs["policy_key"] == ceiling.key()
    assert trials[0].user_attrs["tag"] == "ceiling" and trials[0].state == optuna.trial.TrialState.COMPLETE
    assert all(c.method == "fp32" for c in ceiling.choices) and ceiling.act_bits == res.policy.act_bits
    assert res.policy != ceiling  # the paper space has no fp32: never the strategy's answer
    stored = EvalResult.from_dict(trials[0].user_attrs["result"])
    assert stored.images is not None and stored.images.n == 48
    assert stored.metrics["kl"] == pytest.approx(res.headroom["rows"]["ceiling"]["kl"])


def test_run_json_and_policy_json_carry_the_headroom_with_intervals(run):
    root, res = run
    data = _record(root)
    room = Headroom.from_dict(data["headroom"])
    assert set(room.rows) == {"float", "ceiling", "best_uniform", "answer"}
    assert room.best_uniform == best_uniform(res.baselines)
    for iv in (room.headroom.top1, room.headroom.kl):
        assert iv is not None and iv.low <= iv.diff <= iv.high
    # the KL interval is over per-image KL: its centre is the difference of the mean KLs
    assert room.headroom.kl.diff == pytest.approx(room.rows["ceiling"]["kl"] - room.rows["best_uniform"]["kl"],
                                                  rel=1e-4, abs=1e-7)
    assert room.headroom.top1.diff == pytest.approx(
        100 * (room.rows["ceiling"]["top1"] - room.rows["best_uniform"]["top1"]), abs=1e-9)
    doc = read_policy(root / "results" / RUN / "policy.json")
    assert doc.metrics["headroom"] == data["headroom"]
    assert doc.metrics["verdict"]["answer_vs_best_uniform"] == data["verdict"]["answer_vs_best_uniform"]


def test_summary_says_the_headroom_and_the_verdict(run):
    root, res = run
    text = summary_text(res)
    room = Headroom.from_dict(res.headroom)
    assert f"headroom = ceiling - uniform {room.best_uniform} (paired 95%, 48 images)" in text
    no_room = "No choice of non-linear methods can measurably beat the best uniform method"
    assert (no_room in text) == (not room.headroom.top1.measurable)
    assert verdict_sentence(res.verdict) in text and "answer - uniform" in text
    verdict = Verdict.from_dict(res.verdict)
    if verdict.best_measurably_better:
        assert f"policysearch export {RUN} --pick best" in text
    # the answer trial is named and says how it compares; so does the study
    study = _study(root)
    (answer,) = [t for t in study.trials if t.user_attrs.get("kind") == KIND_ANSWER]
    assert answer.user_attrs["answer_name"] == "the answer of strategy sqnr_diff"
    assert answer.user_attrs["verdict"] == verdict_sentence(res.verdict) == study.user_attrs["verdict"]
    # optuna-dashboard's notes say how the answer compares, and what the ceiling trial is
    from optuna_dashboard import get_note

    assert f"**How the answer compares:** {study.user_attrs['verdict']}" in get_note(study)
    assert "`ceiling`" in get_note(study)
    assert f"- {answer.user_attrs['verdict']}" in get_note(optuna.trial.Trial(study, answer._trial_id))


def test_export_pick_best_exports_the_best_by_objective(run, capsys):
    root, res = run
    results = str(root / "results")
    assert main(["export", RUN, "--pick", "best", "--results-dir", results]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    doc = read_policy(path)
    assert path.endswith("policy-best.json")
    # the objective is KL (minimised): the exported policy has the lowest KL of the answer and the uniforms
    kls = {m: r.metrics["kl"] for m, r in res.baselines.items()}
    lowest = min([res.result.metrics["kl"], *kls.values()])
    assert doc.metrics["kl"] == pytest.approx(lowest)
    # on this model uniform I-BERT is closest to float, and measurably closer than the rule's answer
    assert doc.provenance["picked"]["label"] == "uniform ibert"
    assert all(c.method == "ibert" for c in doc.policy.choices)
    assert res.verdict["best_measurably_better"] is True
    # the default stays the strategy's own answer
    answer = read_policy(export_run(RUN, out=str(root / "answer.json"), results_dir=results))
    assert answer.policy == res.policy and "picked" not in answer.provenance
    with pytest.raises(ConfigError, match="--pick 'worst' is unknown"):
        export_run(RUN, results_dir=results, pick="worst")


def test_resume_reuses_the_ceiling(run):
    root, res = run
    before = len(_study(root).trials)
    again = search(_config(root), progress=False)
    assert again.evaluated == 0 and len(_study(root).trials) == before
    assert again.headroom == res.headroom and again.verdict == res.verdict


# -- the pieces -------------------------------------------------------------------------------------

def _result(correct, kl, **metrics):
    images = PerImage.from_arrays(correct=np.asarray(correct, bool), agree=np.ones(len(kl), bool), kl=kl)
    return EvalResult(values=(float(np.mean(kl)),), images=images,
                      metrics={"top1": float(np.mean(correct)), "kl": float(np.mean(kl)), **metrics})


def test_per_image_scores_round_trip_and_compare():
    rng = np.random.default_rng(0)
    ca, cb = rng.random(500) < 0.9, rng.random(500) < 0.8
    ka, kb = rng.random(500) * 0.01, rng.random(500) * 0.02
    a, b = _result(ca, ka), _result(cb, kb)
    back = EvalResult.from_dict(json.loads(json.dumps(a.to_dict())))
    arrays = back.images.arrays()
    assert (arrays["correct"] == ca).all() and np.allclose(arrays["kl"], ka.astype(np.float32))
    comp = compare("a", a, "b", b)
    assert (comp.top1.diff, comp.top1.low, comp.top1.high) == pytest.approx(paired_difference(ca, cb, scale=100))
    d = ka.astype(np.float32).astype(float) - kb.astype(np.float32)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert comp.kl.diff == pytest.approx(d.mean()) and comp.kl.high - comp.kl.low == pytest.approx(2 * half)
    assert comp.top1.measurable and comp.kl.measurable
    # without per-image scores there is nothing to pair
    assert compare("a", a, "c", EvalResult(values=(0.0,), metrics={"kl": 0.0})).kl is None


def test_per_image_objective_means_to_the_value():
    r = _result([1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], latency=0.5)
    assert per_image_objective(load_objective("kl"), r).mean() == pytest.approx(0.25)
    assert per_image_objective(load_objective("accuracy_kl"), r).mean() == pytest.approx(0.75 - 0.1 * 0.25)
    assert per_image_objective(load_objective("sqnr_output"), r) is None  # logit SQNR is not a per-image mean


def test_sentences_follow_the_intervals():
    base = {"ceiling_policy": "", "best_uniform": "ibert", "rows": {}, "top1_headroom_measurable": None}
    within = {**base, "headroom": {"a": "ceiling", "b": "uniform ibert", "images": 100,
                                   "top1": {"diff": 0.1, "low": -0.2, "high": 0.4},
                                   "kl": {"diff": -0.01, "low": -0.02, "high": -0.005}}}
    assert headroom_sentence(within).startswith("No choice of non-linear methods can measurably beat the best "
                                                "uniform method (ibert)")
    assert "fidelity (KL to the float model) is what is left to gain" in headroom_sentence(within)
    flat = {**within, "headroom": {**within["headroom"], "kl": {"diff": 0.0, "low": -0.01, "high": 0.01}}}
    assert headroom_sentence(flat).endswith("in top-1 or in KL to the float model.")
    beyond = {**within, "headroom": {**within["headroom"], "top1": {"diff": 1.0, "low": 0.5, "high": 1.5}}}
    assert "can gain up to 1.00" in headroom_sentence(beyond)

    def verdict(top1, kl):
        return {"objective": "kl", "direction": "minimize", "answer_values": [0.1], "answer_is": None,
                "answer_vs_best_uniform": {"a": "answer", "b": "uniform ibert", "images": 100, "top1": top1, "kl": kl},
                "best": None, "best_is_answer": True, "best_vs_answer": None, "best_measurably_better": None,
                "export_command": None}

    worse = {"diff": -2.0, "low": -3.0, "high": -1.0}
    same = {"diff": 0.1, "low": -0.5, "high": 0.7}
    assert verdict_sentence(verdict(worse, {"diff": 0.01, "low": 0.005, "high": 0.02})) == \
        "The answer is worse than uniform ibert on top-1 and KL."
    assert verdict_sentence(verdict(same, {"diff": 0.0, "low": -0.1, "high": 0.1})) == \
        "The answer and uniform ibert do not differ measurably (top-1 or KL)."
    assert verdict_sentence(verdict(same, {"diff": -0.01, "low": -0.02, "high": -0.005})) == \
        "The answer is better than uniform ibert on KL and does not differ measurably on top-1."


def test_best_uniform_prefers_top1_and_skips_float():
    r = {"ibert": EvalResult(values=(0.1,), metrics={"top1": 0.9, "kl": 0.1}),
         "ivit": EvalResult(values=(0.05,), metrics={"top1": 0.9, "kl": 0.05}),
         "fp32": EvalResult(values=(0.0,), metrics={"top1": 0.95, "kl": 0.0})}
    assert best_uniform(r) == "ivit" and best_uniform({"fp32": r["fp32"]}) == "fp32"
