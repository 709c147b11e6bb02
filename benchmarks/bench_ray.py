"""Ray runner: candidate throughput with 2 actors vs 1, the runner's own overhead per evaluation, and
the CPU-contention ceiling of this machine.

    python benchmarks/bench_ray.py [--eval-size 160] [--rounds 2] [--workers 1 2] [--loop stream|sync|both]
                                   [--contention-rounds 2] [--contention-only]

A local Ray instance with one CPU per actor of all pools (``--gpus-per-worker 1``: one actor per
GPU instead). Each pool runs the real ``exhaustive`` search on the ``fmnist_vit`` zoo model with
the driver loop of ``search.py`` without the study: ``runner.stream`` fed by
:func:`policysearch.search.strategy_feed` (``--loop sync``, or ``--sync``: the old batch-synchronous
loop, ask ``capacity`` -> ``map`` -> tell all -> ask again, which is ``Runner.stream``'s default;
``--loop both``: the two side by side), each actor with ``--threads`` torch threads (1 by default).
``--eval-size`` makes one evaluation cost about a second. The pools run interleaved (1, 2, 1, 2,
...) because timings on a shared machine drift:

* scaling efficiency = (throughput with N actors / throughput with 1) / N  (target >= 0.8 for N=2),
  the throughput ratio being the median over rounds of each round's ratio (the two ran back to
  back, which cancels the slow drift of a shared machine);
* runner overhead per evaluation = driver wall time from submitting a policy to holding its result,
  minus the time the actor spent in ``evaluate`` (scheduling, transfer of policy and result), as a
  share of one evaluation of the default model (eval size 1000, batch 256; target <= 5%), measured
  on the same actors;
* the CPU-contention ceiling, without Ray: the same exhaustive search (same evaluator, 1 torch
  thread, the local runner) in one process alone, and in two processes at the same time
  (interleaved rounds; the median of each round's ratio of time per evaluation, the slowdown).
  ``1 / slowdown`` bounds the scaling efficiency of any runner on this machine with this workload.

Evaluator builds (one per actor, once) happen in a warm-up map before the timed loop. Prints the
load (``os.getloadavg``) before and after, Ray's start-up time and the memory (PSS) of its
processes. "Actors busy" (actor time / (wall x actors)) separates what the driver loop loses
(actors waiting for work) from what each evaluation loses (taking longer when more actors share
the cores: CPU contention, and less activation reuse when an actor sees every other policy; the
share of a full forward each evaluation computed, from the actors' ``segment_calls``, shows the
latter).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def ray_rss_mb() -> float:
    """Memory of this process's Ray children (raylet, GCS, workers), in MB: PSS, so libraries the
    processes share are counted once (RSS where PSS is not available)."""
    import psutil

    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            info = child.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return total / 2**20


def drive(runner, spec, space, directions, loop: str = "stream") -> tuple[int, float]:
    """One exhaustive search through ``runner`` with search.py's loop: (evaluations, seconds).
    ``loop="sync"``: the batch-synchronous loop (``Runner.stream``'s default, over ``map``)."""
    from policysearch.runners.base import Runner
    from policysearch.search import strategy_feed
    from policysearch.strategies import create_strategy

    strategy = create_strategy("exhaustive", space, directions=directions, seed=0)
    stream = Runner.stream if loop == "sync" else type(runner).stream
    n, t0 = 0, time.perf_counter()
    for policy, result in stream(runner, spec, strategy_feed(strategy)):
        strategy.tell(policy, result)
        n += 1
    if not strategy.finished:
        raise RuntimeError("the exhaustive search stopped before it finished")
    return n, time.perf_counter() - t0


def segments_computed(runner) -> int:
    """Segment forwards (per batch) the pool's actors have run so far: the work activation reuse
    did not save (``Evaluator.segment_calls``, read through Ray's ``__ray_call__``)."""
    import ray

    return sum(ray.get([slot.actor.__ray_call__.remote(lambda worker: worker.evaluator.segment_calls)
                        for slot in runner._slots]))


def _contention_worker(spec, conn, barrier) -> None:
    """A process for the contention measurement: builds the evaluator (1 torch thread), then runs
    the exhaustive search locally on each request; "together" requests start at a barrier."""
    import torch

    torch.set_num_threads(1)
    from policysearch.runners import LocalRunner
    from policysearch.spaces import load_space
    from policysearch.spec import get_evaluator

    evaluator = get_evaluator(spec)
    space = load_space("paper", evaluator.sites)
    directions = tuple(evaluator.objective.directions)
    conn.send("ready")
    while (request := conn.recv()) is not None:
        evaluator.clear_cache()  # every search starts cold, as on a fresh actor
        if request == "together":
            barrier.wait()
        count, seconds = drive(LocalRunner(), spec, space, directions)
        conn.send(seconds / count)


def measure_contention(spec, rounds: int) -> float:
    """Seconds per evaluation with two processes at once / one process alone: the median over
    interleaved rounds of each round's ratio, printed round by round; no Ray."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=_contention_worker, args=(spec, child, barrier), daemon=True)
             for _, child in pipes]
    conns = [parent for parent, _ in pipes]
    t0 = time.perf_counter()
    for proc in procs:
        proc.start()
    for conn in conns:
        assert conn.recv() == "ready"
    print(f"contention: 2 processes started and built in {time.perf_counter() - t0:.1f} s")
    alone: list[float] = []
    together: list[float] = []
    try:
        for r in range(rounds):
            for phase in ("alone", "together") if r % 2 == 0 else ("together", "alone"):
                if phase == "alone":
                    conn = conns[r % 2]  # each process takes its turn alone
                    conn.send("alone")
                    alone.append(conn.recv())
                else:
                    for conn in conns:
                        conn.send("together")
                    together.append(statistics.mean(conn.recv() for conn in conns))
            print(f"contention round {r + 1}: one process alone {alone[-1]:.3f} s/evaluation, two at once "
                  f"{together[-1]:.3f} s/evaluation (x{together[-1] / alone[-1]:.2f}); "
                  f"load {os.getloadavg()[0]:.2f}")
    finally:
        for conn in conns:
            conn.send(None)
        for proc in procs:
            proc.join(timeout=30)
    # each round's two phases ran back to back: their ratio cancels the slow drift of a shared machine
    return statistics.median(t / a for t, a in zip(together, alone))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist_vit")
    ap.add_argument("--eval-size", type=int, default=160, help="images per evaluation (about 1 s at 1 thread)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pool sizes to compare (first = baseline)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (= Ray CPUs) per actor")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0, help="1: one actor per GPU")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per pool size")
    ap.add_argument("--loop", choices=("stream", "sync", "both"), default="stream",
                    help="driver loop: search.py's streaming one, the old batch-synchronous one, or both")
    ap.add_argument("--sync", dest="loop", action="store_const", const="sync", help="same as --loop sync")
    ap.add_argument("--contention-rounds", type=int, default=2,
                    help="interleaved rounds of the contention measurement without Ray (0: skip it; CPU "
                         "actors of 1 thread only)")
    ap.add_argument("--contention-only", action="store_true", help="only the contention measurement")
    ap.add_argument("--skip-default", action="store_true", help="skip timing the default model's evaluation")
    args = ap.parse_args()

    from policysearch.spec import EvaluatorSpec

    print(f"load before: {os.getloadavg()} on {os.cpu_count()} CPUs")
    device = "cuda" if args.gpus_per_worker else "cpu"
    spec = EvaluatorSpec(model=args.model, eval_size=args.eval_size, batch_size=args.batch_size, objective="kl",
                         device=device)
    efficiency: dict[str, float] = {}
    if not args.contention_only:
        efficiency = bench_ray(args, spec)
    ceiling = None
    if args.contention_rounds > 0 and args.threads == 1 and not args.gpus_per_worker:
        slowdown = measure_contention(spec, args.contention_rounds)
        ceiling = 1 / slowdown
        print(f"CPU contention without Ray: one evaluation x{slowdown:.2f} as long with 2 processes at once; "
              f"ceiling on the scaling efficiency of 2 workers here: {ceiling:.2f}")
    for loop, eff in efficiency.items():
        print(f"summary ({loop} loop): scaling efficiency {eff:.2f} (target >= 0.8)"
              + (f", contention ceiling {ceiling:.2f} ({eff / ceiling:.0%} of it)" if ceiling else ""))
    print(f"load after: {os.getloadavg()}")


def bench_ray(args: argparse.Namespace, spec) -> dict[str, float]:
    """The Ray part; returns the scaling efficiency of the last pool size against the first, per loop."""
    import ray
    import torch

    from policysearch.runners.ray import RayRunner
    from policysearch.spaces import load_space
    from policysearch.spec import EvaluatorSpec, get_evaluator

    t0 = time.perf_counter()
    gpus = torch.cuda.device_count() if args.gpus_per_worker else 0
    # CPU: every pool stays up (its evaluators built once) and only one computes at a time, so Ray
    # is told of one CPU per actor of all pools together. GPU: one pool at a time on the real GPUs.
    keep = not args.gpus_per_worker
    cpus = (sum(args.workers) if keep else max(args.workers)) * args.threads
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s, Ray processes {ray_rss_mb():.0f} MB")
    default = EvaluatorSpec(model=args.model, eval_size=1000, batch_size=256, objective="kl", device=spec.device)
    driver = get_evaluator(spec)  # the driver needs the sites (search.py builds it too)
    space = load_space("paper", driver.sites)
    directions = tuple(driver.objective.directions)
    pools: dict[int, RayRunner] = {}

    def pool(n: int) -> RayRunner:
        if n in pools:
            return pools[n]
        runner = RayRunner(address="local", workers=n, cpus_per_worker=args.threads,
                           gpus_per_worker=args.gpus_per_worker)
        t0 = time.perf_counter()
        list(runner.map(spec, list(space.uniform_policies().values())[:n]))  # builds each actor's evaluator
        print(f"{n} actor(s): started and built in {time.perf_counter() - t0:.1f} s; Ray processes "
              f"{ray_rss_mb():.0f} MB")
        if keep:
            pools[n] = runner
        return runner

    def release(runner: RayRunner) -> None:
        if not keep:
            runner.close()

    for n in args.workers if keep else ():
        pool(n)

    loops = ("stream", "sync") if args.loop == "both" else (args.loop,)
    runs = [(n, loop) for n in args.workers for loop in loops]
    rates: dict[tuple[int, str], list[float]] = {k: [] for k in runs}
    overhead: dict[tuple[int, str], list[float]] = {k: [] for k in runs}
    per_eval: dict[tuple[int, str], list[float]] = {k: [] for k in runs}
    busy: dict[tuple[int, str], list[float]] = {k: [] for k in runs}  # actor time / (wall x actors)
    segments: dict[tuple[int, str], list[float]] = {k: [] for k in runs}  # segments computed per evaluation
    per_forward = len(driver.batches) * len(driver.segments)  # segment calls of one evaluation without reuse
    for r in range(args.rounds):
        for n, loop in runs if r % 2 == 0 else runs[::-1]:
            runner = pool(n)
            before, calls = dict(runner.stats), segments_computed(runner)
            count, seconds = drive(runner, spec, space, directions, loop)
            d = {k: runner.stats[k] - before[k] for k in before}
            calls = segments_computed(runner) - calls
            release(runner)
            k = (n, loop)
            rates[k].append(count / seconds)
            overhead[k].append((d["wall_s"] - d["eval_s"]) / d["evaluations"])
            per_eval[k].append(d["eval_s"] / d["evaluations"])
            busy[k].append(d["eval_s"] / (seconds * n))
            segments[k].append(calls / d["evaluations"] / per_forward)
            print(f"round {r + 1}, {n} actor(s), {loop} loop: {count} evaluations in {seconds:.1f} s = "
                  f"{count / seconds:.2f}/s; actor time per evaluation {per_eval[k][-1]:.3f} s, actors busy "
                  f"{100 * busy[k][-1]:.0f}% of the time, {100 * segments[k][-1]:.1f}% of a full forward computed; "
                  f"runner overhead {1000 * overhead[k][-1]:.1f} ms/evaluation; "
                  f"load {os.getloadavg()[0]:.2f}")

    def paired(x: list[float], y: list[float]) -> float:
        """Median over rounds of x / y: the two ran next to each other in a round, so the ratio
        cancels the machine's slow drift."""
        return statistics.median(a / b for a, b in zip(x, y))

    base = args.workers[0]
    efficiency: dict[str, float] = {}
    for loop in loops:
        for n in args.workers[1:]:
            ratio = paired(rates[n, loop], rates[base, loop])
            slower = paired(per_eval[n, loop], per_eval[base, loop])
            more = statistics.median(segments[n, loop]) / statistics.median(segments[base, loop])
            efficiency[loop] = ratio / (n / base)
            print(f"{loop} loop, throughput {n} vs {base} actor(s): x{ratio:.2f}, scaling efficiency "
                  f"{efficiency[loop]:.2f} (target >= 0.8); actors busy {100 * statistics.median(busy[n, loop]):.0f}% "
                  f"vs {100 * statistics.median(busy[base, loop]):.0f}%, each evaluation x{slower:.2f} as long "
                  f"(CPU contention, and x{more:.3f} the segments computed: less activation reuse)")
    if len(loops) == 2:
        for n in args.workers:
            print(f"{n} actor(s): stream loop throughput x{paired(rates[n, 'stream'], rates[n, 'sync']):.2f} "
                  "the sync loop's (median of the rounds' ratios)")
    over = statistics.median(v for k in runs for v in overhead[k])
    print(f"runner overhead per evaluation (median over runs): {1000 * over:.1f} ms")
    if not args.skip_default:
        runner = pool(base)
        uniform = space.uniform_policies()
        list(runner.map(default, [uniform["ivit"]]))  # builds the default spec's evaluator
        before = dict(runner.stats)
        for policy in (uniform["ibert"], uniform["fqvit"]):  # each differs from the last at site 0: full forwards
            list(runner.map(default, [policy]))
        d = {k: runner.stats[k] - before[k] for k in before}
        eval_default = d["eval_s"] / d["evaluations"]
        default_over = (d["wall_s"] - d["eval_s"]) / d["evaluations"]
        print(f"one evaluation of the default model ({args.model}, 1000 images, {args.threads} thread(s)): "
              f"{eval_default:.2f} s; runner overhead {1000 * over:.1f} ms = {100 * over / eval_default:.2f}% of it "
              f"(on the default model itself: {1000 * default_over:.1f} ms = "
              f"{100 * default_over / eval_default:.2f}%; target <= 5%)")
        release(runner)
    for runner in pools.values():
        runner.close()
    ray.shutdown()
    return efficiency


if __name__ == "__main__":
    main()
