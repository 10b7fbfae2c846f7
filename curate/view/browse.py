"""``curate browse``: a finished run's rows in a local web page, served on 127.0.0.1 only.

One page of plain HTML + JavaScript (:mod:`curate.view.browse_page`: no build step, nothing fetched
from the network; every value from the data is put in the page with ``textContent``) over a small
JSON API, both served by the standard library's ``ThreadingHTTPServer``:

=====================  ===========================================================================
``GET /``              the page
``GET /api/meta``      the run: flow, rows, counts per outcome, the reasons, sources and score columns
``GET /api/rows``      one page of rows matching the filters (below), with text, scores and parents
=====================  ===========================================================================

``/api/rows`` parameters (all optional; repeat ``outcome``, ``reason`` or ``source`` for any of several):

- ``outcome``, ``reason``, ``source``: exact values (unknown ones are a 400 naming what there is);
- ``score`` with ``min`` and/or ``max``: only rows whose score lies in ``[min, max]`` (a row without that
  score is left out);
- ``q``: a case-insensitive substring of any message of the row (its prompt or its response; for a
  quarantined row its raw text);
- ``sort``: ``row`` (default), ``rank`` or a score column; ``order``: ``asc`` (default) or ``desc``;
  missing values last, ties in row order;
- ``page``: 1-based (default 1) or ``last``; 50 rows a page (:data:`PAGE_SIZE`).

The answer: ``total`` (rows matching), ``page``, ``pages``, ``page_size`` and ``rows``, each row with
its ledger fields, ``scores`` ({name: value}), ``status`` ({scorer: status}), ``messages``, ``raw``,
the input's own columns (``columns``) and, for a derived row, its ``parent_rows`` and ``parents``
(each parent's row, outcome, reason, source and messages).

Everything is read through :func:`curate.view.rows.run_rows` (lazy Polars over the run's Parquet):
filters and counts read the ledger columns, a score range or score sort also the score table, and only
the 50 rows shown (and their parents) have their text read (:func:`curate.view.rows.with_text`). A
text search is the exception: it looks at every row's text, then keeps the matching row numbers for
the next pages (the last :data:`SEARCH_CACHE` searches). Reading the text from the Parquet files is
most of a search's time (decompressing and decoding it: about 90% of the CPU time at 1M rows; the
match itself, a case-insensitive regex, is the rest), so the :class:`Browser` reads it once, in a
background thread started after the first page it answers, into a :class:`TextIndex` held in memory (every message's content
and every quarantined row's raw text, as they are: about as large as the run's text uncompressed, e.g.
0.9 GB at 1M alpaca-sized rows), and every search matches against that. A run whose text is larger
than :data:`INDEX_MAX_BYTES`, or whose index would take more than half the memory free (about
:data:`INDEX_OVERHEAD` × the text while it is built), gets no index: each new search then reads the files, as the
index's build does. The text's size comes from the Parquet footers: a column the writer dictionary-encoded (many
repeated texts) counts its distinct texts only, so such a run's index can be larger than the estimate.
A search sent while the index is being built waits for it (the build reads what the scan would).

Why the standard library's server and not FastAPI/uvicorn (installed as Prefect's dependencies): the
page is for one person on their own machine; the API is two GET routes; ``http.server`` needs no
event loop, starts in a thread of the calling process in milliseconds on port 0 (tests and
benchmarks use it as it is), and does not tie ``curate browse`` to the versions Prefect pins.
Polars releases the GIL while it reads, so the threads of ``ThreadingHTTPServer`` answer concurrent
requests (e.g. the counts and a page) side by side.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import webbrowser
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, urlsplit

import polars as pl

from curate.errors import CurateError
from curate.ledger import OUTCOMES
from curate.view.rows import RunFiles, did_you_mean, find_run, kept_columns, listing, run_files, run_rows, score_columns, with_text

#: rows per page
PAGE_SIZE = 50
#: searches whose matching rows are kept (for the next pages of the same search)
SEARCH_CACHE = 8
#: the longest search text accepted
MAX_QUERY = 1000
#: the most text (bytes, uncompressed: the Parquet files' own count) a :class:`TextIndex` is built for;
#: a larger run is searched in its files (no index)
INDEX_MAX_BYTES = 2 * 1024**3
#: the index build's peak memory over the text's size (measured: 990 MB for 696 MB of text at 200k rows)
INDEX_OVERHEAD = 1.6


def available_memory() -> int | None:
    """Bytes of memory free for new allocations (psutil, a Prefect dependency), None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 — unknown: the fixed cap alone decides
        return None
