"""What a wheel install gets: the selection presets travel with the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_selection_presets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("curate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if "/data/share/curate/selectors/" in n}
    assert shipped == {p.name for p in (ROOT / "selectors").glob("*.yaml")}
    assert not any(n.startswith("selectors/") for n in names)  # never an importable `selectors` package


def test_presets_found_under_the_install_prefix(tmp_path, monkeypatch):
    """A wheel install has no source checkout beside it: presets come from <prefix>/share."""
    from curate.config import load_flow

    prefix = tmp_path / "prefix"
    (prefix / "share" / "curate" / "selectors").mkdir(parents=True)
    (prefix / "share" / "curate" / "selectors" / "only-installed.yaml").write_text("steps:\n  - method: random\n    budget: 3\n")
    (tmp_path / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    flow = tmp_path / "flow.yaml"
    flow.write_text("name: t\ninputs:\n  - path: rows.jsonl\nselect: only-installed\n")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    spec = load_flow(flow)
    assert [(s.method, s.params) for s in spec.select] == [("random", {"budget": 3})]


#: third-party modules curate imports that the GPU check's path (bench/select_train_eval.py: ingest,
#: heuristic + Superfiltering scores, threshold/top_k/random/token_budget selection, export, train, eval with the hf
#: backend, in-process) never reaches, so bench/gpu_check.sh need not carry them
NOT_ON_THE_GPU_PATH = {
    "faiss": "k-center, DELIFT, DS2 and k-NN selection (not in the check's selections)",
    "prefect": "the check runs compare in-process (prefect: false)",
    "prefect_ray": "runtime.task_runner: ray",
    "sentence_transformers": "the embed stage (the check's pool has none)",
    "upath": "store_dir given as a URL",
    "httpx": "the openai backend and the schedule client (in the image anyway)",
    "lingua": "the lang scorer (not in the check's pool; curate[lang])",
    "typer": "the CLI (in the image anyway)",
    "vllm": "the vllm backend (never carried: too large)",
    "xgrammar": "decoding.constrain on the hf backend",
    "openvino": "embed.backend: openvino (curate[cpu-fast]; the check's pool has no embed stage)",
    "nncf": "embed.quantize: int8 with backend openvino (curate[cpu-fast])",
}


def _distribution(name: str) -> str:
    return name.lower().replace("_", "-")


def test_gpu_check_carries_every_package_the_gpu_path_imports():
    """Every third-party module imported anywhere in curate/ (at module level or inside a function) is in the GPU
    image, carried by bench/gpu_check.sh, or named above as off the check's path: a new dependency on that
    path fails here instead of one minute into a 15-minute GPU lease (polars and markdown once did)."""
    import ast
    import importlib.metadata as md
    import re

    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    carried = {_distribution(d) for d in re.search(r'^CARRIED="([^"]+)"', script, re.M).group(1).split()}
    image = {_distribution(line.strip()) for line in (ROOT / "bench" / "gpu_image.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    dists = md.packages_distributions()
    imported: dict[str, str] = {}
    for f in sorted((ROOT / "curate").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top != "curate":
                    imported.setdefault(top, str(f.relative_to(ROOT)))
    assert {"polars", "pyarrow", "trl", "datasets", "pydantic"} <= set(imported)  # the scan sees lazy imports too
    missing = {}
    for module, where in imported.items():
        if module in NOT_ON_THE_GPU_PATH:
            continue
        names = {_distribution(d) for d in dists.get(module, [module])}
        if not names & (carried | image):
            missing[module] = where
    assert not missing, f"imported by curate but neither in the GPU image nor carried by bench/gpu_check.sh: {missing}"
    # what the carried packages need in turn (polars its runtime, pydantic its core) travels too
    for d in carried:
        for req in md.requires(d) or []:
            if "extra ==" in req:
                continue
            dep = _distribution(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
            assert dep in carried | image, f"{d} needs {dep}, which is neither carried nor in the GPU image"
