"""The ray runner on a local Ray with 2 CPUs: parity with the local runner, a killed actor, a policy
that kills every actor, Ctrl-C and resume, a PostgreSQL study, the streaming driver (a slow policy
does not hold up the other actor); plus the driver's feed, TPE batches and the missing extra.

Tests that need Ray or PostgreSQL skip with the reason when either is unavailable.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from fake_eval import fake_evaluate, small_space
from policysearch.search import SearchConfig, search

DETERMINISTIC = ["uniform", "sqnr_diff", "sqnr_drop", "sqnr_absdiff", "sqnr_output", "exhaustive"]


def config(root: Path, strategy: str, **kw) -> SearchConfig:
    """The cheap config of tests/test_search.py, each run with its own storage unless told."""
    base = dict(strategy=strategy, model="test_fmnist_vit", calib_size=32, eval_size=48, batch_size=48,
                results_dir=str(root / "results"), storage=f"sqlite:///{root / 'studies.db'}",
                run_name=f"t-{strategy}")
    base.update(kw)
    return SearchConfig(**base)


def ray_config(root: Path, strategy: str, *, workers: int = 2, options: dict | None = None, **kw) -> SearchConfig:
    return config(root, strategy, runner="ray_local", runner_options={"workers": workers, **(options or {})}, **kw)


def trials(cfg: SearchConfig) -> list[optuna.trial.FrozenTrial]:
    """The run's evaluations (not the copy of the answer the driver publishes at the end)."""
    ts = optuna.load_study(study_name=cfg.run_name, storage=cfg.storage).get_trials(deepcopy=False)
    return [t for t in ts if t.user_attrs.get("kind") != "answer"]


def keys_of(ts) -> list[str]:
    return [t.user_attrs["policy_key"] for t in ts]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance with 2 CPUs for the module (start-up ~3-7 s, ~700 MB)."""
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "policysearch[ray]")')
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """``strategy -> (SearchResult, config)`` of the local runner, computed once per strategy."""
    done = {}

    def get(strategy: str):
        if strategy not in done:
            cfg = config(tmp_path_factory.mktemp(f"local-{strategy}"), strategy)
            done[strategy] = (search(cfg, progress=False), cfg)
        return done[strategy]

    return get


@pytest.fixture(scope="class")
def shared_ray(ray_session):
    """One pool of 2 actors for the searches of a test class: ``search()`` closes its runner at the
    end, this one stays (its actors keep their evaluator and its activation cache from search to
    search) until the class is done and frees the 2 CPUs for the other tests."""
    from policysearch.runners import create_runner

    pool = create_runner("ray_local", workers=2)

    class Shared:
        @property
        def capacity(self):
            return pool.capacity

        def map(self, spec, policies):
            return pool.map(spec, policies)

        def stream(self, spec, feed):
            return pool.stream(spec, feed)

        def close(self):
            pass

    yield Shared()
    pool.close()


def wait_for_free_cpus(ray, n: float = 2.0, timeout: float = 20.0) -> bool:
    """The runner released its actors: the cluster's CPUs are all free again."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ray.available_resources().get("CPU", 0) >= n:
            return True
        time.sleep(0.2)
    return False


# -- parity -----------------------------------------------------------------------------------------
def check_parity(res, cfg, local, local_cfg):
    assert res.reused == 0 and res.evaluated == local.evaluated
    assert res.policy == local.policy
    assert res.result.values == local.result.values
    assert res.result.metrics == local.result.metrics
    assert res.result.sites == local.result.sites
    assert {m: r.metrics for m, r in res.baselines.items()} == {m: r.metrics for m, r in local.baselines.items()}
    assert sorted(keys_of(trials(cfg))) == sorted(keys_of(trials(local_cfg)))


def test_ray_and_local_give_the_same_answer_on_a_fresh_pool(ray_session, local_runs, tmp_path):
    """The whole path: the preset, a new pool, each actor building its evaluator, closing."""
    local, local_cfg = local_runs("exhaustive")
    cfg = ray_config(tmp_path, "exhaustive")  # its own storage: nothing is reused from the local run
    check_parity(search(cfg, progress=False), cfg, local, local_cfg)
    assert wait_for_free_cpus(ray_session), "the runner did not release its actors"