#: the parameters of /api/rows
PARAMS = ("outcome", "reason", "source", "score", "min", "max", "q", "sort", "order", "page")
#: sort keys besides the scores
ROW_KEYS = ("row", "rank")
HOST = "127.0.0.1"


class BrowseError(CurateError):
    """A request that names nothing in the run (an unknown outcome, reason, source, score) or a bad value."""


class PortInUse(CurateError):
    """The port asked for is taken."""


def _jsonable(v: Any) -> Any:
    """JSON for a value from Polars: non-finite floats as the strings JavaScript prints (NaN, Infinity)."""
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class Browser:
    """The queries behind the page, over one finished run (found once; its files read on each request,
    its text also once, into a :class:`TextIndex` for the searches)."""

    def __init__(self, out_dir: str | os.PathLike, index_max_bytes: int | None = None) -> None:
        """``index_max_bytes``: the largest text (bytes) to hold a :class:`TextIndex` of (None:
        :data:`INDEX_MAX_BYTES`; 0: none, every search reads the files). The index is built in a
        daemon thread started once the first page of rows is answered (so that page does not share the
        CPU with the build), or by the first search or :meth:`wait_index`, whichever comes first."""
        self.files: RunFiles = run_files(find_run(out_dir))
        self.scores = score_columns(self.files)
        self.statuses = [c for c in score_columns(self.files, statuses=True) if c.endswith(".status")]
        self.kept = kept_columns(self.files)
        facts = (run_rows(self.files, text=False, scores=False).group_by("outcome", "reason", "source").len().collect())
        self.n_rows = int(facts.get_column("len").sum())
        by = lambda col: {k: int(n) for k, n in facts.group_by(col).agg(pl.col("len").sum()).iter_rows() if k is not None}  # noqa: E731
        outcomes = by("outcome")
        self.outcomes = {o: outcomes.get(o, 0) for o in OUTCOMES}
        self.reasons = dict(sorted(by("reason").items(), key=lambda kv: (-kv[1], kv[0])))
        self.sources = dict(sorted(by("source").items()))
        self._searches: OrderedDict[str, pl.Series] = OrderedDict()
        self._lock = threading.Lock()
        self.index: TextIndex | None = None  # set by the build (None: no index; see index_note)
        self.index_note = "not built"
        self._index_max = INDEX_MAX_BYTES if index_max_bytes is None else index_max_bytes
        self._index_thread: threading.Thread | None = None
        self._index_done = threading.Event()

    def clear_cache(self) -> None:
        """Forget the searches kept (not the text index)."""
        with self._lock:
            self._searches.clear()

    def start_index(self) -> None:
        """Start building the text index in a daemon thread (once; later calls do nothing)."""
        with self._lock:
            if self._index_thread is None:
                self._index_thread = threading.Thread(target=self._build_index, args=(self._index_max,), name="curate-browse-index",
                                                      daemon=True)
                self._index_thread.start()

    def wait_index(self, timeout: float | None = None) -> TextIndex | None:
        """The text index once its build is over (started here if it was not; None: no index,
        :attr:`index_note` says why), waiting at most ``timeout`` seconds (None: as long as it takes;
        then None if it is not done)."""
        self.start_index()
        self._index_done.wait(timeout)
        return self.index

    def _build_index(self, max_bytes: int) -> None:
        try:
            if max_bytes <= 0:
                self.index_note = "none: turned off (index_max_bytes 0)"
                return
            size = text_bytes(self.files)
            if size > max_bytes:
                self.index_note = f"none: the run's text is {size / 1e6:,.0f} MB, over the limit of {max_bytes / 1e6:,.0f} MB"
                return
            free = available_memory()
            if free is not None and size * INDEX_OVERHEAD > free / 2:  # the build holds about INDEX_OVERHEAD × the text at its peak
                self.index_note = (f"none: the run's text is {size / 1e6:,.0f} MB and this machine has {free / 1e6:,.0f} MB free "
                                   f"(an index needs about {INDEX_OVERHEAD:g}× the text, and at most half of what is free)")
                return
            t0 = time.perf_counter()
            self.index = TextIndex(self.files)
            self.index_note = f"{self.index.nbytes / 1e6:,.0f} MB, built in {time.perf_counter() - t0:.1f} s"
        except Exception as exc:  # noqa: BLE001 — searches read the files instead
            self.index_note = f"none: the build failed ({type(exc).__name__}: {exc})"
        finally:
            self._index_done.set()

    # -- the API ------------------------------------------------------------------------------------

    def meta(self) -> dict:
        s = self.files.summary
        return {"flow": s.get("flow") or str(self.files.out), "out_dir": str(self.files.out), "n_rows": self.n_rows,
                "outcomes": self.outcomes, "reasons": self.reasons, "sources": self.sources, "scores": self.scores,
                "kept_columns": self.kept, "sort_keys": [*ROW_KEYS, *self.scores], "page_size": PAGE_SIZE}

    def rows(self, params: Mapping[str, list[str]]) -> dict:
        """One page of rows (see the module docstring for the parameters). Raises :class:`BrowseError`."""
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise BrowseError(f"unknown parameter {unknown[0]}; the parameters: {', '.join(PARAMS)}")
        cond = pl.lit(True)
        for name, known in (("outcome", list(self.outcomes)), ("reason", list(self.reasons)), ("source", list(self.sources))):
            values = [v for v in params.get(name, []) if v != ""]
            for v in values:
                if v not in known:
                    what = {"outcome": "outcomes", "reason": "reasons in this run", "source": "sources in this run"}[name]
                    raise BrowseError(f"{name} {v}: no such {name}{'' if name == 'outcome' else ' in this run'}; "
                                      f"{did_you_mean(v, known)}{what}: {listing(known)}")
            if values:
                cond &= pl.col(name).is_in(values)
        need_scores = False
        score = self._one(params, "score")
        lo, hi = self._number(params, "min"), self._number(params, "max")
        if score:
            key = self._score(score, "score")
            if lo is not None:
                cond &= pl.col(key) >= lo
            if hi is not None:
                cond &= pl.col(key) <= hi
            need_scores = lo is not None or hi is not None
        elif lo is not None or hi is not None:
            raise BrowseError("min/max: give the score they apply to (score=NAME)")
        sort = self._one(params, "sort") or "row"
        sort = sort if sort in ROW_KEYS else self._score(sort, "sort")
        order = self._one(params, "order") or "asc"
        if order not in ("asc", "desc"):
            raise BrowseError(f"order {order}: asc or desc")
        need_scores |= sort not in ROW_KEYS
        q = self._one(params, "q", strip=False)  # " the " finds the word
        if q is not None and len(q) > MAX_QUERY:
            raise BrowseError(f"q: at most {MAX_QUERY} characters")
        frame = run_rows(self.files, text=False, scores=need_scores)
        if q:
            frame = frame.filter(pl.col("row").is_in(self.search(q).implode()))
        matching = frame.filter(cond)
        total = int(matching.select(pl.len()).collect().item())
        pages = max(1, -(-total // PAGE_SIZE))
        page_arg = self._one(params, "page") or "1"
        if page_arg == "last":
            page = pages
        else:
            try:
                page = int(page_arg)
            except ValueError:
                raise BrowseError(f"page {page_arg}: a whole number from 1, or last") from None
            if page < 1:
                raise BrowseError(f"page {page_arg}: pages count from 1")
            page = min(page, pages)
        desc = order == "desc"
        if sort == "row":
            ordered = matching.sort("row", descending=desc)
        else:
            ordered = matching.sort([sort, "row"], descending=[desc, False], nulls_last=True)
        wanted = ordered.select("row").slice((page - 1) * PAGE_SIZE, PAGE_SIZE).collect().get_column("row").to_list()
        answer = {"total": total, "page": page, "pages": pages, "page_size": PAGE_SIZE, "n_rows": self.n_rows, "sort": sort,
                  "order": order, "rows": self._page(wanted)}
        self.start_index()  # after the first page: it is not slowed by the build
        return answer

    # -- helpers ------------------------------------------------------------------------------------

    @staticmethod
    def _one(params: Mapping[str, list[str]], name: str, strip: bool = True) -> str | None:
        """The one value of ``name`` (None when absent or blank); ``strip``: without surrounding spaces."""
        values = params.get(name) or []
        if len(values) > 1:
            raise BrowseError(f"{name}: give it once")
        if not values or values[0].strip() == "":
            return None
        return values[0].strip() if strip else values[0]

    def _number(self, params: Mapping[str, list[str]], name: str) -> float | None:
        v = self._one(params, name)
        if v is None:
            return None
        try:
            x = float(v)
        except ValueError:
            raise BrowseError(f"{name} {v}: not a number") from None
        if math.isnan(x):
            raise BrowseError(f"{name} {v}: not a number")
        return x

    def _score(self, name: str, param: str) -> str:
        """A score's full name from its full or short name (``response_tokens`` when one scorer has it)."""
        if name in self.scores:
            return name
        short = [s for s in self.scores if s.split(".", 1)[1] == name]
        if len(short) == 1:
            return short[0]
        if len(short) > 1:
            raise BrowseError(f"{param} {name}: more than one scorer has it; give one of {', '.join(short)}")
        keys = list(ROW_KEYS) if param == "sort" else []
        raise BrowseError(f"{param} {name}: no such score; {did_you_mean(name, self.scores + [s.split('.', 1)[1] for s in self.scores])}"
                          f"scores in this run: {listing(self.scores)}{' (or row, rank)' if keys else ''}")

    def search(self, q: str) -> pl.Series:
        """The rows (sorted row numbers) any of whose messages holds ``q`` in any case, or whose raw text
        does (a quarantined row); an exact duplicate by its first copy's text. From the text index (waiting
        for its build) or, without one, the files; kept for the last :data:`SEARCH_CACHE` searches."""
        if q == "":
            raise BrowseError("q: give the text to search for")
        with self._lock:
            if q in self._searches:
                self._searches.move_to_end(q)
                return self._searches[q]
        index = self.wait_index()
        rows = index.search(q) if index is not None else scan_search(self.files, q)
        with self._lock:
            self._searches[q] = rows
            while len(self._searches) > SEARCH_CACHE:
                self._searches.popitem(last=False)
        return rows

    def _page(self, wanted: list[int]) -> list[dict]:
        """The rows ``wanted`` (in that order) as JSON objects, with text, scores and parents."""
        if not wanted:
            return []
        lazy = run_rows(self.files, text=False)
        got = with_text(lazy.filter(pl.col("row").is_in(wanted)).collect(), self.files)
        by_row = {r["row"]: r for r in got.iter_rows(named=True)}
        parent_rows = sorted({p for r in by_row.values() for p in (r.get("parent_rows") or [])})
        parents: dict[int, dict] = {}
        if parent_rows:
            pf = with_text(lazy.filter(pl.col("row").is_in(parent_rows)).collect(), self.files)
            parents = {r["row"]: r for r in pf.iter_rows(named=True)}
        out = []
        for n in wanted:
            r = by_row.get(n)
            if r is None:
                continue
            item = self._row(r)
            if r.get("parent_rows"):
                item["parents"] = [self._parent(parents[p]) for p in r["parent_rows"] if p in parents]
            out.append(_jsonable(item))
        return out

    def _row(self, r: dict) -> dict:
        fields = ("row", "kind", "sample_id", "source", "source_index", "source_line", "source_file", "task", "outcome", "stage", "reason",
                  "detail", "rank", "origin", "parent_rows", "messages", "raw")
        item = {k: r.get(k) for k in fields}
        item["parent_ids"] = r.get("parents")
        item["scores"] = {s: r.get(s) for s in self.scores}
        item["status"] = {s.rsplit(".", 1)[0]: r.get(s) for s in self.statuses}
        item["columns"] = {c: (r.get(c) if isinstance(r.get(c), (str, int, float, bool, type(None))) else str(r.get(c))) for c in self.kept}
        return item

    @staticmethod
    def _parent(r: dict) -> dict:
        return {k: r.get(k) for k in ("row", "kind", "source", "outcome", "reason", "rank", "messages", "raw")}


# -- the text search --------------------------------------------------------------------------------


def holds(text: pl.Expr, q: str) -> pl.Expr:
    """Whether ``text`` (a String expression) holds ``q`` in any case (True/False; null for a null text):
    a case-insensitive regex of ``q`` escaped, so Unicode simple case folding (``CAFÉ`` finds ``café``;
    ``k`` also finds the Kelvin sign and ``s`` the long s ``ſ``). The fastest exact way measured, over
    the 2M messages of a 1M-row run in memory: this regex 0.15 s of CPU, Aho–Corasick
    (``str.contains_any([q], ascii_case_insensitive=True)``, which folds ASCII letters only) 0.42 s,
    lower-casing the text then a literal match 0.75 s."""
    return text.str.contains("(?i)" + re.escape(q))


def text_bytes(files: RunFiles) -> int:
    """The run's searchable text in bytes, uncompressed, as its Parquet files count it (their footers
    only): the messages of the input and derived record sets, the quarantined rows' raw text."""
    import pyarrow.parquet as pq

    def searched(path: str, raw: bool) -> bool:
        return path == "raw" if raw else path.startswith("messages.") and path.endswith(".content")

    total = 0
    for path, raw in [*((p, False) for p in [*files.input_shards, *files.derived_shards]), *((p, True) for p, _ in files.quarantine)]:
        meta = pq.ParquetFile(str(path)).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            total += sum(c.total_uncompressed_size for c in map(group.column, range(group.num_columns)) if searched(c.path_in_schema, raw))
    return total


def _contents(paths: list) -> pl.LazyFrame:
    """(row, text): one frame row per message of the records in ``paths`` (nulls and empty texts left out)."""
    text = pl.col("messages").list.eval(pl.element().struct.field("content")).alias("text")
    return pl.scan_parquet([str(p) for p in paths]).select("row", text).explode("text").filter(pl.col("text").str.len_bytes() > 0)


class TextIndex:
    """The run's searchable text in memory, read once from its files: ``own`` (row: Int64, text: String),
    one frame row per message of a derived row and per quarantined row's raw text (their own rows);
    ``inputs`` (key, text), one per message of the input record set, keyed by its record's row; ``rows``
    (key, row): the ledger's input rows of each record (its row and its exact duplicates', by sample_id).
    Sizes at 1M alpaca-sized rows: 2M messages, 0.9 GB; ``rows`` 16 MB."""

    def __init__(self, files: RunFiles) -> None:
        parts = []
        if files.derived_shards:
            parts.append(_contents(files.derived_shards))
        for path, base_row in files.quarantine:
            parts.append(pl.scan_parquet(str(path)).select((pl.col("local_row") + base_row).alias("row"), pl.col("raw").alias("text")))
        empty = pl.DataFrame(schema={"row": pl.Int64, "text": pl.String})
        self.own = (pl.concat([p.select(pl.col("row").cast(pl.Int64), "text") for p in parts]).filter(pl.col("text").str.len_bytes() > 0)
                    .collect() if parts else empty)
        if files.input_shards:
            self.inputs = _contents(files.input_shards).select(pl.col("row").cast(pl.Int64).alias("key"), "text").collect()
            ledger = run_rows(files, text=False, scores=False).filter(pl.col("kind") == "input").select("row", "sample_id")
            records = pl.scan_parquet([str(p) for p in files.input_shards]).select("sample_id", pl.col("row").cast(pl.Int64).alias("key"))
            self.rows = ledger.join(records, on="sample_id", how="inner").select("key", pl.col("row").cast(pl.Int64)).collect()
        else:
            self.inputs = empty.rename({"row": "key"})
            self.rows = pl.DataFrame(schema={"key": pl.Int64, "row": pl.Int64})

    @property
    def nbytes(self) -> int:
        """Its size in memory (bytes, Polars' estimate)."""
        return self.own.estimated_size() + self.inputs.estimated_size() + self.rows.estimated_size()

    def search(self, q: str) -> pl.Series:
        """The rows (sorted, unique row numbers) whose text holds ``q`` in any case (:func:`holds`)."""
        hit = holds(pl.col("text"), q)
        keys = self.inputs.lazy().filter(hit).select("key").unique()
        found = [self.rows.lazy().join(keys, on="key", how="semi").select("row"), self.own.lazy().filter(hit).select("row")]
        return pl.concat(found).unique().sort("row").collect().get_column("row")


def scan_search(files: RunFiles, q: str) -> pl.Series:
    """:meth:`TextIndex.search` from the files (no index held): reads every row's text."""
    found = pl.col("messages").list.eval(holds(pl.element().struct.field("content"), q)).list.any()
    parts = []
    if files.input_shards:
        ids = pl.scan_parquet([str(p) for p in files.input_shards]).select("sample_id", "messages").filter(found).select("sample_id")
        ledger = run_rows(files, text=False, scores=False).filter(pl.col("kind") == "input").select("row", "sample_id")
        parts.append(ledger.join(ids, on="sample_id", how="semi").select("row"))  # exact duplicates share their first copy's text
    if files.derived_shards:
        parts.append(pl.scan_parquet([str(p) for p in files.derived_shards]).select("row", "messages").filter(found).select("row"))
    for path, base_row in files.quarantine:
        parts.append(pl.scan_parquet(str(path)).filter(holds(pl.col("raw"), q))
                     .select((pl.col("local_row") + base_row).cast(pl.Int64).alias("row")))
    return (pl.concat([p.select(pl.col("row").cast(pl.Int64)) for p in parts]).unique().sort("row").collect().get_column("row")
            if parts else pl.Series("row", [], dtype=pl.Int64))


# -- the server -------------------------------------------------------------------------------------


def _handler(browser: Browser, page: bytes, csp: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "curate-browse"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the terminal shows the URL only
            pass

        def _send(self, status: int, body: bytes, kind: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8"), "application/json; charset=utf-8")

        def _local_host(self) -> bool:
            """Only requests addressed to this server by a loopback name (no DNS-rebinding page on another
            host name can read the API)."""
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
            return host in ("127.0.0.1", "localhost", "::1")

        def do_GET(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            if not self._local_host():
                return self._json(HTTPStatus.FORBIDDEN, {"error": "curate browse answers requests to 127.0.0.1 or localhost only"})
            try:
                if url.path in ("/", "/index.html"):
                    return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", {"Content-Security-Policy": csp})
                if url.path == "/api/meta":
                    return self._json(HTTPStatus.OK, browser.meta())
                if url.path == "/api/rows":
                    return self._json(HTTPStatus.OK, browser.rows(parse_qs(url.query, keep_blank_values=True)))
                if url.path == "/favicon.ico":
                    return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}; the API: /api/meta, /api/rows"})
            except BrowseError as exc:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            except Exception as exc:  # noqa: BLE001 — the page shows it; the server keeps serving
                return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})

        do_HEAD = do_GET

    return Handler


class BrowseServer(ThreadingHTTPServer):
    """The server :func:`serve_browser` starts (serving in a daemon thread): ``url``, ``browser`` (the
    queries), ``shutdown()`` stops it and ``close()`` also frees the port."""

    daemon_threads = True
    allow_reuse_address = False
    browser: Browser
    url: str
    thread: threading.Thread

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def serve_browser(out_dir: str | os.PathLike, port: int = 0, open_browser: bool = False) -> BrowseServer:
    """Serve the rows of the run in ``out_dir`` (a run's output folder, or its flow file) on
    ``http://127.0.0.1:<port>/`` (``port`` 0: a free one), in a daemon thread, and return the server
    (``server.url``; ``server.close()`` stops it). Raises :class:`~curate.view.rows.NotARun` for a
    folder without a finished run and :class:`PortInUse` when the port is taken."""
    from curate.view.browse_page import page_and_csp

    browser = Browser(out_dir)
    page, csp = page_and_csp()
    try:
        server = BrowseServer((HOST, port), _handler(browser, page, csp))
    except OSError as exc:
        raise PortInUse(f"--port {port}: cannot listen on {HOST}:{port} ({exc.strerror or exc}); give another port, "
                        "or leave --port out for a free one") from None
    server.browser = browser
    server.url = f"http://{HOST}:{server.server_address[1]}/"
    server.thread = threading.Thread(target=server.serve_forever, name="curate-browse", daemon=True)
    server.thread.start()
    if open_browser:
        webbrowser.open(server.url)
    return server


def browse(out_dir: str | os.PathLike, port: int = 0, open_browser: bool = False, say: Callable[[str], None] = print) -> None:
    """``curate browse``: serve the run's rows and block until Ctrl-C (then stop the server)."""
    server = serve_browser(out_dir, port, open_browser)
    b = server.browser
    say(f"{b.meta()['flow']}: {b.n_rows:,} rows at {server.url}  (127.0.0.1 only; Ctrl-C stops)")
    try:
        while server.thread.is_alive():
            server.thread.join(0.5)  # with a timeout: Ctrl-C is seen between waits
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
