#!/usr/bin/env bash
# The bundled reference model (mellum-tiny): data preparation on a CPU, training on a GPU (or CPU), packing.
#
#   scripts/reference_model.sh prepare            # CPU: corpus → split → tokenizer → FIM/repo shards (build/reference)
#   scripts/reference_model.sh train              # GPU: mellum-tiny recipe, bf16, time budget → $OUT/mellum-tiny.tar.*
#   scripts/reference_model.sh gpu                # GPU, one command on a bare machine: corpus of its own Python →
#                                                 #   split → shards (carried tokenizer) → baseline → train → $OUT
#   scripts/reference_model.sh wheels             # here: download the wheels `gpu` needs and the GPU machine lacks
#   scripts/reference_model.sh train-cpu          # CPU fallback (mellum-tiny-cpu recipe) → mellum/assets/mellum-tiny
#   scripts/reference_model.sh mtp-cpu            # an MTP head for the bundled model, the model frozen (CPU, MINUTES,
#                                                 #   default 30) → $REF/run-mtp/mellum-tiny-mtp (not installed)
#   scripts/reference_model.sh data-report        # $REF/data_report.md from the prepared shards and tokenizer
#   scripts/reference_model.sh pack MODEL [OUT]   # MODEL (with the data report) → OUT/mellum-tiny.tar.part-* + sums
#   scripts/reference_model.sh unpack DIR         # reassemble DIR/mellum-tiny.tar.part-* into mellum/assets/mellum-tiny
#
# Settings (environment): PYTHON (default .venv/bin/python if present, else python3), REF (build/reference),
# TOKENIZER ($REF/tokenizer), MINUTES (training-loop budget: 7.5 for train, at most 6 for gpu), DEVICE (cuda),
# VOCAB (16384), TRAIN_MB (text for training: 80 for prepare, 400 for gpu), SOURCES (`data build` sources, [LABEL=]PATH;
# default "stdlib=<stdlib> site=<site-packages>"), WORKERS (data build processes, default all CPUs), PATIENCE
# (evaluations without a lower held-out loss before training stops; default never), WHEELS ($REF/wheels),
# DEADLINE_S (gpu: seconds by which the command should end, default 560; training gets what is left),
# BASELINE (gpu: 1 evaluates the bundled model on the new held-out shards first), EXTRA (more trainer arguments,
# e.g. "--set micro_batch=16"). See docs/training.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
REF=${REF:-build/reference}
TOKENIZER=${TOKENIZER:-$REF/tokenizer}
DEVICE=${DEVICE:-cuda}
VOCAB=${VOCAB:-16384}
WORKERS=${WORKERS:-$(nproc)}
PATIENCE=${PATIENCE:-}
WHEELS=${WHEELS:-$REF/wheels}
EXTRA=${EXTRA:-}
QUIET=""
STDLIB=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
SOURCES=${SOURCES:-stdlib=$STDLIB site=$SITE}
# The modules data build, shards and training import (module=distribution where the names differ), and the wheels
# `wheels` fetches for the GPU machine (CPython 3.12, x86-64): the ones its image lacks (it has xxhash and scipy).
PIPELINE_MODULES="torch numpy tokenizers safetensors tqdm zstandard xxhash scipy datasketch"
PIPELINE_MODULES+=" license_expression=license-expression boolean=boolean.py"
GPU_WHEELS="zstandard==0.25.0 datasketch==2.0.0 license-expression==30.4.4 boolean.py==5.0"

prepare() {
  mkdir -p "$REF"
  [[ -f "$REF/corpus/report.json" ]] || build_corpus
  split_corpus "${TRAIN_MB:-80}"
  "$PYTHON" -m mellum.cli tokenizer train --corpus "$REF/corpus-train" --vocab-size "$VOCAB" --max-train-mb 40 \
    --out "$TOKENIZER" --force
  make_shards
  data_report
  du -sh "$REF/shards/train" "$REF/shards/heldout" "$TOKENIZER"
}

build_corpus() {  # permissively licensed code only: the standard library (PSF) and installed distributions whose
  # license metadata is on the allowlist (mellum.data.license); filters, secret redaction, exact + near dedup.
  local args=() source
  for source in $SOURCES; do args+=(--source "$source"); done
  "$PYTHON" -m mellum.cli data build "${args[@]}" --out "$REF/corpus" --force --workers "$WORKERS" $QUIET
}

