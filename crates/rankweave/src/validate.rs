//! Argument checks of every group operation, in one place with one wording:
//! `"{op} in group {name} (rank {r} of {n}): {what is wrong}"`. Backends are
//! only called with arguments that passed these checks.

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The group an operation runs in, for checks and their messages.
#[derive(Clone, Copy)]
pub(crate) struct Check<'a> {
    pub op: &'static str,
    pub group: &'a str,
    pub rank: usize,
    pub size: usize,
}

impl Check<'_> {
    fn err(&self, what: std::fmt::Arguments<'_>) -> Error {
        Error::invalid(format!("{} in group {} (rank {} of {}): {what}", self.op, self.group, self.rank, self.size))
    }

    /// `len` bytes are whole elements of `dtype`.
    pub fn elems(&self, len: usize, dtype: DType) -> Result<()> {
        if len % dtype.size() != 0 {
            return Err(self.err(format_args!(
                "a buffer of {len} bytes is not a whole number of {dtype} elements ({} bytes each)",
                dtype.size()
            )));
        }
        Ok(())
    }

    /// `root` is a rank of the group.
    pub fn root(&self, root: usize) -> Result<()> {
        if root >= self.size {
            return Err(self.err(format_args!("root {root} is not a rank of the group")));
        }
        Ok(())
    }

    /// `peer` is another rank of the group.
    pub fn peer(&self, peer: usize) -> Result<()> {
        if peer >= self.size || peer == self.rank {
            return Err(self.err(format_args!("peer {peer} is not another rank of the group")));
        }
        Ok(())
    }

    /// `what` has `expected` bytes.
    pub fn len(&self, what: &str, expected: usize, actual: usize) -> Result<()> {
        if expected != actual {
            return Err(self.err(format_args!("{what} must be {expected} bytes, got {actual}")));
        }
        Ok(())
    }

    /// A buffer (`what`) passed on the root only: `Some` there with
    /// `expected` bytes, `None` elsewhere.
    pub fn root_buffer(&self, what: &str, root: usize, given: Option<usize>, expected: usize) -> Result<()> {
        self.root(root)?;
        match (given, self.rank == root) {
            (Some(len), true) => self.len(&format!("root's {what}"), expected, len),
            (None, true) => Err(self.err(format_args!("root {root} must pass an {what} buffer"))),
            (Some(_), false) => Err(self.err(format_args!("only root {root} passes an {what} buffer"))),
            (None, false) => Ok(()),
        }
    }

    /// `len` bytes split into one equal block per rank, each of whole
    /// `dtype` elements when given.
    pub fn blocks(&self, len: usize, dtype: Option<DType>) -> Result<()> {
        let unit = self.size * dtype.map_or(1, DType::size);
        if len % unit != 0 {
            let of = dtype.map_or(String::new(), |d| format!(" of whole {d} elements"));
            return Err(self.err(format_args!("{len} bytes do not split into {} equal blocks{of}", self.size)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_names_the_operation_group_and_rank() {
        let c = Check { op: "gather", group: "tp:0", rank: 1, size: 2 };
        let errs = [
            c.elems(3, DType::F32).unwrap_err(),
            c.root(2).unwrap_err(),
            c.peer(1).unwrap_err(),
            c.len("output", 8, 4).unwrap_err(),
            c.root_buffer("output", 0, Some(8), 8).unwrap_err(),
            c.root_buffer("output", 1, None, 8).unwrap_err(),
            c.blocks(3, None).unwrap_err(),
        ];
        for e in errs {
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            assert!(e.to_string().contains("gather in group tp:0 (rank 1 of 2)"), "{e}");
        }
        assert!(c.root_buffer("output", 0, None, 8).is_ok());
        assert!(c.root_buffer("output", 1, Some(8), 8).is_ok());
        assert!(c.blocks(8, Some(DType::F32)).is_ok());
        assert!(c.blocks(4, Some(DType::F32)).is_err());
    }
}
