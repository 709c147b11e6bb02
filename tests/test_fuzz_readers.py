"""Every public reader raises only the project's errors (issue 25, item 1).

Valid policy files, run records (v1 and v2) and the built-in objective/space/runner presets are
mutated (types, nesting to 10^5, unicode and lone surrogates, huge and non-finite numbers,
duplicate keys, BOMs, truncation, alias bombs) and read through the public readers. Each input is
either accepted, validates and round-trips when written back, or refused with one
``PolicySearchError`` whose message is one line; anything else (``RecursionError`` included) is
an escape. The hypothesis tests are derandomized; the slow-marked loop runs 2,500 mutations.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import random
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policysearch.errors import PolicySearchError
from policysearch.objectives import load_objective
from policysearch.policy import read_policy, write_policy
from policysearch.run import RunRecord
from policysearch.rundoc import RunDocument
from policysearch.runners import Runner, create_runner
from policysearch.sites import Site
from policysearch.spaces import SearchSpace, load_space

DATA = Path(__file__).parent / "data"
PRESETS = Path(str(resources.files("policysearch.presets")))
SITES = tuple(Site(name=f"blocks.{b}.{n}", kind=k) for b in range(2) for n, k in
              (("norm1", "layernorm"), ("attn.softmax", "softmax"), ("norm2", "layernorm"),
               ("mlp.act", "gelu"))) + (Site(name="fc_norm", kind="layernorm"),)
DEEP = (65, 200, 999, 3_000, 100_000)


# -- hostile values and mutations ------------------------------------------------------------
def _hostile(rng: random.Random) -> Any:
    """A value of another type or range than a field expects (JSON- and YAML-writable)."""
    depth = rng.choice(DEEP)
    choices: list[Callable[[], Any]] = [
        lambda: None, lambda: True, lambda: 0, lambda: -1, lambda: 1, lambda: 2**63, lambda: -(2**70),
        lambda: 1.5, lambda: -0.0, lambda: 1e308, lambda: math.nan, lambda: -math.inf, lambda: "",
        lambda: "high", lambda: "all",
        lambda: "\u00e9\u4e2d\U0001f600\u202e", lambda: "a\nb\x00", lambda: "x" * 2_000, lambda: [], lambda: {},
        lambda: [1, "two", None], lambda: {"": {"": []}}, lambda: [0] * 300,
        lambda: _Deep(depth, rng.random() < 0.5),
    ]
    return rng.choice(choices)()


class _Deep:
    """A value nested ``depth`` levels (arrays, or objects ``{"k": ...}``), spliced in as text on
    writing: the json and yaml modules recurse and cannot write it themselves."""

    def __init__(self, depth: int, as_dict: bool) -> None:
        self.depth, self.as_dict = depth, as_dict

    def text(self) -> str:
        return ('{"k": ' * self.depth + "1" + "}" * self.depth) if self.as_dict else \
            ("[" * self.depth + "1" + "]" * self.depth)


def _paths(tree: Any) -> list[tuple]:
    """Paths (keys and indexes) to the values of ``tree`` down to 8 levels, the root's included."""
    out: list[tuple] = []
    stack: list[tuple[tuple, Any]] = [((), tree)]
    while stack:
        prefix, node = stack.pop()
        out.append(prefix)
        if len(prefix) >= 8:
            continue
        if isinstance(node, dict):
            stack += [(prefix + (k,), v) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(prefix + (i,), v) for i, v in enumerate(node[:6])]
    return out


def _set(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    parent = tree
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return tree


def mutate_tree(tree: Any, rng: random.Random) -> Any:
    """One to three structural changes: a value replaced, a key dropped or renamed, a list emptied."""
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(sorted(_paths(tree), key=repr))
        op = rng.random()
        if op < 0.6 or not path:
            tree = _set(tree, path, _hostile(rng))
            continue
        parent = tree
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        if isinstance(parent, dict) and op < 0.8:
            del parent[key]
        elif isinstance(parent, dict):
            parent[rng.choice(["", "\ud800", "Format", key + " ", "sites", "stages"])] = parent.pop(key)
        elif isinstance(parent, list):
            parent.clear() if op < 0.8 else parent.append(parent[key])
    return tree


_NUMBER_LITERALS = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5_000, "1" * 400, "1e-400",
                    "0.1e1", "-0")


