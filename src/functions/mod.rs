//! Engine-provided SQL functions whose state outlives one window: the frames that span
//! windows ([`rolling`]) and the anomaly detectors ([`detect`]), with what they share
//! ([`keyed`]). Each use in a query gets its own instance, so its state belongs to that
//! query and survives a hot reload that leaves the query unchanged.

pub mod detect;
pub mod keyed;
pub mod rolling;