class TestParityOnOnePool:
    @pytest.mark.parametrize("strategy", DETERMINISTIC)
    def test_ray_and_local_give_the_same_policy_and_metrics(self, shared_ray, local_runs, tmp_path, monkeypatch,
                                                            strategy):
        import policysearch.runners as runners

        local, local_cfg = local_runs(strategy)
        real = runners.create_runner
        monkeypatch.setattr(runners, "create_runner",
                            lambda name, **kw: shared_ray if name == "ray_local" else real(name, **kw))
        cfg = ray_config(tmp_path, strategy)
        check_parity(search(cfg, progress=False), cfg, local, local_cfg)


def test_resume_across_runners_reuses_everything(ray_session, local_runs, tmp_path):
    local, local_cfg = local_runs("sqnr_diff")
    cfg = config(Path(local_cfg.results_dir).parent, "sqnr_diff", runner="ray_local", runner_options={"workers": 2})
    assert cfg.storage == local_cfg.storage and cfg.run_name == local_cfg.run_name
    again = search(cfg, progress=False)
    assert again.evaluated == 0 and again.policy == local.policy


def test_runner_is_not_part_of_the_fingerprint(tmp_path):
    from policysearch.search import run_fingerprint

    base = run_fingerprint(config(tmp_path, "exhaustive"))
    assert run_fingerprint(ray_config(tmp_path, "exhaustive", options={"address": "auto"})) == base
    assert run_fingerprint(config(tmp_path, "exhaustive", eval_size=40)) != base  # the check can fail


# -- faults ---------------------------------------------------------------------------------------
def test_a_killed_actor_neither_loses_nor_duplicates_a_trial(ray_session, local_runs, tmp_path, caplog):
    local, local_cfg = local_runs("exhaustive")
    cfg = ray_config(tmp_path, "exhaustive", options={"inject_fault": {"exit_on_eval": 3}})  # both first actors die
    with caplog.at_level("WARNING", logger="policysearch.runners.ray"):
        res = search(cfg, progress=False)
    assert caplog.text.count("died while evaluating") == 2
    ts = trials(cfg)
    assert len(keys_of(ts)) == len(set(keys_of(ts))) == res.evaluated == local.evaluated
    assert sorted(keys_of(ts)) == sorted(keys_of(trials(local_cfg)))
    assert all(t.state == TrialState.COMPLETE for t in ts)
    assert res.policy == local.policy and res.result.metrics == local.result.metrics


def test_a_policy_that_kills_every_actor_becomes_a_failed_trial(ray_session, local_runs, tmp_path, caplog):
    local, local_cfg = local_runs("exhaustive")
    poison = next(t.user_attrs["policy_key"] for t in trials(local_cfg)[3:] if t.user_attrs.get("tag") != "baseline")
    cfg = ray_config(tmp_path, "exhaustive", options={"max_retries": 1, "inject_fault": {"exit_on_policies": [poison]}})
    with caplog.at_level("WARNING", logger="policysearch.runners.ray"):
        res = search(cfg, progress=False)
    assert caplog.text.count("died while evaluating") == 2  # the first try and one retry
    ts = trials(cfg)
    assert len(keys_of(ts)) == len(set(keys_of(ts))) == res.evaluated
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert keys_of(failed) == [poison]
    assert "Ray worker died 2 times evaluating this policy" in failed[0].user_attrs["error"]
    assert res.result.ok and res.policy.key() != poison  # the search went on and chose a policy


