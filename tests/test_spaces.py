from pathlib import Path

import pytest
import yaml

from fake_eval import SITES
from policysearch.errors import ConfigError
from policysearch.policy import Choice
from policysearch.spaces import SPACES, SearchSpace, list_spaces, load_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list_spaces())
def test_preset_files_equal_builtins(name):
    data = yaml.safe_load((ROOT / "spaces" / f"{name}.yaml").read_text())
    data.pop("name")
    assert data == SPACES.get(name)


def test_paper_space():
    space = load_space("paper", SITES)
    assert [c.method for c in space.choices("blocks.0.attn.softmax")] == ["ibert", "fqvit", "ivit"]
    assert [c.method for c in space.choices("blocks.0.mlp.act")] == ["ibert", "ivit"]
    uniform = space.uniform_policies()
    assert list(uniform) == ["ibert", "fqvit", "ivit"]
    assert uniform["fqvit"]["blocks.0.mlp.act"].method == "ibert"  # FQ-ViT has no GELU


def test_overrides_and_bits(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({
        "methods": {"softmax": ["ivit"], "gelu": ["ivit", "relu"], "layernorm": ["ivit"]},
        "bits": {"softmax": [6, 8]},
        "overrides": [{"match": "blocks.1.*", "methods": ["fp32"]}, {"match": "nothing.*", "methods": ["ivit"]}],
    }))
    space = load_space(str(path), SITES, act_bits=6)
    assert space.choices("blocks.0.attn.softmax") == (Choice(method="ivit", bits=6), Choice(method="ivit", bits=8))
    assert space.choices("blocks.1.attn.softmax") == (Choice(method="fp32"),)
    assert space.act_bits == 6 and space.size() == 2 * 2


@pytest.mark.parametrize("preset, message", [
    ({"methods": {"softmax": ["relu"]}}, "not allowed for softmax"),
    ({"methods": {"matmul": ["ivit"]}}, "unknown kind"),
    ({"methods": {}, "overrides": [{"match": "*"}]}, "needs 'match' and 'methods'"),
    ({"methods": {"softmax": []}}, "no choice"),
])
def test_bad_presets(preset, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_preset(preset, SITES)


def test_unknown_space_lists_available():
    with pytest.raises(ConfigError, match="available: all, gelu_less, mixed_bits, paper"):
        load_space("nope", SITES)
    with pytest.raises(ConfigError, match="does not exist"):
        load_space("missing.yaml", SITES)
