"""Large pools made from real rows, for the scale tests and ``bench/scale.py``.

``write_scale_pool`` repeats real alpaca rows (``id``, ``instruction``, ``input``, ``output``) until it
has ``n_rows``: copy 0 of each row is the row itself, copy ``k > 0`` adds `` (#k)`` to the instruction,
so every row has its own content and ``sample_id``. With ``dim``, a side file ``vectors.parquet``
(``id``, ``vector``: float32 unit vectors) carries one vector per row: a base direction per real row
plus seeded noise per copy, so copies are near their original but all distinct. With ``bad_every``,
about one row in ``bad_every`` (scattered by ``seed``) is broken in one of four ways — invalid JSON,
not an object, no ``output``, an empty instruction — and its line number is returned.

Tests use the rows in ``data/sample`` (in the repository); the benchmark uses ``../shared/data``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BAD_KINDS = ("invalid_json", "not_an_object", "missing_output", "empty_instruction")


@dataclass
class ScalePool:
    paths: list[Path]
    vectors: Path | None
    n_rows: int
    bad_lines: dict[str, list[int]] = field(default_factory=dict)  # file name -> 1-based line numbers of broken rows

    @property
    def n_bad(self) -> int:
        return sum(len(v) for v in self.bad_lines.values())


def alpaca_rows(paths: list[Path]) -> list[dict]:
    """The alpaca rows (instruction, input, output) of JSON / JSONL files, first occurrence of each."""
    seen, out = set(), []
    for p in paths:
        text = Path(p).read_text(encoding="utf-8")
        items = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
        for r in items:
            if not isinstance(r, dict) or not r.get("instruction") or not r.get("output"):
                continue
            row = {"instruction": str(r["instruction"]), "input": str(r.get("input") or ""), "output": str(r["output"])}
            key = (row["instruction"], row["input"], row["output"])
            if key not in seen:
                seen.add(key)
                out.append(row)
    return out


def write_scale_pool(out_dir: str | Path, n_rows: int, base_rows: list[dict], dim: int | None = 384, seed: int = 0,
                     bad_every: int | None = None, files: int = 1, chunk: int = 50_000) -> ScalePool:
    """Write ``n_rows`` alpaca rows as ``files`` JSONL files (``pool-000.jsonl`` …) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_base = len(base_rows)
    rng = np.random.default_rng(seed)
    bad = set()
    if bad_every:
        bad = set(rng.choice(n_rows, size=max(1, n_rows // bad_every), replace=False).tolist())
    per_file = -(-n_rows // files)
    paths, bad_lines = [], {}
    for f in range(files):
        path = out / f"pool-{f:03d}.jsonl"
        lines_bad = []
        with open(path, "w", encoding="utf-8") as fh:
            for line_no, i in enumerate(range(f * per_file, min(n_rows, (f + 1) * per_file)), start=1):
                base, copy = base_rows[i % n_base], i // n_base
                row = {"id": f"r{i}", "instruction": base["instruction"] + (f" (#{copy})" if copy else ""), "input": base["input"],
                       "output": base["output"]}
                if i in bad:
                    kind = BAD_KINDS[i % len(BAD_KINDS)]
                    lines_bad.append(line_no)
                    if kind == "invalid_json":
                        fh.write('{"id": "r%d", "instruction": "cut short\n' % i)
                        continue
                    if kind == "not_an_object":
                        fh.write(json.dumps([row["instruction"]]) + "\n")
                        continue
                    if kind == "missing_output":
                        row.pop("output")
                    else:
                        row["instruction"], row["input"] = "   ", ""
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths.append(path)
        bad_lines[path.name] = lines_bad
    vectors = None
    if dim:
        import pyarrow as pa
        import pyarrow.parquet as pq

        vectors = out / "vectors.parquet"
        base_rng = np.random.default_rng(seed + 1)
        base_vecs = base_rng.standard_normal((n_base, dim)).astype(np.float32)
        schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim))])
        with pq.ParquetWriter(vectors, schema) as writer:
            for start in range(0, n_rows, chunk):
                idx = np.arange(start, min(n_rows, start + chunk))
                noise = np.random.default_rng([seed, start]).standard_normal((len(idx), dim)).astype(np.float32)
                v = base_vecs[idx % n_base] + 0.35 * noise
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                flat = pa.array(v.reshape(-1), pa.float32())
                writer.write_table(pa.table({"id": pa.array([f"r{i}" for i in idx], pa.string()),
                                             "vector": pa.FixedSizeListArray.from_arrays(flat, dim)}, schema=schema))
    return ScalePool(paths=paths, vectors=vectors, n_rows=n_rows, bad_lines=bad_lines)
