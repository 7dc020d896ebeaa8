#!/usr/bin/env bash
# Issue 16's device run, in one call (repo root on the GPU host; OUT = results folder):
#   bash bench/issue16_gpu.sh $OUT [parts]     parts: any of tiles,tuned,moe,gateway,engine,decode (default: moe,gateway,engine)
# 0. tiles: the decode MoE's swap-AB tile descent and the projections' W8A16 check
#    (bench/decode_sweep.py --swap-only); the winners serve the next parts: the MoE tiles
#    (OUT/sweep/moe_tiles.json) through SLUICE_MOE_TILES, W8A16 through SLUICE_LINEAR_W8A16=1.
#    Kept in /tmp/issue16_tiles: part "tuned" in a later call on the same host uses them.
# 1. moe: grouped-GEMM vs triton prefill MoE, checks then timings (bench/moe_prefill.py);
#    its measured crossover is used as SLUICE_MOE_GROUPED_MIN_TOKENS by the next parts.
# 2. engine: the engine alone on a random FP8 checkpoint (written once per host to
#    /tmp/mixtral-fp8): decode at batch 1 and 64, and 64 x 1K-prompt/50-token bursts per
#    prefill path and max_num_batched_tokens (each burst twice: the first captures graphs).
# 3. gateway: `sluice serve` + bench/e2e_client.py (--no-sleep --settle 3), configured as ../shared/bench/README.md
#    (GATEWAY_MBTS="default 4096 8192": one serve per max_num_batched_tokens; the first runs every phase).
set -u
OUT=${1:?OUT dir}; PARTS=${2:-moe,gateway,engine}
export PYTHONUNBUFFERED=1
CKPT=/tmp/mixtral-fp8
log() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/run_log.txt"; }
# the engine imports pydantic (config) and the gateway its own deps: wheels from .whl (bench/gpu_wheels.sh)
. bench/gpu_site.sh
log "$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv,noheader)"
log "$(python3 -c 'import torch,triton;print("torch",torch.__version__,"triton",triton.__version__,"cuda",torch.version.cuda)')"
if [[ $PARTS == *tiles* ]]; then
  timeout 480 python3 -m bench.decode_sweep "$OUT/sweep" --budget "${SWEEP_BUDGET_S:-200}" --swap-only \
    > "$OUT/sweep.txt" 2>&1
  tail -n 24 "$OUT/sweep.txt"
  mkdir -p /tmp/issue16_tiles && cp "$OUT"/sweep/moe_tiles.json "$OUT"/sweep/linear_choice.json /tmp/issue16_tiles/ 2>/dev/null
fi
if [[ $PARTS == *tiles* || $PARTS == *tuned* ]]; then  # tuned: a previous call's tiles on this host
  [ -f /tmp/issue16_tiles/moe_tiles.json ] && export SLUICE_MOE_TILES=/tmp/issue16_tiles/moe_tiles.json
  grep -q '"w8a16": true' /tmp/issue16_tiles/linear_choice.json 2>/dev/null && export SLUICE_LINEAR_W8A16=1
fi
log "SLUICE_MOE_TILES=${SLUICE_MOE_TILES:-built-in tiles} SLUICE_LINEAR_W8A16=${SLUICE_LINEAR_W8A16:-0}"
GMIN=${SLUICE_MOE_GROUPED_MIN_TOKENS:-}
if [[ $PARTS == *moe* ]]; then
  python3 -m bench.moe_prefill "$OUT" 2>&1 | tail -n 40
  [ -f "$OUT/grouped_min_tokens.txt" ] && GMIN=$(cat "$OUT/grouped_min_tokens.txt")
  rm -f "$OUT/moe_prefill_log.txt"  # the same lines are in the output; 8 files at most come back
fi
[ -n "$GMIN" ] && export SLUICE_MOE_GROUPED_MIN_TOKENS=$GMIN
log "SLUICE_MOE_GROUPED_MIN_TOKENS=${SLUICE_MOE_GROUPED_MIN_TOKENS:-default}"
if [[ $PARTS == *engine* || $PARTS == *gateway* ]] && [ ! -f $CKPT/config.json ]; then
  t0=$(date +%s); python3 bench/make_random_fp8_mixtral.py $CKPT --layers 32 > /dev/null; log "checkpoint written in $(( $(date +%s) - t0 )) s"
