"""The page ``curate browse`` serves: one HTML file with its CSS and plain JavaScript inline (no build
step, nothing loaded from anywhere but the server's own API). Values from the data reach the page
only through ``textContent`` and ``value`` (never ``innerHTML``), and the Content-Security-Policy the
server sends with it allows this page's own script and style only (by their sha256), so even text
that looks like HTML (``<script>``) is shown as written and can run nothing.

It is kept as Python strings (not a ``.html`` file beside this module) so that it ships in the wheel
without package-data settings.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.3em;margin:.2em 0}.sub{color:#666;font-size:13px;margin-bottom:.8em}
form{display:flex;flex-wrap:wrap;gap:.5em 1em;align-items:end;background:#f6f6f6;border:1px solid #ddd;padding:.6em .8em;font-size:13px}
form label{display:flex;flex-direction:column;gap:2px;color:#555}
form input,form select{font:inherit;padding:2px 4px}input.num{width:6em}input#q{width:16em}
.bar{display:flex;gap:.6em;align-items:center;margin:.8em 0;font-size:14px}.bar input{width:4em}
#status{flex:1}#error{color:#b00020;white-space:pre-wrap}
article{border:1px solid #ddd;border-radius:4px;margin:.6em 0;padding:.4em .7em;font-size:14px}
article.derived{border-left:4px solid #6a5acd}
.head{font-weight:600}.dim{color:#666;font-size:12px}.detail{color:#444;font-size:13px}
.o-selected{color:#1b7f2a}.o-not_selected{color:#9a6b00}.o-filtered{color:#c05500}.o-quarantined{color:#b00020}
table.scores{border-collapse:collapse;font-size:12px;margin:.3em 0}
table.scores td,table.scores th{border:1px solid #ddd;padding:1px 6px;text-align:left}
table.scores th{background:#f3f3f3;font-weight:normal;color:#555}td.key{font-weight:700}
.msg{white-space:pre-wrap;word-break:break-word;margin:.25em 0;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px;
     background:#fafafa;border-left:3px solid #ddd;padding:2px 6px}
.msg.assistant{border-left-color:#3a8dde}.role{font-weight:700;color:#555}
button.expand{font-size:12px;margin:.2em 0}
.parents{margin:.4em 0 .2em 1em;padding-left:.6em;border-left:2px dashed #bbb}
"""

