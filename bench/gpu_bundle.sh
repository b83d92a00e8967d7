#!/usr/bin/env bash
# What bench/gpu_check.py needs on an offline GPU machine, in .gpu/ (git-ignored), under 64 MiB:
#   .gpu/wheels/  the Python packages its image lacks (Ray trimmed of jars/, rllib/, serve/,
#                 dashboard/client and tests; DeepSpeed; rouge-score; their needs), for --python-version
#   .gpu/data/    the benchmark, one MMLU subject and the refusals (a data root)
#   .gpu/tokenizer/  the reference target's tokenizer (the check's random model uses it)
# Prints each part's size and the total. Needs the package registry (run it here, not there).
#   bash bench/gpu_bundle.sh [--python-version 3.12] [--data ../shared/data]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=3.12
DATA=../shared/data
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PY=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    *) echo "gpu_bundle.sh: unknown option $1 (expected --python-version or --data)" >&2; exit 2 ;;
  esac
done
OUT=.gpu
rm -rf "$OUT" && mkdir -p "$OUT/wheels" "$OUT/data/mmlu/dev" "$OUT/data/mmlu/test"
pyver=$(python -c "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')")
version() { python -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
# The versions this checkout is tested with; binary wheels for the GPU machine's Python.
BINARY=(ray=="$(version ray)" pydantic-core=="$(version pydantic-core)" rpds-py=="$(version rpds-py)")
PURE=(pydantic=="$(version pydantic)" annotated-types typing-inspection hjson jsonschema jsonschema-specifications
      referencing rouge-score nltk defusedxml)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp "${platforms[@]}" \
  -d "$OUT/wheels" "${BINARY[@]}" "${PURE[@]}"
# DeepSpeed ships a source distribution only: a pure-Python wheel of it (its ops compile on first use).
python -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/wheels" deepspeed=="$(version deepspeed)"
# rouge-score may come as a source distribution too.
ls "$OUT"/wheels/rouge_score-*.whl >/dev/null 2>&1 || \
  python -m pip wheel -q --no-deps -w "$OUT/wheels" rouge-score
# Ray without what a trial never imports; the wheel's RECORD is dropped with them (pip installs without it).
python - "$OUT/wheels" <<'EOF'
import sys, zipfile
from pathlib import Path
DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/tests/", "ray/dashboard/client/",
        "ray/core/src/ray/raylet/raylet.debug", "ray/_private/runtime_env/agent/thirdparty_files/")
for wheel in Path(sys.argv[1]).glob("ray-*.whl"):
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if info.filename.startswith(DROP) or info.filename.endswith(".dist-info/RECORD"):
                continue
            dst.writestr(info, src.read(info.filename))
    before = wheel.stat().st_size
    trimmed.replace(wheel)
    print(f"ray wheel trimmed: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB")
EOF
cp -r "$DATA/semeval25" "$OUT/data/" && cp -r "$DATA/refusals" "$OUT/data/"
for split in dev test; do cp "$DATA/mmlu/$split/abstract_algebra_$split.csv" "$OUT/data/mmlu/$split/"; done
python - "$OUT/tokenizer" "$DATA" <<'EOF'
import sys
from unlearn_search.data import resolve_data
from unlearn_search.models import PRESETS, build_target, load_tokenizer
load_tokenizer(build_target(resolve_data(sys.argv[2]), PRESETS["tiny"], progress=False)).save_pretrained(sys.argv[1])
EOF
du -sh "$OUT"/wheels "$OUT"/data "$OUT"/tokenizer
total=$(du -sb "$OUT" | cut -f1)
echo "bundle .gpu: $((total / 1048576)) MiB of the 64 MiB a device call carries (with the repo's own files)"
[ "$pyver" = "$PY" ] || echo "(wheels for Python $PY; this machine runs $pyver)"
