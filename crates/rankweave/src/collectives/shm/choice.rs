//! Which way a large point-to-point message goes: the split copy or the
//! pipeline, chosen by the receiver from the time recent messages took.
//!
//! Neither way is faster on every host, nor on one host all the time:
//! - The split copy's cost is the kernel's page-by-page copy
//!   (`process_vm_readv`/`writev`). It is about 3.7 memcpys a byte between
//!   plain 4 KiB pages on the machine of `docs/PERFORMANCE.md`, shared by
//!   two cores, and far less between huge pages.
//! - The pipeline's cost is two memcpys a byte, one per core, the second
//!   reading lines the other core just wrote. How fast that is depends on
//!   where the hypervisor runs the two vCPUs: run 18 saw it at memcpy speed
//!   in some starts and 2.4-3.7x slower in others.
//!
//! Run 20 measured the pipeline at half the split copy's time between
//! plain buffers, and the split copy at half the pipeline's between
//! huge-page buffers, on the same host on the same day.
//!
//! So the receiver keeps, per sender and per power-of-two size class, the
//! time per byte of each way (a moving average of the last messages) and
//! takes the cheaper. The first four messages of a class take each way
//! twice, and every [`EXPLORE_EVERY`] messages three in a row take the
//! other way. The first message after a switch (cold caches for its way)
//! does not count. A way whose figure is older than [`STALE_AFTER`]
//! messages gets it afresh: from its next message, then the cheaper of
//! that one and the one after. Otherwise each message moves the average
//! by the cheaper of itself and the way's message before, so that one
//! slow message (a preemption, which only ever makes a copy slower) moves
//! nothing, while two in a row do. So a change of the host's state is seen
//! within that many messages: the way in use gets slower in its average
//! after two slow messages, the other one faster at its next try.
//!
//! Run 21 traced the figures: with the figure set by one message, a
//! single 155 us pipelined 1 MiB message among 40-47 us ones sent the
//! next 30 messages of a ping-pong the split copy's way (50-55 us).

use std::time::Duration;

/// Every this many messages of a size class, two take the way that is not
/// the cheaper one, to keep its figure current.
pub const EXPLORE_EVERY: u64 = 32;
/// Size classes: powers of two from 32 KiB (the eager limit) up; larger
/// messages share the last class.
const CLASSES: usize = 14;
const FIRST_CLASS_LOG2: u32 = 15;
/// The first messages of a class, which take each way twice.
const WARM_UP: u64 = 4;
/// Weight of the newest message in a way's average.
const NEW_WEIGHT: f64 = 0.25;
/// Messages of a class after which a way's figure is set afresh rather
/// than averaged (the host may have changed state since).
const STALE_AFTER: u64 = 8;
/// Messages in a row that an exploration of the other way takes: one
/// that does not count, then two whose cheaper one sets the figure.
const EXPLORE_RUN: u64 = 3;

/// The two ways of a large message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Way {
    /// Split between the two sides by cross-memory attach.
    Split,
    /// Chunks through the channel's data area.
    Pipeline,
}

impl Way {
    fn index(self) -> usize {
        match self {
            Way::Split => 0,
            Way::Pipeline => 1,
        }
    }
    fn other(self) -> Way {
        match self {
            Way::Split => Way::Pipeline,
            Way::Pipeline => Way::Split,
        }
    }
}

/// What one size class has seen from one sender.
#[derive(Debug, Clone, Copy, Default)]
struct Class {
    /// Nanoseconds per byte of each way, `None` before its first message.
    cost: [Option<f64>; 2],
    /// Each way's last counted message (nanoseconds per byte) and when
    /// (`seen` then); `None` before the first.
    prev: [Option<(f64, u64)>; 2],
    /// Whether each way's figure was set afresh by one message only (the
    /// next one may lower it to its own).
    fresh_one: [bool; 2],
    /// Messages of this class so far.
    seen: u64,
    /// The way the last recorded message took, and how many recorded
    /// messages in a row took it.
    last: Option<Way>,
    run: u32,
}

/// The receiver's figures, per sender and size class.
#[derive(Debug, Default)]
pub(super) struct Chooser {
    classes: Vec<[Class; CLASSES]>,
}

fn class_of(len: usize) -> usize {
    let log2 = usize::BITS - 1 - len.max(1).leading_zeros();
    (log2.saturating_sub(FIRST_CLASS_LOG2) as usize).min(CLASSES - 1)
}