def mutate_json_text(text: str, rng: random.Random) -> bytes:
    """Byte-level damage that a tree cannot express: literals, BOMs, truncation, bad UTF-8."""
    op = rng.randrange(9)
    if op == 0:  # a number becomes a non-finite or huge literal
        digits = [i for i, c in enumerate(text) if c.isdigit() and not text[i - 1].isalnum()]
        if digits:
            i = rng.choice(digits)
            j = i
            while j < len(text) and (text[j].isdigit() or text[j] in ".eE-+"):
                j += 1
            text = text[:i] + rng.choice(_NUMBER_LITERALS) + text[j:]
    elif op == 1:  # a key given twice
        i = text.find("{")
        key = rng.choice(['"format"', '"sites"', '"name"', '"quantization"', '"stages"', '"evaluations"'])
        text = text[: i + 1] + f"{key}: {rng.choice(['1', 'null', '[]', '{}'])}, " + text[i + 1:]
        text = text.replace(", }", "}")
    elif op == 2:
        return b"\xef\xbb\xbf" + _bytes(text)
    elif op == 3:
        return ("\ufeff" + text).encode("utf-16", "surrogatepass")
    elif op == 4:  # truncated
        return _bytes(text)[: rng.randrange(len(text))]
    elif op == 5:  # a byte flipped (often not UTF-8 any more)
        raw = bytearray(_bytes(text))
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    elif op == 6:  # a lone surrogate escape in some string
        i = text.find('"', rng.randrange(len(text)))
        if i >= 0:
            text = text[: i + 1] + "\\ud800" + text[i + 1:]
    elif op == 7:  # deep nesting as text, in place of a value
        n = rng.choice(DEEP)
        i = text.find(": ", rng.randrange(len(text)))
        if i >= 0:
            ends = [j for j in (text.find(c, i + 2) for c in ",}]") if j > 0]
            text = text[: i + 2] + "[" * n + "]" * n + text[min(ends, default=len(text)):]
    else:  # the whole document deep
        n = rng.choice(DEEP)
        text = "[" * n + text + "]" * n
    return _bytes(text)


def _bytes(text: str) -> bytes:
    """UTF-8, a lone surrogate written as its three bytes (CESU: not valid UTF-8)."""
    return text.encode("utf-8", "surrogatepass")


_YAML_TEXT = (
    "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
    "x: &x [*x]\n",
    "k: 1\nk: 2\n",
    "k: " + "1" * 5_000 + "\n",
    "k: .nan\n", "k: -.inf\n", "k: 2026-13-45\n", "\tk: 1\n", "k: !!python/object:os.system {}\n",
    "k: \"\\ud800\"\n", "- 1\n- 2\n", "just text\n", "", "k: [1, 2\n", "? [a]\n: 1\n",
)


def mutate_yaml_text(text: str, rng: random.Random) -> bytes:
    op = rng.randrange(7)
    if op == 0:
        return b"\xef\xbb\xbf" + _bytes(text)
    if op == 1:
        return _bytes(text)[: rng.randrange(len(text) + 1)]
    if op == 2:  # a hostile snippet appended (keys at top level) or the whole text
        snippet = rng.choice(_YAML_TEXT)
        return (snippet if rng.random() < 0.3 else text + "\n" + snippet).encode("utf-8", "surrogatepass")
    if op == 3:
        n = rng.choice(DEEP)
        return _bytes(text + f"\ndeep: {'[' * n}{']' * n}\n")
    if op == 4:  # a line duplicated (often a key given twice)
        lines = text.splitlines(keepends=True) or ["\n"]
        i = rng.randrange(len(lines))
        return _bytes("".join(lines[: i + 1] + lines[i:]))
    if op == 5:
        raw = bytearray(_bytes(text) or b" ")
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    n = rng.choice(DEEP)
    return _bytes(text + "\nnest: " + "{a: " * n + "1" + "}" * n + "\n")


# -- the readers, their validation and their round trip -------------------------------------
def _read_policy(path: Path, tmp: Path) -> None:
    doc = read_policy(path)
    assert len(doc.policy) >= 1
    again = read_policy(write_policy(tmp / "back.json", doc))
    assert again.to_json() == doc.to_json() and again.policy == doc.policy


def _stringify_nonfinite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _stringify_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_stringify_nonfinite(v) for v in obj]
    return obj


def _read_run(path: Path, tmp: Path) -> None:
    rec = RunRecord.load(path.parent)
    doc = rec.doc
    doc.fingerprint()
    assert isinstance(doc.to_json(), dict)
    back = tmp / "back"
    back.mkdir(exist_ok=True)
    RunRecord(back, copy.deepcopy(rec.data)).save()
    again = RunRecord.load(back).data
    again.pop("updated", None)
    first = _stringify_nonfinite(rec.data)
    first.pop("updated", None)
    assert again == first


def _read_objective(path: Path, tmp: Path) -> None:
    obj = load_objective(str(path))
    assert all(math.isfinite(w) for terms in obj.values for _, w in terms)
    out = tmp / "back.yaml"
    out.write_text(yaml.safe_dump(obj.to_dict(), sort_keys=False))
    again = load_objective(str(out))
    assert again.to_dict() == {**obj.to_dict(), "name": "back"}


