"""Benchmark runner.

```
python -m benchmarks.run scaling|decode|ttft|quality|regime|recall|all [--quick] [--preset NAME]
                         [--out DIR] [--data PATH]
python benchmarks/run.py ...            # same
```

Presets live in `benchmarks/registry.py`: `cpu` (default on CPU; the
committed results), `gpu` (default on GPU), `quick` (`--quick`: a smoke run),
`micro` (the tests' shapes). Results go to `benchmarks/results/` (or `--out`)
as `<bench>-<device>[-<preset>].md` and `.png`; each file starts with the
machine, jax version, date and this command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as C
from benchmarks import registry

BENCHES = ("scaling", "decode", "ttft", "quality", "regime", "recall")


def _module(bench: str):
    if bench == "scaling":
        from benchmarks import scaling as m
    elif bench in ("decode", "ttft"):
        from benchmarks import decode as m
    elif bench == "regime":
        from benchmarks import regime as m
    elif bench == "recall":
        from benchmarks import recall as m
    else:
        from benchmarks import quality as m
    return m


def result_tag(preset_name: str) -> str:
    dev = C.device_tag()
    if preset_name == dev or preset_name.startswith(dev + "-"):
        return preset_name
    return f"{dev}-{preset_name}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    ap.add_argument("bench", choices=(*BENCHES, "all"))
    ap.add_argument("--quick", action="store_true", help="the quick preset (smoke run)")
    ap.add_argument(
        "--preset",
        default=None,
        help="preset name from benchmarks/registry.py (default: cpu/gpu by device)",
    )
    ap.add_argument("--out", default=str(C.RESULTS_DIR), help="results folder")
    ap.add_argument(
        "--data",
        default=None,
        help="quality, regime: byte corpus (file or folder); default the preset's",
    )
    args = ap.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        ap.error("--quick and --preset disagree")
    name = (
        "quick"
        if args.quick
        else (args.preset or ("gpu" if C.device_tag() == "gpu" else "cpu"))
    )
    benches = BENCHES if args.bench == "all" else (args.bench,)
    for b in benches:
        try:
            registry.preset(b, name)
        except ValueError as e:
            ap.error(str(e))
    if args.data is not None and not os.path.exists(args.data):
        ap.error(f"--data {args.data!r} does not exist")
    if argv is None:
        main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        prog = "-m benchmarks.run" if main_spec is not None else sys.argv[0]
        command = C.command_line([prog, *sys.argv[1:]])
    else:
        command = C.command_line(["-m benchmarks.run", *argv])
    out = Path(args.out)
    tag = result_tag(name)
    for b in benches:
        C.log(f"== {b} (preset {name}) -> {out}")
        kw = dict(out_dir=out, tag=tag, command=command)
        if b in ("quality", "regime"):
            kw["data_path"] = args.data
        m = _module(b)
        runner = m.run_ttft if b == "ttft" else m.run
        res = runner(registry.preset(b, name), **kw)
        print("\n".join(res["lines"]))
        print(f"\nwrote {res['markdown']} and {res['plot']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
