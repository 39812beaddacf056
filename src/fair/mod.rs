//! Who goes first: the priority classes, and the fair queue of the requests waiting for
//! capacity.

mod priority;
mod queue;

pub use self::priority::Priority;
pub(crate) use self::queue::{Arrival, Draws, Queue, Wake, RECHECK};
