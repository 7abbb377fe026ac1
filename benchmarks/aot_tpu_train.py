"""The whole training step compiled for a TPU slice, on a CPU machine.

The library's pallas train step (`tvq_eqx.train.train_step`: the update
segments scanned with the carried attention state, loss and gradients, the
optimizer, the EMA codebook) for a context-parallel `("data", "seq")` mesh of
a TPU topology (default v5e:2x2, 4 chips, data=2 x seq=2), lowered from
this CPU machine and compiled by libtpu's real XLA:TPU + Mosaic compiler
(no TPU needed: `benchmarks/_libtpu.py`). Reports:

- the compiled memory per device (`compiled.memory_analysis()`: arguments,
  outputs, temporaries, generated code);
- the number of Mosaic kernel calls in the lowered program;
- every collective of the optimized HLO (`compiled.as_text()`): op, shape
  and bytes, replica groups / source-target pairs, the computation it sits in
  and how many times it runs per step (while-loop trip counts), and which mesh
  axis it crosses (from the device ids: device `i` is `mesh.devices.flat[i]`).

Context parallelism should send across the seq axis only the per-code
summaries of each attention unit (counts `[B, H, S]`, value sums
`[B, H, S, d_v]`, the chunk's cache factor `[B]`), one boundary block (codes,
codewords and values of the last `mem_len` keys) per unit, the final state
hand-off, and their transposes in the backward pass; never a whole-sequence
activation.

    python benchmarks/aot_tpu_train.py                      # official attention shape
    python benchmarks/aot_tpu_train.py --preset micro --json   # seconds; the test's size

The `--json` flag prints one line `AOT_TPU_TRAIN_JSON {...}` with the figures
(tests/test_aot_tpu_train.py reads it). Exit status 0 when it compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks._libtpu import TOPOLOGIES, require_libtpu

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
)

# Model sizes. "official": the per-layer attention shape of the official
# enwik8 launch (d_model 768, d_k 128, d_v 1536, 512 codes, block = mem_len =
# 512, one head, update_len 2048: 1024 tokens per seq-device), with 2 layers
# instead of 24 (the layers run as one scan: the program and its collectives
# are the same per layer; only the parameter memory grows with depth).
# "micro": the smallest size that still runs the Mosaic kernels (TPU tiles:
# d_k and d_v multiples of 128, block 128) with two blocks per seq-device.
PRESETS = {
    "official": dict(
        d_model=768, d_k=128, d_v=1536, n_head=1, n_code=512, n_layer=2,
        block_len=512, batch=4, seq_len=4096, update_len=2048, n_vocab=256,
    ),
    "small": dict(
        d_model=256, d_k=128, d_v=512, n_head=1, n_code=256, n_layer=2,
        block_len=256, batch=4, seq_len=2048, update_len=1024, n_vocab=256,
    ),
    "micro": dict(
        d_model=128, d_k=128, d_v=128, n_head=1, n_code=128, n_layer=1,
        block_len=128, batch=2, seq_len=512, update_len=512, n_vocab=256,
    ),
}  # fmt: skip


@dataclasses.dataclass
class Collective:
    op: str  # e.g. "all-reduce" (an async -start/-done pair counts once)
    name: str  # the HLO instruction name
    computation: str
    shapes: list[str]  # result shapes (e.g. ["f32[2,1,512,1536]"])
    bytes: int  # bytes of the result (per device)
    groups: list[list[int]]  # replica groups or source-target pairs
    pairs: bool  # groups are (source, target) pairs
    axes: tuple[str, ...]  # mesh axes crossed
    runs: int  # executions per step (loop trip counts)
    source: str  # fwd/bwd and the JAX op path (op_name metadata)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- HLO parsing
_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def shape_bytes(shape_text: str) -> tuple[list[str], int]:
    """Array shapes in an HLO type (a tuple or one array) and their bytes."""
    shapes, total = [], 0
    for dt, dims in _SHAPE.findall(shape_text):
        if dt not in _DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        shapes.append(f"{dt}[{dims}]")
        total += n * _DTYPE_BYTES[dt]
    return shapes, total


def _split_type_and_op(rhs: str) -> tuple[str, str]:
    """`f32[2]{0} all-reduce(...)` or `(f32[2], u32[]) op(...)` -> (type, rest)."""
    rhs = rhs.strip()
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rhs[: i + 1], rhs[i + 1 :].strip()
    typ, _, rest = rhs.partition(" ")
    return typ, rest.strip()


def parse_groups(attrs: str, n_devices: int) -> tuple[list[list[int]], bool]:
    """Device groups of a collective from its attribute text: source-target
    pairs, or replica groups in any of XLA's spellings (explicit
    `{{0,1},{2,3}}`, iota `[2,2]<=[2,2]T(1,0)`, or by mesh axes
    `mesh['data'=2,'seq'=2] {'seq'}`: the devices that differ only along
    the named axes). Returns (groups, are_pairs); no groups = all devices."""
    import numpy as np

    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
    if m:
        pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(1))
        return [[int(a), int(b)] for a, b in pairs], True
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names = [a for a, _ in axes]
        sizes = [int(n) for _, n in axes]
        over = re.findall(r"'([^']+)'", m.group(2))
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        moved = np.moveaxis(ids, [names.index(a) for a in over], range(-len(over), 0))
        size = math.prod(sizes[names.index(a)] for a in over) if over else 1
        return moved.reshape(-1, size).tolist(), False
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        out_shape = [int(x) for x in m.group(1).split(",")]
        src = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(src)).reshape(src)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(out_shape).tolist(), False
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if m and m.group(1):
        groups = re.findall(r"\{([\d,]*)\}", m.group(1))
        return [[int(x) for x in g.split(",") if x] for g in groups], False
    return [list(range(n_devices))], False


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """Computation name -> its instruction lines, and the entry's name. A
    computation starts at an unindented line ending in `{`."""
    comps: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo.splitlines():
        if current is None:
            if line and not line[0].isspace() and line.rstrip().endswith("{"):
                head = line.split()
                if head[0] == "ENTRY":
                    current = entry = head[1].lstrip("%")
                elif head[0].startswith("%"):
                    current = head[0].lstrip("%")
                if current is not None:
                    comps[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        comps[current].append(line)
    return comps, entry


def _trip_count(cond: list[str]) -> int | None:
    """A while condition `i < N` with a constant N (scans count from 0)."""
    consts = {}
    for line in cond:
        m = _INSTR.match(line)
        if m:
            c = re.search(r"\bconstant\((-?\d+)\)", m.group(2))
            if c:
                consts[m.group(1)] = int(c.group(1))
    for line in cond:
        if line.lstrip().startswith("ROOT") and "direction=LT" in line:
            args = re.search(r"compare\(([^)]*)\)", line)
            if args:
                ops = [a.strip().lstrip("%") for a in args.group(1).split(",")]
                if len(ops) == 2 and ops[1] in consts:
                    return consts[ops[1]]
    return None


def _runs_per_computation(comps: dict[str, list[str]], entry: str | None):
    """How many times each computation runs per call of the entry: while
    bodies multiply by their trip count (`_trip_count`; unknown counts 1)."""
    runs: dict[str, int] = {}

    def visit(name: str, mult: int, depth: int = 0):
        if name not in comps or depth > 64 or runs.get(name, 0) >= mult:
            return
        runs[name] = mult
        for line in comps[name]:
            called = re.findall(
                r"\b(body|condition|calls|to_apply|true_computation|"
                r"false_computation)=%?([\w.\-]+)",
                line,
            )
            trip = 1
            cond = dict(called).get("condition")
            if cond is not None:
                trip = _trip_count(comps.get(cond, [])) or 1
            for br in re.findall(r"branch_computations=\{([^}]*)\}", line):
                called += [("branch", c.strip().lstrip("%")) for c in br.split(",")]
            for key, callee in called:
                visit(callee, mult * (trip if key == "body" else 1), depth + 1)

    if entry is not None:
        visit(entry, 1)
    return runs


def _source(line: str) -> str:
    """A short source of an instruction from its op_name metadata:
    forward/backward and the JAX primitive path's last parts."""
    m = re.search(r'op_name="([^"]*)"', line)
    if not m:
        return ""
    name = m.group(1)
    phase = "bwd" if "transpose(" in name else ("fwd" if "jvp(" in name else "")
    parts = [p for p in name.split("/") if p and not p.startswith("jit(step")]
    parts = [
        p for p in parts if p not in ("while", "body", "jvp()", "transpose(jvp())")
    ]
    tail = "/".join(parts[-3:])
    return f"{phase} {tail}".strip()