split_corpus() {  # split_corpus MB: 1% of files held out by a hash of project/path, and a training subset of MB of
  # text in a stable pseudo-random order of files (the hash) → $REF/corpus-train, $REF/corpus-heldout
  "$PYTHON" - "$REF" "$1" <<'PY'
import json, sys, zlib
from pathlib import Path
import zstandard
from mellum.data.corpus import read_corpus, read_report

ref, budget = Path(sys.argv[1]), float(sys.argv[2]) * 1e6
records = list(read_corpus(ref / "corpus"))
def key(r):  # a stable pseudo-random order of files
    return zlib.crc32(f"{r['project']}/{r['path']}".encode())
heldout = [r for r in records if key(r) % 100 == 0]
rest = sorted((r for r in records if key(r) % 100 != 0), key=key)
train, used = [], 0
for r in rest:
    if used + len(r["text"]) <= budget:
        train.append(r); used += len(r["text"])
print(f"{ref / 'corpus'}: {len(records)} files, {sum(len(r['text']) for r in records) / 1e6:.1f} MB of text; "
      f"{len(rest) - len(train)} files ({sum(len(r['text']) for r in rest) / 1e6 - used / 1e6:.1f} MB) left out "
      f"of the {budget / 1e6:.0f} MB training subset")
if not heldout or not train:
    sys.exit(f"error: {len(train)} training and {len(heldout)} held-out files: give more sources")
for name, part in (("corpus-train", train), ("corpus-heldout", heldout)):
    out = ref / name
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "files.jsonl.zst.tmp", "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as w:
        for r in part:
            w.write((json.dumps(r) + "\n").encode("utf-8"))
    (out / "files.jsonl.zst.tmp").rename(out / "files.jsonl.zst")
    report = read_report(ref / "corpus")  # the full corpus's governance report, with this subset's own counts
    report["subset_of"] = str(ref / "corpus")
    report["totals"]["files_kept"] = len(part)
    report["totals"]["bytes_kept"] = sum(len(r["text"].encode("utf-8")) for r in part)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"{out}: {len(part)} files, {sum(len(r['text']) for r in part) / 1e6:.1f} MB of text")
PY
}

make_shards() {  # FIM on half of the documents, SPM and PSM in equal shares (Mellum prompt format), 10% repository-
  # level samples; encoding runs on all CPUs (tokenizers' thread pool)
  local split
  for split in train heldout; do
    TOKENIZERS_PARALLELISM=true "$PYTHON" -m mellum.cli data shards --corpus "$REF/corpus-$split" \
      --tokenizer "$TOKENIZER" --out "$REF/shards/$split" --force --fim-rate 0.5 --spm-rate 0.5 --repo-samples 0.1 \
      --repo-context-chars 4000 --seed 0 $QUIET
  done
}

data_report() {
  "$PYTHON" - "$REF" "$TOKENIZER" <<'PY'
import json, sys
from pathlib import Path
ref, tokenizer = Path(sys.argv[1]), Path(sys.argv[2])
lines = ["# mellum-tiny: data report", ""]
for split in ("train", "heldout"):
    meta = json.loads((ref / "shards" / split / "meta.json").read_text())
    lines.append(f"- {split} shards: {meta['num_docs']:,} documents, {meta['num_tokens']:,} tokens "
                 f"(vocabulary {meta['vocab_size']:,}, {meta['dtype']})")
comp = tokenizer / "compression.json"
if comp.is_file():
    lines.append(f"- tokenizer compression: `{comp.read_text().strip()}`")
lines += ["", "Samples: FIM on 50% of files (SPM and PSM in equal shares, Mellum format), 10% repository-level "
          "samples (other files of the project as <filename> blocks, 4,000 characters), the rest plain. Held out: "
          "1% of files by a hash of project/path.", "", "## Corpus (mellum data build)", ""]
lines.append((ref / "corpus" / "report.md").read_text())
(ref / "data_report.md").write_text("\n".join(lines) + "\n")
print(f"{ref / 'data_report.md'} written")
PY
}

