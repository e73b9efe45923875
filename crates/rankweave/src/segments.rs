//! Shared-memory segments of a job: naming, the job-id rule, listing and
//! cleanup, and the segment type itself, for launchers and tools.
//!
//! Every segment rankweave creates is named `/rankweave-<job>-<purpose>…`
//! in `/dev/shm`, where `<job>` is [`job_id`] (from [`JOB_ID_ENV`], which
//! `rankweave launch` sets). Segments are unlinked as soon as every rank has
//! attached; [`cleanup_job`] removes what a killed job left behind.

pub use crate::sys::shm::{
    check_free_space, check_free_space_at, cleanup_job, cleanup_job_of, creator_pid, free_bytes, is_valid_job_id,
    job_id, job_prefix, list_job, new_job_id, segment_name, ShmSegment, JOB_ID_ENV, SHM_DIR,
};