def _read_space(path: Path, tmp: Path) -> None:
    space = load_space(str(path), SITES)
    assert space.size() >= 1
    text = yaml.safe_dump(space.to_dict(), sort_keys=False)
    again = SearchSpace.from_dict(yaml.safe_load(text))
    assert again.to_dict() == space.to_dict()


def _read_runner(path: Path, tmp: Path) -> None:
    assert isinstance(create_runner(str(path)), Runner)


def _policy_seeds() -> list[tuple[str, Any]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(DATA.glob("policy_v1*.json"))]


def _run_seeds() -> list[tuple[str, Any]]:
    v1 = json.loads((DATA / "run_v1.json").read_text())
    v2 = RunDocument.from_json(v1).to_json()
    v2["stages"] = {"report": {"file": "report.html", "figures": ["a.png"], "answer_trial": 3},
                    "custom": {"anything": [1, {"x": None}]}}
    return [("run_v1", v1), ("run_v2", v2)]


#: a ray runner preset giving every option, so that each one gets mutated
_RAY_ALL = {"type": "ray", "address": "local", "workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0,
            "num_cpus": 2, "num_gpus": 0, "max_retries": 2, "max_restarts": 1, "startup_timeout_s": 60.0,
            "init_options": {"include_dashboard": False}, "inject_fault": {"exit_on_eval": 1}}
#: a space preset using every field, overrides included
_SPACE_ALL = {"methods": {"softmax": ["ibert", "ivit"], "gelu": ["ibert", "relu"], "layernorm": ["ivit"]},
              "bits": {"softmax": [6, 8]},
              "overrides": [{"match": "blocks.0.*", "methods": ["fp32"]},
                            {"regex": "blocks\\.1\\.mlp\\.act", "kind": "gelu", "methods": ["relu"]},
                            {"match": "*", "kind": "softmax", "bits": [8]}]}


def _preset_seeds(kind: str) -> list[tuple[str, Any]]:
    seeds = [(p.name, yaml.safe_load(p.read_text())) for p in sorted((PRESETS / kind).glob("*.yaml"))]
    extra = {"runners": [("ray_all", _RAY_ALL)], "spaces": [("space_all", _SPACE_ALL)]}.get(kind, [])
    return seeds + extra


READERS: dict[str, tuple[Callable[[Path, Path], None], Callable[[], list], str]] = {
    "policy": (_read_policy, _policy_seeds, "json"),
    "run": (_read_run, _run_seeds, "json"),
    "objective": (_read_objective, lambda: _preset_seeds("objectives"), "yaml"),
    "space": (_read_space, lambda: _preset_seeds("spaces"), "yaml"),
    "runner": (_read_runner, lambda: _preset_seeds("runners"), "yaml"),
}
_SEEDS = {kind: seeds() for kind, (_, seeds, _) in READERS.items()}


def _serialise(tree: Any, fmt: str, *, ascii_only: bool = True) -> str:
    """JSON or YAML text of ``tree``, each :class:`_Deep` value written as flow text (valid in both)."""
    deep: list[_Deep] = []

    def placeholders(node: Any) -> Any:
        if isinstance(node, _Deep):
            deep.append(node)
            return f"@@deep{len(deep) - 1}@@"
        if isinstance(node, dict):
            return {k: placeholders(v) for k, v in node.items()}
        if isinstance(node, list):
            return [placeholders(v) for v in node]
        return node

    plain = placeholders(tree)
    if fmt == "json":
        text = json.dumps(plain, indent=1, ensure_ascii=ascii_only)
    else:
        try:
            text = yaml.dump(plain, Dumper=_DUMPER, sort_keys=False, allow_unicode=not ascii_only)
        except UnicodeEncodeError:  # libyaml's emitter refuses lone surrogates; PyYAML's escapes them
            text = yaml.dump(plain, Dumper=yaml.SafeDumper, sort_keys=False, allow_unicode=not ascii_only)
    for i, d in enumerate(deep):
        for quoted in (f'"@@deep{i}@@"', f"'@@deep{i}@@'", f"@@deep{i}@@"):
            text = text.replace(quoted, d.text())
    return text


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def one_case(kind: str, rng: random.Random, tmp: Path) -> str:
    """Mutate one seed of ``kind``, read it; ``accepted`` or ``refused``, else an AssertionError."""
    read, _, fmt = READERS[kind]
    _, seed = rng.choice(_SEEDS[kind])
    tree = mutate_tree(seed, rng) if rng.random() < 0.6 else copy.deepcopy(seed)
    text = _serialise(tree, fmt, ascii_only=rng.random() < 0.5)
    raw = _bytes(text)
    if rng.random() < 0.6 or raw == _bytes(_serialise(seed, fmt)):
        raw = (mutate_json_text if fmt == "json" else mutate_yaml_text)(text, rng)
    case = tmp / f"case-{kind}"
    case.mkdir(exist_ok=True)
    path = case / ("run.json" if kind == "run" else "policy.json" if kind == "policy" else "preset.yaml")
    path.write_bytes(raw)
    try:
        read(path, case)
    except PolicySearchError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"{kind}: a message of more than one line: {message!r}"
        return "refused"
    except AssertionError:
        raise
    except BaseException as exc:  # noqa: BLE001 -- the point: nothing else may escape
        raise AssertionError(f"{kind}: {type(exc).__name__} escaped on {raw[:200]!r}...: {exc!s:.300}") from exc
    return "accepted"