impl Chooser {
    /// Figures for `size` senders, none measured.
    pub(super) fn new(size: usize) -> Chooser {
        Chooser { classes: vec![[Class::default(); CLASSES]; size] }
    }

    /// The way message of `len` bytes from `src` should take.
    pub(super) fn choose(&mut self, src: usize, len: usize) -> Way {
        let Some(c) = self.classes.get_mut(src).map(|cs| &mut cs[class_of(len)]) else {
            return Way::Split;
        };
        c.seen += 1;
        if c.seen <= WARM_UP {
            // Each way twice in a row (see `record`).
            return if c.seen <= WARM_UP / 2 { Way::Split } else { Way::Pipeline };
        }
        match c.cost {
            [None, _] => Way::Split,
            [_, None] => Way::Pipeline,
            [Some(split), Some(pipe)] => {
                let cheaper = if pipe < split { Way::Pipeline } else { Way::Split };
                // Three in a row: the second and third give the figure.
                if c.seen % EXPLORE_EVERY < EXPLORE_RUN {
                    cheaper.other()
                } else {
                    cheaper
                }
            }
        }
    }

    /// Nanoseconds per byte of the split copy and the pipeline for
    /// messages like `len` bytes from `src` (for traces).
    pub(super) fn figures(&self, src: usize, len: usize) -> [Option<f64>; 2] {
        self.classes.get(src).map_or([None; 2], |cs| cs[class_of(len)].cost)
    }