SCRIPT = r"""
'use strict';
var PREVIEW = 300, PREVIEW_LINES = 8, meta = null, seq = 0, timer = null;
var $ = function (id) { return document.getElementById(id); };
var FIELDS = ['outcome', 'reason', 'source', 'score', 'min', 'max', 'q', 'sort', 'order'];

function el(tag, cls) {  // an element; every further argument is a child: a string becomes a text node (never HTML)
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  for (var i = 2; i < arguments.length; i++) {
    var c = arguments[i];
    if (c === null || c === undefined) continue;
    e.appendChild(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return e;
}
function option(value, label) { var o = document.createElement('option'); o.value = value; o.textContent = label; return o; }
function num(v) {
  if (v === null || v === undefined) return '–';
  if (typeof v === 'string') return v;  // NaN, Infinity
  if (Number.isInteger(v)) return String(v);
  return String(Number(v.toPrecision(4)));
}
function cut(text, n) {  // at most n characters and PREVIEW_LINES lines, with … where it was cut
  var out = text.split('\n').slice(0, PREVIEW_LINES).join('\n');
  if (out.length > n) out = out.slice(0, n);
  return out === text ? text : out.replace(/\s+$/, '') + ' …';
}

function params(page) {
  var p = new URLSearchParams();
  FIELDS.forEach(function (f) { var v = $(f).value.trim(); if (v !== '') p.set(f, v); });
  if (p.get('sort') === 'row') p.delete('sort');
  if (p.get('order') === 'asc') p.delete('order');
  if (!p.get('score')) { p.delete('min'); p.delete('max'); }
  if (page > 1) p.set('page', String(page));
  return p;
}

function messagesBlock(row, full) {
  var box = el('div', 'text');
  if (!row.messages) {
    if (row.raw !== null && row.raw !== undefined)
      box.appendChild(el('div', 'msg', el('span', 'role', 'raw: '), full ? row.raw : cut(row.raw, PREVIEW * 2)));
    return box;
  }
  row.messages.forEach(function (m) {
    var content = m.content || '';
    if (m.tool_calls) content = (content ? content + '\n' : '') + '[tool_calls] ' + m.tool_calls;
    box.appendChild(el('div', 'msg ' + (m.role === 'assistant' ? 'assistant' : ''), el('span', 'role', m.role + ': '),
                       full ? content : cut(content, PREVIEW)));
  });
  return box;
}
function longText(row) {
  if (!row.messages) return cut(row.raw || '', PREVIEW * 2) !== (row.raw || '');
  return row.messages.some(function (m) {
    var c = m.content || '';
    return c.length + (m.tool_calls ? m.tool_calls.length + 14 : 0) > PREVIEW || cut(c, PREVIEW) !== c;
  });
}

function scoresTable(row, sortKey) {
  var names = meta.scores.filter(function (s) { return row.scores[s] !== null && row.scores[s] !== undefined; });
  if (!names.length) return null;
  var head = el('tr'), body = el('tr');
  names.forEach(function (s) {
    head.appendChild(el('th', null, s));
    body.appendChild(el('td', s === sortKey ? 'key' : null, num(row.scores[s])));
  });
  var t = el('table', 'scores', el('thead', null, head), el('tbody', null, body));
  var odd = Object.keys(row.status || {}).filter(function (k) { return row.status[k] && row.status[k] !== 'ok'; });
  if (!odd.length) return t;
  return el('div', null, t, el('div', 'dim', 'status: ' + odd.map(function (k) { return k + ' ' + row.status[k]; }).join(', ')));
}

function title(row, prefix) {
  var h = el('div', 'head', prefix + ' ' + row.row + ' · ', el('span', 'outcome o-' + row.outcome, row.outcome));
  if (row.reason) h.appendChild(el('span', 'reason', ' · ' + row.reason));
  if (row.rank !== null && row.rank !== undefined) h.appendChild(document.createTextNode(' · rank ' + row.rank));
  return h;
}

function rowBlock(row, sortKey) {
  var a = el('article', row.kind === 'derived' ? 'derived' : null);
  a.dataset.row = row.row;
  a.appendChild(title(row, row.kind === 'derived' ? 'derived row' : 'row'));
  var where = [row.source || '?'];
  if (row.source_file) where.push(row.source_file + (row.source_line !== null ? ':' + row.source_line : ''));
  if (row.task) where.push('task ' + row.task);
  if (row.sample_id) where.push('id ' + row.sample_id.slice(0, 12));
  where.push('stage ' + (row.stage || ''));
  a.appendChild(el('div', 'dim', where.join(' · ')));
  if (row.detail) a.appendChild(el('div', 'detail', row.detail));
  var own = Object.keys(row.columns || {}).filter(function (c) { return row.columns[c] !== null; });
  if (own.length) a.appendChild(el('div', 'dim', 'columns: ' + own.map(function (c) { return c + ' ' + row.columns[c]; }).join(' · ')));
  var s = scoresTable(row, sortKey);
  if (s) a.appendChild(s);
  var text = messagesBlock(row, false);
  a.appendChild(text);
  if (longText(row)) {
    var b = el('button', 'expand', 'show all');
    b.type = 'button';
    b.addEventListener('click', function () {
      var full = b.textContent === 'show all';
      var t = messagesBlock(row, full);
      a.replaceChild(t, text); text = t;
      b.textContent = full ? 'show less' : 'show all';
    });
    a.appendChild(b);
  }
  if (row.origin || (row.parent_rows && row.parent_rows.length)) {
    var p = el('div', 'parents',
               el('div', 'dim', 'origin ' + (row.origin || '–') + ' · parents: row ' + (row.parent_rows || []).join(', ')));
    (row.parents || []).forEach(function (par) {
      var d = el('div', 'parent', title(par, 'parent row'), el('div', 'dim', par.source || ''));
      d.appendChild(messagesBlock(par, false));
      p.appendChild(d);
    });
    a.appendChild(p);
  }
  return a;
}

function load(page) {
  var p = params(page || 1), mine = ++seq;
  history.replaceState(null, '', '#' + p.toString());
  $('status').textContent = 'loading …';
  $('error').textContent = '';
  fetch('/api/rows?' + p.toString()).then(function (r) {
    return r.json().then(function (d) { if (!r.ok) throw new Error(d.error || r.statusText); return d; });
  }).then(function (d) {
    if (mine !== seq) return;  // a later request was made: its answer wins
    var rows = $('rows');
    rows.replaceChildren();
    d.rows.forEach(function (r) { rows.appendChild(rowBlock(r, d.sort)); });
    var first = d.total ? (d.page - 1) * d.page_size + 1 : 0, last = Math.min(d.total, d.page * d.page_size);
    $('status').textContent = d.total.toLocaleString('en') + ' of ' + d.n_rows.toLocaleString('en') + ' rows match · showing ' +
      first + '–' + last + ' · page ' + d.page + ' of ' + d.pages;
    $('page').value = d.page; $('page').max = d.pages; $('pages').textContent = String(d.pages);
    $('prev').disabled = d.page <= 1; $('next').disabled = d.page >= d.pages;
    document.body.dataset.page = d.page; document.body.dataset.total = d.total;
    document.body.dataset.loaded = String(mine);
  }).catch(function (e) {
    if (mine !== seq) return;
    $('status').textContent = '';
    $('error').textContent = String(e.message || e);
    document.body.dataset.loaded = String(mine);
  });
}
function current() { return parseInt($('page').value, 10) || 1; }
function later() { clearTimeout(timer); timer = setTimeout(function () { load(1); }, 300); }

function start(m) {
  meta = m;
  $('flow').textContent = m.flow;
  $('sub').textContent = m.n_rows.toLocaleString('en') + ' rows · ' + Object.keys(m.outcomes).map(function (o) {
    return o + ' ' + m.outcomes[o].toLocaleString('en'); }).join(' · ') + ' · ' + m.out_dir;
  Object.keys(m.outcomes).forEach(function (o) { $('outcome').appendChild(option(o, o + ' (' + m.outcomes[o] + ')')); });
  Object.keys(m.reasons).forEach(function (o) { $('reason').appendChild(option(o, o + ' (' + m.reasons[o] + ')')); });
  Object.keys(m.sources).forEach(function (o) { $('source').appendChild(option(o, o + ' (' + m.sources[o] + ')')); });
  m.scores.forEach(function (s) { $('score').appendChild(option(s, s)); });
  m.sort_keys.forEach(function (s) { $('sort').appendChild(option(s, s)); });
  var saved = new URLSearchParams(location.hash.slice(1));
  FIELDS.forEach(function (f) { if (saved.has(f)) $(f).value = saved.get(f); });
  ['outcome', 'reason', 'source', 'score', 'sort', 'order'].forEach(function (f) {
    $(f).addEventListener('change', function () { load(1); });
  });
  ['min', 'max', 'q'].forEach(function (f) { $(f).addEventListener('input', later); });
  $('filters').addEventListener('submit', function (e) { e.preventDefault(); clearTimeout(timer); load(1); });
  $('prev').addEventListener('click', function () { load(current() - 1); });
  $('next').addEventListener('click', function () { load(current() + 1); });
  $('page').addEventListener('change', function () { load(current()); });
  load(parseInt(saved.get('page'), 10) || 1);
}

fetch('/api/meta').then(function (r) { return r.json(); }).then(start).catch(function (e) { $('error').textContent = String(e); });
"""

