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
