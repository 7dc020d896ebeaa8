#!/usr/bin/env bash
# Issue 17's device run, in one call (repo root on the GPU host; OUT = results folder):
#   bash bench/transitions_gpu.sh $OUT
# Needs the gateway's wheels in .whl (bench/gpu_wheels.sh; carried). Writes the random FP8 Mixtral-8x7B (44 GB)
# to /tmp/mixtral-fp8, then, through `sluice serve` and HTTP as ../shared/bench/README.md:
# 1. fresh host: empty kernel cache, pool at zero -> e2e_client.py --no-sleep (cold first
#    token), then bench/transitions.py (first sleep, wake, requests during and 3 s into a sleep);
# 2. restart on the same host (page cache and kernel cache warm) -> the cold first token;
# 3. `sluice warmup` into a new empty kernel cache, then a start on it -> cold first token.
set -u
OUT=${1:?OUT dir}
export PYTHONUNBUFFERED=1 SLUICE_LOG_COMPILES=1  # each kernel compile in the serve logs
CKPT=/tmp/mixtral-fp8
log() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/run_log.txt"; }
. bench/gpu_site.sh
log "$(nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader)"
log "$(python3 -c 'import torch,triton;print("torch",torch.__version__,"triton",triton.__version__)')"
log "commit $(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null)"  # COMMIT: a `git archive` snapshot run from .snap/
t0=$(date +%s); [ -f $CKPT/config.json ] || python3 bench/make_random_fp8_mixtral.py $CKPT --layers 32 > /dev/null
log "checkpoint written in $(( $(date +%s) - t0 )) s"
REPO=$PWD
mkdir -p /tmp/gw && cd /tmp/gw
config() {  # kernel cache dir
  cat > /tmp/gw/sluice.toml <<TOML
[backends.mixtral]
plugin = "local"
[backends.mixtral.options]
model = "$CKPT"
served_model_name = "mixtral-fp8"
dtype = "fp8"
max_num_seqs = 64
max_num_batched_tokens = ${MBT:-4096}
compile_cache_dir = "$1"
${COMPILE_THREADS:+compile_threads = $COMPILE_THREADS}
[backends.mixtral.pool]
min_workers = 0
max_workers = 1
idle_timeout_s = ${IDLE_S:-8}
idle_action = "sleep"
max_concurrency = 128
queue_size = 256
queue_timeout_s = 300
TOML
}
export SLUICE_CONFIG=/tmp/gw/sluice.toml SLUICE_DATABASE_URL=sqlite+aiosqlite:////tmp/gw/sluice.db
S="python3 -m sluice.gateway.cli"
config /tmp/kc1
$S migrate >> "$OUT/run_log.txt" 2>&1
$S tenants create bench --rpm 1000000 --tpm 1000000000 >> "$OUT/run_log.txt" 2>&1
KEY=$($S keys create --tenant bench --json 2>>"$OUT/run_log.txt" | python3 -c 'import json,sys;print(json.load(sys.stdin)["key"])')
ADMIN=$($S admin-token --ttl 7200 2>>"$OUT/run_log.txt")
serve() {  # label; logs the process start -> /healthz time (the engine's imports are in it)
  local t=$(date +%s.%N)
  $S serve --port 8400 > "$OUT/serve_$1.txt" 2>&1 &
  SPID=$!
  for _ in $(seq 120); do
    python3 -c "import urllib.request as u;u.urlopen('http://127.0.0.1:8400/healthz')" 2>/dev/null && {
      log "gateway $1 up in $(python3 -c "print(round($(date +%s.%N)-$t,2))") s"; return 0; }
    sleep 0.25
  done
  log "gateway $1 did not come up"; tail -n 20 "$OUT/serve_$1.txt"; return 1
}
stop() {
  local t=$(date +%s.%N); kill $SPID; wait $SPID 2>/dev/null
  log "gateway stopped in $(python3 -c "print(round($(date +%s.%N)-$t,2))") s"
}
E2E="timeout 200 python3 $REPO/bench/e2e_client.py http://127.0.0.1:8400 $KEY mixtral-fp8"
if serve fresh; then
  if [ -n "${SHORT:-}" ]; then  # the cold first token only, no batches (a short device run)
    timeout 60 python3 $REPO/bench/transitions.py http://127.0.0.1:8400 $KEY mixtral-fp8 $ADMIN "$OUT/fresh.json" \
      --first-token-only 2>>"$OUT/run_log.txt" | tee -a "$OUT/run_log.txt"
  else
    $E2E "$OUT/e2e_fresh.json" --no-sleep > /dev/null 2>>"$OUT/run_log.txt"
    log "fresh: $(python3 -c "import json;r=json.load(open('$OUT/e2e_fresh.json'));print('first token',r['cold_first_token_s'],'c1',r['c1'].get('chunk_gap_p50_ms'),'c64',r['c64'].get('chunk_gap_p50_ms'),r['c64'].get('chunk_gap_p90_ms'),'c1_json',r['c1_json'].get('chunk_gap_p50_ms'),'c64_json',r['c64_json'].get('chunk_gap_p50_ms'),'burst req/s',r['burst_1k_50x64'].get('req_s'))")"
  fi
  timeout 150 python3 $REPO/bench/transitions.py http://127.0.0.1:8400 $KEY mixtral-fp8 $ADMIN "$OUT/transitions.json" \
    2>>"$OUT/run_log.txt" | grep -v mem_trace | tee -a "$OUT/run_log.txt"
  stop
