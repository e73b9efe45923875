//! coordinator (to be built).
