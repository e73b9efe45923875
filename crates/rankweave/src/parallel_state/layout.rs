//! The model-parallel layout as a pure function of the sizes.
//!
//! Ranks are laid out DP x PP x TP (as later vLLM versions build it, with
//! the data-parallel dimension outermost): global rank
//! `r = (dp_index * pp + pp_index) * tp + tp_index`. With `dp = 1` this is
//! exactly the seed's layout: tensor-parallel groups are contiguous blocks
//! (`[0, 1], [2, 3], ...`) and pipeline groups are strided
//! (`range(i, world, world / pp)`).

use crate::error::{Error, Result};

/// One rank's position in the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankPosition {
    /// The global rank.
    pub rank: usize,
    /// Index along the data-parallel dimension (= rank in its DP group).
    pub dp: usize,
    /// Index along the pipeline dimension (= rank in its PP group).
    pub pp: usize,
    /// Index along the tensor-parallel dimension (= rank in its TP group).
    pub tp: usize,
    /// Which TP group (index into [`Layout::tp_groups`]).
    pub tp_group: usize,
    /// Which PP group (index into [`Layout::pp_groups`]).
    pub pp_group: usize,
    /// Which DP group (index into [`Layout::dp_groups`]).
    pub dp_group: usize,
}

/// Every group of a model-parallel configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Number of ranks.
    pub world_size: usize,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Pipeline-parallel size.
    pub pp: usize,
    /// Data-parallel size.
    pub dp: usize,
    /// Tensor-parallel groups, in creation order.
    pub tp_groups: Vec<Vec<usize>>,
    /// Pipeline-parallel groups, in creation order.
    pub pp_groups: Vec<Vec<usize>>,
    /// Data-parallel groups, in creation order.
    pub dp_groups: Vec<Vec<usize>>,
    /// Position of every global rank, indexed by rank.
    pub positions: Vec<RankPosition>,
}

/// Computes the layout for `world` ranks with the given sizes.
///
/// `world` must equal `tp * pp * dp`; the error names the numbers, as the
/// seed's does.
///
/// ```
/// use rankweave::parallel_state::model_parallel_layout;
/// let l = model_parallel_layout(8, 2, 4, 1)?;
/// assert_eq!(l.tp_groups, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
/// assert_eq!(l.pp_groups, vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
/// println!("{l}");
/// # Ok::<(), rankweave::Error>(())
/// ```
pub fn model_parallel_layout(world: usize, tp: usize, pp: usize, dp: usize) -> Result<Layout> {
    if tp == 0 || pp == 0 || dp == 0 {
        return Err(Error::invalid(format!(
            "parallel sizes must be at least 1: tensor_model_parallel_size ({tp}), \
             pipeline_model_parallel_size ({pp}), data_parallel_size ({dp})"
        )));
    }
    if tp.checked_mul(pp).and_then(|x| x.checked_mul(dp)) != Some(world) {
        return Err(Error::invalid(if dp == 1 {
            format!(
                "world_size ({world}) is not equal to tensor_model_parallel_size ({tp}) x \
                 pipeline_model_parallel_size ({pp})"
            )
        } else {
            format!(
                "world_size ({world}) is not equal to tensor_model_parallel_size ({tp}) x \
                 pipeline_model_parallel_size ({pp}) x data_parallel_size ({dp})"
            )
        }));
    }
    let rank_of = |d: usize, p: usize, t: usize| (d * pp + p) * tp + t;
    let mut tp_groups = Vec::with_capacity(dp * pp);
    for d in 0..dp {
        for p in 0..pp {
            tp_groups.push((0..tp).map(|t| rank_of(d, p, t)).collect());
        }
    }
    let mut pp_groups = Vec::with_capacity(dp * tp);
    for d in 0..dp {
        for t in 0..tp {
            pp_groups.push((0..pp).map(|p| rank_of(d, p, t)).collect());
        }
    }
    let mut dp_groups = Vec::with_capacity(pp * tp);
    for t in 0..tp {
        for p in 0..pp {
            dp_groups.push((0..dp).map(|d| rank_of(d, p, t)).collect());
        }
    }
    let positions = (0..world)
        .map(|rank| {
            let t = rank % tp;
            let p = (rank / tp) % pp;
            let d = rank / (tp * pp);
            RankPosition { rank, dp: d, pp: p, tp: t, tp_group: d * pp + p, pp_group: d * tp + t, dp_group: t * pp + p }
        })
        .collect();
    Ok(Layout { world_size: world, tp, pp, dp, tp_groups, pp_groups, dp_groups, positions })
}

