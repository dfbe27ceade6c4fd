#!/usr/bin/env bash
# The bundled reference model (mellum-tiny): data preparation on a CPU, training on a GPU (or CPU), packing.
#
#   scripts/reference_model.sh prepare            # CPU: corpus → split → tokenizer → FIM/repo shards (build/reference)
#   scripts/reference_model.sh train              # GPU: mellum-tiny recipe, bf16, 7.5-minute budget → $OUT/mellum-tiny.tar.*
#   scripts/reference_model.sh train-cpu          # CPU fallback (mellum-tiny-cpu recipe) → mellum/assets/mellum-tiny
#   scripts/reference_model.sh unpack DIR         # reassemble DIR/mellum-tiny.tar.part-* into mellum/assets/mellum-tiny
#
# Settings (environment): PYTHON (default .venv/bin/python if present, else python3), REF (build/reference),
# MINUTES (training-loop budget, default 7.5: with start-up, compilation and export the command takes ~9), DEVICE (cuda), VOCAB (16384), TRAIN_MB (text for training, 80),
# EXTRA (more arguments for the trainer, e.g. "--set micro_batch=16"). See docs/training.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
REF=${REF:-build/reference}
MINUTES=${MINUTES:-7.5}
DEVICE=${DEVICE:-cuda}
VOCAB=${VOCAB:-16384}
TRAIN_MB=${TRAIN_MB:-80}
EXTRA=${EXTRA:-}
STDLIB=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

prepare() {
  mkdir -p "$REF"
  if [[ ! -f "$REF/corpus/report.json" ]]; then
    # Permissively licensed code only: the standard library (PSF) and installed distributions whose license
    # metadata is on the allowlist (mellum.data.license); filters, secret redaction, exact + near dedup.
    "$PYTHON" -m mellum.cli data build --source "stdlib=$STDLIB" --source "site=$SITE" --out "$REF/corpus" --force
  fi
  # Held-out files (1% by a hash of project/path) and a training subset of TRAIN_MB of text: the shards must stay
  # small enough to travel to the GPU machine (~45 MB as uint16).
  "$PYTHON" - "$REF" "$TRAIN_MB" <<'PY'
import io, json, sys, zlib
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
  "$PYTHON" -m mellum.cli tokenizer train --corpus "$REF/corpus-train" --vocab-size "$VOCAB" --max-train-mb 40 \
    --out "$REF/tokenizer" --force
  # FIM on half of the documents, SPM and PSM in equal shares (Mellum prompt format), 10% repository-level samples.
  for split in train heldout; do
    "$PYTHON" -m mellum.cli data shards --corpus "$REF/corpus-$split" --tokenizer "$REF/tokenizer" \
      --out "$REF/shards/$split" --force --fim-rate 0.5 --spm-rate 0.5 --repo-samples 0.1 \
      --repo-context-chars 4000 --seed 0
  done
  data_report
  du -sh "$REF/shards/train" "$REF/shards/heldout" "$REF/tokenizer"
}

data_report() {
  "$PYTHON" - "$REF" <<'PY'
import json, sys
from pathlib import Path
ref = Path(sys.argv[1])
lines = ["# mellum-tiny: data report", ""]
for split in ("train", "heldout"):
    meta = json.loads((ref / "shards" / split / "meta.json").read_text())
    lines.append(f"- {split} shards: {meta['num_docs']:,} documents, {meta['num_tokens']:,} tokens "
                 f"(vocabulary {meta['vocab_size']:,}, {meta['dtype']})")
comp = ref / "tokenizer" / "compression.json"
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
  "$PYTHON" -m mellum.train.pretrain --recipe mellum-tiny --device "$DEVICE" --max-minutes "$MINUTES" \
    --out "$run" --data "$REF/shards/train" --eval-data "$REF/shards/heldout" --tokenizer "$REF/tokenizer" \
    --export "$run/mellum-tiny" --no-bar $EXTRA | tee "$run.summary"
  # The held-out loss curve and the last step's throughput, for the report.
  "$PYTHON" -c "import json, sys; rs = [json.loads(l) for l in open(sys.argv[1])]; \
print('eval_loss by step:', [(r['step'], round(r['eval_loss'], 3)) for r in rs if 'eval_loss' in r]); \
last = [r for r in rs if 'tokens_per_s' in r][-1]; print('last step:', last)" "$run/metrics.jsonl"
  pack "$run/mellum-tiny" "$out"
}

train_cpu() {
  local run=${RUN:-$REF/run-cpu}
  rm -rf "$run"
  # shellcheck disable=SC2086
  "$PYTHON" -m mellum.train.pretrain --recipe mellum-tiny-cpu --device cpu --max-minutes "$MINUTES" \
    --out "$run" --data "$REF/shards/train" --eval-data "$REF/shards/heldout" --tokenizer "$REF/tokenizer" \
    --export "$run/mellum-tiny" $EXTRA
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

case "${1:-}" in
  prepare) prepare ;;
  data-report) data_report ;;
  train) train ;;
  train-cpu) train_cpu ;;
  pack) pack "$2" "${3:-${OUT:-$REF/out}}" ;;
  unpack) unpack "${2:?usage: $0 unpack DIR}" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
