//! message_queue (to be built).
