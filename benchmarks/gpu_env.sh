# Sourced by the GPU check scripts: HH (the HH-RLHF file) and LOGS from the script's arguments, the
# wheels of a .whl/ folder installed for a machine without network, this checkout on PYTHONPATH.
#   . benchmarks/gpu_env.sh DEFAULT_LOGS "$@"
set -u
HH=${2:-preftune/recipes/data/hh-rlhf-harmless-test.jsonl.gz}
LOGS=${3:-${OUT:-$1}}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