fi
grep -E "ready in|engine ready|twin built|kernels compiled by|awake in|asleep in|parked|CUDA graphs captured|ERROR|Traceback" "$OUT/serve_fresh.txt" | tail -n 20 | tee -a "$OUT/run_log.txt"
if serve restart; then  # the cold first token only (the batches were measured on the fresh start)
  timeout 60 python3 $REPO/bench/transitions.py http://127.0.0.1:8400 $KEY mixtral-fp8 $ADMIN "$OUT/restart.json" \
    --first-token-only 2>>"$OUT/run_log.txt" | tee -a "$OUT/run_log.txt"
  stop
fi
grep -E "ready in|engine ready|twin built|kernels compiled by|ERROR|Traceback" "$OUT/serve_restart.txt" | tail -n 5 | tee -a "$OUT/run_log.txt"
if [ -n "${FRESH2:-}" ]; then  # a second fresh start: another empty kernel cache, the cold first token
  COMPILE_THREADS=${COMPILE_THREADS2:-${COMPILE_THREADS:-}} config /tmp/kc3  # COMPILE_THREADS2=0: a control without precompile
  if serve fresh2; then
    timeout 60 python3 $REPO/bench/transitions.py http://127.0.0.1:8400 $KEY mixtral-fp8 $ADMIN "$OUT/fresh2.json" \
      --first-token-only 2>>"$OUT/run_log.txt" | tee -a "$OUT/run_log.txt"
    stop
  fi
  grep -E "ready in|engine ready|twin built|kernels compiled by|compiled .* in|ERROR|Traceback" "$OUT/serve_fresh2.txt" | tail -n 40 | tee -a "$OUT/run_log.txt"
fi
if [ -z "${SKIP_WARMUP:-}" ]; then
  config /tmp/kc2
  t0=$(date +%s.%N); timeout 240 $S warmup --json > "$OUT/warmup.json" 2>>"$OUT/run_log.txt"
  log "sluice warmup (empty cache) took $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s: $(tr -d '\n ' < "$OUT/warmup.json" | head -c 400)"
fi
log done
# the device returns at most eight files: the serve logs (request lines dropped) in one archive
(cd "$OUT" && for f in serve_*.txt; do grep -v '"POST \|"GET ' "$f" > "$f.tmp" && mv "$f.tmp" "$f"; done \
  && tar czf serve_logs.tgz serve_*.txt && rm serve_*.txt)
