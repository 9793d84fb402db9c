#!/usr/bin/env bash
# Prometheus and promtool (Debian `prometheus`) for the operations tests, which start their own
# prometheus process; plus systemd-analyze (Debian `systemd`) to verify the shipped unit.
# Nothing is started here.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ "${1:-start}" = stop ] && exit 0
command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_ensure prometheus
command -v systemd-analyze >/dev/null || apt_ensure systemd
log "prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}') and systemd-analyze available"
