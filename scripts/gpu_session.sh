#!/usr/bin/env bash
# One prepared run on a lent GPU machine (torch there; no Ray/MLflow/Optuna, no network):
# CUDA tests, the GPU benchmarks, the lambda study of the paper (Fig. 3) as parallel
# `s2study train` runs sharing the GPU, then `s2study eval` of the results at K = 1024/2048/4096.
# Inputs travel in .gpu/ (kornia wheels, a copy of ../shared/data and ../shared/weights).
# Everything it produces lands in $OUT (log.txt, bench_gpu.json, results.tar).
set -u
T0=$(date +%s)
TRAIN_S=${TRAIN_S:-210}          # wall-clock budget of the training runs (all in parallel)
exec > >(tee "$OUT/log.txt") 2>&1
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export S2STUDY_DATA=$PWD/.gpu/shared/data S2STUDY_WEIGHTS=$PWD/.gpu/shared/weights
R=$OUT/work && mkdir -p "$R/ckpt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$R/gpu.txt"
python3 -c "import torch, kornia, cv2; print('torch', torch.__version__, 'kornia', kornia.__version__, 'cv2', cv2.__version__)"

stamp "benchmarks (cuda)"
timeout 80 python3 benchmarks/run.py --device cuda --only r2d2_s2_step d2net_s2_step mnn_4096 mnn_8192 \
    extract_r2d2_single_roadscene extract_r2d2_multi_rgbnir --json "$OUT/bench_gpu.json" || stamp "benchmarks ended early"

stamp "training runs start"
train_run() {  # name preset lambda
  timeout "$TRAIN_S" python3 -m s2study train "$2" --set lambda_ssl="$3" --set num_workers=1 \
      --epochs 200 --out "$R/$1" > "$R/$1.log" 2>&1
}
for l in 0 0.2 0.4 0.6 0.8 1.0 1.2; do train_run "r2d2_roadscene_l$l" r2d2-roadscene "$l" & done
for l in 0 0.4; do train_run "r2d2_rgbnir_l$l" r2d2-rgbnir "$l" & done
for l in 0 0.8; do train_run "d2net_roadscene_l$l" d2net-roadscene "$l" & done
sleep 5
stamp "CUDA tests (sharing the GPU with the training runs)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5
wait
stamp "training runs done"
for d in "$R"/*/; do n=$(basename "$d"); [ -f "$d/best.pt" ] && cp "$d/best.pt" "$R/ckpt/$n.pt"; done
tail -n 2 "$R"/*.log

stamp "evaluation"
W=$S2STUDY_WEIGHTS/r2d2_WASF_N16.pt
timeout 100 python3 -m s2study eval --checkpoint "$W" sift "$R"/ckpt/r2d2_roadscene_l*.pt "$R"/ckpt/d2net_roadscene_l*.pt \
    --data roadscene --split val --k 1024 2048 4096 --device cuda --out "$R/eval_roadscene"
timeout 60 python3 -m s2study eval --checkpoint "$W" sift "$R"/ckpt/r2d2_rgbnir_l*.pt \
    --data rgbnir --split val --k 1024 2048 4096 --device cuda --out "$R/eval_rgbnir"
stamp "packing"
rm -f "$R"/*/last.pt "$R"/*/best.pt "$R"/ckpt/d2net_*.pt   # D2-Net weights are too big to bring back
tar -cf "$OUT/ckpt_roadscene.tar" -C "$R/ckpt" $(cd "$R/ckpt" && ls r2d2_roadscene_*.pt) && rm -f "$R"/ckpt/r2d2_roadscene_*.pt
tar -cf "$OUT/results.tar" -C "$OUT" work && rm -rf "$R"
ls -la "$OUT"; stamp "done"
