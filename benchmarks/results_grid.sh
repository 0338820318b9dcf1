#!/usr/bin/env bash
# The comparisons of docs/results.md: each section is one `clora compare` command, which writes its
# run directories under results/, its summary (md/csv/json/png) and its section of docs/results.md.
# Rerunning resumes every unfinished run; REPORT_ONLY=1 trains nothing and only rewrites the summaries
# and sections from the run directories as they stand.
#
#   JOBS=8 bash benchmarks/results_grid.sh        # runs at once per command (three lanes side by side)
#
# Caps (SPEC §4 proxy): 192 training items per task, 1 epoch, lr 2e-3, rank 8, batch 8, where SeqLoRA
# learns each task and then forgets it; 100 test items per task (32 left AA noisy to ±3 points).
set -uo pipefail
cd "$(dirname "$0")/.."
CLORA=${CLORA:-clora}
JOBS=${JOBS:-8}
run_control="--jobs $JOBS"
[ "${REPORT_ONLY:-0}" = 1 ] && run_control="--report-only"
common=(--lr 2e-3 --rank 8 --eval-batch-size 64 --page docs/results.md)
# Method-specific rates, the same for every order: DEAL's filter/MLP rate (its task 1 is plain LoRA at
# the common rate), the full-rank rate of GORP and GaLore (GORP's LoRA at the common rate).
rates=(--for deal update_lr=5e-4 --for gorp full_lr=1e-3)
galore_rate=(--for galore full_lr=1e-3)

# Three lanes side by side (one GPU is shared well by many small runs); each lane's commands in turn.
lane_standard() {
  $CLORA compare --methods seq-lora,inc-lora,o-lora,ewc,replay,galore,deal,gorp,mtl,per-task-ft --orders 1,2,3 \
    --train-per-task 192 --test-per-task 100 --eval-all --zero-shot "${rates[@]}" "${galore_rate[@]}" "${common[@]}" \
    --output results/standard --section standard \
    --title "Standard benchmark (4 tasks), orders 1-3: every method" $run_control
}

lane_long() {
  $CLORA compare --methods seq-lora,o-lora,deal,gorp,mtl --orders 4 --train-per-task 96 --test-per-task 50 \
    "${rates[@]}" "${common[@]}" --output results/long --section long \
    --title "Long benchmark (15 tasks), order 4: smaller caps" $run_control
}

lane_data() {
  for n in 16 64 256; do
    $CLORA compare --methods seq-lora,o-lora,deal,gorp --orders 1 --train-per-task $n --test-per-task 100 \
      --eval-all --zero-shot "${rates[@]}" "${common[@]}" --output results/data-$n --section data-$n \
      --title "Data efficiency: $n training items per task (order 1)" $run_control
  done
  # What was tried for DEAL below O-LoRA: the paper's T5 rank, and a faster filter/MLP rate.
  $CLORA compare --methods deal --orders 1 --train-per-task 192 --test-per-task 100 --eval-all --zero-shot \
    --for deal rank=16 --for deal update_lr=5e-4 "${common[@]}" --output results/deal-rank16 --section deal-rank16 \
    --title "DEAL tuning: rank 16 (order 1)" $run_control
  $CLORA compare --methods deal --orders 1 --train-per-task 192 --test-per-task 100 --eval-all --zero-shot \
    --for deal update_lr=2e-3 "${common[@]}" --output results/deal-update-lr --section deal-update-lr \
    --title "DEAL tuning: filter/MLP rate 2e-3 (order 1)" $run_control
}

if [ "${REPORT_ONLY:-0}" = 1 ]; then
  lane_standard; lane_long; lane_data
else
  lane_long & lane_data & lane_standard; wait
  # The lanes wrote docs/results.md concurrently; rewrite every section once more, one after another.
  REPORT_ONLY=1 bash "$0"
fi