impl Layout {
    /// The TP group of `rank`.
    pub fn tp_group_of(&self, rank: usize) -> Option<&[usize]> {
        self.positions.get(rank).map(|p| self.tp_groups[p.tp_group].as_slice())
    }
    /// The PP group of `rank`.
    pub fn pp_group_of(&self, rank: usize) -> Option<&[usize]> {
        self.positions.get(rank).map(|p| self.pp_groups[p.pp_group].as_slice())
    }
    /// The DP group of `rank`.
    pub fn dp_group_of(&self, rank: usize) -> Option<&[usize]> {
        self.positions.get(rank).map(|p| self.dp_groups[p.dp_group].as_slice())
    }
}

fn list(ranks: &[usize]) -> String {
    let v: Vec<String> = ranks.iter().map(usize::to_string).collect();
    format!("[{}]", v.join(", "))
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "world_size {} = data parallel {} x pipeline parallel {} x tensor parallel {}",
            self.world_size, self.dp, self.pp, self.tp
        )?;
        // Group numbers are creation order (indices into the lists), not the
        // coordinators' unique names: every rank's own TP group is `tp:0`.
        for (title, groups, size) in [
            ("tensor parallel", &self.tp_groups, self.tp),
            ("pipeline parallel", &self.pp_groups, self.pp),
            ("data parallel", &self.dp_groups, self.dp),
        ] {
            writeln!(f)?;
            writeln!(f, "{title} groups ({} of size {size}):", groups.len())?;
            for (i, g) in groups.iter().enumerate() {
                writeln!(f, "  group {i:<3} {}", list(g))?;
            }
        }
        writeln!(f)?;
        writeln!(f, "each rank's position in its groups, and which groups (numbers above) it belongs to:")?;
        writeln!(
            f,
            "{:>6} {:>4} {:>4} {:>4}  {:>8} {:>8} {:>8}",
            "rank", "dp", "pp", "tp", "tp group", "pp group", "dp group"
        )?;
        for p in &self.positions {
            writeln!(
                f,
                "{:>6} {:>4} {:>4} {:>4}  {:>8} {:>8} {:>8}",
                p.rank, p.dp, p.pp, p.tp, p.tp_group, p.pp_group, p.dp_group
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_layout_8_ranks_tp2_pp4() {
        let l = model_parallel_layout(8, 2, 4, 1).unwrap();
        assert_eq!(l.tp_groups, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(l.pp_groups, vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
        assert_eq!(l.dp_groups.len(), 8);
        assert!(l.dp_groups.iter().all(|g| g.len() == 1));
        assert_eq!(
            l.positions[5],
            RankPosition { rank: 5, dp: 0, pp: 2, tp: 1, tp_group: 2, pp_group: 1, dp_group: 6 }
        );
        assert_eq!(l.tp_group_of(5).unwrap(), &[4, 5]);
        assert_eq!(l.pp_group_of(5).unwrap(), &[1, 3, 5, 7]);
        assert_eq!(l.dp_group_of(5).unwrap(), &[5]);
    }

    #[test]
    fn dp_layout() {
        let l = model_parallel_layout(8, 2, 2, 2).unwrap();
        assert_eq!(l.tp_groups, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(l.pp_groups, vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
        assert_eq!(l.dp_groups, vec![vec![0, 4], vec![2, 6], vec![1, 5], vec![3, 7]]);
        for p in &l.positions {
            assert_eq!(l.tp_groups[p.tp_group][p.tp], p.rank);
            assert_eq!(l.pp_groups[p.pp_group][p.pp], p.rank);
            assert_eq!(l.dp_groups[p.dp_group][p.dp], p.rank);
        }
        let l = model_parallel_layout(4, 1, 1, 4).unwrap();
        assert_eq!(l.dp_groups, vec![vec![0, 1, 2, 3]]);
        assert_eq!(l.tp_groups.len(), 4);
    }

    #[test]
    fn errors_name_the_numbers() {
        let e = model_parallel_layout(8, 2, 3, 1).unwrap_err().to_string();
        assert!(
            e.contains(
                "world_size (8) is not equal to tensor_model_parallel_size (2) x pipeline_model_parallel_size (3)"
            ),
            "{e}"
        );
        let e = model_parallel_layout(8, 2, 2, 3).unwrap_err().to_string();
        assert!(e.contains("data_parallel_size (3)"), "{e}");
        assert!(model_parallel_layout(0, 0, 1, 1).is_err());
        assert!(model_parallel_layout(usize::MAX, usize::MAX, 2, 1).is_err());
    }

    #[test]
    fn display_is_a_table() {
        let s = model_parallel_layout(8, 2, 4, 1).unwrap().to_string();
        assert!(s.starts_with("world_size 8 = data parallel 1 x pipeline parallel 4 x tensor parallel 2"));
        assert!(s.contains("tensor parallel groups (4 of size 2):\n  group 0   [0, 1]\n"), "{s}");
        assert!(
            s.contains("  group 3   [6, 7]\n\npipeline parallel groups (2 of size 4):\n  group 0   [0, 2, 4, 6]\n"),
            "{s}"
        );
        assert!(s.contains("\n     5    0    2    1         2        1        6\n"), "{s}");
    }
}