def find_collectives(hlo: str, mesh_shape: dict[str, int]) -> list[Collective]:
    """Every collective of an optimized HLO module's text. Async pairs
    (`-start` / `-done`) count once, with the shape of the `-done` result
    (the array that arrives)."""
    import numpy as np

    comps, entry = _computations(hlo)
    runs = _runs_per_computation(comps, entry)
    names = list(mesh_shape)
    sizes = [mesh_shape[n] for n in names]
    n_dev = math.prod(sizes)
    done_types: dict[str, str] = {}
    for lines in comps.values():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            typ, rest = _split_type_and_op(m.group(2))
            d = re.match(r"[\w\-]+-done\(%?([\w.\-]+)", rest)
            if d:
                done_types[d.group(1)] = typ
    out = []
    chains = set()
    for comp, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            name = m.group(1)
            typ, rest = _split_type_and_op(m.group(2))
            opm = re.match(r"([\w\-]+)\(", rest)
            if not opm:
                continue
            op = opm.group(1)
            base = op[: -len("-start")] if op.endswith("-start") else op
            if base not in COLLECTIVES:
                continue
            # XLA:TPU's async collective fusions split one collective into
            # start / compute-overlapped update / done fusions, each holding
            # a copy of it with the same channel and chain id: count it once.
            chain = re.search(r'chain_id="(\d+)"', rest)
            channel = re.search(r"channel_id=(\d+)", rest)
            if chain:
                key = (
                    chain.group(1), channel and channel.group(1), base,
                    tuple(shape_bytes(typ)[0]),
                )  # fmt: skip
                if key in chains:
                    continue
                chains.add(key)
            result = done_types.get(name, typ) if op.endswith("-start") else typ
            shapes, nbytes = shape_bytes(result)
            groups, pairs = parse_groups(rest, n_dev)
            crossed = set()
            for g in groups:
                coords = [np.unravel_index(i, sizes) for i in g]
                for ax, axis_name in enumerate(names):
                    if len({int(c[ax]) for c in coords}) > 1:
                        crossed.add(axis_name)
            axes = tuple(n for n in names if n in crossed)
            out.append(
                Collective(
                    op=base, name=name, computation=comp, shapes=shapes,
                    bytes=nbytes, groups=groups, pairs=pairs, axes=axes,
                    runs=runs.get(comp, 1), source=_source(line),
                )
            )  # fmt: skip
    return out


