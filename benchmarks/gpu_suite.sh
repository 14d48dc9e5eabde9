#!/usr/bin/env bash
# Issue 4's GPU benchmarks in one bounded run, most important first: GPU time is scarce and
# machines are lent for minutes, so every stage gets at most the time left, and what finished
# is written to benchmarks/results/ even when later stages run out of time.
#
#   bash benchmarks/gpu_suite.sh DATA [SECONDS] [JOBS]
#
# DATA is an ImageFolder tree with train/ and val/ (imagenette-96); SECONDS the whole budget
# (default 540); JOBS the parity students trained side by side on the one GPU (default 4, with
# the CPU cores split between them). Needs `refine` on the PATH. Stages:
#   1. loader throughput: replay vs FFCV's stock RandomResizedCrop, 16 and 4 workers; the plain
#      PyTorch backend (StoreCropDataset) vs torchvision's ImageFolder loader, 16 workers
#   2. refinery: ResNet-18, 40 epochs on ground truth (the reference's student recipe), and a
#      1-epoch ResNet-50 whose only use is timing an online ResNet-50 refinery (speed does not
#      depend on the weights)
#   3. fidelity: stored labels vs the refinery on the student's replayed pixels (real data)
#   4. parity stores (every K in KS, seeds 0 1), then `refine audit` of the K = 10 one;
#      then issue 18's recipes (recipes.py: torchvision's ImageNet recipe cached, online and on
#      ground truth, an ensemble of two refineries; epoch time with the recipe in every mode)
#   5. epoch time: ground truth vs cached labels vs an online ResNet-50 refinery, at RES and
#      at 224 px (where the teacher's share of an online step is larger), and at RES with
#      student and refinery under torch.compile (`refine train --compile`)
#   6. precompute throughput: `refine precompute`'s code path with a ResNet-50 refinery at RES
#      (random weights: speed does not depend on them) against that model's own inference rate
#      measured in the same run, K = 10 and 40 (precompute_throughput.py)
#   7. parity students with whatever time is left, then the summary of those that finished
#   8. every labelling mode of the paper, one student each (refined_vs_ground_truth.py)
#   9. adversarial jittering (adversarial_jitter.py, ETAS, seeds 0 1; reuses stage 8's ground
#      truth and online students)
#  10. stored classes per crop and the rest policy (top_k_rest.py, K = EPOCHS, top-k 2 5 10;
#      reuses stage 9's online students)
#  11. chained refineries (generations.py, 2 generations, seeds 0 1; generation 0 is stage 8's
#      ground-truth students)
#  12. issue 19: a ResNet-50 refinery, then Table 2 (paper_tables.py architectures: ResNet-18
#      and MobileNetV2 students on it and on the ResNet-18 refinery), Table 5 (label levels) and
#      the chain in the overfitting regime (generations.py --gap --control --show-crops on a
#      100-per-class subset, 100 epochs per generation)
#  13. many classes (issue 17), only with TIN=<an ImageFolder subset of Tiny-ImageNet-200>, e.g.
#      `python benchmarks/folder_subset.py /tmp/tiny-imagenet-200 .carry/tin50 --train 50
#      --val 25 --copy` (~26 MB; the whole set does not fit the 64 MiB carry): a 64 px ResNet-18
#      refinery, then stored classes per crop and the rest policy at top-k 1 5 10 20 and all 200
#      (top_k_rest.py --derive: one refinery pass, the smaller top-k cut from it)
# Rerunning on the same machine reuses finished work (runs/gpu), and SKIP="loader_w16 fidelity"
# leaves out stages by name, so a suite cut short by a time limit continues in a second call.
# On an H200 stages 1-5 and 7 need about 10 minutes, stage 6 about 1 (estimated), stage 8 about 3,
# stage 9 about 4, stage 10 about 5 and stage 11 about 2 (estimated); results: README, "Results".
#
# On a lent machine without this package installed, put it on the path first, e.g.
#   export PYTHONPATH=$PWD; printf '#!/bin/sh\nexec python3 -m cli.main "$@"\n' >/tmp/bin/refine
set -u
DATA=$1
BUDGET=${2:-540}
JOBS=${3:-4}
RES=${RES:-96}        # crop size (the reference's); a CPU rehearsal sets RES=32 EPOCHS=2 KS="1 2"
                      # SKIP=epoch_time_224
