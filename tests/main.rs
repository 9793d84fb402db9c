//! Integration tests against the real servers `make peers` starts (one binary, linked once).

mod support;

mod bad_input;
mod capture;
mod crash;
mod pg_cache;
