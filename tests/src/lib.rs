//! Weir's test environment and end-to-end tests.
//!
//! - [`node`]: the node agent (`weir-node`) that plays the kubelet, running pods as local
//!   processes;
//! - [`jobs`]: what the tests of a job's life under the controller share (a controller per
//!   namespace, the word-count manifest, the exactly-once check of its output);
//! - [`argocd`]: the Argo CD health checks of `manifests/argocd/` run with Lua 5.1 over
//!   objects, and the objects captured from the environment that they are tested on;
//! - [`dashboard`]: the Grafana dashboard's queries held against `/metrics` scrapes;
//! - [`testenv`]: what a test needs to use the environment that `make env-up` started
//!   (clients, a namespace of its own, waiting helpers);
//! - `tests/`: the end-to-end tests, run by `make e2e` against that environment.

pub mod argocd;
pub mod dashboard;
pub mod jobs;
pub mod node;
pub mod testenv;