EPOCHS=${EPOCHS:-40}  # refinery and student epochs
KS=${KS:-5 10 20 40}  # stored crops per image in the parity sweep
TOP_K=${TOP_K:-10}    # classes kept per stored label
SKIP=${SKIP:-}        # stage names not to run
ETAS=${ETAS:-8 64}    # adversarial step sizes: eta 1 and 8 moved 32 px twins by ~0.3 and ~1.5
                      # pixel values; per-pixel gradients likely shrink with the pixel count
                      # (an estimate: the results' adv_rms column says what they did)
CORES=$(nproc)
REFINERY_WORKERS=$(( CORES > 8 ? CORES - 4 : CORES ))  # 4 go to the ResNet-50 beside it
STUDENT_WORKERS=$(( CORES / JOBS > 1 ? CORES / JOBS : 1 ))
DEADLINE=$(( $(date +%s) + BUDGET ))
W=runs/gpu
LOGS=$W/logs
mkdir -p "$LOGS"

left() { echo $(( DEADLINE - $(date +%s) )); }
resume() { [ -f "$1/last.pt" ] && echo --resume; }  # refine train refuses --resume on a fresh --out

# stage NAME MIN_SECONDS COMMAND...: run COMMAND with the time left (less a reserve for the
# summary), log to $LOGS/NAME.log; skipped when fewer than MIN_SECONDS are left.
stage() {
  local name=$1 min=$2; shift 2
  if [[ " $SKIP " == *" $name "* ]]; then echo "[suite] $name skipped (SKIP)"; return 0; fi
  local budget=$(( $(left) - 30 ))
  if (( budget < min )); then echo "[suite] skip $name: ${budget}s left"; return 1; fi
  echo "[suite] $name (${budget}s left)"
  local start=$(date +%s)
  timeout "$budget" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "[suite] $name exit $rc after $(( $(date +%s) - start ))s"
  tr "\r" "\n" <"$LOGS/$name.log" | grep -v "it/s\]" | tail -n 4 | cut -c1-400
  return $rc
}

stage convert 10 python3 -c "
from refinery_pipeline.sources.dataset import open_dataset
for split in ('train', 'val'):
    print(open_dataset('$DATA', split, num_workers=$CORES).path)" || exit 1

stage loader_w16 30 python3 benchmarks/loader_throughput.py "$DATA" --res "$RES" --batch-size 256 \
  --workers 16 --rounds 5 --tag loader_gpu_w16
stage loader_w4 30 python3 benchmarks/loader_throughput.py "$DATA" --res "$RES" --batch-size 256 \
  --workers 4 --rounds 3 --tag loader_gpu_w4
stage plain_loader_w16 40 python3 benchmarks/plain_loader_throughput.py --data "$DATA" \
  --work $W/plain_loader --res "$RES" --batch-size 256 --workers 16 --rounds 3 --profile 0 \
  --tag plain_loader_gpu_w16

REFINERY=$W/refinery/model.pt
TIMING_R50=$W/r50_timing/model.pt
if [ ! -f $REFINERY ] || [ ! -f $TIMING_R50 ]; then
  refine train "$DATA" --arch resnet50 --res "$RES" --epochs 1 --batch-size 256 --workers 4 \
    --out $W/r50_timing $(resume $W/r50_timing) >"$LOGS/r50_timing.log" 2>&1 &
  TIMING_PID=$!
  stage refinery 60 refine train "$DATA" --arch resnet18 --res "$RES" --epochs "$EPOCHS" \
    --batch-size 256 --lr 0.4 --workers "$REFINERY_WORKERS" --eval-every 10 --out $W/refinery \
    $(resume $W/refinery) || exit 1
  wait $TIMING_PID || echo "[suite] the ResNet-50 timing teacher failed: $LOGS/r50_timing.log"