train() {
  local out=${OUT:-$REF/out}
  local run=${RUN:-$REF/run-gpu}
  rm -rf "$run"
  mkdir -p "$out"
  # shellcheck disable=SC2086
  "$PYTHON" -m mellum.train.pretrain --recipe mellum-tiny --device "$DEVICE" --max-minutes "${MINUTES:-7.5}" \
    --out "$run" --data "$REF/shards/train" --eval-data "$REF/shards/heldout" --tokenizer "$TOKENIZER" \
    --export "$run/mellum-tiny" --no-bar ${PATIENCE:+--patience "$PATIENCE"} $EXTRA | tee "$run.summary"
  # The held-out loss curve, the exported weights and the last step's throughput, for the report.
  "$PYTHON" - "$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rs = [json.loads(line) for line in open(run / "metrics.jsonl")]
print("eval_loss by step:", [(r["step"], round(r["eval_loss"], 3)) for r in rs if "eval_loss" in r])
s = json.loads((run / "summary.json").read_text())
print(f"exported: step {s['exported_step']} of {s['steps']}, held-out loss {s['exported_eval_loss']:.3f}"
      + (" (stopped early)" if s.get("stopped_early") else ""))
print("last step:", [r for r in rs if "tokens_per_s" in r][-1])
PY
  pack "$run/mellum-tiny" "$out"
}

baseline() {  # the bundled model's held-out loss on these shards (same batches as the run's evaluations)
  if ! cmp -s "$TOKENIZER/tokenizer.json" mellum/assets/mellum-tiny/tokenizer.json; then
    echo "baseline skipped: the bundled model uses another tokenizer"
    return
  fi
  # shellcheck disable=SC2086
  "$PYTHON" - --recipe mellum-tiny --device "$DEVICE" --eval-data "$REF/shards/heldout" $EXTRA <<'PY'
import argparse, sys, tempfile
from mellum.train.distributed import init_distributed
from mellum.train.pretrain import Trainer, config_from_args, configure
parser = argparse.ArgumentParser()
configure(parser)
args = parser.parse_args(sys.argv[1:])
args.overrides += ["init_from='mellum/assets/mellum-tiny'", "compile=False"]
with tempfile.TemporaryDirectory() as out:
    loss = Trainer(config_from_args(args), out, init_distributed(args.device), bar=False).evaluate()
print(f"baseline: the bundled mellum/assets/mellum-tiny scores held-out loss {loss:.3f} on these shards")
PY
}

gpu() {  # one command on a bare GPU machine (carry $TOKENIZER and $WHEELS): it builds its own data, then trains
  local left
  mkdir -p "$REF"
  export PYTHONUNBUFFERED=1
  QUIET=--quiet
  MINUTES=${MINUTES:-6}
  echo "gpu: $(nproc) CPUs, $PYTHON ($("$PYTHON" -V 2>&1)), sources: $SOURCES"
  echo "expected (minutes, 16 CPUs): packages <0.1, corpus ~0.5-1, split ~0.2, shards ~1-1.5, baseline ~0.3," \
    "training up to $MINUTES + ~1 (start-up, compilation, evaluations, export, packing): the training budget" \
    "shrinks so that the command ends by ${DEADLINE_S:-560} s"
  [[ -f "$TOKENIZER/tokenizer.json" ]] || { echo "error: no tokenizer at $TOKENIZER (carry it)" >&2; exit 3; }
  stage packages preflight
  stage corpus build_corpus
  stage split split_corpus "${TRAIN_MB:-400}"
  stage shards make_shards
  data_report
  if [[ ${BASELINE:-1} == 1 ]]; then stage baseline baseline; fi
  left=$(( ${DEADLINE_S:-560} - SECONDS - 75 ))  # 75 s: start-up, compilation, evaluations, export and packing
  if (( left < 30 )); then
    echo "error: ${SECONDS} s spent on data, too little left to train (DEADLINE_S ${DEADLINE_S:-560})" >&2
    exit 4
  fi
  MINUTES=$("$PYTHON" -c "print(f'{min($MINUTES, $left / 60):.2f}')")
  echo "training budget: $MINUTES minutes"
  stage train train
  echo "timings (s): ${TIMINGS[*]}; total ${SECONDS}"
}

TIMINGS=()
stage() {  # stage NAME COMMAND...: run it and record its wall-clock seconds
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  TIMINGS+=("$name $((SECONDS - start))")
  echo "== $name: $((SECONDS - start)) s"
}

missing_packages() {  # the distributions of PIPELINE_MODULES that $PYTHON cannot import
  "$PYTHON" -c 'import importlib.util, sys
print(" ".join(m.split("=")[-1] for m in sys.argv[1:] if importlib.util.find_spec(m.split("=")[0]) is None))' \
    $PIPELINE_MODULES
}

