"""Ray runner: candidate throughput with 2 actors vs 1, and the runner's own overhead per evaluation.

    python benchmarks/bench_ray.py [--eval-size 160] [--rounds 2] [--limit 0] [--workers 1 2]

A local Ray instance with one CPU per actor of all pools (``--gpus-per-worker 1``: one actor per
GPU instead). Each pool runs the real ``exhaustive`` search loop on the ``fmnist_vit`` zoo model
(ask ``capacity`` policies -> ``runner.map`` -> tell, as ``search.py`` drives it, without the study),
each actor with ``--threads`` torch threads (1 by default). ``--eval-size`` makes one evaluation
cost about a second. The pools run interleaved (1, 2, 1, 2, ...) because timings on a shared
machine drift; the medians are compared:

* scaling efficiency = (throughput with N actors / throughput with 1) / N  (target >= 0.8 for N=2);
* runner overhead per evaluation = driver wall time from submitting a policy to holding its result,
  minus the time the actor spent in ``evaluate`` (scheduling, transfer of policy and result), as a
  share of one evaluation of the default model (eval size 1000, batch 256; target <= 5%), measured
  on the same actors.

Evaluator builds (one per actor, once) happen in a warm-up map before the timed loop. Prints the
load (``os.getloadavg``) before and after, Ray's start-up time and the memory (PSS) of its
processes. "Actors busy" (actor time / (wall x actors)) separates what the batch-synchronous loop
loses (strategy batches smaller than the pool, the slower of a batch) from CPU contention (each
evaluation taking longer when more actors share the cores).
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


def drive(runner, spec, space, directions) -> tuple[int, float]:
    """One exhaustive search through ``runner``: (evaluations, seconds)."""
    from policysearch.strategies import create_strategy

    strategy = create_strategy("exhaustive", space, directions=directions, seed=0)
    n, t0 = 0, time.perf_counter()
    while batch := strategy.ask(runner.capacity):
        for policy, result in runner.map(spec, batch):
            strategy.tell(policy, result)
            n += 1
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist_vit")
    ap.add_argument("--eval-size", type=int, default=160, help="images per evaluation (about 1 s at 1 thread)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pool sizes to compare (first = baseline)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (= Ray CPUs) per actor")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0, help="1: one actor per GPU")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per pool size")
    ap.add_argument("--skip-default", action="store_true", help="skip timing the default model's evaluation")
    args = ap.parse_args()

    import ray
    import torch

    from policysearch.runners.ray import RayRunner
    from policysearch.spaces import load_space
    from policysearch.spec import EvaluatorSpec, get_evaluator

    print(f"load before: {os.getloadavg()} on {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    gpus = torch.cuda.device_count() if args.gpus_per_worker else 0
    # CPU: every pool stays up (its evaluators built once) and only one computes at a time, so Ray
    # is told of one CPU per actor of all pools together. GPU: one pool at a time on the real GPUs.
    keep = not args.gpus_per_worker
    cpus = (sum(args.workers) if keep else max(args.workers)) * args.threads
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s, Ray processes {ray_rss_mb():.0f} MB")
    device = "cuda" if args.gpus_per_worker else "cpu"
    spec = EvaluatorSpec(model=args.model, eval_size=args.eval_size, batch_size=args.batch_size, objective="kl",
                         device=device)
    default = EvaluatorSpec(model=args.model, eval_size=1000, batch_size=256, objective="kl", device=device)
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

    rates: dict[int, list[float]] = {n: [] for n in args.workers}
    overhead: dict[int, list[float]] = {n: [] for n in args.workers}
    per_eval: dict[int, list[float]] = {n: [] for n in args.workers}
    busy: dict[int, list[float]] = {n: [] for n in args.workers}  # actor time / (wall x actors)
    for r in range(args.rounds):
        for n in args.workers if r % 2 == 0 else args.workers[::-1]:
            runner = pool(n)
            before = dict(runner.stats)
            count, seconds = drive(runner, spec, space, directions)
            d = {k: runner.stats[k] - before[k] for k in before}
            release(runner)
            rates[n].append(count / seconds)
            overhead[n].append((d["wall_s"] - d["eval_s"]) / d["evaluations"])
            per_eval[n].append(d["eval_s"] / d["evaluations"])
            busy[n].append(d["eval_s"] / (seconds * n))
            print(f"round {r + 1}, {n} actor(s): {count} evaluations in {seconds:.1f} s = {count / seconds:.2f}/s; "
                  f"actor time per evaluation {per_eval[n][-1]:.3f} s, actors busy {100 * busy[n][-1]:.0f}% of the "
                  f"time; runner overhead {1000 * overhead[n][-1]:.1f} ms/evaluation; load {os.getloadavg()[0]:.2f}")

    base = args.workers[0]
    for n in args.workers[1:]:
        ratio = statistics.median(rates[n]) / statistics.median(rates[base])
        slower = statistics.median(per_eval[n]) / statistics.median(per_eval[base])
        print(f"throughput {n} vs {base} actor(s): x{ratio:.2f}, scaling efficiency {ratio / (n / base):.2f} "
              f"(target >= 0.8); actors busy {100 * statistics.median(busy[n]):.0f}% vs "
              f"{100 * statistics.median(busy[base]):.0f}%, each evaluation x{slower:.2f} as long "
              "(CPU contention: the machine's cores are shared)")
    over = statistics.median(v for n in args.workers for v in overhead[n])
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
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