fi

stage fidelity 20 python3 benchmarks/replay_fidelity.py "$DATA" --refinery $REFINERY -K 4 \
  --epochs 2 --workers "$CORES" --tag fidelity_gpu

SWEEP=(benchmarks/parity_sweep.py "$DATA" --refinery $REFINERY --work $W/parity --res "$RES"
       --epochs "$EPOCHS" --batch-size 256 --lr 0.4 -K $KS --jobs "$JOBS"
       --top-k "$TOP_K" --workers "$STUDENT_WORKERS" --precompute-workers "$CORES"
       --precompute-jobs "$JOBS" --tag parity_gpu_top$TOP_K)
TIMED_K=${KS%% *}; [[ " $KS " == *" 10 "* ]] && TIMED_K=10  # the reference's K when swept
STORE=$W/parity/stores/K${TIMED_K}_seed0.zarr  # audited and timed
stage stores 60 python3 "${SWEEP[@]}" --precompute-only || exit 1
stage audit 15 refine audit $STORE "$DATA" --weights $REFINERY --workers "$CORES"

# Issue 18: torchvision's ImageNet recipe in the store; a second refinery for the ensemble row.
RECIPE=(trivialaugment erasing:0.1 mixup:0.2 cutmix:1)
stage refinery_b 60 refine train "$DATA" --arch resnet18 --res "$RES" --epochs "$EPOCHS" \
  --batch-size 256 --lr 0.4 --seed 1 --workers "$CORES" --eval-every 10 --out $W/refinery_b \
  $(resume $W/refinery_b) &&
stage recipes 60 python3 benchmarks/recipes.py "$DATA" --refinery $REFINERY \
  --refinery $W/refinery_b/model.pt --work $W/recipes --res "$RES" --epochs "$EPOCHS" \
  --batch-size 256 --lr 0.4 -K "$EPOCHS" --augment "${RECIPE[@]}" --jobs "$JOBS" \
  --workers "$STUDENT_WORKERS" --tag recipes_gpu
stage epoch_time_recipe 40 python3 benchmarks/epoch_time.py "$DATA" \
  --store $W/recipes/labels_K${EPOCHS}_recipe.zarr --teacher $REFINERY --arch resnet18 \
  --res "$RES" --batch-size 256 --workers "$CORES" --rounds 3 --augment "${RECIPE[@]}" \
  --tag epoch_time_recipe_gpu

stage epoch_time 40 python3 benchmarks/epoch_time.py "$DATA" --store $STORE --teacher $TIMING_R50 \
  --arch resnet18 --res "$RES" --batch-size 256 --workers "$CORES" --rounds 5 --tag epoch_time_gpu
stage epoch_time_224 40 python3 benchmarks/epoch_time.py "$DATA" --store $STORE \
  --teacher $TIMING_R50 --arch resnet18 --res 224 --batch-size 256 --workers "$CORES" --rounds 5 \
  --tag epoch_time_gpu224
stage epoch_time_compiled 90 python3 benchmarks/epoch_time.py "$DATA" --store $STORE \
  --teacher $TIMING_R50 --arch resnet18 --res "$RES" --batch-size 256 --workers "$CORES" \
  --rounds 5 --compile --tag epoch_time_gpu_compiled
stage precompute 60 python3 benchmarks/precompute_throughput.py "$DATA" --arch resnet50 \
  --res "$RES" --batch-size 512 --workers "$CORES" --ks 10 40 --n-fractions 0.5 1.0 \
  --ceiling-seconds 5 --tag precompute_gpu

stage students 60 python3 "${SWEEP[@]}"
DEADLINE=$(( DEADLINE + 30 ))  # the reserve is for the summary
stage summary 5 python3 "${SWEEP[@]}" --collect-only
stage modes 60 python3 benchmarks/refined_vs_ground_truth.py "$DATA" --refinery $REFINERY \
  --work $W/modes --res "$RES" --epochs "$EPOCHS" --batch-size 256 --lr 0.4 --top-k "$TOP_K" \
  --jobs "$JOBS" --workers "$STUDENT_WORKERS" --tag imagenette96_gpu
