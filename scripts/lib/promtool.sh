# shellcheck shell=bash
#
# scripts/lib/promtool.sh -- Prometheus's promtool, to check the bridges'
# metrics in the tests.
#
#   promtool_path [DIR]
#       Prints the path of a promtool binary, fetching it the first time:
#       Debian's `prometheus` package is downloaded (apt-get download) and
#       only promtool is extracted into DIR (default target/tools), so
#       nothing is installed and no daemon is started on this machine.

promtool_path() {
    local dir=${1:-target/tools}
    if [[ -x $dir/promtool ]]; then
        printf '%s\n' "$dir/promtool"
        return 0
    fi
    if command -v promtool >/dev/null 2>&1; then
        command -v promtool
        return 0
    fi
    mkdir -p "$dir"
    local tmp
    tmp=$(mktemp -d /tmp/vios-promtool.XXXXXX)
    if ! (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1); then
        echo "promtool: cannot download Debian's prometheus package (is apt-get update done?)" >&2
        rm -rf "$tmp"
        return 1
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    cp "$tmp/x/usr/bin/promtool" "$dir/promtool"
    rm -rf "$tmp"
    printf '%s\n' "$dir/promtool"
}
