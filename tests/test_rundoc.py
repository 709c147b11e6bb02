"""The typed run document (policysearch.run/v2): round trips, the v1 reader, stage types, specs."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import pytest

from policysearch.deploy.record import LatencyStage
from policysearch.errors import ConfigError
from policysearch.finetune.record import FinetuneStage
from policysearch.report.record import ReportStage
from policysearch.run import RunRecord, policy_document
from policysearch.rundoc import (
    RUN_FORMAT,
    STAGES,
    RawStage,
    RunDocument,
    SearchStage,
    Stage,
    register_stage,
)
from policysearch.spec import EvaluatorSpec

#: run.json of a tiny `policysearch run` (uniform, 16 images) written by the v1 code, with the
#: stages a v1 record could hold (the training stage in an earlier, flat layout)
V1 = Path(__file__).parent / "data" / "run_v1.json"


def _v1() -> dict:
    return json.loads(V1.read_text())


def test_v1_file_reads_into_typed_stages():
    raw = _v1()
    assert raw["format"] == "policysearch.run/v1"
    doc = RunDocument.from_json(raw)
    assert doc.name == raw["name"] and doc.status == "finished"
    assert doc.search.config == raw["config"] and doc.search.answer == raw["answer"]
    assert doc.search.fingerprint() == raw["fingerprint"]
    ft = doc.stage(FinetuneStage)
    assert isinstance(ft, FinetuneStage) and ft.after == {"top1": raw["stages"]["finetune"]["top1_after"]}
    lat = doc.stage(LatencyStage)
    assert isinstance(lat, LatencyStage) and lat.median_ms == raw["stages"]["latency"]["median_ms"]
    assert doc.stage(ReportStage) is None


def test_v1_to_v2_keeps_every_field_and_round_trips():
    raw = _v1()
    out = RunDocument.from_json(raw).to_json()
    assert out["format"] == RUN_FORMAT
    for key, value in raw.items():
        if key not in ("format", "stages"):
            assert out[key] == value, key
    for name, stage in raw["stages"].items():
        assert {k: v for k, v in out["stages"][name].items() if k != "after"} == stage, name
    again = RunDocument.from_json(json.loads(json.dumps(out))).to_json()
    assert again == out


def test_record_load_reads_v1_and_policy_document_is_unchanged(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(_v1()))
    record = RunRecord.load(run_dir)
    assert record.data["format"] == RUN_FORMAT
    doc = policy_document(record)
    assert doc.metrics["finetune"]["after"] == {"top1": _v1()["stages"]["finetune"]["top1_after"]}
    assert doc.metrics["latency"]["median_ms"] == _v1()["stages"]["latency"]["median_ms"]
    assert doc.model["finetuned"] == "finetuned.safetensors"
    assert list(doc.metrics)[-2:] == ["latency", "finetune"]  # latency adds first, as before
    record.save()
    assert json.loads((run_dir / "run.json").read_text())["format"] == RUN_FORMAT


def test_stage_types_round_trip_and_keep_unknown_fields():
    ft = FinetuneStage(weights="w.safetensors", after={"top1": 0.5}, settings={"lr": 1e-4}, extra={"new": 1})
    assert FinetuneStage.from_json(ft.to_json()) == ft
    lat = LatencyStage(file="latency.json", provider="cpu", threads=2, median_ms={"float": {"1": 2.0}})
    assert LatencyStage.from_json(lat.to_json()) == lat
    rep = ReportStage(file="report.html", figures=["figures/a.png"], answer_trial=3, missing=[])
    assert ReportStage.from_json(rep.to_json()) == rep
    doc = RunDocument(name="n", search=SearchStage(config={"model": "m"}, fingerprint_fields={"a": 1}),
                      stages={"finetune": ft, "odd": RawStage(extra={"x": [1, 2]})})
    back = RunDocument.from_json(doc.to_json())
    assert back == doc and back.fingerprint() == {"a": 1}


def test_a_stage_registers_its_type_and_contributes():
    @register_stage
    @dataclasses.dataclass(kw_only=True)
    class Probe(Stage):
        name: ClassVar[str] = "probe_test"
        seen: int | None = None

        def fingerprint(self) -> dict:
            return {"probe": self.seen}

    assert STAGES.get("probe_test") is Probe
    doc = RunDocument.from_json({"format": RUN_FORMAT, "name": "n", "fingerprint": {"m": 1},
                                 "stages": {"probe_test": {"seen": 3}}})
    assert isinstance(doc.stages["probe_test"], Probe)
    assert doc.fingerprint() == {"m": 1, "probe": 3}


def test_bad_documents_are_one_clear_error():
    with pytest.raises(ConfigError, match="run record"):
        RunDocument.from_json({"format": "policysearch.run/v0"})
    with pytest.raises(ConfigError, match="stages"):
        RunDocument.from_json({"format": RUN_FORMAT, "name": "n", "stages": {"finetune": 3}})


def test_evaluator_spec_from_run():
    doc = RunDocument.from_json(_v1())
    cfg = doc.search.config
    spec = EvaluatorSpec.from_run(doc, device="cpu")
    assert (spec.model, spec.data, spec.eval_size, spec.calib_size, spec.seed) == (
        cfg["model"], cfg["data"], cfg["eval_size"], cfg["calib_size"], cfg["seed"])
    assert spec.objective == doc.search.objective and spec.device == "cpu"
    assert spec.model_args == tuple(sorted(doc.search.fingerprint()["model_args"].items()))
    with pytest.raises(TypeError, match="no field"):
        EvaluatorSpec.from_run(doc, nope=1)


def test_evaluator_spec_from_policy_reads_what_the_run_evaluated(tmp_path):
    """A run's policy JSON names the run's model, weights, architecture, wiring, data, image
    counts and seed: the spec from the policy file and the spec from the run agree on them."""
    record = RunRecord(tmp_path, _v1())
    doc = policy_document(record)
    from_policy = EvaluatorSpec.from_policy(doc, device="cpu")
    from_run = EvaluatorSpec.from_run(record.doc, device="cpu")
    same = ("model", "checkpoint", "model_args", "wiring", "data", "calib_size", "eval_size", "seed", "device")
    assert [getattr(from_policy, f) for f in same] == [getattr(from_run, f) for f in same]
    custom = dataclasses.replace(doc, model={"name": "vit_tiny", "checkpoint": "w.safetensors",
                                             "args": {"num_classes": 3, "img_size": 32}},
                                 provenance={"data": "fmnist", "eval_size": 7, "calib_size": 5, "seed": 4},
                                 wiring="native")
    spec = EvaluatorSpec.from_policy(custom, eval_size=None, progress=True)
    assert (spec.model, spec.checkpoint, spec.model_args, spec.wiring, spec.data) == (
        "vit_tiny", "w.safetensors", (("img_size", 32), ("num_classes", 3)), "native", "fmnist")
    assert (spec.eval_size, spec.calib_size, spec.seed, spec.progress) == (None, 5, 4, True)
    bare = EvaluatorSpec.from_policy(dataclasses.replace(doc, model={}, provenance={}, wiring=None))
    assert bare == EvaluatorSpec()  # nothing recorded: the defaults
    with pytest.raises(TypeError, match="no field"):
        EvaluatorSpec.from_policy(doc, nope=1)
