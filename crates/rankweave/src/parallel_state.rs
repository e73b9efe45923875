//! parallel_state (to be built).
