"""Packaging: the core imports only its core dependencies, optional features
name their extra when it is missing, the version comes from the metadata, and
the type information ships (py.typed)."""

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import tvq_eqx
from tvq_eqx import data

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = [
    "tyro",
    "tqdm",
    "matplotlib",
    "PIL",
    "sentencepiece",
    "beartype",
    "safetensors",
    "msgpack",
    "tensorboardX",
    "wandb",
    "trackio",
]


def test_core_dependencies_are_only_the_four():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(d.split(">")[0].split("=")[0] for d in project["dependencies"])
    assert names == ["equinox", "jax", "jaxtyping", "optax"]
    for extra in (
        "cli",
        "images",
        "sentencepiece",
        "weights",
        "tensorboard",
        "wandb",
        "trackio",
        "test",
        "docs",
        "dev",
        "aot",
        "aot-tpu",
    ):
        assert extra in project["optional-dependencies"], extra


def _json_of_fresh_python(code: str):
    """The JSON `code` prints last, run in a fresh interpreter (what a new
    process imports, untouched by this one's imports)."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_pulls_in_no_optional_dependency():
    code = (
        "import sys, json, tvq_eqx, tvq_eqx.data, tvq_eqx.train, tvq_eqx.nn, "
        "tvq_eqx.ops, tvq_eqx.sampling, pallas_kernels.vq_attention\n"
        f"print(json.dumps([m for m in {OPTIONAL!r} if m in sys.modules]))"
    )
    assert _json_of_fresh_python(code) == []


# What `import tvq_eqx` may load of the kernels' package: the configuration
# classes (`PallasConfig` is a field of `TransformerConfig`), nothing of the
# kernels or of the Pallas lowering they import.
KERNEL_CONFIG_MODULES = [
    "pallas_kernels",
    "pallas_kernels.vq_attention",
    "pallas_kernels.vq_attention.config",
]


def test_kernels_load_on_first_use():
    code = """
import json, sys
import jax.numpy as jnp
import tvq_eqx, tvq_eqx.data, tvq_eqx.nn, tvq_eqx.ops, tvq_eqx.sampling, tvq_eqx.train

def loaded():
    return sorted(m for m in sys.modules if m.startswith("pallas_kernels"))

tvq_eqx.TransformerConfig(n_vocab=8, d_model=8, d_k=4, d_v=8, n_head=1, n_code=4,
                          n_layer=1, block_len=4)
x = jnp.ones((1, 8, 1, 4))
tvq_eqx.vq_attention(x, x, jnp.ones((1, 8, 1, 8)), jnp.ones((1, 4, 4)), block_len=4)
before = dict(kernels=loaded(), pallas="jax.experimental.pallas" in sys.modules)
tvq_eqx.ops.vq_attention_pallas
print(json.dumps(dict(before=before, after=loaded())))
"""
    got = _json_of_fresh_python(code)
    assert got["before"] == dict(kernels=KERNEL_CONFIG_MODULES, pallas=False)
    assert "pallas_kernels.vq_attention.ops" in got["after"]


def test_version_comes_from_the_metadata():
    try:
        expected = importlib.metadata.version("tvq-eqx")
    except importlib.metadata.PackageNotFoundError:
        expected = "0.0.0+unknown"
    assert tvq_eqx.__version__ == expected


def test_py_typed_ships():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = project["tool"]["setuptools"]["package-data"]
    for package in ("tvq_eqx", "pallas_kernels"):
        assert (ROOT / package / "py.typed").is_file()
        assert "py.typed" in package_data[package]


def test_missing_pillow_names_the_images_extra(monkeypatch, tmp_path):
    np.save(tmp_path / "unused.npy", np.zeros(1))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"tvq-eqx\[images\]"):
        data.load_images(tmp_path)


def test_missing_sentencepiece_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match=r"tvq-eqx\[sentencepiece\]"):
        data.SentencePieceTokenizer.train(vocab_size=100)


def test_missing_msgpack_names_the_weights_extra(monkeypatch, tmp_path):
    (tmp_path / "checkpoint").write_bytes(b"\x80")
    monkeypatch.setitem(sys.modules, "msgpack", None)
    with pytest.raises(ImportError, match=r"tvq-eqx\[weights\]"):
        tvq_eqx.train.read_official_checkpoint(tmp_path)


# The floors of the import drawing (docs/architecture.md): a module imports
# only from its own room or a lower floor. The package root re-exports the
# public names of every floor and is imported by no library module below it
# except for its metadata.
FLOORS = {
    "pallas_kernels": 0,
    "tvq_eqx._checks": 1,
    "tvq_eqx._config": 1,
    "tvq_eqx.ops": 2,
    "tvq_eqx.data": 2,
    "tvq_eqx.nn": 3,
    "tvq_eqx.loss": 4,
    "tvq_eqx.sampling": 4,
    "tvq_eqx.train": 5,
    "tvq_eqx.cli": 6,
    "tvq_eqx.__main__": 7,
}


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "pallas_kernels":
        return "pallas_kernels"
    return ".".join(parts[:2])


def _imports(path: Path, module: str):
    """The library modules `path` imports (at any depth, from any function),
    relative imports resolved, `from pkg import submodule` as the submodule."""
    import ast

    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:
                name = f"{source}.{a.name}"
                as_file = ROOT / Path(*name.split("."))
                is_module = as_file.with_suffix(".py").exists() or as_file.is_dir()
                yield name if is_module else source


def test_imports_only_run_downward():
    upward = []
    files = [*ROOT.glob("tvq_eqx/**/*.py"), *ROOT.glob("pallas_kernels/**/*.py")]
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module == "tvq_eqx":
            continue  # the root re-exports every floor's public names
        here = _room(module)
        for target in _imports(path, module):
            if target.split(".")[0] not in ("tvq_eqx", "pallas_kernels"):
                continue
            there = _room(target)
            if there == "tvq_eqx" and target == "tvq_eqx":
                upward.append(f"{module} imports the package root")
            elif there != here and FLOORS[there] >= FLOORS[here]:
                upward.append(f"{module} -> {target}")
    assert len(files) > 40 and not upward, upward


# Packages of the extras other than `cli` (test, aot, aot-tpu, docs, dev,
# images' sentencepiece sibling): what `scripts/setup.sh demo` leaves out.
NOT_IN_DEMO = [
    "pytest",
    "hypothesis",
    "beartype",
    "xdist",
    "triton",
    "libtpu",
    "mkdocs",
    "mkdocstrings",
    "pyright",
    "ruff",
    "sentencepiece",
]


@pytest.mark.slow  # a fresh interpreter compiles a (micro) training run
def test_demo_runs_with_only_the_cli_extra(tmp_path):
    """`scripts/demo.sh` installs the library and its `cli` extra only: the
    demo's train → evaluate → sample path must not import anything else."""
    from tests.test_cli import MICRO

    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert 'demo) extras="cli"' in setup
    assert "scripts/setup.sh demo" in (ROOT / "scripts" / "demo.sh").read_text()
    code = f"""
import importlib.abc, json, sys
blocked = {NOT_IN_DEMO!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"the demo imported {{name}}, not in the cli extra")
sys.meta_path.insert(0, Block())
from tvq_eqx.cli import main
rc = main(["train", "--preset", "tiny", "--run-dir", {str(tmp_path / "run")!r},
           *{MICRO!r}])
print(json.dumps([rc, sorted(m for m in blocked if m in sys.modules)]))
"""
    assert _json_of_fresh_python(code) == [0, []]
