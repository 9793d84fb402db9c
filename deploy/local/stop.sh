#!/usr/bin/env bash
# Stop the local servers (default: all); data is kept. Same as `peers.sh --stop [name...]`.
exec bash "$(dirname "${BASH_SOURCE[0]}")/peers.sh" --stop "$@"
