//! The plan: built from the spec by `weir_crds::plan`, which the controller uses too, so that
//! both refuse the same pipelines with the same words.

pub use weir_crds::plan::*;

use weir_crds::StreamJobSpec;

/// Checks `spec` (with `parallelism` and `max_parallelism` overrides from the command line)
/// and builds the plan, with the operator types of this binary's registry beside the
/// built-in ones ([`crate::operator::registry`]).
pub fn build(
    spec: &StreamJobSpec,
    parallelism: Option<u32>,
    max_parallelism: Option<u32>,
) -> Result<Plan, PlanError> {
    build_with(spec, parallelism, max_parallelism, crate::operator::registry())
}

/// Checks a plan handed over by the coordinator against this binary's planner and registry
/// ([`weir_crds::plan::verify`]).
pub fn verify(plan: &Plan) -> Result<(), PlanError> {
    weir_crds::plan::verify(plan, crate::operator::registry())
}
