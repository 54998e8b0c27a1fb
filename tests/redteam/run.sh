#!/bin/sh
# Runs every attempt of attacks.tsv inside the build, each in its own process,
# and says how each went: "ATTEMPT <name> <pid> <status>". Then it checks from
# inside that the build is still confined: "STILL <what> <answer>".
# Usage: run.sh ATTACKS PROBE (run as the build's command, in $TREE).
attacks=$1
probe=$2
export TREE SUP TARGET PROBE FOREIGN_PTS OUTSIDE OUTSIDE_PORT OUTSIDE_MAPPED
PROBE=$probe
TREE=$(pwd)
SUP=$PPID
# Things the attempts use, made inside the tree.
echo "evil:x:0:0::/:/bin/sh" > "$TREE/passwd"
mkdir -p "$TREE/p" "$TREE/cg" "$TREE/old"
grep -v '^#' "$attacks" | grep -v '^[[:space:]]*$' | while IFS= read -r line; do
    name=$(printf '%s' "$line" | awk -F ' [|] ' '{gsub(/ +$/, "", $1); print $1}')
    # Everything after the second separator: commands have pipes of their own.
    cmd=$(printf '%s' "$line" | sed 's/^[^|]*| *[^|]*| //')
    sh -c "$cmd" </dev/null >/dev/null 2>&1 &
    pid=$!
    wait "$pid"
    echo "ATTEMPT $name $pid $?"
done
echo "STILL cgroup $(cut -d: -f3 /proc/self/cgroup)"
echo "STILL $("$probe" socket inet stream)"
# The build's own UDP server still answers it (loopback mode; refused otherwise).
echo "STILL $("$probe" net udp-pair 2>&1)"
# A build's own pseudo-terminal still works.
echo "STILL $("$probe" pty)"
# A build's own abstract socket still works.
if perl -MSocket -e 'socket(L, AF_UNIX, SOCK_STREAM, 0) or die; bind(L, pack_sockaddr_un("\0bc-own-$$")) or die; listen(L, 1) or die; if (!fork) { socket(C, AF_UNIX, SOCK_STREAM, 0); exit(connect(C, pack_sockaddr_un("\0bc-own-" . getppid())) ? 0 : 1) } wait; exit($? >> 8)'; then
    echo "STILL abstract-own OK"
else
    echo "STILL abstract-own FAILED"
fi
