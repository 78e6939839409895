"""Benchmark: records per second through the `api` target against `loader serve`.

    /work/venv/bin/python bench/api_throughput.py [--rows 40000] [--concurrency 1 4 8] [--latency 0 50]
    /work/venv/bin/python bench/api_throughput.py --latencies 0,20 --concurrency 1,2,4,8 [--trials 3]
    /work/venv/bin/python bench/api_throughput.py --latencies 20 --concurrency 8 --profile 20:8

For each added server latency, starts `loader serve` on a free port with a
fresh database, then sends the same number of new records (1000 per bulk
request) through `HttpTarget.send` at each concurrency. Prints records per
second, the speed-up over concurrency 1 at the same latency, the client's CPU
time per 1000 records (time.process_time of this process around send:
encoding, httpx, JSON pages, frames), and the speed-up of concurrency 4 over 1
at each latency. The server's CPU time per 1000 records (from /proc) shows
when the server, not the client, is the limit: both share this machine's
cores. Lists (`--concurrency`, `--latency`/`--latencies`) take spaces or
commas; with `--trials N` each figure is the median of N sends.

`--profile LATENCY:CONCURRENCY` (alone: 20:8) sends once more at that
configuration under a profiler and prints where the client's CPU goes, in
buckets (JSON encoding of bodies, POST send/receive, polling, result pages,
Polars frame building) and the top functions by own and cumulative time.
The profiler is py-spy when it is installed (next to this Python or on PATH):
it runs the profiled send in a child process and samples every thread from
outside; otherwise cProfile, in this process, in every thread, on each
thread's own CPU clock.

Targets: throughput grows with concurrency up to 8 at 20 ms; client CPU
under 20 ms per 1000 records.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import httpx
import polars as pl

from loader.chunk import plan_chunks
from loader.targets.http import HttpTarget

KEY = "bench-key"
STREAM = "bench_operating"
HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CLIENT_CPU_TARGET_MS = 20.0
PYSPY_RATE = 1000  # samples per second


def start_server(database: Path, latency_ms: int) -> tuple[subprocess.Popen, str]:
    """`loader serve` on a free port; returns the process and its base URL (with /v1)."""
    command = [sys.executable, "-m", "loader", "serve", "--database", str(database), "--port", "0",
               "--api-key", KEY]
    if latency_ms:
        command += ["--latency", str(latency_ms)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline() if process.stdout else ""
    found = re.search(r"(https?://\S+)", line)
    if not found:
        process.kill()
        raise SystemExit(f"loader serve did not start: {line}{process.stderr.read() if process.stderr else ''}")
    url = found.group(1).rstrip("/")
    return process, url if url.endswith("/v1") else url + "/v1"


@contextlib.contextmanager
def served(folder: Path, latency: int) -> Iterator[tuple[subprocess.Popen, str]]:
    """A `loader serve` with a fresh database and the bench data stream, stopped on exit."""
    process, url = start_server(folder / f"latency_{latency}.duckdb", latency)
    try:
        httpx.post(f"{url}/data_streams", headers={"X-API-KEY": KEY},
                   json={"key": STREAM, "name": "Bench", "type": "api"}).raise_for_status()
        yield process, url
    finally:
        process.terminate()
        process.wait(timeout=30)


def mapped_rows(rows: int, prefix: str) -> pl.DataFrame:
    """Rows as the pipeline hands them to a target: mapped, valid, keyed."""
    n = pl.int_range(0, rows, eager=True)
    frame = pl.DataFrame({"n": n}).select(
        date=pl.lit(date(2024, 1, 1)) + pl.duration(days=pl.col("n") % 365),
        data_stream_key=pl.lit(STREAM),
        amount=(pl.col("n") * 7919) % 1_000_000 - 500_000,
        currency=pl.when(pl.col("n") % 10 == 0).then(pl.lit("EUR")).otherwise(pl.lit("USD")),
        direction=pl.when(pl.col("n") % 2 == 0).then(pl.lit("credit")).otherwise(pl.lit("debit")),
        description=pl.format("payment {} to supplier", pl.col("n")),
        external_id=pl.format(f"{prefix}-{{}}", pl.col("n")),
        metadata=pl.format('{{"batch": {}}}', pl.col("n") // 1000),
    )
    # Any distinct key per row will do here: the chunks' Idempotency-Keys derive from it.
    return frame.with_columns(
        key_hi=pl.col("external_id").hash(seed=1), key_lo=pl.col("external_id").hash(seed=2)
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_trial(url: str, server_pid: int, rows: int, concurrency: int, prefix: str,
              around_send: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict:
    target = HttpTarget(url, KEY, concurrency=concurrency)
    try:
        target.prepare()
        _, chunks = plan_chunks(mapped_rows(rows, prefix), chunk_size=1000, target_key=target.target_key,
                                on_conflict="skip")
        server_cpu = cpu_seconds(server_pid)
        with around_send():
            cpu, wall = time.process_time(), time.perf_counter()
            result = target.send(chunks, on_conflict="skip")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        server_cpu = cpu_seconds(server_pid) - server_cpu
    finally:
        target.close()
    created = result.items.filter(pl.col("status") == "successful").height
    if created != rows:
        raise SystemExit(f"expected {rows} records created, the server reports {created}")
    return {"seconds": wall, "rows_per_second": rows / wall, "cpu_ms_per_1000": cpu * 1000 / (rows / 1000),
            "server_cpu_ms_per_1000": server_cpu * 1000 / (rows / 1000)}


def median_of(trials: list[dict]) -> dict:
    return {name: statistics.median(t[name] for t in trials) for name in trials[0]}


# -- profiling -------------------------------------------------------------------------------

# Where a stack's CPU goes: the first bucket whose rule matches the stack (root to leaf).
BUCKETS = (
    "JSON encoding of bodies (payloads.encode_body)",
    "POST /records/bulk: httpx send/receive, retry policy",
    "polling until final: httpx send/receive",
    "polling until final: JSON decoding (last poll = result page 1)",
    "polling until final: tenacity loop",
    "result pages 2+: httpx send/receive",
    "result pages 2+: JSON decoding",
    "polars frame building (http._frames)",
    "other (thread pool, loader.targets.http)",
)
_HTTP_PACKAGES = ("httpx", "httpcore", "h11", "anyio", "ssl", "socket", "selectors")


class Frame:
    """One frame of a stack: function (py-spy: Class.method) and file."""

    __slots__ = ("file", "function")

    def __init__(self, function: str, file: str):
        self.function = function.rsplit(".", 1)[-1]
        self.file = file.replace("\\", "/")

    def is_(self, function: str, file_suffix: str) -> bool:
        return self.function == function and self.file.endswith(file_suffix)

    def in_http_stack(self) -> bool:
        parts = self.file.split("/")
        return any(p in _HTTP_PACKAGES or p in (f"{name}.py" for name in _HTTP_PACKAGES) for p in parts)


def _has(stack: list[Frame], function: str, file_suffix: str) -> bool:
    return any(frame.is_(function, file_suffix) for frame in stack)


def in_send(stack: list[Frame]) -> bool:
    """A stack of HttpTarget.send: its caller's thread, or a worker loading a chunk."""
    return any(frame.file.endswith("targets/http.py") and frame.function in ("send", "load", "_load_chunk")
               for frame in stack)


