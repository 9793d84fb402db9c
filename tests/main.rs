//! Integration tests against the real servers `make peers` starts (one binary, linked once).

mod support;

mod pg_cache;
