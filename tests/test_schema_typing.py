"""Every block of the policy schema is typed as the loader reads it: a bad value is refused on read."""
import copy
import json

import pytest

from policysearch.errors import PolicyError
from policysearch.policy import read_policy
from policysearch.schema import build_policy_schema, load_policy_schema

VALID = {
    "format": "policysearch.policy/v1",
    "model": {"name": "fmnist_vit", "checkpoint": None, "args": {"num_classes": 10}, "weights": "sha256:00"},
    "quantization": {"weight_bits": 8, "act_bits": 8, "wiring": "paper"},
    "sites": [{"name": "blocks.0.attn.softmax", "kind": "softmax", "method": "ibert", "bits": None}],
    "metrics": {"top1": 0.9, "kl": None, "values": [0.1], "sites": {"blocks.0.attn.softmax": {"gamma": 30.0}},
                "finetune": {"before": {"top1": 0.8}, "after": {"top1": 0.85}, "eval_images": 100},
                "latency": {"device": "cpu"}},
    "provenance": {"data": "fmnist-sample", "eval_size": 16, "calib_size": None, "seed": 0,
                   "versions": {"policysearch": "0.1.0"},
                   "finetune": {"data": "fmnist", "eval_size": None, "settings": {"epochs": 1}}},
}


def _write(tmp_path, doc):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    return path


def test_the_valid_document_reads(tmp_path):
    doc = read_policy(_write(tmp_path, VALID))
    assert doc.provenance["eval_size"] == 16 and doc.metrics["top1"] == 0.9


@pytest.mark.parametrize(("block", "key", "value", "where"), [
    ("metrics", "top1", "high", "metrics/top1"),
    ("metrics", "kl", [1], "metrics/kl"),
    ("metrics", "values", ["a"], "metrics/values/0"),
    ("metrics", "sites", {"s": {"gamma": "x"}}, "metrics/sites/s/gamma"),
    ("metrics", "finetune", {"after": {"top1": "high"}}, "metrics/finetune/after/top1"),
    ("provenance", "eval_size", "all", "provenance/eval_size"),
    ("provenance", "eval_size", 0, "provenance/eval_size"),
    ("provenance", "calib_size", 1.5, "provenance/calib_size"),
    ("provenance", "seed", "zero", "provenance/seed"),
    ("provenance", "data", 3, "provenance/data"),
    ("provenance", "finetune", {"eval_size": "all"}, "provenance/finetune/eval_size"),
    ("model", "name", 7, "model/name"),
    ("model", "checkpoint", ["a.pt"], "model/checkpoint"),
    ("model", "args", {"num_classes": {"n": 10}}, "model/args/num_classes"),
    ("model", "args", [10], "model/args"),
    ("model", "finetuned", 1, "model/finetuned"),
])
def test_a_mistyped_field_is_refused_on_read_with_one_line(tmp_path, block, key, value, where):
    doc = copy.deepcopy(VALID)
    doc[block][key] = value
    with pytest.raises(PolicyError) as info:
        read_policy(_write(tmp_path, doc))
    message = str(info.value)
    assert f"invalid at {where}:" in message and "\n" not in message


def test_unknown_fields_in_the_open_blocks_stay_allowed(tmp_path):
    doc = copy.deepcopy(VALID)
    doc["metrics"]["custom"] = {"anything": [1, "two"]}
    doc["provenance"]["note"] = "hand-written"
    doc["model"]["family"] = "vit"
    assert read_policy(_write(tmp_path, doc)).provenance["note"] == "hand-written"


def test_the_typed_schema_is_still_the_generated_one():
    assert build_policy_schema() == load_policy_schema()