def test_interrupt_then_the_same_command_resumes(ray_session, local_runs, tmp_path, monkeypatch):
    import json

    from policysearch.study import StudyRecorder

    local, local_cfg = local_runs("exhaustive")
    cfg = ray_config(tmp_path, "exhaustive")
    original = StudyRecorder.record
    calls = []

    def ctrl_c_at_the_sixth(self, *args, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # as Ctrl-C in the driver, with evaluations in flight
        return original(self, *args, **kw)

    monkeypatch.setattr(StudyRecorder, "record", ctrl_c_at_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        search(cfg, progress=False)
    monkeypatch.setattr(StudyRecorder, "record", original)
    first = keys_of(trials(cfg))
    assert len(first) == 5
    run = json.loads((Path(cfg.results_dir) / cfg.run_name / "run.json").read_text())
    assert run["status"] == "interrupted" and len(run["evaluations"]) == 5
    assert wait_for_free_cpus(ray_session), "the interrupted runner left actors behind"

    res = search(cfg, progress=False)  # the same command
    ts = keys_of(trials(cfg))
    assert len(ts) == len(set(ts)) == local.evaluated  # nothing evaluated twice, nothing lost
    assert res.evaluated == local.evaluated - 5
    assert res.policy == local.policy and res.result.metrics == local.result.metrics


# -- PostgreSQL -------------------------------------------------------------------------------------
def _pg_bindir() -> Path | None:
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True) + [shutil.which("initdb")]:
        if initdb and Path(initdb).is_file():
            return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """``POLICYSEARCH_TEST_POSTGRES`` (.ci/run starts one), else a throwaway server started here."""
    import sqlalchemy

    try:
        sqlalchemy.create_engine("postgresql://postgres@127.0.0.1:1/x")  # imports SQLAlchemy's default driver
    except ImportError as exc:
        pytest.skip(f'no PostgreSQL driver for SQLAlchemy ({exc}; pip install "policysearch[postgres]")')
    url = os.environ.get("POLICYSEARCH_TEST_POSTGRES")
    if url:
        yield url
        return
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    prefix: list[str] = []
    datadir = Path(tempfile.mkdtemp(prefix="policysearch-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(datadir, ignore_errors=True)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(datadir, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else ["su", "postgres", "-s",
                                                                                       "/bin/sh", "-c"]
    port = _free_port()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        argv = [*prefix, " ".join(cmd)] if prefix[:1] == ["su"] else [*prefix, *cmd]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    opts = f"-k {datadir} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    steps = [(str(bindir / "initdb"), "-D", str(datadir / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8",
              "--no-sync"),
             (str(bindir / "pg_ctl"), "-D", str(datadir / "data"), "-l", str(datadir / "log"), "-w", "-t", "30",
              "-o", f'"{opts}"' if prefix[:1] == ["su"] else opts, "start"),
             (str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "policysearch")]
    started = False
    try:
        for step in steps:
            proc = run(*step)
            if proc.returncode != 0:
                pytest.skip(f"could not start PostgreSQL ({Path(step[0]).name}: "
                            f"{(proc.stderr or proc.stdout).strip()[-300:]})")
            started = started or step[-1] == "start"
        yield f"postgresql://postgres@127.0.0.1:{port}/policysearch"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(datadir / "data"), "-m", "immediate", "stop")
        shutil.rmtree(datadir, ignore_errors=True)


def test_postgres_study_with_two_ray_workers(ray_session, postgres_url, local_runs, tmp_path):
    local, local_cfg = local_runs("sqnr_diff")
    cfg = ray_config(tmp_path, "sqnr_diff", storage=postgres_url, run_name=f"pg-{os.getpid()}-{time.time_ns()}")
    res = search(cfg, progress=False)
    assert res.policy == local.policy and res.result.metrics == local.result.metrics
    ts = trials(cfg)
    assert len(ts) == res.evaluated == local.evaluated and len(set(keys_of(ts))) == len(ts)
    study = optuna.load_study(study_name=cfg.run_name, storage=postgres_url)
    assert study.user_attrs["fingerprint"]["model"] == "test_fmnist_vit"
    again = search(config(tmp_path, "sqnr_diff", storage=postgres_url, run_name=cfg.run_name), progress=False)
    assert again.evaluated == 0 and again.policy == res.policy  # resumed from PostgreSQL, on the local runner


# -- runner options and errors -----------------------------------------------------------------
def test_presets_and_option_errors():
    pytest.importorskip("ray", reason='Ray is not installed (pip install "policysearch[ray]")')
    from policysearch.errors import ConfigError
    from policysearch.runners import create_runner
    from policysearch.runners.ray import RayRunner

    local = create_runner("ray_local", workers=3)
    assert isinstance(local, RayRunner) and (local.address, local.workers_option) == ("local", 3)
    cluster = create_runner("ray_cluster", address="10.0.0.1:6379")
    assert (cluster.address, cluster.cpus_per_worker) == ("10.0.0.1:6379", 4)
    for bad, match in (({"workers": 0}, "workers"), ({"cpus_per_worker": 1.5}, "cpus_per_worker"),
                       ({"max_retries": -1}, "max_retries"), ({"inject_fault": {"boom": 1}}, "inject_fault"),
                       ({"colour": "red"}, "no option.*colour.*valid: address, workers")):
        with pytest.raises(ConfigError, match=match):
            create_runner("ray_local", **bad)


def test_more_workers_than_cpus_is_refused(ray_session):
    from policysearch.errors import ConfigError
    from policysearch.runners import create_runner

    runner = create_runner("ray_local", workers=3)
    with pytest.raises(ConfigError, match="3 workers of 1 CPU.* need 3 CPUs and 0 GPUs; the Ray cluster has 2 CPUs"):
        _ = runner.capacity
    runner.close()


