//! Operating-system specifics behind small safe interfaces.

pub mod shm;