# ------------------------------------------------------------------ the build
def build_run(args):
    """The `RunConfig` of the compiled step: the official enwik8 preset
    (`train.PRESETS["enwik8"]`: dropout, AdamW with clipping and the cosine
    schedule, c_beta, c_gamma, bf16 activations) with the preset's sizes,
    `implementation="pallas"` and the TPU tile rule. Context parallelism is
    set afterwards by `train.for_mesh`."""
    from pallas_kernels.vq_attention import BlockSizes, PallasConfig
    from tvq_eqx import train

    p = dict(PRESETS[args.preset])
    for k in p:
        v = getattr(args, k, None)
        if v is not None:
            p[k] = v
    base = train.PRESETS["enwik8"]
    model = base.model.replace(
        n_vocab=p["n_vocab"], d_model=p["d_model"], d_k=p["d_k"], d_v=p["d_v"],
        n_head=p["n_head"], n_code=p["n_code"], n_layer=p["n_layer"],
        block_len=p["block_len"], mem_len=p["block_len"], dtype=args.dtype,
        implementation="pallas",
        # The TPU tile rule, explicitly: on this CPU machine the default
        # (None) would pick the rule of the backend jax runs on (cpu).
        pallas=PallasConfig(block_sizes=BlockSizes.for_platform("tpu")),
    )  # fmt: skip
    updates = p["seq_len"] // p["update_len"]
    run = base.replace(
        model=model,
        data=dict(batch_size=p["batch"], seq_len=p["seq_len"]),
        update_len=p["update_len"],
        steps=base.steps - base.steps % updates,
        context_len=p["seq_len"],
        eval_batches=0,
    )
    return run, p