def test_a_worker_that_loaded_other_inputs_is_refused(ray_session, monkeypatch):
    from policysearch.errors import ConfigError
    from policysearch.runners.ray import RayRunner
    from policysearch.spaces import load_space
    from policysearch.spec import EvaluatorSpec, get_evaluator

    spec = EvaluatorSpec(model="test_fmnist_vit", calib_size=32, eval_size=48, batch_size=48)
    policy = load_space("paper", get_evaluator(spec).sites).uniform_policies()["ivit"]
    real = RayRunner._driver_identity
    monkeypatch.setattr(RayRunner, "_driver_identity", staticmethod(lambda s: {**real(s), "data_digest": "0" * 16}))
    runner = RayRunner(workers=1)
    try:
        with pytest.raises(ConfigError, match=r"loaded other inputs than the driver \(data_digest: driver '0{16}'"):
            list(runner.map(spec, [policy]))
    finally:
        runner.close()
    assert wait_for_free_cpus(ray_session)


def test_no_cluster_at_the_address_is_one_line(tmp_path):
    """A fresh process (no Ray yet) and an address where nothing listens: one line, no minutes of retries."""
    pytest.importorskip("ray", reason='Ray is not installed (pip install "policysearch[ray]")')
    argv = ["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--eval-size", "48", "--calib-size", "32",
            "--results-dir", str(tmp_path), "--no-progress", "--runner", "ray_cluster", "--address", "127.0.0.1:1"]
    code = f"import sys; from policysearch.cli import main; sys.exit(main({argv!r}))"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("policysearch:")]
    assert line.startswith("policysearch: error: ray runner: cannot connect to Ray at '127.0.0.1:1' (nothing answers")
    assert "ray start --head" in line and "Traceback" not in proc.stderr


