#!/usr/bin/env bash
# The project's GPU-only checks in one command on a bare GPU machine (no network): each stage has its own time
# budget inside one global deadline, may fail without stopping the others, and writes its own log to $OUT.
#
#   OUT=DIR scripts/gpu_checks.sh             # GPU: setup → test_cuda → train → engine_4b → engine_mellum2,
#                                             #   $OUT/<stage>.log + $OUT/summary.md, all done by DEADLINE_S
#   scripts/gpu_checks.sh wheels              # here (network): the wheels the GPU machine lacks → $WHEELS (~7 MB)
#   DEVICE=cpu OUT=DIR scripts/gpu_checks.sh  # the plumbing on a CPU: a tiny version of every stage (~1 minute)
#
# Stages: setup (environment; carried pytest / torchao wheels installed offline into $SITE when missing; torchao
# candidates tried in order until one imports and runs a float8 step), test_cuda (tests/engine/test_cuda.py: CUDA
# graphs vs the uncached reference), train (benchmarks/train_throughput.py, Mellum-4B's shape with 16 of its 30
# layers at 8192 tokens, 1 and 8 micro-batches per optimizer step, bf16 and, with torchao, fp8), engine_4b and engine_mellum2 (benchmarks/engine.py, reduced settings);
# engine_4b_compiled only when STAGES names it (its own call: STAGES="setup engine_4b_compiled"): the compiled-step
# tests of tests/engine/test_cuda.py, then decode and keystroke rows of Mellum-4B with compile=True.
# Settings (environment): PYTHON (.venv/bin/python if present, else python3), DEVICE (cuda), DEADLINE_S (555: every
# stage is stopped by then, the summary follows), WHEELS (build/gpu-checks/wheels), SITE (build/gpu-checks/site),
# STAGES (a subset to run, e.g. "setup train"; default all but engine_4b_compiled).
# See docs/engine.md ("Next GPU session") and docs/training.md.
set -uo pipefail
if [[ -n ${OUT:-} ]]; then OUT=$(realpath -m "$OUT"); fi
cd "$(dirname "$0")/.."
SELF=$PWD/scripts/gpu_checks.sh
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export DEVICE=${DEVICE:-cuda}
export DEADLINE_S=${DEADLINE_S:-555}
export WHEELS=${WHEELS:-build/gpu-checks/wheels}
SITE=$(realpath -m "${SITE:-build/gpu-checks/site}")  # absolute: it goes on PYTHONPATH
export SITE
export WORK=${WORK:-build/gpu-checks/run}  # scratch: stage status, engine tables, the environment setup found
# Wheels for the GPU image, which has pytest (and its dependencies) but not torchao: pytest travels as a fallback.
# torchao 0.17.0 is the first release built for torch 2.11 (the image's; ABI-stable from then on); 0.18.0 is tried
# second. Float8 training is torchao's Python API over torch._scaled_mm, so either should do.
PYTEST_WHEELS="pytest==8.3.5 iniconfig==2.1.0 pluggy==1.6.0 packaging==25.0"
TORCHAO_VERSIONS="0.17.0 0.18.0"
RESERVE_S=20  # kept after the last stage for the summary; `timeout -k 10` may add 10 s to a stage's budget

