# Sourced by bench/gpu.sh and bench/gpu_train.sh (after `cd` to the repository): their shared set-up.
# Reads --tiny and --out FILE from the arguments into TINY (0/1) and OUT (default: the caller's OUT),
# sets PY (the venv's python unless given) and TMP (a scratch folder removed on exit).
PY=${PY:-.venv/bin/python}
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --out) OUT=$2; shift ;;
    *) echo "bench/$(basename "$0"): unknown option $1 (use --tiny, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
