"""Latency and throughput of ONNX files in ONNX Runtime, with the settings beside the figures.

``bench_files`` measures each file at every (batch, sequence) pair: one session at a
time (a session is created, warmed up, timed and dropped before the next is created),
intra-op threads as asked, ``session.intra_op.allow_spinning`` off unless asked (idle
sessions spinning on a 2-core machine tripled another session's latency, measured).
Inputs are synthesized from each file's graph inputs, the same way ``graphopt.load``
does. The result holds the machine, the versions, the load average before and after, and
the settings, so that a figure is never read without them.

Example::

    result = bench_files(["out/model.onnx"], BenchSettings(batch_sizes=(1, 8), threads=2))
    for row in result["results"]:
        print(row["file"], row["batch"], row["sequence"], row["p50_ms"])
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.onnx_io import read_onnx
from graphopt.onnx_runtime import OptimizationLevel, create_session, run_session, session_options
from graphopt.report import versions

__all__ = ["BenchSettings", "Timing", "time_runs", "bench_files", "format_table", "machine_info", "BENCH_SCHEMA"]

logger = logging.getLogger(__name__)

#: Version of the ``--json`` layout; bump it when a key changes meaning.
BENCH_SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """How to measure. ``threads=None`` lets ONNX Runtime pick (one per core).

    Args:
        batch_sizes: Batch sizes to measure at.
        sequence_lengths: Sequence lengths to measure at.
        threads: ONNX Runtime intra-op threads.
        warmup: Untimed runs after the session is created (first runs allocate and tune).
        rounds: Timed runs; percentiles are over these.
        spinning: Let idle intra-op threads spin (ONNX Runtime's own default is on).
        optimization: ONNX Runtime graph optimization level.
    """

    batch_sizes: tuple[int, ...] = (1,)
    sequence_lengths: tuple[int, ...] = (128,)
    threads: int | None = None
    warmup: int = 10
    rounds: int = 50
    spinning: bool = False
    optimization: OptimizationLevel = "all"

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be at least 1, got {self.batch_sizes}")
        if not self.sequence_lengths or any(s < 1 for s in self.sequence_lengths):
            raise ValueError(f"sequence lengths must be at least 1, got {self.sequence_lengths}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.warmup < 0 or self.rounds < 1:
            raise ValueError(f"warmup must be >= 0 and rounds >= 1, got {self.warmup} and {self.rounds}")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Latency percentiles in milliseconds over ``samples`` timed runs of one batch."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    samples: int

    @staticmethod
    def of(seconds: Sequence[float]) -> Timing:
        ms = np.asarray(seconds, np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return Timing(float(p50), float(p90), float(p99), float(ms.mean()), len(ms))


def time_runs(run: Callable[[], Any], *, warmup: int, rounds: int) -> Timing:
    """Calls ``run`` ``warmup`` times untimed, then ``rounds`` times timed, one call each."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return Timing.of(seconds)


def interleaved_ms(fns: Mapping[Any, Callable[[], Any]], rounds: int, *, target_s: float = 0.001,
                   clock: Callable[[], float] = time.thread_time) -> dict[Any, float]:
    """Median ms per call of each function, sampled round by round (each sample ~``target_s``),
    the order of the functions rotated from one round to the next.

    Side by side rather than one function after another: on a shared machine the speed of
    everything drifts over minutes, and a ratio of two medians taken minutes apart measures the
    drift. The default clock is the calling thread's CPU time (``time.thread_time``): most
    wall-clock samples on a loaded machine include preemption, CPU time does not. It is only
    right for work done on the calling thread; pass ``time.perf_counter`` for threaded work.
    """
    repeat = {}
    for key, fn in fns.items():
        for _ in range(3):
            fn()
        start = clock()
        for _ in range(3):
            fn()
        repeat[key] = max(1, int(target_s / max((clock() - start) / 3, 1e-7)))
    times: dict[Any, list[float]] = {key: [] for key in fns}
    keys = list(fns)
    for r in range(rounds):
        # Rotated each round: a function called right after one that streams a large model
        # meets colder caches (measured: 3-6% slower than the same function one position later).
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            fn = fns[key]
            start = clock()
            for _ in range(repeat[key]):
                fn()
            times[key].append((clock() - start) / repeat[key])
    return {key: float(np.median(v)) * 1e3 for key, v in times.items()}


def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on: CPU model, cores, load average."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"platform": platform.platform(), "cpu": model, "cores": os.cpu_count(),
            "load_average_1m": round(load[0], 2)}


def _inputs_for(model: ir.Model, batch: int, sequence: int) -> dict[str, Any]:
    from graphopt.trace import synthesize_inputs

    return synthesize_inputs(model, batch=batch, sequence=sequence)


def bench_files(paths: Sequence[str | os.PathLike[str]], settings: BenchSettings = BenchSettings(), *,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measures every file at every (batch, sequence); returns a JSON-serialisable dict.

    Raises:
        FormatError: a file is missing or not a valid ONNX model (external data is checked).
    """
    rows: list[dict[str, Any]] = []
    machine_before = machine_info()
    for path in map(Path, paths):
        proto = read_onnx(path)
        model = ir.from_proto(proto)
        data = proto.SerializeToString()
        del proto
        options = session_options(threads=settings.threads, optimization=settings.optimization,
                                  spinning=settings.spinning)
        start = time.perf_counter()
        session = create_session(data, options)
        load_s = time.perf_counter() - start
        for batch in settings.batch_sizes:
            for sequence in settings.sequence_lengths:
                if progress:
                    progress(f"{path.name}: batch {batch}, sequence {sequence}")
                feeds = _inputs_for(model, batch, sequence)
                timing = time_runs(lambda: run_session(session, feeds), warmup=settings.warmup,
                                   rounds=settings.rounds)
                rows.append({"file": str(path), "batch": batch, "sequence": sequence,
                             **dataclasses.asdict(timing),
                             "sequences_per_s": batch / (timing.p50_ms / 1e3),
                             "tokens_per_s": batch * sequence / (timing.p50_ms / 1e3),
                             "session_load_s": load_s})
                logger.info("%s b%d s%d: p50 %.2f ms", path, batch, sequence, timing.p50_ms)
        del session  # one session at a time: freed (by refcount) before the next file's is created
    return {"graphopt_bench": BENCH_SCHEMA, "settings": dataclasses.asdict(settings),
            "machine": machine_before, "load_average_1m_after": machine_info()["load_average_1m"],
            "versions": versions(), "results": rows}


def format_table(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for printing a ``bench_files`` result."""
    header = ["file", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "seq/s", "tokens/s"]
    files = {r["file"] for r in result["results"]}
    short = len({Path(f).name for f in files}) == len(files)  # base names when they are unambiguous
    return header, [[Path(r["file"]).name if short else r["file"], str(r["batch"]), str(r["sequence"]),
                     f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                     f"{r['sequences_per_s']:.1f}", f"{r['tokens_per_s']:.0f}"] for r in result["results"]]