# ---- stages (each runs as `gpu_checks.sh _stage NAME` under timeout, output to $OUT/NAME.log) ------------------
stage_setup() {
  echo "python: $PYTHON ($("$PYTHON" -V 2>&1)); device: $DEVICE; $(env -u OMP_NUM_THREADS nproc) CPUs; deadline ${DEADLINE_S} s"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available",
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
  local paths="" dir version ok=0
  : > "$WORK/env.sh"
  if "$PYTHON" -c 'import pytest' 2>/dev/null; then
    echo "pytest: $("$PYTHON" -c 'import pytest; print(pytest.__version__)') (installed)"
  elif compgen -G "$WHEELS/pytest/*.whl" >/dev/null; then
    PYTHON=$PYTHON scripts/wheels.sh install "$SITE/pytest" "$WHEELS"/pytest/*.whl && paths="$SITE/pytest"
    echo "export PYTHONPATH=\"$paths:\$PYTHONPATH\"" > "$WORK/env.sh"
    PYTHONPATH="$paths:$PYTHONPATH" "$PYTHON" -c 'import pytest; print("pytest:", pytest.__version__, "(carried)")'
  else
    echo "pytest: missing and no wheels in $WHEELS/pytest (run scripts/gpu_checks.sh wheels here and carry $WHEELS)"
  fi
  if torchao_works ""; then
    ok=1
    echo "torchao: $("$PYTHON" -c 'import torchao; print(torchao.__version__)') (installed)"
  else
    for version in $TORCHAO_VERSIONS; do
      dir=$WHEELS/torchao-$version
      if ! compgen -G "$dir/*.whl" >/dev/null; then
        echo "torchao $version: no wheel in $dir"
        continue
      fi
      PYTHON=$PYTHON scripts/wheels.sh install "$SITE/torchao-$version" "$dir"/*.whl || continue
      if torchao_works "$SITE/torchao-$version"; then
        paths="$SITE/torchao-$version${paths:+:$paths}"
        echo "export PYTHONPATH=\"$paths:\$PYTHONPATH\"" > "$WORK/env.sh"
        echo "torchao: $version (carried)"
        ok=1
        break
      fi
      echo "torchao $version: does not work with this torch (above); trying the next candidate"
    done
  fi
  if (( ok )); then echo "export TORCHAO_OK=1" >> "$WORK/env.sh"; else echo "torchao: none works: fp8 skipped"; fi
  echo "env for the next stages:"; cat "$WORK/env.sh"
}

torchao_works() {  # torchao_works EXTRA_PATH: torchao's float8 training imports (and, on a GPU, runs a step)
  PYTHONPATH="${1:+$1:}$PYTHONPATH" "$PYTHON" - "$DEVICE" <<'PY'
import sys
import torch
from torchao.float8 import Float8LinearConfig, convert_to_float8_training
if sys.argv[1] == "cuda" and torch.cuda.is_available():
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256)).cuda()
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(torch.randn(64, 256, device="cuda")).float().square().mean()
    loss.backward()
    torch.cuda.synchronize()
    print("torchao float8 step ok:", type(model[0]).__name__, float(loss))
PY
}

stage_test_cuda() {  # the compiled step's tests run in engine_4b_compiled (each compiles for a minute or so)
  "$PYTHON" -m pytest tests/engine/test_cuda.py -q -p no:cacheprovider -k "not compiled"
}

stage_train() {
  if [[ $DEVICE == cuda ]]; then
    [[ -n ${TORCHAO_OK:-} ]] || echo "fp8 not measured: no working torchao (see setup.log)"
    # 16 of the 30 layers: with 8 micro-batches the whole model's gradients, fp32 weights and Muon momentum
    # (48 GB) and a second micro-batch's activations do not fit one 80 GB GPU (FSDP shards them over several).
    "$PYTHON" benchmarks/train_throughput.py --device cuda --model mellum-4b --layers 16 --accum 1,8 ${TORCHAO_OK:+--fp8}
  else
    "$PYTHON" benchmarks/train_throughput.py --device cpu --model mellum-tiny-cpu --steps 2 --seq-len 64 --batch 2 \
      --accum 1,2
  fi
}

stage_train_fp8() {  # CPU only: --fp8 must stop at once with the trainer's message
  "$PYTHON" benchmarks/train_throughput.py --device cpu --model mellum-tiny-cpu --steps 1 --seq-len 64 --batch 2 --fp8
}

stage_engine_4b() {
  if [[ $DEVICE == cuda ]]; then
    "$PYTHON" benchmarks/engine.py --device cuda --shape mellum-4b --typist-requests 3 --out "$WORK/engine_4b.md"
  else
    "$PYTHON" benchmarks/engine.py --shape mellum-4b-cpu --sections decode --decode-tokens 8 --no-int8 --skip-hf \
      --repeats 1 --threads 1 --out "$WORK/engine_4b.md"
  fi
}

stage_engine_4b_compiled() {  # opt-in (STAGES): graphs of the decode step under torch.compile (compile=True)
  if [[ $DEVICE == cuda ]]; then
    "$PYTHON" -m pytest tests/engine/test_cuda.py -q -p no:cacheprovider -k compiled || echo "compiled-step tests failed"
    "$PYTHON" benchmarks/engine.py --device cuda --shape mellum-4b --compile --sections decode,keystroke \
      --keystrokes 10 --cold-keystrokes 3 --out "$WORK/engine_4b_compiled.md"
  else
    "$PYTHON" benchmarks/engine.py --shape mellum-4b-cpu --sections decode --decode-tokens 8 --no-int8 --skip-hf \
      --repeats 1 --threads 1 --compile --out "$WORK/engine_4b_compiled.md"
  fi
}

stage_engine_mellum2() {  # the slower shape: no concurrency rows, fewer keystrokes
  if [[ $DEVICE == cuda ]]; then
    "$PYTHON" benchmarks/engine.py --device cuda --shape mellum2-12b-a2.5b \
      --sections decode,fim,keystroke,speculative --keystrokes 10 --cold-keystrokes 3 --out "$WORK/engine_mellum2.md"
  else
    "$PYTHON" benchmarks/engine.py --shape mellum2-cpu --sections decode --decode-tokens 8 --no-int8 --skip-hf \
      --repeats 1 --threads 1 --out "$WORK/engine_mellum2.md"
  fi
}

# ---- driver -----------------------------------------------------------------------------------------------------
run_stage() {  # run_stage NAME MAX_S [MIN_S [NOTE]]: within min(MAX_S, time left before the deadline), else skipped
  local name=$1 max=$2 min=${3:-15} note=${4:-} left budget start rc status
  [[ -z ${STAGES:-} || " $STAGES " == *" $name "* ]] || return 0
  left=$(( DEADLINE_S - SECONDS - RESERVE_S - 10 ))
  budget=$(( max < left ? max : left ))
  if (( budget < min )); then
    echo "== $name: skipped, ${left} s left before the deadline (needs ${min} s)"
    printf '%s\tskipped\t0\t%s\tonly %s s left before the deadline\n' "$name" "$max" "$left" >> "$WORK/status.tsv"
    summary >/dev/null
    return
  fi
  echo "== $name (budget ${budget} s, at ${SECONDS} s)"
  start=$SECONDS
  timeout -k 10 "$budget" "$SELF" _stage "$name" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out"; echo "== $name: stopped at its budget of ${budget} s" >> "$OUT/$name.log" ;;
    *) status="failed (rc $rc)" ;;
  esac
  tail -n 6 "$OUT/$name.log" | sed 's/^/   | /'
  echo "== $name: $status, $((SECONDS - start)) s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$budget" "$note" >> "$WORK/status.tsv"
  summary >/dev/null  # after every stage: whatever stops the command later, a summary is already there
}

summary() {  # $OUT/summary.md from the stage table, the logs and the engine tables
  "$PYTHON" - "$OUT" "$WORK" "$DEVICE" "$SECONDS" "$DEADLINE_S" <<'PY'
import json, re, sys, time
from pathlib import Path
out, work, device, elapsed, deadline = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]

def log(name):
    p = out / f"{name}.log"
    return p.read_text(errors="replace") if p.is_file() else ""

setup = log("setup")
env = [l for l in setup.splitlines() if l.startswith(("torch ", "pytest:", "torchao", "python:"))
       or ", " in l and "MiB" in l]
lines = [f"# GPU checks ({device}), {time.strftime('%Y-%m-%d %H:%M %Z')}", "",
         f"{elapsed} s of the {deadline} s deadline. " + "; ".join(env), "",
         "| stage | status | seconds | budget (s) | note |", "|---|---|---|---|---|"]
for row in (work / "status.tsv").read_text().splitlines() if (work / "status.tsv").is_file() else []:
    name, status, secs, budget, note = (row.split("\t") + [""] * 5)[:5]
    lines.append(f"| {name} | {status} | {secs} | {budget} | {note} |")

text = log("test_cuda")
if text:
    final = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
    failed = [l for l in text.splitlines() if l.startswith(("FAILED", "ERROR"))]
    lines += ["", "## tests/engine/test_cuda.py (CUDA graphs vs uncached greedy, fp32)", "",
              f"`{final[-1].strip('= ') if final else 'no pytest summary line (see test_cuda.log)'}`"]
    lines += [f"- {l}" for l in failed[:10]]

for name in ("train", "train_fp8"):
    text = log(name)
    if not text:
        continue
    rows = []
    for l in text.splitlines():
        if l.startswith("{"):
            try:
                rows.append(json.loads(l))
            except ValueError:
                pass
    head = [l for l in text.splitlines() if l.startswith(("device ", "error:", "fp8 not measured"))]
    lines += ["", f"## Training throughput ({name}: benchmarks/train_throughput.py; goal MFU ≥ 40% on the 4B shape)", ""]
    lines += [f"- {l}" for l in head]
    if rows:
        lines += ["", "| model | precision | seq × batch × accumulation | tokens/s | s per optimizer step: "
                  "forward/backward + optimizer | model TFLOP/s | MFU | MFU, causal attention at half |",
                  "|---|---|---|---|---|---|---|---|"]
        base = {}
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['precision']} | error: {r['error'][:200]} | | | | | |")
                continue
            note, key, accum = "", (r["model"], r.get("accum", 1)), r.get("accum", 1)
            if r["precision"] == "fp8" and key in base:
                note = f" ({r['tokens_per_s'] / base[key]:.2f}× bf16)"
            else:
                base[key] = r["tokens_per_s"]
            split = f"{r['fwd_bwd_s']} + {r['optimizer_s']}" if "fwd_bwd_s" in r else ""
            causal = f"{r['mfu_causal']:.1%}" if "mfu_causal" in r else ""
            lines.append(f"| {r['model']} | {r['precision']} | {r['seq_len']} × {r['batch']} × {accum} | "
                         f"{r['tokens_per_s']:,}{note} | {split} | {r['model_tflops']} | {r['mfu']:.1%} | {causal} |")

for name in ("engine_4b", "engine_mellum2", "engine_4b_compiled"):
    text, table = log(name), work / f"{name}.md"
    if not text:
        continue
    lines += ["", f"## {name} (benchmarks/engine.py)", ""]
    lines += [f"- {l[2:]}" for l in text.splitlines() if l.startswith("# ") and ("device:" in l or "bandwidth" in l)
              or re.match(r"# \w+ took", l)]
    if table.is_file():
        lines += ["", table.read_text().strip()]
    else:
        lines += ["", "No table (the shape did not finish); the log's last lines:", "", "```"]
        lines += text.splitlines()[-15:] + ["```"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
}

wheels() {  # pytest (+ dependencies) → $WHEELS/pytest; each torchao candidate → $WHEELS/torchao-VERSION
  local version
  # shellcheck disable=SC2086
  PYTHON=$PYTHON scripts/wheels.sh fetch "$WHEELS/pytest" $PYTEST_WHEELS
  for version in $TORCHAO_VERSIONS; do
    PYTHON=$PYTHON scripts/wheels.sh fetch "$WHEELS/torchao-$version" "torchao==$version"
  done
  du -sh "$WHEELS"
}

main() {
  mkdir -p "${OUT:?set OUT to the directory for the logs and summary.md}"
  rm -rf "$WORK" && mkdir -p "$WORK" "$SITE"
  echo "gpu_checks: device $DEVICE, deadline ${DEADLINE_S} s, logs in $OUT"
  if [[ $DEVICE == cpu ]]; then export OMP_NUM_THREADS=1; fi  # the CPU dry run stays light
  run_stage setup 90
  # shellcheck disable=SC1091
  source "$WORK/env.sh" 2>/dev/null || true
  if [[ $DEVICE == cuda ]]; then
    run_stage test_cuda 150
    run_stage train 240 60
    run_stage engine_4b 180 60
    run_stage engine_mellum2 200 60
    if [[ " ${STAGES:-} " == *" engine_4b_compiled "* ]]; then run_stage engine_4b_compiled 480 120; fi
  else
    run_stage test_cuda 60
    run_stage train 60
    run_stage train_fp8 30 15 "expected to fail on a CPU, with the trainer's message"
    run_stage engine_4b 60
    run_stage engine_mellum2 60
    if [[ " ${STAGES:-} " == *" engine_4b_compiled "* ]]; then run_stage engine_4b_compiled 150; fi
  fi
  echo "== summary ($OUT/summary.md), total ${SECONDS} s"
  summary
}

case "${1:-}" in
  _stage) "stage_$2" ;;
  wheels) wheels ;;
  "") main ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
