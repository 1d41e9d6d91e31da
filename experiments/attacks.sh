#!/usr/bin/env bash
# Hostile clients (docs/RESULTS.md, "Hostile clients"): every attack of [faults] with the
# server's defences on and off, on the default job (FedAvg, configs/attacks.toml) and on
# setting (d) (HFedMoE, configs/bbc_topics.toml), with 1 (client 0) or 2 (clients 0 and 1) of
# the 8 clients attacking whenever they are sampled. Each attacked run is paired with the same
# seed's run in which the attackers take no part (attack "dropout"), with the same defences.
#
#   bash experiments/attacks.sh default 1        # the default job, 1 attacker of 8 (70 runs)
#   bash experiments/attacks.sh d 1              # setting (d); hfedmoe prepare builds its model
#   bash experiments/attacks.sh default 2        # 2 of 8; then d 2
#   bash experiments/attacks.sh table            # the tables of whatever has finished
#   PARTS=2 PART=0 bash experiments/attacks.sh d 1 &   # two processes on 2 cores, one thread
#   PARTS=2 PART=1 bash experiments/attacks.sh d 1 &   # each: every other cell
#   SEEDS=0 KINDS=sign-flip DEFENCES=on bash experiments/attacks.sh default 1   # one cell
#   KINDS=dropout,sign-flip DEFENCES=median bash experiments/attacks.sh default 1
#                                                # the defences plus federation.robust = median
#   KINDS=dropout,sign-flip DEFENCES=descent bash experiments/attacks.sh default 1
#                                                # the defences plus federation.descent_check
#   KINDS=dropout DEFENCES=validated bash experiments/attacks.sh default 1
#                                                # its honest baseline: the same validation split
#
# Decided before any run (docs/RESULTS.md): seeds 0-4, one thread per run; the end point is
# the final round's test accuracy, attacked minus absent, mean over the seeds with a 95%
# t-interval; the target is a mean of at least -0.02 for every attack with the defences on and
# 1 attacker of 8, on both settings. `hfedmoe compare` skips finished runs and resumes
# interrupted ones, so rerunning a command continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 TOKENIZERS_PARALLELISM=false

H=.venv/bin/hfedmoe
OUT=${OUT:-runs/attacks}
SEEDS=${SEEDS:-0,1,2,3,4}
# none: every client honest (the attackers' own honest participation, for comparison)
KINDS=${KINDS:-dropout,none,inflate-examples,sign-flip,scale-update,noise,inflate-stats,inf-metric}
DEFENCES=${DEFENCES:-on,off}
VALIDATION=(--set data.validation_fraction=0.1)  # the descent check's reference data
PARTS=${PARTS:-1}  # PARTS=2 PART=0|1: this process runs every other cell
PART=${PART:-0}

if [[ ${1:-} == table ]]; then
    exec .venv/bin/python experiments/attacks_table.py "$OUT"
fi
setting=${1:?usage: attacks.sh default|d|table [1|2]}
n=${2:-1}
case $setting in
    default) config=configs/attacks.toml method=fedavg ;;
    d) config=configs/bbc_topics.toml method=hfedmoe ;;
    *) echo "unknown setting '$setting' (default, d or table)" >&2; exit 2 ;;
esac
case $n in
    1) attackers="[0]" ;;
    2) attackers="[0,1]" ;;
    *) echo "attackers: 1 or 2, not '$n'" >&2; exit 2 ;;
esac

IFS=, read -ra kinds <<<"$KINDS"
IFS=, read -ra defences <<<"$DEFENCES"
IFS=, read -ra seeds <<<"$SEEDS"
cell=0
for seed in "${seeds[@]}"; do
    for kind in "${kinds[@]}"; do
        for d in "${defences[@]}"; do
            if ((cell++ % PARTS == PART)); then
                case $d in  # on: the defaults; off: trust every report; median: on, robust
                    on) defended=(--set federation.defences=true) ;;
                    off) defended=(--set federation.defences=false) ;;
                    median) defended=(--set federation.defences=true --set federation.robust=median) ;;
                    # the descent check needs a validation split; "validated" is the same split
                    # without the check, to measure what the check costs honest clients
                    descent) defended=(--set federation.defences=true "${VALIDATION[@]}"
                        --set federation.descent_check=true) ;;
                    validated) defended=(--set federation.defences=true "${VALIDATION[@]}") ;;
                    *) echo "DEFENCES: on, off, median, descent or validated, not '$d'" >&2
                        exit 2 ;;
                esac
                if [[ $kind == none ]]; then  # no attacker: the same clients, all honest
                    attack=(--set "faults.attackers=[]")
                else
                    attack=(--set "faults.attackers=$attackers" --set "faults.attack=$kind")
                fi
                $H compare "$config" --methods "$method" --seeds "$seed" --no-progress \
                    "${attack[@]}" "${defended[@]}" --set threads=1 \
                    -o "$OUT/$setting/${n}of8/$kind-$d"
            fi
        done
    done
done