BODY = """<header><h1 id="flow">curate browse</h1><div class="sub" id="sub"></div></header>
<form id="filters" autocomplete="off">
<label>outcome<select id="outcome"><option value="">any</option></select></label>
<label>reason<select id="reason"><option value="">any</option></select></label>
<label>source<select id="source"><option value="">any</option></select></label>
<label>score<select id="score"><option value="">–</option></select></label>
<label>min<input id="min" class="num" type="number" step="any"></label>
<label>max<input id="max" class="num" type="number" step="any"></label>
<label>search prompt and response<input id="q" type="search" placeholder="text, any case"></label>
<label>sort by<select id="sort"></select></label>
<label>order<select id="order"><option value="asc">ascending</option><option value="desc">descending</option></select></label>
</form>
<div class="bar"><span id="status"></span>
<button id="prev" type="button">‹ prev</button>
<label>page <input id="page" type="number" min="1" value="1"></label> of <span id="pages">1</span>
<button id="next" type="button">next ›</button></div>
<div id="error"></div>
<main id="rows"></main>
<div class="bar"><span class="dim">50 rows a page · text shown as written · served on 127.0.0.1 only</span></div>"""


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def page_and_csp() -> tuple[bytes, str]:
    """The page (UTF-8) and the Content-Security-Policy to send with it: its own inline script and
    style only; requests to this server only."""
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>curate browse</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>\n'
            f"<body>\n{BODY}\n<script>{SCRIPT}</script>\n</body></html>\n")
    csp = (f"default-src 'none'; script-src {_sha(SCRIPT)}; style-src {_sha(STYLE)}; connect-src 'self'; img-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page.encode("utf-8"), csp
