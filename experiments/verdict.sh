#!/usr/bin/env bash
# Issue 18's comparison (docs/RESULTS.md, "The verdict"): every method on identical partitions,
# device tiers, initial weights and rounds per seed, then the report with paired statistics.
#
#   bash experiments/verdict.sh bbc          # the topic-skewed encoder setting, main methods
#   bash experiments/verdict.sh bbc-ablations
#   bash experiments/verdict.sh report       # reports of whatever has finished
#   SEEDS=0,1,2,3,4 bash experiments/verdict.sh bbc
#   SEEDS=1 SET=threads=1 bash experiments/verdict.sh bbc &    # two seeds at once on 2 cores,
#   SEEDS=2 SET=threads=1 bash experiments/verdict.sh bbc &    # one thread each
#
# A seed's methods must all run with the same threads (float sums differ in the last bits
# otherwise); different seeds may differ. docs/RESULTS.md says which seed ran how.
# `hfedmoe compare` skips finished runs and resumes interrupted ones, so rerunning a command
# continues where it stopped. Each selection-based run is then analysed (`hfedmoe analyze`):
# the loss cost of removing the experts each client last updated, the report's "Why" column.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 TOKENIZERS_PARALLELISM=false

H=.venv/bin/hfedmoe
OUT=${OUT:-runs/verdict}
SEEDS=${SEEDS:-0,1,2}
SET=${SET:+--set $SET}  # one extra KEY=VALUE for every run, e.g. threads=1
MAIN=hfedmoe,fftmoe,random,fedmoe,flexmoe,fedavg,flux
ABLATIONS=hfedmoe-holder-avg,hfedmoe-fedavg-routers,hfedmoe-rank-s,hfedmoe-lambda1
SELECTING=(hfedmoe random fedmoe flexmoe flux hfedmoe-holder-avg hfedmoe-fedavg-routers
    hfedmoe-rank-s hfedmoe-lambda1)

analyse() {  # the selection measure of every finished run that selects experts per client
    local grid=$1
    for method in "${SELECTING[@]}"; do
        for run in "$grid/$method"/seed*; do
            if [[ -f $run/summary.json && ! -f $run/analysis/selection.json ]]; then
                $H analyze "$run" --selection-only >/dev/null
            fi
        done
    done
}

report() {  # report GRID NAME TARGET METHODS...: GRID/NAME from the methods' finished runs
    local grid=$1 name=$2 target=$3
    shift 3
    local dirs=()
    for method in "$@"; do
        if [[ -d $grid/$method ]]; then dirs+=("$grid/$method"); fi
    done
    $H report "${dirs[@]}" -o "$grid/$name" --target "$target"
}

case "${1:-}" in
bbc)
    # shellcheck disable=SC2086  # SET is empty or two words
    $H compare configs/bbc_topics.toml --methods "$MAIN" --seeds "$SEEDS" $SET -o "$OUT/bbc-topics"
    analyse "$OUT/bbc-topics"
    ;;
bbc-ablations)
    # shellcheck disable=SC2086
    $H compare configs/bbc_topics.toml --methods "hfedmoe,$ABLATIONS" --seeds "$SEEDS" $SET \
        -o "$OUT/bbc-topics"
    analyse "$OUT/bbc-topics"
    ;;
report)
    IFS=, read -ra main <<<"$MAIN"
    IFS=, read -ra ablations <<<"$ABLATIONS"
    report "$OUT/bbc-topics" report 0.9 "${main[@]}"
    report "$OUT/bbc-topics" report-ablations 0.9 hfedmoe "${ablations[@]}"
    ;;
*)
    echo "usage: $0 bbc|bbc-ablations|report" >&2
    exit 2
    ;;
esac