def compile_train_step(args) -> dict:
    """Lower and compile the train step; returns the report's figures."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tvq_eqx import train

    topo_name = TOPOLOGIES.get(args.topology, args.topology)
    devices = topologies.get_topology_desc(topo_name, platform="tpu").devices
    n_dev = args.data * args.seq
    if n_dev > len(devices):
        raise SystemExit(
            f"data={args.data} x seq={args.seq} needs {n_dev} devices; "
            f"{topo_name} has {len(devices)}"
        )
    devices = sorted(devices, key=lambda d: d.id)[:n_dev]
    # train.make_mesh's layout (as the CLI's): device i of the list is
    # mesh.devices.flat[i], a (data, seq) array.
    mesh = train.make_mesh(devices, seq=args.seq)
    run, sizes = build_run(args)
    run, _ = train.for_mesh(run, None, mesh)
    optimizer = train.optimizer_from_config(run.optimizer, run.steps)

    like = eqx.filter_eval_shape(train.new_train_state, run)
    is_sds = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    dyn, static = eqx.partition(like, is_sds)
    rep = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P("data"))
    # The attention state's arrays are stacked [n_layer, batch, ...].
    state_rows = NamedSharding(mesh, P(None, "data"))

    def sharding_of(path, x):
        # The attention state is split by batch row, everything else
        # replicated (train.shard_train_state's layout).
        in_attn = any(getattr(k, "name", None) == "attn_state" for k in path)
        return state_rows if in_attn and x.ndim >= 1 else rep

    dyn_shardings = jax.tree_util.tree_map_with_path(sharding_of, dyn)
    dyn_args = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        dyn, dyn_shardings,
    )  # fmt: skip
    b, t = sizes["batch"], sizes["seq_len"]
    batch_args = dict(
        inputs=jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows),
        targets=jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows),
        loss_mask=jax.ShapeDtypeStruct((b, t), jnp.float32, sharding=rows),
    )
    reset_arg = jax.ShapeDtypeStruct((), jnp.bool_, sharding=rep)

    def step(dyn, batch, reset):
        ts = eqx.combine(dyn, static)
        new, metrics = train.train_step(
            ts, batch, optimizer=optimizer, update_len=run.update_len, reset=reset
        )
        return eqx.partition(new, eqx.is_array)[0], metrics

    fn = jax.jit(
        step,
        out_shardings=(dyn_shardings, rep),
        donate_argnums=(0,),
    )
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with jax.set_mesh(mesh):
            lowered = fn.trace(dyn_args, batch_args, reset_arg).lower(
                lowering_platforms=("tpu",)
            )
    t_lower = time.time() - t0
    lowered_text = lowered.as_text()
    n_mosaic = lowered_text.count("tpu_custom_call")
    t0 = time.time()
    compiled = lowered.compile()
    t_compile = time.time() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    colls = find_collectives(hlo, dict(mesh.shape))
    memory = {
        k: getattr(mem, f"{k}_size_in_bytes", None)
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    n_params = sum(
        math.prod(x.shape) for x in jax.tree.leaves(eqx.filter(dyn.model, is_sds))
    )
    return dict(
        topology=topo_name,
        device_kind=devices[0].device_kind,
        mesh=dict(mesh.shape),
        sizes=sizes,
        dtype=args.dtype,
        preset=args.preset,
        n_params=int(n_params),
        lower_s=t_lower,
        compile_s=t_compile,
        n_mosaic=n_mosaic,
        memory=memory,
        collectives=[c.as_dict() for c in colls],
        hlo_chars=len(hlo),
    )


# ----------------------------------------------------------- the seq bound
def seq_bound(sizes: dict, dtype: str) -> dict:
    """Upper bound, in bytes per device and step, of what context parallelism
    (`ops.vq_attention_context_parallel`) moves across the seq axis alone,
    from the shapes. Per attention unit (two per layer) and update segment,
    with `b` the rows of one data group, `D` the seq devices, `M` = mem_len,
    `H` heads, `S` codes, `e` the activation dtype's bytes:

    - boundary block (forward `ppermute` to the next device): the last `M`
      keys' codes (int32 `[b, M, H]`), codewords `[b, M, H, d_k]` and values
      `[b, M, H, d_v]`: `b M H (4 + e (d_k + d_v))`;
    - code summaries (forward `all_gather` of every seq device's): the
      cache factor (float32 `[D, b]`), counts `[D, b, H, S]` and value sums
      `[D, b, H, S, d_v]` (float32): `4 D b (1 + H S (1 + d_v))`;
    - the final state handed to every device (a `psum` of the last device's):
      the window (as the boundary block), its length `[b]` (int32), the
      cache's counts and means (float32): `boundary + 4 b + 4 b H S (1 + d_v)`;
    - backward: the transposes of the boundary block (its cotangents, at most
      its size) and of the summaries' gather (a reduce-scatter / all-reduce,
      at most their size); the state hand-off carries no gradient (the train
      step stops gradients through the carried state).

    So per unit: `2 boundary + 2 summaries + state`, independent of the
    sequence length; times `2 n_layer` units and `seq_len / update_len`
    segments per step. `chunk` is one seq device's tokens per update: an
    all-gather of a whole-sequence activation would carry a dimension of at
    least that length, which nothing above has (for sizes with
    `M, S, d_k, d_v < chunk`)."""
    e = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}[dtype]
    d = sizes.get("seq", 2)
    b = sizes["batch"] // sizes.get("data", 1)
    h, k, v, s, m = (
        sizes["n_head"], sizes["d_k"], sizes["d_v"], sizes["n_code"], sizes["block_len"]
    )  # fmt: skip
    mean_bytes = max(4, e)  # the cache means are float32 (or wider)
    boundary = b * m * h * (4 + e * (k + v))
    summaries = 4 * d * b * (1 + h * s * (1 + v))
    state = boundary + 4 * b + b * h * s * (4 + mean_bytes * v)
    per_unit = 2 * boundary + 2 * summaries + state
    units = 2 * sizes["n_layer"] * (sizes["seq_len"] // sizes["update_len"])
    return dict(
        boundary=boundary,
        summaries=summaries,
        state=state,
        per_unit=per_unit,
        units=units,
        bound=per_unit * units,
        chunk=sizes["update_len"] // d,
    )


# ------------------------------------------------------------------- report
def _fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


def _groups_text(c: dict) -> str:
    if c["pairs"]:
        return "pairs " + " ".join(f"{a}->{b}" for a, b in c["groups"])
    return " ".join("{" + ",".join(map(str, g)) + "}" for g in c["groups"])


def _dims(shape: str) -> list[int]:
    inner = shape[shape.index("[") + 1 : -1]
    return [int(x) for x in inner.split(",") if x]


def summarize(res: dict) -> dict:
    """The collectives by the axes they cross, their bytes, and the bound."""
    colls = res["collectives"]
    seq_only = [c for c in colls if tuple(c["axes"]) == ("seq",)]
    whole = [c for c in colls if "seq" in c["axes"] and "data" in c["axes"]]
    data_only = [c for c in colls if tuple(c["axes"]) == ("data",)]
    sizes = dict(res["sizes"], **res["mesh"])
    bound = seq_bound(sizes, res["dtype"])
    # Token-length dimensions: one seq device's chunk, the update segment,
    # the whole row. An activation of the chunk crossing seq carries one.
    token_dims = {bound["chunk"], sizes["update_len"], sizes["seq_len"]}
    with_token_dim = sorted(
        {sh for c in seq_only for sh in c["shapes"] if token_dims & set(_dims(sh))}
    )
    return dict(
        n_collectives=len(colls),
        n_seq_only=len(seq_only),
        n_whole_mesh=len(whole),
        n_data_only=len(data_only),
        seq_only_bytes=sum(c["bytes"] for c in seq_only),
        seq_only_bytes_per_step=sum(c["bytes"] * c["runs"] for c in seq_only),
        whole_mesh_bytes=sum(c["bytes"] for c in whole),
        whole_mesh_bytes_per_step=sum(c["bytes"] * c["runs"] for c in whole),
        data_only_bytes=sum(c["bytes"] for c in data_only),
        whole_mesh_bf16_shapes=sum(
            sh.startswith("bf16[") and max(_dims(sh), default=0) > 1
            for c in whole
            for sh in c["shapes"]
        ),
        token_dims=sorted(token_dims),
        seq_only_with_token_dim=with_token_dim,
        seq_all_gathers=[c["shapes"] for c in seq_only if c["op"] == "all-gather"],
        param_bytes=4 * res["n_params"],
        bound=bound,
    )


def markdown(res: dict) -> str:
    s = summarize(res)
    sz = res["sizes"]
    mem = res["memory"]
    b = s["bound"]
    seq = res["mesh"].get("seq", 1)
    lines = [
        "# Train step compiled for a TPU slice (AOT, libtpu, no TPU)",
        "",
        "Written by `benchmarks/aot_tpu_train.py`: the library's pallas train step "
        "(`tvq_eqx.train.train_step`, jitted as `train.make_train_step` does: "
        "donated train state, replicated except the attention state, split by "
        "row; update segments scanned with the carried attention state, loss and "
        "gradients, the optimizer, the EMA codebook) of the official enwik8 "
        "preset (`train.PRESETS['enwik8']`: dropout, AdamW with clipping and the "
        "cosine schedule, bf16 activations) at the sizes below, with context "
        "parallelism set by `train.for_mesh` on a `train.make_mesh` mesh, lowered "
        "on a CPU machine for a TPU topology and compiled by libtpu (XLA:TPU + "
        "Mosaic). Nothing ran: the figures are the compiler's.",
        "",
        "## Settings",
        "",
        f"- topology `{res['topology']}` ({res['device_kind']}), mesh "
        f"{res['mesh']}; device i = `mesh.devices.flat[i]` (ids 0, 1: data 0, "
        "seq 0 and 1; ids 2, 3: data 1)",
        f"- preset `{res['preset']}`: d_model {sz['d_model']}, d_k {sz['d_k']}, "
        f"d_v {sz['d_v']}, heads {sz['n_head']}, codes {sz['n_code']}, layers "
        f"{sz['n_layer']} (2 attention units each), block_len = mem_len "
        f"{sz['block_len']}, vocab {sz['n_vocab']}; {res['n_params']:,} parameters",
        f"- batch {sz['batch']} x {sz['seq_len']} tokens, update_len "
        f"{sz['update_len']} ({sz['seq_len'] // sz['update_len']} optimizer "
        f"updates per step), {sz['update_len'] // seq} tokens per seq-device per "
        f"update; activations {res['dtype']}, float32 parameters; "
        "implementation `pallas` with the TPU tiles "
        "(`BlockSizes.for_platform('tpu')`)",
        f"- lowering {res['lower_s']:.1f} s, compile {res['compile_s']:.1f} s "
        "(this 2-core CPU machine)",
        f"- Mosaic kernel calls (`tpu_custom_call`) in the lowered program: "
        f"{res['n_mosaic']}",
        "",
        "## Compiled memory per device",
        "",
        "| arguments | outputs | aliased (donated) | temporaries | generated code |",
        "|---:|---:|---:|---:|---:|",
        f"| {_fmt_bytes(mem['argument'])} | {_fmt_bytes(mem['output'])} "
        f"| {_fmt_bytes(mem['alias'])} | {_fmt_bytes(mem['temp'])} "
        f"| {_fmt_bytes(mem['generated_code'])} |",
        "",
        "## Collectives in the optimized HLO",
        "",
        "Bytes: the result per device (an all-gather's gathered array, a "
        "reduce-scatter's scattered part; tuples summed). Runs: executions per "
        "step, from the while loops' trip counts (update segments x layers). "
        "Source: forward or backward and the JAX op (HLO op_name metadata).",
        "",
        "| # | op | shape | bytes | groups / pairs | crosses | runs | source |",
        "|---:|---|---|---:|---|---|---:|---|",
    ]
    for i, c in enumerate(res["collectives"]):
        crosses = "+".join(c["axes"]) or "none"
        shapes = " ".join(c["shapes"][:4]) + (
            f" (+{len(c['shapes']) - 4})" if len(c["shapes"]) > 4 else ""
        )
        lines.append(
            f"| {i} | {c['op']} | {shapes} | {_fmt_bytes(c['bytes'])} "
            f"| {_groups_text(c)} | {crosses} | {c['runs']} | {c['source']} |"
        )
    lines += [
        "",
        "## Across the seq axis",
        "",
        f"- **seq axis only** (context parallelism's own exchange): "
        f"{s['n_seq_only']} collectives, {_fmt_bytes(s['seq_only_bytes'])} as "
        f"written, **{_fmt_bytes(s['seq_only_bytes_per_step'])} per step**; "
        "arrays with a token-length dimension "
        f"({', '.join(map(str, s['token_dims']))}: the chunk, the update segment, "
        "the row): "
        + (", ".join(s["seq_only_with_token_dim"]) or "none")
        + "; all-gathers over seq: "
        + (
            ", ".join(" ".join(x) for x in s["seq_all_gathers"])
            if s["seq_all_gathers"]
            else "none"
        )
        + " (the code summaries).",
        f"- bound from the shapes (`seq_bound`): per attention unit and update "
        f"segment, boundary block {_fmt_bytes(b['boundary'])}, gathered code "
        f"summaries {_fmt_bytes(b['summaries'])}, final-state hand-off "
        f"{_fmt_bytes(b['state'])}; 2 x boundary + 2 x summaries + state = "
        f"{_fmt_bytes(b['per_unit'])} (forward and backward), x {b['units']} "
        f"unit-segments = {_fmt_bytes(b['bound'])} per step. Measured / bound: "
        f"{s['seq_only_bytes_per_step'] / b['bound']:.2f}.",
        f"- **whole mesh** (data and seq together): {s['n_whole_mesh']} "
        f"collectives, {_fmt_bytes(s['whole_mesh_bytes'])} as written, "
        f"{_fmt_bytes(s['whole_mesh_bytes_per_step'])} per step: the gradient "
        "sums (every device's partial gradient of the replicated parameters), "
        "the EMA codebook statistics (per-code key counts and sums) and scalar "
        f"metrics; parameter bytes (float32) {_fmt_bytes(s['param_bytes'])}. "
        "These are data parallelism's reductions, extended over seq because each "
        "seq device holds part of every row."
        + (
            f" {s['whole_mesh_bf16_shapes']} of their arrays are bfloat16: "
            "weight gradients of the attention units, summed across devices in "
            "the activation dtype (the partitioner reduces the bf16 matmul "
            "output before its transpose-of-convert to float32)."
            if s["whole_mesh_bf16_shapes"]
            else ""
        ),
        f"- data axis only: {s['n_data_only']} collectives, "
        f"{_fmt_bytes(s['data_only_bytes'])}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5e", help="v4, v5e, v5p, v6e or a name")
    ap.add_argument("--data", type=int, default=2, help="data-parallel axis size")
    ap.add_argument("--seq", type=int, default=2, help="context-parallel axis size")
    ap.add_argument("--preset", default="official", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bfloat16")
    for k in PRESETS["official"]:
        ap.add_argument("--" + k.replace("_", "-"), dest=k, type=int, default=None)
    ap.add_argument(
        "--out", default=None, help="Markdown report (default: none; see --json)"
    )
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    if not require_libtpu():
        return 3
    res = compile_train_step(args)
    res["summary"] = summarize(res)
    text = markdown(res)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        print("AOT_TPU_TRAIN_JSON " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
