#!/usr/bin/env bash
# Prometheus and promtool (Debian `prometheus`), and systemd-analyze (Debian `systemd`), for the
# tests that check the daemon's metrics and its systemd unit. Nothing is started here (the
# packaged service is never run): tests start `prometheus --config.file=... --web.listen-address=
# 127.0.0.1:<port> --storage.tsdb.path=<tmp>` themselves. Prints the tools' paths.
#   prometheus.sh [start]   install if missing; print paths
#   prometheus.sh stop      no-op (nothing to stop)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-start}" in
  stop|status) exit 0 ;;
  check)
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    printf 'global:\n  scrape_interval: 15s\nscrape_configs:\n  - job_name: polysync\n    static_configs:\n      - targets: ["127.0.0.1:9464"]\n' > "$tmp/p.yml"
    promtool check config "$tmp/p.yml" >/dev/null 2>&1 || die "prometheus check: promtool check config failed"
    systemd-analyze --version >/dev/null || die "prometheus check: systemd-analyze does not run"
    log "prometheus check ok: promtool check config, systemd-analyze $(systemd-analyze --version | head -1 | awk '{print $2}')"
    exit 0 ;;
  start) ;;
  *) die "usage: prometheus.sh [start]" ;;
esac
t0=$(now_ms)
need=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)
[ ${#need[@]} -eq 0 ] || apt_ensure "${need[@]}"
for tool in prometheus promtool systemd-analyze; do
  command -v $tool >/dev/null || die "prometheus: $tool not found after install"
done
# The package enables its service for a later boot; the tests' own processes are all we want.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
log "prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}') at $(command -v prometheus), promtool at $(command -v promtool), systemd-analyze at $(command -v systemd-analyze) ($(elapsed "$t0"))"
