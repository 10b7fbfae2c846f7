#!/usr/bin/env bash
# Do our exports load in LLaMA-Factory's and axolotl's OWN loaders? (trainers.md §6 "CI smoke tests")
#
#   bash bench/trainer_loaders.sh
#
# 1. Makes throwaway venvs (never the project's .venv) when absent: $LF_VENV with llamafactory,
#    $AX_VENV with axolotl (torch pinned to the local CPU wheel). A tool that does not install is
#    skipped with the reason (the tail of pip's error) printed. ~3 min and ~5-7 GB each.
# 2. Runs a small flow (every sample source: alpaca, code CSV, tool-call sharegpt, multi-turn,
#    prompt/completion Parquet; heuristic score; threshold select) exporting all four layouts as JSONL
#    and Parquet. FLOW=flows/select.yaml uses the default flow instead (scores with SmolLM2, ~2 min).
# 3. bench/trainer_loaders/lf_check.py: LLaMA-Factory's get_train_args + load_tokenizer +
#    get_template_and_fix_tokenizer + get_dataset(stage=sft) on every dataset_info.json entry.
#    bench/trainer_loaders/ax_check.py: `axolotl preprocess` on the axolotl_datasets.yaml block.
#    Both compare the converted/prepared row count with the manifest's and check the label masks.
#
# Prints PASS / FAIL / SKIP per tool; exits 1 when a tool that ran drops, misreads or fails on rows.
# Environment: WORK (default /tmp/trainer_loaders), LF_VENV (/tmp/lf), AX_VENV (/tmp/ax),
# LF_VERSION (0.9.5), AX_VERSION (0.19.0: the newest for Python 3.11; 0.20+ need 3.12), TORCH (2.13.0),
# LF_TEMPLATE (smollm2), INSTALL_TIMEOUT (1500 s per tool), PYTHON (python3), FLOW.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/bench/trainer_loaders"
WORK="${WORK:-/tmp/trainer_loaders}"
LF_VENV="${LF_VENV:-/tmp/lf}"
AX_VENV="${AX_VENV:-/tmp/ax}"
LF_VERSION="${LF_VERSION:-0.9.5}"
AX_VERSION="${AX_VERSION:-0.19.0}"
TORCH="${TORCH:-2.13.0}"
LF_TEMPLATE="${LF_TEMPLATE:-smollm2}"
INSTALL_TIMEOUT="${INSTALL_TIMEOUT:-1500}"
PYTHON="${PYTHON:-python3}"
CURATE_PY="$ROOT/.venv/bin/python"
mkdir -p "$WORK"

say() { printf '%s\n' "$*"; }

# ensure_tool VENV PIP_SPEC IMPORT NAME [TORCH_SPEC...] -> 0 when importable (installing it if needed);
# the reason in $WORK/<name>.why
ensure_tool() {
    local venv="$1" spec="$2" module="$3" name="$4" log="$WORK/$4-install.log"
    shift 4
    local torch_spec=("$@")
    rm -f "$WORK/$name.why"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import $module" >/dev/null 2>&1; then
        return 0
    fi
    say "[$name] installing $spec into $venv (log: $log)"
    # a venv this script made (marker file) and whose import fails is made anew; any other is reused
    if [ -f "$venv/.trainer_loaders" ]; then rm -rf "$venv"; fi
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv" >"$log" 2>&1 || { echo "python -m venv $venv failed" >"$WORK/$name.why"; return 1; }
        touch "$venv/.trainer_loaders"
    fi
    if ! timeout "$INSTALL_TIMEOUT" "$venv/bin/pip" install "$spec" "${torch_spec[@]}" >>"$log" 2>&1; then
        { echo "pip install $spec ${torch_spec[*]} failed; last errors (full log: $log):"
          grep -v "^WARNING: Location" "$log" | grep -iE "error|conflict|requires|failed|no matching" | tail -8; } >"$WORK/$name.why"
        return 1
    fi
    if ! "$venv/bin/python" -c "import $module" >>"$log" 2>&1; then
        { echo "installed but 'import $module' fails:"; tail -5 "$log"; } >"$WORK/$name.why"
        return 1
    fi
}

versions() {  # VENV DIST... -> "dist==version ..."
    local venv="$1"; shift
    "$venv/bin/python" - "$@" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
out = []
for d in sys.argv[1:]:
    try:
        out.append(f"{d}=={version(d)}")
    except PackageNotFoundError:
        out.append(f"{d}: absent")
print(" ".join(out))
EOF
}

# ---------------------------------------------------------------- 1. the tools
# axolotl: torch pinned to the local CPU wheel (axolotl wants torch<=2.13.0; pinning keeps pip from
# swapping in a CUDA build). LLaMA-Factory: torch left to pip (it takes PyPI's torch 2.14.1 + torchvision
# 0.29.1, which run on CPU): pinned to 2.13.0+cpu, pip pairs it with torchvision 0.28.0 whose ops do not
# load ("operator torchvision::nms does not exist") and transformers' PreTrainedModel import fails.
LF_OK=0; AX_OK=0
ensure_tool "$LF_VENV" "llamafactory==$LF_VERSION" llamafactory.data llamafactory && LF_OK=1
ensure_tool "$AX_VENV" "axolotl==$AX_VERSION" axolotl.cli.main axolotl "torch==$TORCH" && AX_OK=1

