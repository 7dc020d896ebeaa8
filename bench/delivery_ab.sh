#!/usr/bin/env bash
# A/B of AsyncLLM's hand-over of a step's outputs once the next step is launched
# (SLUICE_DELIVER_AFTER_LAUNCH=1, the default on CUDA) against at once (=0), through
# `sluice serve` on a random FP8 Mixtral-8x7B of LAYERS layers (default 8: a short device
# run; the loop's share of a step is larger than at 32), then the engine alone:
#   bash bench/delivery_ab.sh $OUT        (repo root on the GPU host, wheels in .whl: bench/gpu_wheels.sh)
set -u
OUT=${1:?OUT dir}; LAYERS=${LAYERS:-8}
export PYTHONUNBUFFERED=1
CKPT=/tmp/mixtral-fp8-$LAYERS
log() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/run_log.txt"; }
. bench/gpu_site.sh
export TRITON_CACHE_DIR=/tmp/kc-ab/triton
log "commit $(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null), $LAYERS layers"
[ -f $CKPT/config.json ] || python3 bench/make_random_fp8_mixtral.py $CKPT --layers $LAYERS > /dev/null
log "checkpoint ready"
REPO=$PWD
mkdir -p /tmp/gwab && cd /tmp/gwab
cat > sluice.toml <<TOML
[backends.ab]
plugin = "local"
[backends.ab.options]
model = "$CKPT"
served_model_name = "mixtral-ab"
dtype = "fp8"
max_num_seqs = 64
compile_cache_dir = "/tmp/kc-ab"
[backends.ab.pool]
min_workers = 0
max_workers = 1
idle_timeout_s = 600
max_concurrency = 128
queue_size = 256
TOML
export SLUICE_CONFIG=/tmp/gwab/sluice.toml SLUICE_DATABASE_URL=sqlite+aiosqlite:////tmp/gwab/sluice.db
S="python3 -m sluice.gateway.cli"
$S migrate > /dev/null 2>&1
$S tenants create ab --rpm 1000000 --tpm 1000000000 > /dev/null 2>&1
KEY=$($S keys create --tenant ab --json 2>>"$OUT/run_log.txt" | python3 -c 'import json,sys;print(json.load(sys.stdin)["key"])')
# VARIANTS: "deliver:switch" pairs, e.g. "1:0.005 1:0.0005 0:0.005": the hand-over mode
# and the interpreter's GIL switch interval (sys.setswitchinterval, default 0.005 s), set
# through a sitecustomize on PYTHONPATH for that serve only
SITE=/tmp/gwab/swi && mkdir -p $SITE
printf 'import os, sys\nif os.environ.get("SWI"):\n    sys.setswitchinterval(float(os.environ["SWI"]))\n' > $SITE/sitecustomize.py
n=0
for v in ${VARIANTS:-${MODES:-1 0}}; do
  mode=${v%%:*}; swi=$([ "$v" != "${v#*:}" ] && echo "${v#*:}" || echo ""); n=$((n+1)); tag="$n-$mode${swi:+-$swi}"
  SWI=$swi PYTHONPATH=$SITE:$PYTHONPATH SLUICE_DELIVER_AFTER_LAUNCH=$mode $S serve --port 8401 > "$OUT/serve_$tag.txt" 2>&1 &
  SPID=$!
  for _ in $(seq 120); do python3 -c "import urllib.request as u;u.urlopen('http://127.0.0.1:8401/healthz')" 2>/dev/null && break; sleep 0.25; done
  timeout 90 python3 $REPO/bench/e2e_client.py http://127.0.0.1:8401 "$KEY" mixtral-ab "$OUT/e2e_$tag.json" \
    --no-sleep --settle ${SETTLE_S:-4} --phases ${PHASES:-c1,c64} > /dev/null 2>>"$OUT/run_log.txt"
  log "$tag after_launch=$mode switch=${swi:-default}: $(python3 -c "import json;r=json.load(open('$OUT/e2e_$tag.json'));print({p:(round(r[p]['chunk_gap_p50_ms'],3),round(r[p]['chunk_gap_p90_ms'],3)) for p in ('c1','c64') if p in r and 'chunk_gap_p50_ms' in r[p]})")"
  kill $SPID; wait $SPID 2>/dev/null
done
cd "$REPO"
[ "${ENGINE:-1}" = 0 ] && { log done; exit 0; }
timeout 60 python3 -m bench.throughput --model $CKPT --dtype fp8 --batch-sizes 1,64 --prompt-len 32 --decode-len 256 \
  --json > "$OUT/engine.json" 2>>"$OUT/run_log.txt"
log "engine alone: $(python3 -c "import json;r=json.load(open('$OUT/engine.json'))['results'];print([(x['batch_size'],round(1e3*x['batch_size']/x['decode_tok_s'],3)) for x in r])") ms a step"
log done
