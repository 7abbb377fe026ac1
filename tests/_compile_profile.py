"""Per-test compile profile, opt-in: `TVQ_TEST_PROFILE_COMPILES=<path>`.

Records for every test (setup, call and teardown together, so a module
fixture's compiles count for the first test that uses it):

- wall and CPU seconds of this process, and CPU seconds of the subprocesses it
  waited for (CLI and benchmark smoke tests);
- the XLA compiles (jax's `/jax/core/compile/backend_compile_duration` events)
  and their seconds, the jaxpr tracing and the MLIR lowering seconds;
- the process's memory mappings after the test (`maps`; see conftest.py);
- the three functions that took the most compile seconds.

Each process appends one tab-separated row per test to `<path>.rows` (xdist
workers too: short appends are atomic); the controlling process then writes
`<path>` as a table sorted by compile seconds, with a per-file summary. Run it
with the persistent compilation cache off, or a cache hit compiles nothing:

    TVQ_TEST_COMPILATION_CACHE=off TVQ_TEST_PROFILE_COMPILES=/tmp/prof.md \\
        scripts/test.sh tests/test_aot.py
"""

import collections
import os
import resource
import time

import pytest
from jax import monitoring

ENV = "TVQ_TEST_PROFILE_COMPILES"

_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COLUMNS = (
    "test",
    "wall_s",
    "cpu_s",
    "child_cpu_s",
    "compiles",
    "compile_s",
    "trace_s",
    "lower_s",
    "maps",
    "top_compiles",
)


def _mappings() -> int:
    """Memory mappings of this process now (-1 off Linux): each compiled
    program jax keeps holds a few (see tests/conftest.py)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return -1


class CompileProfile:
    def __init__(self, path: str):
        self.path = path
        self.rows_path = path + ".rows"
        self._compiles: list[tuple[str, float]] = []
        self._seconds = collections.Counter()
        monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_duration(self, event, duration, **kwargs):
        if event == _COMPILE:
            self._compiles.append((str(kwargs.get("fun_name", "?")), duration))
        if event in (_COMPILE, _TRACE, _LOWER):
            self._seconds[event] += duration

    @staticmethod
    def _child_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self._compiles.clear()
        self._seconds.clear()
        wall, cpu, child = time.perf_counter(), time.process_time(), self._child_cpu()
        try:
            return (yield)
        finally:
            by_fun = collections.Counter()
            for name, seconds in self._compiles:
                by_fun[name] += seconds
            top = ", ".join(f"{n} {s:.1f}s" for n, s in by_fun.most_common(3))
            row = (
                item.nodeid,
                f"{time.perf_counter() - wall:.2f}",
                f"{time.process_time() - cpu:.2f}",
                f"{self._child_cpu() - child:.2f}",
                str(len(self._compiles)),
                f"{self._seconds[_COMPILE]:.2f}",
                f"{self._seconds[_TRACE]:.2f}",
                f"{self._seconds[_LOWER]:.2f}",
                str(_mappings()),
                top.replace("\t", " "),
            )
            with open(self.rows_path, "a") as f:
                f.write("\t".join(row) + "\n")

    def pytest_sessionfinish(self, session):
        if hasattr(session.config, "workerinput"):
            return  # an xdist worker: the controller writes the table
        write_table(self.rows_path, self.path)


def write_table(rows_path: str, out_path: str) -> None:
    try:
        with open(rows_path) as f:
            rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except FileNotFoundError:
        return
    rows.sort(key=lambda r: -float(r[5]))
    per_file = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
    for r in rows:
        agg = per_file[r[0].split("::")[0]]
        agg[0] += int(r[4])
        agg[1] += float(r[5])
        agg[2] += float(r[2])
        agg[3] += float(r[3])
        agg[4] += float(r[1])
    total = [sum(a[i] for a in per_file.values()) for i in range(5)]
    lines = [
        f"# Compile profile: {len(rows)} tests, {total[0]} compiles, "
        f"{total[1]:.0f} s compiling, {total[2]:.0f} s CPU "
        f"(+{total[3]:.0f} s in subprocesses), {total[4]:.0f} s wall summed",
        "",
        "| file | compiles | compile s | cpu s | child cpu s | wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, a in sorted(per_file.items(), key=lambda kv: -(kv[1][2] + kv[1][3])):
        lines.append(
            f"| {name} | {a[0]} | {a[1]:.1f} | {a[2]:.1f} | {a[3]:.1f} | {a[4]:.1f} |"
        )
    lines += ["", "| " + " | ".join(_COLUMNS) + " |", "|---" * len(_COLUMNS) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")


def register(config) -> None:
    path = os.environ.get(ENV, "").strip()
    if not path:
        return
    if not hasattr(config, "workerinput"):  # the controller, before any worker
        try:
            os.remove(path + ".rows")
        except FileNotFoundError:
            pass
    config.pluginmanager.register(CompileProfile(path), "tvq_compile_profile")
