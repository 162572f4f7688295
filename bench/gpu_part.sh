# Sourced by bench/gpu_*.sh. part NAME SECONDS command...: run the command with a time limit, keep its output
# in $OUT/NAME.txt as well as on screen, and say how it ended (a failure or hang in one part leaves the rest).
part() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name: $*" | tee "$OUT/$name.txt"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
}