    /// Records that a message of `len` bytes from `src` took `way` and
    /// `took` (from the receiver's claim to its last byte).
    pub(super) fn record(&mut self, src: usize, len: usize, way: Way, took: Duration) {
        if len == 0 {
            return;
        }
        let Some(c) = self.classes.get_mut(src).map(|cs| &mut cs[class_of(len)]) else {
            return;
        };
        let per_byte = took.as_nanos() as f64 / len as f64;
        c.run = if c.last == Some(way) { c.run.saturating_add(1) } else { 1 };
        c.last = Some(way);
        let (i, seen) = (way.index(), c.seen);
        // The first message after a switch finds the caches cold for its
        // way (the data area, the other side's pages) and the first of all
        // also maps them: it counts only while the way has no figure.
        if c.run == 1 {
            if c.cost[i].is_none() {
                c.cost[i] = Some(per_byte);
            }
            return;
        }
        let before = c.prev[i].filter(|&(_, at)| seen.saturating_sub(at) <= STALE_AFTER).map(|(p, _)| p);
        c.cost[i] = Some(match (c.cost[i], before) {
            // The second message of a fresh figure: the cheaper of the two.
            (Some(old), Some(_)) if c.fresh_one[i] => {
                c.fresh_one[i] = false;
                old.min(per_byte)
            }
            // The cheaper of this message and the one before moves the
            // average: one slow message alone moves nothing.
            (Some(old), Some(before)) => old + NEW_WEIGHT * (per_byte.min(before) - old),
            // No recent message of this way (another state of the host,
            // perhaps): afresh.
            _ => {
                c.fresh_one[i] = true;
                per_byte
            }
        });
        c.prev[i] = Some((per_byte, seen));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// Runs `n` messages of `len` bytes from sender 0 where the split copy
    /// takes `split` and the pipeline `pipe`; returns how many took each.
    fn run(ch: &mut Chooser, n: usize, len: usize, split: Duration, pipe: Duration) -> [usize; 2] {
        let mut taken = [0; 2];
        for _ in 0..n {
            let way = ch.choose(0, len);
            taken[way.index()] += 1;
            ch.record(0, len, way, if way == Way::Split { split } else { pipe });
        }
        taken
    }

    #[test]
    fn each_way_is_tried_twice_then_the_cheaper_one_is_taken_but_for_the_exploring_messages() {
        let mut ch = Chooser::new(2);
        for way in [Way::Split, Way::Split, Way::Pipeline, Way::Pipeline] {
            assert_eq!(ch.choose(0, MIB), way);
            // The first message of each way is slow (it maps its pages).
            let us = if way == Way::Split { 40 } else { 20 };
            let first = ch.classes[0][class_of(MIB)].cost[way.index()].is_none();
            ch.record(0, MIB, way, Duration::from_micros(if first { 500 } else { us }));
        }
        // Explorations of three at messages 32-34, 64-66, ..., 288-290 and
        // 320: 28 split copies.
        let taken = run(&mut ch, 316, MIB, Duration::from_micros(40), Duration::from_micros(20));
        assert_eq!(taken, [28, 288]);
        // The other way round for another sender and for another size.
        let mut ch = Chooser::new(2);
        let taken = run(&mut ch, 324, 4 * MIB, Duration::from_micros(40), Duration::from_micros(90));
        assert_eq!(taken, [292, 32]);
    }

    #[test]
    fn a_change_of_the_host_moves_the_choice_within_the_exploring_interval() {
        let mut ch = Chooser::new(1);
        run(&mut ch, 100, MIB, Duration::from_micros(45), Duration::from_micros(22));
        // The pipeline becomes slow (the cross-core copy's slow state):
        // the first slow message moves nothing, the next two raise the
        // pipeline's figure above the split copy's, which takes over.
        let taken = run(&mut ch, 64, MIB, Duration::from_micros(45), Duration::from_micros(90));
        assert!(taken[0] >= 52, "{taken:?}");
        // And back: the exploring messages see the pipeline fast again.
        let taken = run(&mut ch, 3 * EXPLORE_EVERY as usize, MIB, Duration::from_micros(45), Duration::from_micros(22));
        assert!(taken[1] >= EXPLORE_EVERY as usize, "{taken:?}");
    }

    #[test]
    fn one_slow_message_does_not_move_the_choice() {
        let (split, pipe, slow) = (Duration::from_micros(50), Duration::from_micros(40), Duration::from_micros(155));
        let mut ch = Chooser::new(1);
        run(&mut ch, 40, MIB, split, pipe);
        // A preemption in the way in use: one message at 155 us.
        assert_eq!(ch.choose(0, MIB), Way::Pipeline);
        ch.record(0, MIB, Way::Pipeline, slow);
        let taken = run(&mut ch, 20, MIB, split, pipe);
        assert_eq!(taken, [0, 20], "the pipeline stays the way");
        // The same at the exploration's end: the pipeline comes back after
        // three split copies, its first (cold) message is not counted, and
        // its second is the slow one.
        let mut ch = Chooser::new(1);
        run(&mut ch, 63, MIB, split, pipe);
        for _ in 0..EXPLORE_RUN {
            let way = ch.choose(0, MIB);
            assert_eq!(way, Way::Split);
            ch.record(0, MIB, way, split);
        }
        for took in [pipe, slow] {
            let way = ch.choose(0, MIB);
            assert_eq!(way, Way::Pipeline);
            ch.record(0, MIB, way, took);
        }
        let taken = run(&mut ch, 25, MIB, split, pipe);
        assert_eq!(taken, [0, 25], "the pipeline stays the way after the exploration");
        // And a slow message in the exploration itself: the cheaper of its
        // two counted messages is the figure.
        let mut ch = Chooser::new(1);
        run(&mut ch, 63, MIB, Duration::from_micros(40), Duration::from_micros(50));
        for took in [Duration::from_micros(40), slow, Duration::from_micros(30)] {
            assert_eq!(ch.choose(0, MIB), Way::Pipeline, "exploring");
            ch.record(0, MIB, Way::Pipeline, took);
        }
        assert_eq!(ch.choose(0, MIB), Way::Pipeline, "30 us beats 40");
    }

    #[test]
    fn senders_and_size_classes_are_kept_apart() {
        assert_eq!(class_of(32 << 10), 0);
        assert_eq!(class_of((64 << 10) - 1), 0);
        assert_eq!(class_of(64 << 10), 1);
        assert_eq!(class_of(MIB), 5);
        assert_eq!(class_of(usize::MAX), CLASSES - 1);
        assert_eq!(class_of(0), 0);
        let mut ch = Chooser::new(2);
        run(&mut ch, 10, MIB, Duration::from_micros(40), Duration::from_micros(20));
        assert_eq!(ch.choose(1, MIB), Way::Split, "sender 1 is unmeasured");
        assert_eq!(ch.choose(0, 4 * MIB), Way::Split, "4 MiB is unmeasured");
        // A sender out of range (never the case) takes the split copy.
        assert_eq!(ch.choose(7, MIB), Way::Split);
        ch.record(7, MIB, Way::Split, Duration::from_micros(1));
    }
}