def bucket_of(stack: list[Frame]) -> str:
    if _has(stack, "encode_body", "loader/payloads.py"):
        return BUCKETS[0]
    if _has(stack, "_frames", "targets/http.py"):
        return BUCKETS[7]
    decoding = _has(stack, "parse", "targets/http_client.py")
    http = any(frame.in_http_stack() for frame in stack)
    if _has(stack, "_wait_until_final", "targets/http.py"):
        return BUCKETS[3] if decoding else BUCKETS[2] if http else BUCKETS[4]
    if _has(stack, "get_json", "targets/http_client.py"):
        return BUCKETS[6] if decoding else BUCKETS[5]
    if decoding or _has(stack, "request", "targets/http_client.py"):
        return BUCKETS[1]
    return BUCKETS[8]


def child_command(url: str, server_pid: int, rows: int, concurrency: int, prefix: str) -> list[str]:
    spec = {"url": url, "server_pid": server_pid, "rows": rows, "concurrency": concurrency, "prefix": prefix}
    return [sys.executable, str(Path(__file__).resolve()), "--profile-child", json.dumps(spec)]


def find_pyspy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


# Frames at the root of every worker's stack: their cumulative time says nothing.
_PLUMBING = ("(threading.py)", "(concurrent/futures/", "(contextlib.py)")
_RAW_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def pyspy_profile(pyspy: str, url: str, server_pid: int, rows: int, concurrency: int, prefix: str,
                  output: Path) -> tuple[dict, Counter, Counter, Counter, int]:
    """The profiled send in a child under `py-spy record`: (its trial, own, cumulative, bucket samples, total)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [pyspy, "record", "--format", "raw", "--rate", str(PYSPY_RATE), "--nonblocking",
               "--output", str(output), "--", *child_command(url, server_pid, rows, concurrency, prefix)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"py-spy run failed ({done.returncode}): {done.stderr[-2000:]}")
    trial = json.loads(lines[-1])
    own: Counter = Counter()
    cumulative: Counter = Counter()
    buckets: Counter = Counter()
    total = 0
    for line in output.read_text().splitlines():
        text, _, count = line.rpartition(" ")
        if not text or not count.isdigit():
            continue
        stack = []
        for part in text.split(";"):
            found = _RAW_FRAME.match(part)
            if found:
                stack.append(Frame(found["function"], found["file"]))
        if not stack or not in_send(stack):
            continue
        samples = int(count)
        total += samples
        buckets[bucket_of(stack)] += samples
        leaf = stack[-1]
        own[_label(leaf.function, leaf.file), bucket_of(stack)] += samples
        for label in {_label(frame.function, frame.file) for frame in stack}:
            cumulative[label] += samples
    return trial, own, cumulative, buckets, total


def _label(function: str, file: str) -> str:
    return f"{function} ({_short(file)})"


def _short(file: str) -> str:
    """A file as a module path: site-packages, the standard library's folder and the project's left out."""
    if file == "~":
        return "built-in"
    file = file.replace("\\", "/")
    file = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", file)
    return file.removeprefix(str(HERE.parent) + "/")


class ThreadProfiles:
    """cProfile in the calling thread and in every thread started meanwhile (the target's workers).

    Each thread is timed on its own CPU clock (time.thread_time), so waiting
    on sockets and sleeping between polls count for nothing, as in
    time.process_time. CPU spent in threads Python does not start (Polars'
    pool) is not seen.
    """

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        original = threading.Thread.run
        profiles = self.profiles

        def run(thread: threading.Thread) -> None:
            profile = cProfile.Profile(time.thread_time)
            profiles.append(profile)
            profile.enable()
            try:
                original(thread)
            finally:
                profile.disable()

        main = cProfile.Profile(time.thread_time)
        profiles.append(main)
        threading.Thread.run = run  # type: ignore[method-assign]
        main.enable()
        try:
            yield
        finally:
            main.disable()
            threading.Thread.run = original  # type: ignore[method-assign]

    def stats(self) -> pstats.Stats:
        stats = pstats.Stats(self.profiles[0])
        for profile in self.profiles[1:]:
            if profile.getstats():
                stats.add(profile)
        return stats


def cprofile_summary(stats: pstats.Stats) -> tuple[Counter, Counter, Counter, float]:
    """(own, cumulative, bucket seconds, total seconds) of a merged cProfile.

    cProfile knows callers one level up only, so the buckets are the
    cumulative times of their entry points (which do not nest): encode_body,
    ApiClient.request/parse called by _load_chunk (the POST), get_json called
    by _load_chunk (result pages 2+), _wait_until_final (polling), _frames.
    Polling and result pages are not split into httpx and JSON decoding here.
    """
    entries = stats.stats  # type: ignore[attr-defined]
    own: Counter = Counter()
    cumulative: Counter = Counter()
    total = 0.0
    for (file, _, function), (_, _, tt, ct, _) in entries.items():
        label = _label(function, file)
        own[label, ""] += tt
        cumulative[label] += ct
        total += tt

    def ct_of(function: str, file_suffix: str, caller: str | None = None) -> float:
        seconds = 0.0
        for (file, _, name), (_, _, _, ct, callers) in entries.items():
            if name != function or not file.replace("\\", "/").endswith(file_suffix):
                continue
            if caller is None:
                seconds += ct
            else:
                seconds += sum(c[3] for (_, _, caller_name), c in callers.items() if caller_name == caller)
        return seconds

    buckets: Counter = Counter()
    buckets[BUCKETS[0]] = ct_of("encode_body", "loader/payloads.py")
    buckets[BUCKETS[1]] = (ct_of("request", "targets/http_client.py", "_load_chunk")
                           + ct_of("parse", "targets/http_client.py", "_load_chunk"))
    buckets["polling until final (httpx, JSON decoding, tenacity)"] = ct_of("_wait_until_final", "targets/http.py")
    buckets["result pages 2+ (httpx, JSON decoding)"] = ct_of("get_json", "targets/http_client.py", "_load_chunk")
    buckets[BUCKETS[7]] = ct_of("_frames", "targets/http.py")
    buckets[BUCKETS[8]] = max(0.0, total - sum(buckets.values()))
    return own, cumulative, buckets, total


def print_profile(config: str, rows: int, profiler: str, trial: dict, own: Counter, cumulative: Counter,
                  buckets: Counter, total: float, unit: str, per_second: float, top: int) -> None:
    """Buckets and top functions; `total` is in `unit`s (samples or seconds), `per_second` of them a second."""
    thousands = rows / 1000

    def ms(amount: float) -> float:
        return amount / per_second * 1000 / thousands

    print()
    print(f"profile of the client at {config}, {rows} records, {profiler}")
    print(f"  measured in the profiled run: {trial['rows_per_second']:.0f} records/s, client CPU "
          f"{trial['cpu_ms_per_1000']:.1f} ms per 1000 records (time.process_time, profiler overhead included)")
    print(f"  the profiler saw {ms(total):.1f} ms per 1000 records in HttpTarget.send's threads "
          f"({total:.4g} {unit}); Polars' own thread pool is not seen")
    if unit == "s":
        print("  (cProfile's own cost per call inflates Python-heavy code such as httpx: read the shares, "
              "not the milliseconds, and prefer py-spy)")
    if total <= 0:
        print("  nothing sampled: raise --profile-rows")
        return
    print(f"  {'bucket':<66} {'share':>6} {'ms/1000':>8}")
    for name, amount in sorted(buckets.items(), key=lambda item: -item[1]):
        print(f"  {name:<66} {amount / total:>6.1%} {ms(amount):>8.2f}")
    by_own: Counter = Counter()
    main_bucket: dict[str, Counter] = defaultdict(Counter)
    for (label, bucket), amount in own.items():
        by_own[label] += amount
        main_bucket[label][bucket] += amount
    print(f"  top {top} functions by own time:")
    for label, amount in by_own.most_common(top):
        bucket = main_bucket[label].most_common(1)[0][0]
        print(f"    {amount / total:>6.1%} {ms(amount):>7.2f} ms/1000  {label}" + (f"  [{bucket}]" if bucket else ""))
    print(f"  top {top} functions by cumulative time (thread machinery left out):")
    shown = [(label, amount) for label, amount in cumulative.most_common()
             if not any(part in label for part in _PLUMBING)]
    for label, amount in shown[:top]:
        print(f"    {amount / total:>6.1%} {ms(amount):>7.2f} ms/1000  {label}")


def run_profile(args: argparse.Namespace, url: str, server_pid: int, latency: int, concurrency: int) -> None:
    rows = args.profile_rows or args.rows
    prefix = f"profile-l{latency}-c{concurrency}"
    config = f"{latency} ms, concurrency {concurrency}"
    pyspy = find_pyspy() if args.profiler in ("auto", "py-spy") else None
    if args.profiler == "py-spy" and pyspy is None:
        raise SystemExit("--profiler py-spy: py-spy is not installed")
    if pyspy is not None:
        output = OUT / f"api_profile_l{latency}_c{concurrency}.txt"
        trial, own, cumulative, buckets, samples = pyspy_profile(pyspy, url, server_pid, rows, concurrency,
                                                                 prefix, output)
        print_profile(config, rows, f"py-spy {PYSPY_RATE} Hz, raw stacks in {_short(str(output))}", trial, own,
                      cumulative, buckets, samples, "samples", PYSPY_RATE, args.top)
    else:
        profiles = ThreadProfiles()
        trial = one_trial(url, server_pid, rows, concurrency, prefix, around_send=profiles)
        own, cumulative, buckets, seconds = cprofile_summary(profiles.stats())
        print_profile(config, rows, "cProfile on each thread's CPU clock", trial, own, cumulative, buckets,
                      seconds, "s", 1.0, args.top)


# -- main --------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def flat(lists: list[list[int]] | None, default: list[int]) -> list[int]:
    if not lists:
        return default
    return list(dict.fromkeys(value for values in lists for value in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000, help="records per trial (default 40000)")
    parser.add_argument("--concurrency", type=int_list, nargs="+", help="default 1 4 8 (spaces or commas)")
    parser.add_argument("--latency", "--latencies", dest="latency", type=int_list, nargs="+",
                        help="added server latency, ms (default 0 50; spaces or commas)")
    parser.add_argument("--trials", type=int, default=1, help="sends per configuration; medians (default 1)")
    parser.add_argument("--profile", nargs="?", const="20:8", metavar="LATENCY:CONCURRENCY",
                        help="profile the client at one configuration (alone: 20:8)")
    parser.add_argument("--profile-rows", type=int, help="records of the profiled send (default --rows)")
    parser.add_argument("--profiler", choices=("auto", "py-spy", "cprofile"), default="auto",
                        help="auto: py-spy when installed, else cProfile")
    parser.add_argument("--top", type=int, default=12, help="functions listed by the profile (default 12)")
    parser.add_argument("--profile-child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.profile_child:  # the profiled send, in the process py-spy samples
        spec = json.loads(args.profile_child)
        print(json.dumps(one_trial(spec["url"], spec["server_pid"], spec["rows"], spec["concurrency"],
                                   spec["prefix"])))
        return

    latencies = flat(args.latency, [0, 50])
    concurrencies = flat(args.concurrency, [1, 4, 8])
    profile: tuple[int, int] | None = None
    if args.profile:
        found = re.fullmatch(r"(\d+):(\d+)", args.profile)
        if not found:
            parser.error("--profile takes LATENCY:CONCURRENCY, e.g. 20:8")
        profile = (int(found[1]), int(found[2]))

    results: dict[tuple[int, int], dict] = {}
    profile_text = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="loader-bench-api-") as folder:
        for latency in dict.fromkeys([*latencies, *([profile[0]] if profile else [])]):
            with served(Path(folder), latency) as (process, url):
                if latency in latencies:
                    for concurrency in concurrencies:
                        results[latency, concurrency] = median_of([
                            one_trial(url, process.pid, args.rows, concurrency, f"l{latency}-c{concurrency}-t{t}")
                            for t in range(args.trials)
                        ])
                if profile and profile[0] == latency:
                    with contextlib.redirect_stdout(profile_text):  # printed after the table
                        run_profile(args, url, process.pid, latency, profile[1])

    print(f"{args.rows} records per trial, 1000 per bulk request, loader serve on 127.0.0.1; "
          f"{args.trials} trial(s), medians")
    requests = -(-args.rows // 1000)
    if concurrencies and max(concurrencies) > requests:
        print(f"note: {requests} bulk requests per trial, so concurrency above {requests} cannot help: "
              "raise --rows")
    print(f"{'latency':>8} {'concurrency':>11} {'seconds':>8} {'records/s':>10} {'vs c1':>6} "
          f"{'client CPU ms/1000':>19} {'server CPU ms/1000':>19}")
    for (latency, concurrency), r in results.items():
        base = results.get((latency, 1))
        speedup = f"{r['rows_per_second'] / base['rows_per_second']:.2f}x" if base else "-"
        print(f"{latency:>6}ms {concurrency:>11} {r['seconds']:>8.2f} {r['rows_per_second']:>10.0f} {speedup:>6} "
              f"{r['cpu_ms_per_1000']:>19.1f} {r['server_cpu_ms_per_1000']:>19.1f}")
    for latency in latencies:
        if (latency, 1) in results and (latency, 4) in results:
            ratio = results[latency, 4]["rows_per_second"] / results[latency, 1]["rows_per_second"]
            print(f"c4/c1 at {latency} ms: {ratio:.2f}x")
    ordered = sorted(concurrencies)
    for latency in latencies:
        if len(ordered) > 1:
            rates = [results[latency, c]["rows_per_second"] for c in ordered]
            grows = all(later > earlier for earlier, later in itertools.pairwise(rates))
            print(f"throughput grows with concurrency {'/'.join(map(str, ordered))} at {latency} ms: "
                  f"{'yes' if grows else 'NO'}")
    worst = max(r["cpu_ms_per_1000"] for r in results.values()) if results else 0.0
    if results:
        print(f"client CPU per 1000 records, worst configuration: {worst:.1f} ms; target under "
              f"{CLIENT_CPU_TARGET_MS:.0f} ms: {'met' if worst < CLIENT_CPU_TARGET_MS else 'NOT met'}")
    print(profile_text.getvalue(), end="")


if __name__ == "__main__":
    main()