preflight() {  # no network on the GPU machine: install only the carried wheels, say clearly what is missing
  local missing
  missing=$(missing_packages)
  if [[ -n $missing && -d $WHEELS ]]; then
    echo "missing: $missing; installing the carried wheels in $WHEELS"
    PYTHON=$PYTHON scripts/wheels.sh install "$REF/site" "$WHEELS"/*.whl
    PYTHONPATH="$PYTHONPATH:$(cd "$REF/site" && pwd)"
    missing=$(missing_packages)
  fi
  if [[ -n $missing ]]; then
    echo "error: $PYTHON cannot import: $missing (\`scripts/reference_model.sh wheels\` fetches $GPU_WHEELS" \
      "into $WHEELS here; carry it)" >&2
    exit 3
  fi
}

wheels() {  # the wheels of GPU_WHEELS for CPython 3.12 on x86-64 Linux → $WHEELS (about 6 MB)
  # shellcheck disable=SC2086
  PYTHON=$PYTHON scripts/wheels.sh fetch "$WHEELS" $GPU_WHEELS
}

train_cpu() {
  local run=${RUN:-$REF/run-cpu}
  rm -rf "$run"
  # shellcheck disable=SC2086
  "$PYTHON" -m mellum.train.pretrain --recipe mellum-tiny-cpu --device cpu --max-minutes "${MINUTES:-7.5}" \
    --out "$run" --data "$REF/shards/train" --eval-data "$REF/shards/heldout" --tokenizer "$TOKENIZER" \
    --export "$run/mellum-tiny" ${PATIENCE:+--patience "$PATIENCE"} $EXTRA
  install_model "$run/mellum-tiny"
}

pack() {  # pack MODEL_DIR OUT: one tar split into ≤15 MiB parts + SHA256SUMS (the GPU machine returns ≤ 8 files)
  local model=$1 out=$2
  cp "$REF/data_report.md" "$model/data_report.md"
  rm -f "$out"/mellum-tiny.tar.part-*
  tar -cf - -C "$(dirname "$model")" "$(basename "$model")" | split -b 15m -d - "$out/mellum-tiny.tar.part-"
  (cd "$out" && sha256sum mellum-tiny.tar.part-* > mellum-tiny.SHA256SUMS)
  ls -la "$out"
}

unpack() {  # unpack DIR: verify and reassemble the parts into mellum/assets/mellum-tiny
  local dir=$1 tmp
  (cd "$dir" && sha256sum -c mellum-tiny.SHA256SUMS)
  tmp=$(mktemp -d)
  cat "$dir"/mellum-tiny.tar.part-* | tar -xf - -C "$tmp"
  install_model "$tmp/mellum-tiny"
  rm -rf "$tmp"
}

install_model() {  # replace mellum/assets/mellum-tiny in place (new directory first, then swap)
  local model=$1 dest=mellum/assets/mellum-tiny
  [[ -f "$model/data_report.md" ]] || cp "$REF/data_report.md" "$model/data_report.md"
  rm -rf "$dest.new" && cp -r "$model" "$dest.new"
  rm -rf "$dest.old" && { [[ -d $dest ]] && mv "$dest" "$dest.old" || true; }
  mv "$dest.new" "$dest" && rm -rf "$dest.old"
  "$PYTHON" -c "from mellum.checkpoint import load_pretrained; m = load_pretrained('$dest'); \
print('$dest:', sum(p.numel() for p in m.parameters()) / 1e6, 'M parameters')"
  du -sh "$dest"
}

mtp_cpu() {  # the bundled model plus a trained MTP head (recipe mellum-tiny-mtp): measures MTP speculative decoding
  local run=${RUN:-$REF/run-mtp}
  rm -rf "$run"
  # shellcheck disable=SC2086
  "$PYTHON" -m mellum.train.pretrain --recipe mellum-tiny-mtp --device cpu --max-minutes "${MINUTES:-30}" \
    --out "$run" --data "$REF/shards/train" --eval-data "$REF/shards/heldout" --tokenizer mellum/assets/mellum-tiny \
    --export "$run/mellum-tiny-mtp" ${PATIENCE:+--patience "$PATIENCE"} $EXTRA
}

case "${1:-}" in
  prepare) prepare ;;
  data-report) data_report ;;
  train) train ;;
  gpu) mkdir -p "${OUT:?set OUT to the directory for the parts}" && gpu 2>&1 | tee "$OUT/reference_gpu.log" ;;
  wheels) wheels ;;
  train-cpu) train_cpu ;;
  mtp-cpu) mtp_cpu ;;
  pack) pack "$2" "${3:-${OUT:-$REF/out}}" ;;
  unpack) unpack "${2:?usage: $0 unpack DIR}" ;;
  *) sed -n '2,23p' "$0"; exit 2 ;;
esac