# -- the tests ---------------------------------------------------------------------------------
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@pytest.mark.parametrize("kind", list(READERS))
@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_readers_raise_only_project_errors(kind, rng, tmp_path_factory):
    one_case(kind, rng, tmp_path_factory.mktemp(kind))


@pytest.mark.parametrize("kind", list(READERS))
def test_the_seeds_are_accepted_and_round_trip(kind, tmp_path):
    read, _, fmt = READERS[kind]
    for i, (_name, seed) in enumerate(_SEEDS[kind]):
        if kind == "runner" and seed.get("type") == "ray" and importlib.util.find_spec("ray") is None:
            continue  # without the ray extra a ray preset is refused by name (MissingExtraError), rightly
        case = tmp_path / str(i)
        case.mkdir()
        path = case / ("run.json" if kind == "run" else "policy.json" if kind == "policy" else "preset.yaml")
        path.write_text(_serialise(seed, fmt))
        read(path, case)


@pytest.mark.parametrize(("text", "needle"), [
    ("[" * 100_000 + "]" * 100_000, "nested more than"),
    ('{"format": "policysearch.policy/v1", "format": "policysearch.policy/v1"}', "duplicate key"),
    ('{"a": NaN}', "NaN is not JSON"),
    ('{"a": 1e999}', "too large"),
    ('{"a": ' + "1" * 5_000 + "}", "5000 digits"),
    ('{"a": "\\ud800"}', "surrogate"),
])
def test_hostile_policy_text_is_one_named_error(tmp_path, text, needle):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(PolicySearchError, match=needle) as info:
        read_policy(path)
    assert "\n" not in str(info.value)


def test_a_bom_is_accepted(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + (DATA / "policy_v1.json").read_bytes())
    assert len(read_policy(path).policy) == 25


@pytest.mark.slow
def test_2500_mutations_raise_only_project_errors(tmp_path):
    """The issue's count: 2,500 mutations, 500 per reader, from a fixed seed."""
    counts: dict[str, int] = {}
    for kind in READERS:
        rng = random.Random(f"issue-25-{kind}")
        for _ in range(500):
            outcome = one_case(kind, rng, tmp_path)
            counts[outcome] = counts.get(outcome, 0) + 1
    assert sum(counts.values()) == 2_500
    assert counts.get("accepted", 0) > 0 and counts.get("refused", 0) > 0


@pytest.mark.parametrize(("change", "needle"), [
    ({"resumed": "two"}, "'resumed'"),
    ({"status": 3}, "'status'"),
    ({"evaluations": {"0": {}}}, "'evaluations'"),
    ({"evaluations": [[]]}, "'evaluations'"),
    ({"fingerprint": []}, "'fingerprint_fields'"),
    ({"stages": {"report": {"figures": "a.png"}}}, "'figures'"),
])
def test_a_mistyped_run_record_is_one_line_naming_the_field(tmp_path, change, needle):
    data = {**json.loads((DATA / "run_v1.json").read_text()), **change}
    (tmp_path / "run.json").write_text(json.dumps(data))
    with pytest.raises(PolicySearchError, match=needle) as info:
        RunRecord.load(tmp_path)
    assert "\n" not in str(info.value) and "delete the run folder" in str(info.value)


@pytest.mark.parametrize(("text", "needle"), [
    ("values:\n- kl: 1\nvalues:\n- top1: 1\n", "duplicate key"),
    (_YAML_TEXT[0], "aliases are expanded"),
    ("values: &x [*x]\n", "refers to itself"),
    ("values: " + "[" * 3_000 + "]" * 3_000 + "\n", "nested more than"),
    ("values: [\n  - kl\n", "not valid YAML"),
    ("values: " + "1" * 5_000 + "\n", "too many digits"),
])
def test_hostile_preset_text_is_one_named_error(tmp_path, text, needle):
    path = tmp_path / "o.yaml"
    path.write_text(text)
    with pytest.raises(PolicySearchError, match=needle) as info:
        load_objective(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("weight", [".nan", ".inf", "-.inf", "1e999"])
def test_an_objective_weight_must_be_finite(tmp_path, weight):
    path = tmp_path / "o.yaml"
    path.write_text(f"values:\n- kl: {weight}\n")
    with pytest.raises(PolicySearchError, match="finite"):
        load_objective(str(path))