fi
engine() {  # label, env assignments..., -- throughput args
  local label=$1; shift
  env "$@" --json > /tmp/engine_one.json 2>>"$OUT/run_log.txt" || { log "engine $label FAILED"; tail -n 20 "$OUT/run_log.txt"; return; }
  python3 -c "import json,sys;r=json.load(open('/tmp/engine_one.json'));r['label']='$label';print(json.dumps(r))" >> "$OUT/engine.jsonl"
  log "engine $label: $(python3 -c "import json;r=json.load(open('/tmp/engine_one.json'))['results'];print([dict(b=x['batch_size'],p=x['prompt_len'],req_s=round(x['batch_size']/x['total_s'],2),ttft=round(x['ttft_s'],3),dec=round(x['decode_tok_s'],1)) for x in r])")"
}
serve_one() {  # max_num_batched_tokens ("default": the README's configuration, no such line), e2e phases
  local mbt=$1 phases=$2 opt=""
  [ "$mbt" != default ] && opt="max_num_batched_tokens = $mbt"
  mkdir -p /tmp/gw && cat > /tmp/gw/sluice.toml <<TOML
[backends.mixtral]
plugin = "local"
[backends.mixtral.options]
model = "$CKPT"
served_model_name = "mixtral-fp8"
dtype = "fp8"
max_num_seqs = 64
$opt
[backends.mixtral.pool]
min_workers = 0
max_workers = 1
idle_timeout_s = 600
idle_action = "sleep"
max_concurrency = 128
queue_size = 256
queue_timeout_s = 300
TOML
  export SLUICE_CONFIG=/tmp/gw/sluice.toml SLUICE_DATABASE_URL=sqlite+aiosqlite:////tmp/gw/sluice.db
  local here=$PWD; cd /tmp/gw
  S="python3 -m sluice.gateway.cli"
  $S migrate >> "$OUT/run_log.txt" 2>&1
  $S tenants create bench --rpm 1000000 --tpm 1000000000 >> "$OUT/run_log.txt" 2>&1
  KEY=$($S keys create --tenant bench --json 2>>"$OUT/run_log.txt" | python3 -c 'import json,sys;print(json.load(sys.stdin)["key"])')
  $S serve --port 8400 > "$OUT/serve_log_$mbt.txt" 2>&1 &
  SPID=$!
  UP=0
  for _ in $(seq 45); do python3 -c "import urllib.request as u;u.urlopen('http://127.0.0.1:8400/healthz')" 2>/dev/null && { UP=1; break; }; sleep 1; done
  cd "$here"
  log "gateway up=$UP (max_num_batched_tokens=$mbt)"
  # --settle: the engine captures its CUDA graphs while idle after the cold request, before the measured phases
  [ $UP = 1 ] && timeout 240 python3 bench/e2e_client.py http://127.0.0.1:8400 "$KEY" mixtral-fp8 "$OUT/e2e_$mbt.json" \
    --no-sleep --settle "${SETTLE_S:-3}" --phases "$phases" > /dev/null 2>>"$OUT/run_log.txt"
  log "e2e mbt=$mbt: $(python3 -c "
import json; r=json.load(open('$OUT/e2e_$mbt.json'))
print({k: r.get(k) for k in ('cold_first_token_s',)}, 'c1', {k: v for k, v in r.get('c1', {}).items() if 'gap' in k or 'tok_s' in k},
      'c64', {k: v for k, v in r.get('c64', {}).items() if 'gap' in k or 'tok_s' in k}, 'burst', {k: r.get('burst_1k_50x64', {}).get(k) for k in ('req_s', 'ttft_p50_s', 'wall_s')})")"
  kill $SPID; wait $SPID 2>/dev/null
  tail -n 3 "$OUT/serve_log_$mbt.txt"
  unset SLUICE_CONFIG SLUICE_DATABASE_URL
}
if [[ $PARTS == *gateway* ]]; then
  # GATEWAY_MBTS: the first serve runs every phase, the others the 1K/50 burst only
  first=1
  for mbt in ${GATEWAY_MBTS:-default}; do
    if [ $first = 1 ]; then serve_one "$mbt" c1,c64,json,burst; first=0; else serve_one "$mbt" burst; fi
  done
fi
if [[ $PARTS == *engine* ]]; then
  T="python3 -m bench.throughput --model $CKPT --dtype fp8"
  BURST="--batch-sizes 64,64 --prompt-len 1024 --decode-len 50"
  for cfg in ${ENGINE_BURSTS:-triton:4096 auto:4096 auto:8192}; do
    path=${cfg%%:*}; mbt=${cfg##*:}
    engine "burst_${path}_${mbt}" SLUICE_MOE_PREFILL=$path $T $BURST --max-batched-tokens $mbt
  done
  [[ $PARTS == *decode* ]] && engine decode $T --batch-sizes 1,64 --prompt-len 32 --decode-len 256
fi
log done
