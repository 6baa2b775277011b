//! The plan: built from the spec by `weir_crds::plan`, which the controller uses too, so that
//! both refuse the same pipelines with the same words.

pub use weir_crds::plan::*;
