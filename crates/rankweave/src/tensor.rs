//! tensor (to be built).