stage adversarial 60 python3 benchmarks/adversarial_jitter.py "$DATA" --refinery $REFINERY \
  --work $W/modes --res "$RES" --epochs "$EPOCHS" --batch-size 256 --lr 0.4 --etas $ETAS \
  --seeds 0 1 --jobs "$JOBS" --workers "$STUDENT_WORKERS" --tag adversarial_gpu
stage top_k_rest 60 python3 benchmarks/top_k_rest.py "$DATA" --refinery $REFINERY \
  --work $W/modes --res "$RES" --epochs "$EPOCHS" --batch-size 256 --lr 0.4 -K "$EPOCHS" \
  --top-ks 2 5 10 --seeds 0 1 --jobs "$JOBS" --workers "$STUDENT_WORKERS" --tag top_k_rest_gpu
stage generations 60 python3 benchmarks/generations.py "$DATA" --work $W/modes --res "$RES" \
  --epochs "$EPOCHS" --batch-size 256 --lr 0.4 --generations 2 --seeds 0 1 --jobs 2 \
  --workers "$STUDENT_WORKERS" --tag generations_gpu
# Issue 19: Table 2 (a ResNet-50 refinery for smaller students of two architectures), Table 5
# (label levels) and the chain in the overfitting regime (a 100-per-class subset, long schedule,
# the equal-total-epochs control, the gap and Figs. 7-8).
stage refinery_r50 60 refine train "$DATA" --arch resnet50 --res "$RES" --epochs "$EPOCHS" \
  --batch-size 256 --lr 0.4 --workers "$CORES" --eval-every 10 --out $W/refinery_r50 \
  $(resume $W/refinery_r50) &&
stage table2 60 python3 benchmarks/paper_tables.py architectures "$DATA" --work $W/modes \
  --refinery resnet50=$W/refinery_r50/model.pt --refinery resnet18=$REFINERY \
  --student-arch resnet18 mobilenet_v2 --res "$RES" --epochs "$EPOCHS" --batch-size 256 \
  --lr 0.4 -K "$EPOCHS" --jobs "$JOBS" --workers "$STUDENT_WORKERS" --tag paper_table2_gpu
stage table5 60 python3 benchmarks/paper_tables.py levels "$DATA" --work $W/modes \
  --refinery resnet18=$REFINERY --res "$RES" --epochs "$EPOCHS" --batch-size 256 --lr 0.4 \
  -K "$EPOCHS" --jobs "$JOBS" --workers "$STUDENT_WORKERS" --tag paper_table5_gpu
python3 benchmarks/folder_subset.py "$DATA" $W/subset100 --train 100 >/dev/null &&
stage overfit_chain 60 python3 benchmarks/generations.py $W/subset100 --work $W/overfit \
  --res "$RES" --epochs 100 --batch-size 128 --lr 0.2 --generations 3 --seeds 0 1 --jobs 2 \
  --workers "$STUDENT_WORKERS" --gap --control --show-crops --tag generations_overfit_gpu
if [ -n "${TIN:-}" ]; then
  stage tin_refinery 60 refine train "$TIN" --arch resnet18 --res 64 --epochs "$EPOCHS" \
    --batch-size 256 --lr 0.4 --workers "$REFINERY_WORKERS" --eval-every 10 --out $W/tin/refinery \
    $(resume $W/tin/refinery) &&
  stage tin_top_k_rest 60 python3 benchmarks/top_k_rest.py "$TIN" \
    --refinery $W/tin/refinery/model.pt --work $W/tin --res 64 --epochs "$EPOCHS" \
    --batch-size 256 --lr 0.4 -K "$EPOCHS" --top-ks 1 5 10 20 200 --derive --seeds 0 1 \
    --jobs "$JOBS" --workers "$STUDENT_WORKERS" --tag top_k_rest_tin200_gpu
fi
echo "[suite] done with $(left)s to spare"