def test_without_ray_the_runner_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import policysearch.runners as runners
    from policysearch.cli import main
    from policysearch.registry import Registry

    fresh = Registry("runner")
    fresh.register("local", runners.LocalRunner)
    fresh.register_lazy("ray", "policysearch.runners.ray:RayRunner", extra="ray")
    monkeypatch.setattr(runners, "RUNNERS", fresh)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    monkeypatch.delitem(sys.modules, "policysearch.runners.ray", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--runner", "ray_local"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "policysearch[ray]"' in err and err.count("\n") == 1
    assert main(["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--runner", "local",
                 "--workers", "2"]) == 2  # a ray option on the local runner is an error, not ignored
    assert "runner 'local' has no option(s) workers" in capsys.readouterr().err


# -- streaming ------------------------------------------------------------------------------------
def _recording_feed(policies, calls, yielded):
    """``feed_list(policies)`` that notes ``(n, results yielded so far, what it handed out)`` per call."""
    from policysearch.runners.base import feed_list

    inner = feed_list(policies)

    def feed(n):
        out = inner(n)
        calls.append((n, len(yielded), [p.key() for p in out]))
        return out

    return feed


def test_the_default_stream_is_batch_synchronous():
    """Runner.stream (every runner without its own): feed(capacity) -> map -> the next batch only
    once the whole batch is back."""
    from policysearch.runners.base import Runner

    class Fake(Runner):
        capacity = 3

        def map(self, spec, policies):
            return ((p, fake_evaluate(p)) for p in policies)

    policies = list(small_space().uniform_policies().values())
    policies += [policies[0].replace({"norm": c}) for c in small_space().choices("norm")][1:]
    policies += [policies[0].replace({"blocks.0.norm1": c}) for c in small_space().choices("blocks.0.norm1")][1:]
    assert len(policies) == 5
    calls, yielded = [], []
    for p, r in Fake().stream(None, _recording_feed(policies, calls, yielded)):
        assert r == fake_evaluate(p)
        yielded.append(p)
    assert yielded == policies
    assert [(n, k, len(out)) for n, k, out in calls] == [(3, 0, 3), (3, 3, 2), (3, 5, 0)]


def test_the_driver_feed_tells_known_results_and_hands_out_only_new_work():
    """strategy_feed: known results told at once and asked past; asks while results are pending;
    [] while the strategy waits for them; the next step once they are told."""
    from policysearch.search import strategy_feed
    from policysearch.strategies import create_strategy

    space = small_space()
    s = create_strategy("exhaustive", space, seed=0)
    uniform = list(space.uniform_policies().values())
    known = {p.key(): fake_evaluate(p) for p in uniform}
    looked_up = []
    feed = strategy_feed(s, lambda p: looked_up.append(p.key()) or known.get(p.key()))
    first = feed(3)
    assert looked_up[:len(uniform)] == [p.key() for p in uniform]  # asked, answered, told: never handed out
    assert all(s.result_of(p) == known[p.key()] for p in uniform)
    changes = s.changes(s.base())
    assert [p.key() for p in first] == [p.key() for p in changes[:3]]  # filled up to n past the known ones
    rest = []
    while more := feed(3):  # while the first ones are pending
        assert len(more) <= 3
        rest += more
    assert [p.key() for p in first + rest] == [p.key() for p in changes]
    assert feed(3) == [] and not s.finished  # waiting: the combined policy needs every result
    for p in first + rest:
        s.tell(p, fake_evaluate(p))
    (combined,) = feed(3)
    assert combined == s.combined(s.base())
    s.tell(combined, fake_evaluate(combined))
    assert feed(3) == [] and s.finished


def test_the_ray_stream_refills_a_free_actor_while_another_is_busy(ray_session):
    """One slow policy: the other actor goes on with the next policies, fed one at a time as it
    frees up, and the slow one comes back last (a batch-synchronous loop would wait for it)."""
    from policysearch.runners.ray import RayRunner
    from policysearch.spaces import load_space
    from policysearch.spec import EvaluatorSpec, get_evaluator

    spec = EvaluatorSpec(model="test_fmnist_vit", calib_size=32, eval_size=48, batch_size=48)
    sites = get_evaluator(spec).sites
    space = load_space("paper", sites)
    slow, *others = space.uniform_policies().values()
    others += [others[0].replace({sites[-1].name: c}) for c in space.choices(sites[-1].name)
               if c != others[0][sites[-1].name]][:2]
    assert len(others) == 4
    runner = RayRunner(workers=2, inject_fault={"slow_policies": {slow.key(): 4.0}})
    calls, yielded = [], []
    try:
        for p, r in runner.stream(spec, _recording_feed([slow, *others], calls, yielded)):
            assert r.ok, r.error
            yielded.append(p)
    finally:
        runner.close()
    assert [p.key() for p in yielded] == [p.key() for p in [*others, slow]]
    # feed(2) at the start; then one free actor after each quick result, while the slow one runs
    assert [(n, k) for n, k, _ in calls] == [(2, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 5)]
    assert runner.stats["evaluations"] == 5
    assert wait_for_free_cpus(ray_session)


def test_a_search_goes_on_while_one_actor_evaluates_a_slow_policy(ray_session, local_runs, tmp_path):
    """Through search(): trials start and finish while the slow one runs, and the answer, the
    metrics and the trials are those of the local runner."""
    local, local_cfg = local_runs("exhaustive")
    slow = next(t.user_attrs["policy_key"] for t in trials(local_cfg) if t.user_attrs.get("tag") != "baseline")
    cfg = ray_config(tmp_path, "exhaustive", options={"inject_fault": {"slow_policies": {slow: 3.0}}})
    check_parity(search(cfg, progress=False), cfg, local, local_cfg)
    ts = trials(cfg)
    (s,) = [t for t in ts if t.user_attrs["policy_key"] == slow]
    during = [t for t in ts if s.datetime_start < t.datetime_start and t.datetime_complete < s.datetime_complete]
    assert len(during) >= 2, [(t.datetime_start, t.datetime_complete) for t in ts]
    assert wait_for_free_cpus(ray_session)


# -- TPE batches (constant liar) --------------------------------------------------------------------
def _tpe_batches(order: str, n: int = 4, rounds: int = 3):
    from policysearch.strategies import create_strategy

    s = create_strategy("tpe", small_space(), seed=5, trials=n * rounds, n_startup_trials=2)
    while not s.warm.finished:  # the sqnr_diff warm start, as the driver runs it
        for p in s.ask(n):
            s.tell(p, fake_evaluate(p))
    out = []
    for _ in range(rounds):
        batch = s.ask(n)
        out.append([p.key() for p in batch])
        for p in (batch if order == "forward" else batch[::-1]):  # results come back in any order
            s.tell(p, fake_evaluate(p))
    return out, s


def test_tpe_asks_a_full_batch_with_a_constant_liar():
    forward, s = _tpe_batches("forward")
    backward, _ = _tpe_batches("backward")
    assert all(len(b) == 4 and len(set(b)) == 4 for b in forward)
    assert forward == backward  # the next batch never depends on the order results arrived
    assert s.study.sampler._constant_liar is True
