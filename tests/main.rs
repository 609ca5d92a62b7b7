//! Integration tests: each starts the real `tally run` on port 0 in a
//! temporary directory and checks what a user would.

mod util;

mod auth;
mod caps;
mod cluster;
mod crash;
mod determinism;
mod edge;
mod history;
mod ingest;
mod live;
mod openapi;
mod quiet;
mod restart;
mod sketches;
mod versions;
