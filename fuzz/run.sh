#!/usr/bin/env bash
# One fuzzing session of one target: AFL++ for SECONDS (default 300) from corpus/<target>, then
# the queue merged into corpus/<target> and minimized (afl-cmin), and one line of figures
# appended to RUNS.md. Crashes stay in out/<target>/default/crashes/ (replay them with
# `target/debug/replay <target> out/<target>/default/crashes`).
#
# Usage, from fuzz/: ./run.sh <target> [SECONDS]   (build first, see README.md)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

target="${1:?usage: run.sh <target> [seconds]}"
seconds="${2:-300}"
bin=target/fuzz/afl
[[ -x "$bin" ]] || { echo "run.sh: build $bin first (README.md)" >&2; exit 1; }
[[ -d "corpus/$target" ]] || { echo "run.sh: no corpus/$target" >&2; exit 1; }

# Shared machines: no CPU binding, no core_pattern or governor changes, no UI.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
export AFL_NO_UI=1 AFL_QUIET=1
case "$target" in
    sse_upstream | sse_agent) dict=dict/sse.dict ;;
    relay_config) dict=dict/toml.dict ;;
    cel) dict=dict/cel.dict ;;
    frame) dict="" ;;
    *) dict=dict/json.dict ;;
esac
mkdir -p out
out="out/$target"
rm -rf "$out"
nice -n 19 cargo afl fuzz -i "corpus/$target" -o "$out" -V "$seconds" -t 2000 ${dict:+-x "$dict"} -- "$bin" "$target" \
    > "out/$target.log" 2>&1 || { tail -20 "out/$target.log" >&2; exit 1; }

stats="$out/default/fuzzer_stats"
field() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
execs=$(field execs_done)
crashes=$(field saved_crashes)
hangs=$(field saved_hangs)
speed=$(field execs_per_sec)
edges=$(field edges_found)

# Merge what the run found into the corpus and keep a minimal set with the same coverage.
merged=$(mktemp -d)
cp "corpus/$target"/* "$merged/"
cp "$out/default/queue"/id:* "$merged/" 2>/dev/null || true
minimized=$(mktemp -d)
rmdir "$minimized"
AFL_QUIET=1 nice -n 19 cargo afl cmin -i "$merged" -o "$minimized" -t 2000 -- "$bin" "$target" \
    > "out/$target.cmin.log" 2>&1
rm -rf "corpus/$target"
mkdir "corpus/$target"
# Content-addressed names: the same input never lands twice across runs.
for f in "$minimized"/*; do
    cp "$f" "corpus/$target/$(sha1sum "$f" | cut -c1-16)"
done
rm -rf "$merged" "$minimized"
kept=$(ls "corpus/$target" | wc -l)

line="| $(date -u +%Y-%m-%d) | $target | ${seconds}s | $execs | ${speed%.*}/s | $edges | $crashes | $hangs | $kept |"
echo "$line" | tee -a RUNS.md