# ---------------------------------------------------------------- 2. the export
EXPORT="$WORK/out/export"
rm -rf "$WORK/out"
if [ -n "${FLOW:-}" ]; then
    FLOW_PATH="$FLOW"; case "$FLOW_PATH" in /*) ;; *) FLOW_PATH="$ROOT/$FLOW_PATH" ;; esac
else
    FLOW_PATH="$WORK/flow.yaml"
    cat >"$FLOW_PATH" <<EOF
name: loaders
base_dir: $ROOT
output_dir: $WORK/out
store_dir: $WORK/store
seed: 0
inputs:
  - {path: data/sample/alpaca_gpt4_en.json, name: alpaca_gpt4_en, limit: 50}
  - {path: data/sample/cherry_alpaca.jsonl, name: cherry_alpaca, limit: 40}
  - {path: data/sample/code_alpaca.csv, name: code_alpaca, task: code, limit: 30}
  - {path: data/sample/glaive_toolcall.json, format: sharegpt, name: glaive_toolcall}
  - {path: data/sample/sharegpt_dialogstudio.json, name: sharegpt}
  - {path: data/sample/t0_tasks.parquet, name: t0, task_field: task, limit: 30}
score:
  - method: heuristic
select:
  - {method: threshold, score: heuristic.degenerate, max: 0}
  - {method: threshold, score: heuristic.response_tokens, min: 3}
export:
  layouts: [messages, prompt_completion, alpaca, sharegpt]
  file_types: [jsonl, parquet]
  max_length: 2048
report: {plots: false}
runtime: {torch_threads: 2, progress: false}
EOF
fi
say "[export] curate run $FLOW_PATH -> $EXPORT"
if ! (cd "$ROOT" && .venv/bin/curate run "$FLOW_PATH" --no-prefect --quiet --set "output_dir=$WORK/out" --set "store_dir=$WORK/store") >"$WORK/export.log" 2>&1; then
    say "[export] FAIL: curate run failed"; tail -20 "$WORK/export.log"; exit 1
fi
"$CURATE_PY" - "$EXPORT/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print("[export] " + ", ".join(f"{f['path']}={f['n_rows']}" + (f" (+{len(f['skipped'])} skipped: no form)" if f["skipped"] else "")
                              for f in m["files"]) + f"; max_length={m['max_length']}")
EOF
read -r TOK_DIR MODEL_DIR < <(cd "$ROOT" && "$CURATE_PY" -c "
from curate.models import resolve_model
print(resolve_model('smollm2-135m-instruct', weights=False).location, resolve_model('smollm2-135m-instruct').location)")
if [ -z "${MODEL_DIR:-}" ]; then say "[export] FAIL: could not resolve the SmolLM2 tokenizer/model dirs"; exit 1; fi

# ---------------------------------------------------------------- 3. the checks
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
STATUS=0
LF_LINE="SKIP"; AX_LINE="SKIP"
if [ "$LF_OK" = 1 ]; then
    say "[llamafactory] $(versions "$LF_VENV" llamafactory transformers datasets torch); template=$LF_TEMPLATE"
    HF_DATASETS_CACHE="$WORK/lf_cache" "$LF_VENV/bin/python" "$HERE/lf_check.py" "$EXPORT" "$TOK_DIR" --template "$LF_TEMPLATE" \
        --json "$WORK/llamafactory.json" >"$WORK/llamafactory.log" 2>&1
    rc=$?
    grep '^\[llamafactory\]' "$WORK/llamafactory.log"
    if [ $rc = 0 ]; then LF_LINE="PASS"; else LF_LINE="FAIL"; STATUS=1; grep -q '^\[llamafactory\]' "$WORK/llamafactory.log" || tail -20 "$WORK/llamafactory.log"; fi
else
    say "[llamafactory] SKIP: not installable here:"; sed 's/^/    /' "$WORK/llamafactory.why"
fi
if [ "$AX_OK" = 1 ]; then
    say "[axolotl] $(versions "$AX_VENV" axolotl transformers datasets torch)"
    rm -rf "$WORK/ax"
    "$AX_VENV/bin/python" "$HERE/ax_check.py" "$EXPORT" "$MODEL_DIR" --work "$WORK/ax" --json "$WORK/axolotl.json" >"$WORK/axolotl.log" 2>&1
    rc=$?
    grep '^\[axolotl\]' "$WORK/axolotl.log"
    if [ $rc = 0 ]; then AX_LINE="PASS"; else AX_LINE="FAIL"; STATUS=1; grep -q '^\[axolotl\]' "$WORK/axolotl.log" || tail -20 "$WORK/axolotl.log"; fi
else
    say "[axolotl] SKIP: not installable here:"; sed 's/^/    /' "$WORK/axolotl.why"
fi

say ""
say "LLaMA-Factory: $LF_LINE   axolotl: $AX_LINE   (details: $WORK/{llamafactory,axolotl}.json, logs beside them)"
exit $STATUS
